"""Planned vs measured peak memory of a real training step (checks ``synthmri plan-memory``).

Runs each configuration in a fresh child process: two real optimizer steps (forward, backward, AdamW)
of the VQ-GAN generator + discriminator or of the diffusion U-Net (+ EMA copy), and compares the peak
with the planner's estimate. On CUDA the peak is ``torch.cuda.max_memory_allocated``; on the CPU it is
the growth of the process's peak RSS over the footprint before the models were built. On Linux the peak
(``VmHWM``) is reset to the current RSS just before the models are built (``/proc/self/clear_refs``), so a
transient peak of an earlier import cannot hide the step's; elsewhere ``ru_maxrss`` is used.

    .venv/bin/python benchmarks/bench_memory.py            # 64^3 volumes
    .venv/bin/python benchmarks/bench_memory.py --quick    # 48^3
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import queue as queue_module
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _overrides(size: int, checkpointing: bool, precision: str) -> list[str]:
    flag = str(checkpointing).lower()
    return [
        f"normalize.shape=[{size},{size},{size}]",
        f"vqgan.train.precision={precision}",
        f"diffusion.train.precision={precision}",
        f"vqgan.train.activation_checkpointing={flag}",
        f"diffusion.train.activation_checkpointing={flag}",
        "vqgan.loss.perceptual=0",
        "vqgan.loss.adversarial=0.1",  # the GAN phase: the largest VQ-GAN step (the demo trains without it)
        "diffusion.train.batch_size=16",
        "diffusion.unet.channels=[64,128]",
    ]


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _warm_up(device: torch.device) -> None:
    """Load the kernels' code (oneDNN JIT, attention, AdamW) before the baseline: on the CPU they add a
    constant ~0.2 GB of RSS that is not training memory."""
    conv = torch.nn.Conv3d(1, 4, 3).to(device)
    x = torch.randn(1, 1, 8, 8, 8, device=device)
    q = torch.randn(1, 2, 16, 8, device=device, requires_grad=True)
    (conv(x).sum() + torch.nn.functional.scaled_dot_product_attention(q, q, q).sum()).backward()
    torch.optim.AdamW(conv.parameters()).step()


def measure(stage: str, size: int, checkpointing: bool, device: str, queue) -> None:
    """Child process: plan, then run two real steps and report (planned allocated bytes, measured bytes)."""
    from synthmri.config import load_params
    from synthmri.models.loading import build_ldm
    from synthmri.training.memory import plan_diffusion, plan_vqgan
    from synthmri.training.runtime import autocast
    from synthmri.training.train_vqgan import build_models

    torch.set_num_threads(1)
    precision = "bf16" if device == "cuda" else "fp32"
    params = load_params(REPO / "params.yaml", _overrides(size, checkpointing, precision))
    plan = plan_vqgan(params) if stage == "vqgan" else plan_diffusion(params)
    dev = torch.device(device)
    _warm_up(dev)
    exact_peak = _reset_peak_rss()
    base = _status_bytes("VmRSS") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if stage == "vqgan":
        model, critics = build_models(params, dev, checkpointing)
        optimizers = [torch.optim.AdamW(model.parameters()), torch.optim.AdamW(critics.parameters())]
        x = torch.randn(params.vqgan.train.batch_size, 1, *params.normalize.shape, device=dev)

        def loss():
            recon, vq_loss, _ = model(x)
            return (recon - x).abs().mean() + vq_loss + sum(d(recon)[0].mean() for d in critics)
    else:
        factor, channels = params.vqgan.model.downsample_factor, params.vqgan.model.latent_channels
        model = build_ldm(params.diffusion.unet, params.covariates, channels, checkpointing).to(dev)
        optimizers = [torch.optim.AdamW(model.parameters())]
        ema = copy.deepcopy(model)  # noqa: F841  (held, like the trainer's EMA)
        batch = params.diffusion.train.batch_size
        x = torch.randn(batch, channels, *[s // factor for s in params.normalize.shape], device=dev)
        covariates = model.encoder.encode_values([{c.name: None for c in params.covariates}] * batch)

        def loss():
            return model(x, torch.zeros(batch, dtype=torch.long, device=dev), covariates).square().mean()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        with autocast(dev, precision):
            value = loss()
        value.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        measured = torch.cuda.max_memory_allocated()
    else:
        peak = _status_bytes("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        measured = peak - base
    queue.put((plan.allocated, measured))


def run(stage: str, size: int, checkpointing: bool, device: str) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=measure, args=(stage, size, checkpointing, device, queue))
    child.start()
    began = time.monotonic()
    while True:  # a child that dies (an exception, the OOM killer) must fail the run, not hang it
        try:
            planned, measured = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not child.is_alive() or time.monotonic() - began > 900:
                child.kill()
                raise RuntimeError(f"the {stage} memory probe died (exit code {child.exitcode})") from None
    child.join()
    return {
        "stage": stage,
        "size": size,
        "activation_checkpointing": checkpointing,
        "device": device,
        "planned_GiB": planned / 2**30,
        "measured_GiB": measured / 2**30,
        "ratio": measured / planned,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="48^3 volumes (a shorter run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory.json")
    args = parser.parse_args(argv)
    size = 48 if args.quick else 64
    rows = [run(stage, size, ckpt, args.device) for stage in ("vqgan", "diffusion") for ckpt in (False, True)]
    print("| stage | volume | checkpointing | planned | measured | measured / planned |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['stage']} | {r['size']}^3 | {r['activation_checkpointing']} | {r['planned_GiB']:.3f} GiB | "
            f"{r['measured_GiB']:.3f} GiB | {r['ratio']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
