"""Shared parts of the side-by-side benchmarks (``bench_monai.py``, ``bench_flops.py``).

Why one module: both scripts must time *exactly* the same work, built from the same matched
configurations, so that the MONAI ratios and the FLOP/s figures describe the same training steps.

- :func:`machine_info`: what the numbers were measured on (CPU, threads, versions, load average);
- :func:`time_interleaved`: repeats in the order A B A B ..., so background load hits every
  candidate alike; callers report medians;
- :func:`peak_memory_mb`: one configuration in a fresh spawned process: peak RSS above the
  post-import baseline on CPU, ``torch.cuda.max_memory_allocated`` on CUDA;
- :func:`build`: the workloads. ``vqgan/*``: generator + discriminator train step (same GAN step
  code for both sides); ``unet/*``: diffusion U-Net train step (same v-prediction step code);
  ``sample/*``: DDIM sampling + decoding of a batch of volumes, no classifier-free guidance.
  MONAI's models are sized from ours (same widths, resolution levels and batch; free knobs searched
  for the closest parameter count), see :func:`monai_vqvae_kwargs` and :func:`monai_disc_channels`;
  ``vqgan/monai_ourwidths`` is a second matched MONAI VQ-GAN whose residual layers keep our widths.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import platform
import queue
import resource
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from synthmri.config import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Tiny sizes for smoke runs (tests/test_benchmarks.py): same code paths, seconds instead of minutes.
QUICK_OVERRIDES = [
    "normalize.shape=[16,16,16]",
    "vqgan.model.channels=[8,8,16]",
    "vqgan.model.downsample_factor=4",
    "vqgan.quantizer.codebook_size=32",
    "vqgan.discriminator.channels=16",
    "vqgan.discriminator.layers=2",
    "vqgan.train.batch_size=1",
    "diffusion.unet.channels=[16,32]",
    "diffusion.train.batch_size=2",
]
VARIANTS = ("eager", "channels_last", "compile")


# -- machine and timing ------------------------------------------------------------------------------


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


# Both sides time the DDPM v-prediction path: MONAI's DDIMScheduler has no rectified flow, and a U-Net step or a
# sampler step costs the same whatever the network is trained to predict.
MATCHED_SCHEDULE = ["diffusion.schedule.prediction=v_prediction"]


def load_bench_params(
    path: str | Path = ROOT / "params.yaml", quick: bool = False, overrides: list[str] | None = None
) -> Params:
    return load_params(path, [*MATCHED_SCHEDULE, *(QUICK_OVERRIDES if quick else []), *(overrides or [])])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_stamp() -> dict:
    """Where and when a benchmark row was measured: intra-op threads, CPU model, torch version, date."""
    return {
        "threads": torch.get_num_threads(),
        "machine": cpu_model(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def add_run_args(parser, out: Path) -> None:
    """The options every curve/baseline benchmark shares: params file and overrides, threads, output table."""
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("-S", dest="overrides", action="append", default=[])


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average": list(os.getloadavg()),
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        info["monai"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class CpuMonitor:
    """CPU time that OTHER processes used since creation, in cores: the machine's busy time (/proc/stat)
    minus this process's and its finished children's. A direct measure of contention; load averages
    lag by minutes and count our own threads too. ``None`` where /proc/stat does not exist."""

    def __init__(self) -> None:
        self.start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
        own = sum(
            getattr(resource.getrusage(who), f)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for f in ("ru_utime", "ru_stime")
        )
        return busy, own, time.monotonic()

    def others_cores(self) -> float | None:
        end = self._snapshot()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        others = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return round(max(0.0, others) / (end[2] - self.start[2]), 2)


CONTENDED_CORES = 0.25  # other processes' mean CPU use above which a measurement counts as contended


def contended(other_cores: float | None) -> bool | None:
    """Contended: other processes used more than ``CONTENDED_CORES`` on average while we measured."""
    return None if other_cores is None else other_cores > CONTENDED_CORES


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    device: torch.device,
    record: dict | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate: ``warmup`` untimed calls each, then ``repeats`` rounds of
    one call per candidate in turn (A B A B ...), so drifting background load hits all alike.

    A round during which other processes used more than ``CONTENDED_CORES`` is discarded and run
    again, at most ``repeats`` times in all: on a shared 2-core machine a second busy process makes
    2-thread steps several times slower (OpenMP threads wait for each other at every barrier), which
    no median of a few rounds survives. ``record`` (if given) receives the counts and the other
    processes' mean cores over the kept rounds."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    kept, discarded, others = 0, 0, []
    while kept < repeats:
        monitor = CpuMonitor()
        round_times = {}
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            sync(device)
            round_times[name] = time.perf_counter() - start
        busy = monitor.others_cores()
        if busy is not None and busy > CONTENDED_CORES and discarded < repeats:
            discarded += 1
            continue
        kept += 1
        others.append(busy or 0.0)
        for name, seconds in round_times.items():
            times[name].append(seconds)
    if record is not None:
        record.update(
            rounds=kept,
            rounds_discarded=discarded,
            other_processes_cores=round(sum(others) / len(others), 2) if others else None,
        )
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_seconds_per_step(
    step: Callable[[], object], steps: int = 20, warmup: int = 3, clock: Callable[[], float] = time.process_time
) -> float:
    """Median process CPU seconds of one ``step()`` after ``warmup`` untimed calls.

    The curve benchmarks size a run's schedule from this probe. A mean over 5 steps after one warm-up moved by 15 %
    between two launches of the same recipe (a neighbour run warming up beside it), so repeats of a recipe trained
    different step counts; the median of 20 ignores a few slow steps.
    """
    for _ in range(warmup):
        step()
    per_step = []
    for _ in range(steps):
        began = clock()
        step()
        per_step.append(clock() - began)
    return statistics.median(per_step)


def top_ops(fn: Callable[[], object], device: torch.device, steps: int = 2, k: int = 12) -> list[dict]:
    """The ``k`` operators with the most self CPU time over ``steps`` calls of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # not the first call: no lazy initialisation in the profile
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "self_cpu_ms_per_call": round(e.self_cpu_time_total / 1e3 / steps, 2),
            "self_cpu_pct": round(100 * e.self_cpu_time_total / total, 1),
            "calls_per_step": e.count // steps,
        }
        for e in events[:k]
    ]


# -- the workloads -----------------------------------------------------------------------------------


CONDITIONING_MODULES = ("covariate_encoder",)  # counted, but not matched against MONAI's unconditional U-Net


@dataclass
class Workload:
    """One unit of benchmarked work: ``run()`` does one training step (or samples one batch);
    ``items`` = volumes (or latents) it processes; ``modules`` = the trained / sampled networks."""

    name: str
    run: Callable[[], object]
    items: int
    modules: dict[str, nn.Module]
    notes: dict = field(default_factory=dict)

    @property
    def params(self) -> dict[str, int]:
        return {k: sum(p.numel() for p in m.parameters()) for k, m in self.modules.items()}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _latent_shape(params: Params) -> tuple[int, ...]:
    factor = 2 ** (len(params.vqgan.model.channels) - 1)
    return (params.vqgan.model.latent_channels, *(s // factor for s in params.normalize.shape))


def _our_vqgan(params: Params):
    from synthmri.models.discriminator import PatchDiscriminator
    from synthmri.models.vqgan import VQGAN

    cfg = params.vqgan
    return VQGAN.from_params(cfg.model, cfg.quantizer), PatchDiscriminator.from_params(cfg.discriminator)


def monai_vqvae_kwargs(params: Params, our_widths: bool = False) -> dict:
    """MONAI ``VQVAE`` with our widths per level and our downsampling factor: the first level stays at
    full resolution (stride-1 3x3 conv, as our first level), each further level halves the size with
    MONAI's stride-2 4x4 conv. ``num_res_layers`` / ``num_res_channels`` (free in MONAI) are picked
    for the parameter count closest to our generator's; with ``our_widths`` the residual layers keep our
    widths too (only their number is searched). Why both: the closest count has residual widths
    0.75x ours (12/24/48 by default), which oneDNN runs far less efficiently than multiples of 16 in
    the contiguous layout, so the closest count alone would flatter our model."""
    from monai.networks.nets import VQVAE

    m, q = params.vqgan.model, params.vqgan.quantizer
    channels = tuple(m.channels)
    n = len(channels)
    base = dict(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=channels,
        downsample_parameters=((1, 3, 1, 1),) + ((2, 4, 1, 1),) * (n - 1),
        upsample_parameters=((2, 4, 1, 1, 0),) * (n - 1) + ((1, 3, 1, 1, 0),),
        num_embeddings=q.codebook_size,
        embedding_dim=m.latent_channels,
        commitment_cost=q.commitment_weight,
        decay=q.ema_decay,
    )
    target = count(_our_vqgan(params)[0])
    best = None
    for layers in (1, 2, 3, 4):
        for frac in (1.0,) if our_widths else (0.25, 0.5, 0.75, 1.0, 1.25, 1.5):
            kwargs = {
                **base,
                "num_res_layers": layers,
                "num_res_channels": tuple(max(1, round(c * frac)) for c in channels),
            }
            gap = abs(count(VQVAE(**kwargs)) - target)
            if best is None or gap < best[0]:
                best = (gap, kwargs)
    return best[1]


def monai_disc_channels(params: Params) -> int:
    """First-layer width of MONAI's ``PatchDiscriminator`` (4x4 kernels throughout, so wider per channel
    than ours with its 3x3 tail) giving the parameter count closest to our discriminator's."""
    from monai.networks.nets import PatchDiscriminator

    d = params.vqgan.discriminator
    target = count(_our_vqgan(params)[1])
    widths = range(4, 4 * d.channels + 1, 4)  # deeper layers (2x, 4x, ...) divisible by the 8 GroupNorm groups
    return min(
        widths,
        key=lambda c: abs(
            count(PatchDiscriminator(3, c, 1, num_layers_d=d.layers, norm=("GROUP", {"num_groups": 8}))) - target
        ),
    )


def _monai_vqgan(params: Params, our_widths: bool = False):
    from monai.networks.nets import VQVAE, PatchDiscriminator

    d = params.vqgan.discriminator
    disc = PatchDiscriminator(
        3, monai_disc_channels(params), 1, num_layers_d=d.layers, norm=("GROUP", {"num_groups": 8})
    )
    return VQVAE(**monai_vqvae_kwargs(params, our_widths)), disc


def _our_ldm(params: Params):
    from synthmri.models.loading import build_ldm

    return build_ldm(params.diffusion.unet, params.covariates, params.vqgan.model.latent_channels)


def _monai_unet(params: Params):
    from monai.networks.nets import DiffusionModelUNet

    u = params.diffusion.unet
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=params.vqgan.model.latent_channels,
        out_channels=params.vqgan.model.latent_channels,
        num_res_blocks=u.num_res_blocks,
        channels=tuple(u.channels),
        attention_levels=tuple(u.attention),
        norm_num_groups=u.norm_groups,
        num_head_channels=[c // u.num_heads for c in u.channels],
        use_flash_attention=True,
    )  # = F.scaled_dot_product_attention, as ours


def _covariate_rows(params: Params, n: int) -> list[dict]:
    """Plausible covariate values (middle of each range / first level) for our conditioned U-Net."""
    row = {c.name: (sum(c.range) / 2 if c.kind == "continuous" else c.levels[0]) for c in params.covariates}
    return [row] * n


def _prepare(modules: dict[str, nn.Module], device: torch.device, variant: str) -> dict[str, Callable]:
    """Move modules to ``device`` (channels-last-3d if asked); return what the step calls (compiled if asked)."""
    callables = {}
    for name, module in modules.items():
        module.to(device)
        if variant == "channels_last":
            module.to(memory_format=torch.channels_last_3d)
        callables[name] = torch.compile(module) if variant == "compile" else module
    return callables


def _input(x: torch.Tensor, variant: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d) if variant == "channels_last" else x


def _gan_step(
    generate: Callable, discriminate: Callable, gen: nn.Module, disc: nn.Module, x: torch.Tensor, params: Params
) -> Callable[[], None]:
    """The VQ-GAN step used for BOTH sides: generator loss = L1 + quantizer (commitment) loss + a fixed
    ``loss.adversarial`` x hinge generator loss; then a hinge discriminator step on real vs detached
    reconstructions. AdamW with our betas / weight decay, gradient clipping as in training. Left out on
    both sides: LPIPS, feature matching and the adaptive GAN weight (MONAI has no equivalents built in)."""
    from synthmri.losses.adversarial import hinge_d_loss, hinge_g_loss

    t, w = params.vqgan.train, params.vqgan.loss.adversarial
    opt_g = torch.optim.AdamW(gen.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=t.lr_discriminator, betas=t.betas, weight_decay=t.weight_decay)

    def step() -> None:
        recon, vq_loss = generate(x)
        loss = (recon - x).abs().mean() + vq_loss + w * hinge_g_loss(discriminate(recon))
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), t.grad_clip)
        opt_g.step()
        d_loss = hinge_d_loss(discriminate(x), discriminate(recon.detach()))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(disc.parameters(), t.grad_clip)
        opt_d.step()

    return step


def _diffusion_step(
    predict: Callable, model: nn.Module, params: Params, device: torch.device, variant: str
) -> Callable[[], None]:
    """The diffusion step used for BOTH sides: random timesteps, our training schedule's noising and
    target (v or eps), MSE, AdamW, gradient clipping (our training loop minus the EMA update)."""
    from synthmri.diffusion.schedulers import add_noise, make_training_scheduler, training_target

    t = params.diffusion.train
    scheduler = make_training_scheduler(params.diffusion.schedule)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    x0 = torch.randn(t.batch_size, *_latent_shape(params), device=device)

    def step() -> None:
        noise = torch.randn_like(x0)
        steps = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=device)
        loss = F.mse_loss(
            predict(_input(add_noise(scheduler, x0, noise, steps), variant), steps),
            training_target(scheduler, x0, noise, steps),
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()

    return step


def build(
    name: str,
    params: Params,
    device: torch.device,
    variant: str = "eager",
    sample_volumes: int = 2,
    ddim_steps: int = 50,
) -> Workload:
    """The workload ``name`` (``vqgan/ours``, ``vqgan/monai``, ``vqgan/monai_ourwidths``, ``unet/ours``,
    ``unet/monai``, ``sample/ours``, ``sample/ours_invariant``, ``sample/monai``) with fixed initial weights
    (seed 0)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    torch.manual_seed(0)
    kind, side = name.split("/")
    if kind == "vqgan":
        gen, disc = _our_vqgan(params) if side == "ours" else _monai_vqgan(params, side == "monai_ourwidths")
        g, d = _prepare({"generator": gen, "discriminator": disc}, device, variant).values()
        x = _input(
            torch.rand(params.vqgan.train.batch_size, 1, *params.normalize.shape, device=device) * 2 - 1, variant
        )
        if side == "ours":
            generate, discriminate = (lambda v: g(v)[:2]), (lambda v: d(v)[0])
        else:  # MONAI: VQVAE returns (reconstruction, quantization loss); PatchDiscriminator a list, logits last
            generate, discriminate = g, (lambda v: d(v)[-1])
        return Workload(
            name,
            _gan_step(generate, discriminate, gen, disc, x, params),
            x.shape[0],
            {"generator": gen, "discriminator": disc},
        )
    if kind == "unet":
        if side == "ours":
            ldm = _our_ldm(params)
            (model,) = _prepare({"unet": ldm}, device, variant).values()
            covariates = ldm.encoder.encode_values(_covariate_rows(params, params.diffusion.train.batch_size))
            covariates = covariates.to(device)
            predict, module = (lambda x, t: model(x, t, covariates)), ldm
        else:
            module = _monai_unet(params)
            (model,) = _prepare({"unet": module}, device, variant).values()
            predict = lambda x, t: model(x, timesteps=t)  # noqa: E731
        # ours: the denoiser and the covariate encoder (MONAI's U-Net is unconditional, so it has no encoder and
        # sizes are matched on the denoiser: CONDITIONING_MODULES are left out of params_ratio)
        counted = {"unet": module.unet, "covariate_encoder": module.encoder} if side == "ours" else {"unet": module}
        return Workload(
            name,
            _diffusion_step(predict, module, params, device, variant),
            params.diffusion.train.batch_size,
            counted,
        )
    if kind == "sample":
        return _sampling(side, params, device, variant, sample_volumes, ddim_steps)
    raise ValueError(f"unknown workload {name!r}")


def _sampling(side: str, params: Params, device: torch.device, variant: str, volumes: int, steps: int) -> Workload:
    """DDIM (deterministic, ``steps`` steps) from noise to decoded volumes, a batch of ``volumes``, no
    guidance. Ours: ``sample_latents`` (batched chain, or ``ours_invariant``: one chain per volume, the
    sample stage's default) + ``VQGAN.decode(quantize=True)``; MONAI: ``LatentDiffusionInferer.sample``
    (its VQVAE's ``decode_stage_2_outputs`` also quantizes first)."""
    if variant == "compile":
        raise ValueError("sampling is not benchmarked under torch.compile (a compile per step count and batch)")
    shape = _latent_shape(params)
    sched = params.diffusion.schedule
    if side in ("ours", "ours_invariant"):
        from synthmri.diffusion.sampling import sample_latents
        from synthmri.diffusion.schedulers import make_sampler

        ldm, (vqgan, _) = _our_ldm(params).eval(), _our_vqgan(params)
        vqgan.eval()
        _prepare({"unet": ldm, "vqgan": vqgan}, device, variant)
        sampler = make_sampler("ddim", sched)
        rows = _covariate_rows(params, volumes)

        @torch.inference_mode()
        def run() -> torch.Tensor:
            z = sample_latents(
                ldm.unet,
                ldm.encoder,
                sampler,
                rows,
                shape,
                steps,
                guidance_scale=1.0,
                seeds=list(range(volumes)),
                device=device,
                micro_batch=1 if side == "ours_invariant" else volumes,
            )
            return vqgan.decode(_input(z, variant), quantize=True)

        return Workload(f"sample/{side}", run, volumes, {"unet": ldm, "vqgan": vqgan})
    from monai.inferers import LatentDiffusionInferer
    from monai.networks.schedulers import DDIMScheduler

    unet, (vqvae, _) = _monai_unet(params).eval(), _monai_vqgan(params)
    vqvae.eval()
    _prepare({"unet": unet, "vqvae": vqvae}, device, variant)
    scheduler = DDIMScheduler(
        num_train_timesteps=sched.num_train_timesteps,
        schedule={"linear": "linear_beta", "cosine": "cosine"}[sched.beta_schedule],
        beta_start=sched.beta_start,
        beta_end=sched.beta_end,
        clip_sample=False,
        prediction_type=sched.prediction,
    )
    scheduler.set_timesteps(num_inference_steps=steps)
    inferer = LatentDiffusionInferer(scheduler, scale_factor=1.0)
    generator = torch.Generator().manual_seed(0)

    @torch.inference_mode()
    def run() -> torch.Tensor:
        noise = _input(torch.randn(volumes, *shape, generator=generator).to(device), variant)
        return inferer.sample(noise, autoencoder_model=vqvae, diffusion_model=unet, scheduler=scheduler, verbose=False)

    return Workload("sample/monai", run, volumes, {"unet": unet, "vqvae": vqvae})


# -- fresh-process measurements ----------------------------------------------------------------------


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_memory_now_mb(device: torch.device) -> float:
    """Peak memory of this process so far: max allocated on CUDA; on CPU the peak RSS of this process
    image (Linux ``VmHWM``; ``ru_maxrss`` elsewhere, which on Linux would also count the RSS of the parent
    at the time a spawned child was forked, hence not used there)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _proc_status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> float:
    """Reset the peak-RSS mark to the current RSS where Linux allows it (``clear_refs`` 5); the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    current = _proc_status_mb("VmRSS")
    return current if current is not None else peak_memory_now_mb(torch.device("cpu"))


def _import_models() -> None:
    """Import every module a workload may need, so that import-time memory is not counted as the model's."""
    import importlib

    for module in (
        "synthmri.models.vqgan",
        "synthmri.models.discriminator",
        "synthmri.models.loading",
        "synthmri.diffusion.sampling",
        "synthmri.diffusion.schedulers",
        "synthmri.losses.adversarial",
        "monai.networks.nets",
        "monai.inferers",
        "monai.networks.schedulers",
    ):
        try:
            importlib.import_module(module)
        except ImportError:  # MONAI not installed: only our workloads can run
            pass


def _memory_child(
    queue, name: str, params: Params, device: str, variant: str, calls: int, kwargs: dict, threads: int
) -> None:
    try:
        torch.set_num_threads(threads)
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        _import_models()
        baseline = 0.0 if dev.type == "cuda" else _reset_peak_rss()  # after the imports
        work = build(name, params, dev, variant, **kwargs)
        for _ in range(calls):
            work.run()
        sync(dev)
        queue.put({"peak_memory_MB": round(peak_memory_now_mb(dev) - baseline, 1)})
    except Exception:  # reported, never raised: one failing child must not lose the other results
        queue.put({"error": traceback.format_exc(limit=3)})


def _compile_child(queue, name: str, params: Params, device: str, repeats: int, kwargs: dict, threads: int) -> None:
    """Eager vs ``torch.compile`` of the same workload, interleaved in one process. The inductor cache is a
    fresh folder, so the first call's time is a cold compile, as on a new machine."""
    cache = tempfile.mkdtemp(prefix="bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        torch.set_num_threads(threads)
        torch._logging.set_logs(dynamo=logging.ERROR, inductor=logging.ERROR)  # graph-break warnings: noted in RESULTS
        dev = torch.device(device)
        eager, compiled = build(name, params, dev, "eager", **kwargs), build(name, params, dev, "compile", **kwargs)
        start = time.perf_counter()
        compiled.run()
        sync(dev)
        first = time.perf_counter() - start
        record: dict = {}
        times = time_interleaved({"eager": eager.run, "compile": compiled.run}, repeats, 1, dev, record)
        queue.put(
            {
                "compile_first_call_s": round(first, 1),
                "other_processes_cores": record["other_processes_cores"],
                "rounds_discarded": record["rounds_discarded"],
                "eager_s": round(median(times["eager"]), 4),
                "compile_s": round(median(times["compile"]), 4),
                "eager_min_s": round(min(times["eager"]), 4),
                "compile_min_s": round(min(times["compile"]), 4),
            }
        )
    except Exception:
        queue.put({"error": traceback.format_exc(limit=3)})
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run_in_child(target: Callable, args: tuple, timeout: float) -> dict:
    """Run ``target(queue, *args)`` in a fresh spawned interpreter; its result, or why there is none."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=target, args=(results, *args), daemon=True)
    proc.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                return results.get(timeout=1.0)
            except queue.Empty:
                if not proc.is_alive():
                    try:  # a result put just before exiting
                        return results.get(timeout=1.0)
                    except queue.Empty:
                        return {"error": f"child process exited with code {proc.exitcode} and no result"}
                if time.monotonic() > deadline:
                    return {"error": f"no result within {timeout:.0f} s (stopped)"}
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def peak_memory_mb(
    name: str,
    params: Params,
    device: torch.device,
    variant: str = "eager",
    calls: int = 2,
    timeout: float = 600,
    **kwargs,
) -> dict:
    return run_in_child(
        _memory_child, (name, params, str(device), variant, calls, kwargs, torch.get_num_threads()), timeout
    )


def compile_speedup(name: str, params: Params, device: torch.device, repeats: int, timeout: float, **kwargs) -> dict:
    return run_in_child(_compile_child, (name, params, str(device), repeats, kwargs, torch.get_num_threads()), timeout)


def write_result(result: dict, out: Path, table: str) -> None:
    """Write a benchmark's JSON (the record RESULTS.md cites) and print its markdown tables."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    print(f"\nwritten: {out}")
