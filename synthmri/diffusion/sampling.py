"""Reverse diffusion with classifier-free guidance and per-sample random streams.

Reproducibility contract: sample ``i`` depends only on its own seed (derived from the global seed
and ``i`` by :func:`sample_seed`), its covariates and the sampler settings, never on which other
samples share its batch. Therefore:

- each sample's initial noise is drawn from its own CPU ``torch.Generator`` (CPU streams are the same
  on every machine and device; the tensor is then moved to ``device``);
- stochastic steps (DDPM ancestral; DDIM with eta > 0 or SDE variants of DPM-Solver if ever used)
  draw their noise through the *list* of per-sample generators: diffusers' ``step(generator=...)``
  passes it to ``randn_tensor``, which draws row ``i`` of the noise from ``generator[i]`` alone. One
  batched ``step`` is kept (rather than one call per sample) because multistep schedulers such as
  DPM-Solver keep a history of model outputs and a step counter that per-sample calls would corrupt.
  This matters when chains are batched (``micro_batch > 1``), and the tests check it (a shared stream
  would make neighbours' noise differ by O(1), not by nothing).
- the network's result for one sample is NOT bitwise independent of the batch *size* (measured on CPU:
  oneDNN conv3d and ``Linear`` with few rows differ in the last bits, ~4e-6; GPU kernels are also
  chosen per shape), but at a fixed batch size it IS independent of the other rows' values and of its
  own row position (measured on CPU, 1 thread, the demo's U-Net: bitwise equal). So chains run in
  micro-batches of a fixed size ``micro_batch`` laid on a fixed grid: the row with global index
  (``slot``) ``s`` runs in micro-batch ``s // micro_batch`` at position ``s % micro_batch``, and a
  micro-batch that is not full is padded with filler rows whose results are dropped. Sample ``i`` is
  then the same bits whichever shard, worker, resume or neighbours it was generated with, for a given
  ``micro_batch`` (and intra-op thread count); ``micro_batch=1`` is one chain per sample.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from synthmri.diffusion.conditioning import CovariateEncoder
from synthmri.diffusion.schedulers import signal_to_noise


def sample_seed(global_seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample ``index`` of a run seeded with ``global_seed``.

    ``numpy.random.SeedSequence`` hashes the pair, so neighbouring indices get unrelated streams
    (``global_seed + index`` would make run ``s`` sample ``i+1`` equal run ``s+1`` sample ``i``).
    63 bits: fits a signed int64 column of a manifest (parquet).
    """
    state = np.random.SeedSequence([int(global_seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & (2**63 - 1))


FILLER_SEED = 0  # the noise stream of padding rows (their results are dropped)


def micro_batch_grid(slots: Sequence[int], size: int) -> list[list[int | None]]:
    """Lay rows on the fixed grid of micro-batches (see the module docstring).

    Args:
        slots: the global index of each row (e.g. its sample index); unique.
        size: rows per micro-batch.

    Returns:
        one list of ``size`` entries per occupied micro-batch, in grid order: at each position, the
        index into ``slots`` of the row that runs there, or ``None`` for a filler.
    """
    if size < 1:
        raise ValueError(f"micro_batch must be >= 1, got {size}")
    if len(set(slots)) != len(slots):
        raise ValueError("slots must be unique: two rows cannot run in the same grid position")
    grid: dict[int, list[int | None]] = {}
    for row, slot in enumerate(slots):
        grid.setdefault(int(slot) // size, [None] * size)[int(slot) % size] = row
    return [grid[batch] for batch in sorted(grid)]


def _generators(
    generators: Sequence[torch.Generator] | None, seeds: Sequence[int] | None, n: int
) -> list[torch.Generator]:
    if (generators is None) == (seeds is None):
        raise ValueError("pass exactly one of `generators` or `seeds` (one per sample)")
    gens = list(generators) if generators is not None else [torch.Generator().manual_seed(int(s)) for s in seeds]
    if len(gens) != n:
        raise ValueError(f"need one generator/seed per sample: {n} rows, {len(gens)} generators/seeds")
    if any(g.device.type != "cpu" for g in gens):
        raise ValueError("per-sample generators must be CPU generators (device-independent random streams)")
    return gens


@torch.no_grad()
def sample_latents(
    model: nn.Module,
    covariate_encoder: CovariateEncoder,
    scheduler,
    rows: Sequence[Mapping[str, object]],
    shape: Sequence[int],
    steps: int,
    guidance_scale: float,
    generators: Sequence[torch.Generator] | None = None,
    seeds: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    micro_batch: int = 1,
    slots: Sequence[int] | None = None,
    callback: Callable[[int, int], None] | None = None,
    guidance_interval: Sequence[float] | None = None,
    rest_guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Generate one latent per row of covariates.

    Args:
        model: the denoising U-Net (``forward(x, t, cond_emb, cond_tokens)``), e.g. the EMA copy.
        covariate_encoder: the encoder trained with it.
        scheduler: a sampler from :func:`synthmri.diffusion.schedulers.make_sampler`. It is copied
            first, so one scheduler may be shared by concurrent shards (threads).
        rows: covariates per sample, ``{name: value | None}``; ``None`` / absent = unspecified.
        shape: latent shape of ONE sample, ``(C, *spatial)``.
        steps: number of sampler steps.
        guidance_scale: ``s`` in ``eps = eps_ref + s·(eps_cond - eps_ref)``; 1 = conditional only
            (one forward per step), 0 = reference only, > 1 = stronger adherence to the covariates.
            Otherwise the conditional and reference inputs share one forward pass. The reference is the
            unconditional prediction, or, for an encoder with a guided group, the prediction with only
            that group unspecified (:meth:`CovariateEncoder.guidance_reference`).
        generators: one CPU generator per sample, or
        seeds: one seed per sample (e.g. from :func:`sample_seed`).
        device: where the network runs.
        micro_batch: rows per network call (padded with fillers when not full). For a given value,
            sample ``i`` is bitwise the same whatever else is generated with it; a different value
            changes its last bits (~1e-5). 1 = one chain per sample.
        slots: each row's position on the micro-batch grid (its global sample index); default
            ``0 .. len(rows) - 1``. Pass the sample indices so that a subset (one shard, one volume
            regenerated alone) lands where it lands in the whole set.
        callback: ``callback(done, total)`` after each step, counted in sample-steps
            (``total = len(rows) * steps``), for progress bars.
        guidance_interval: ``(low, high)``: guide only the steps whose noise level ``σ = 1/√SNR(t)`` (EDM's
            noise-to-signal ratio; flow: ``σ_t / (1 - σ_t)``) is in ``(low, high]``, and run the others
            conditional only (one forward pass). Guidance at high noise pulls every chain of a covariate row
            towards the same layout (less variety), and at low noise it only sharpens what is decided
            (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves sample and
            distribution quality"). ``None``: every step.
        rest_guidance_scale: ``r``, for an encoder with a guided group only: the guidance of the *other*
            covariates (the acquisition), in ``eps = eps_null + r·(eps_ref - eps_null) + s·(eps_cond - eps_ref)``
            (two guidance terms, as InstructPix2Pix guides its image and its text separately). ``r = 1``: the
            other covariates as conditioned, no unconditional pass; ``r = s``: the same as guiding every
            covariate at ``s``.

    Returns:
        ``(len(rows), *shape)`` float32 latents on ``device``, in the model's (scaled) latent space:
        divide by the latent scale factor before decoding.
    """
    gens = _generators(generators, seeds, len(rows))
    model.eval()
    covariate_encoder.eval()
    slots = list(range(len(rows))) if slots is None else list(slots)
    if len(slots) != len(rows):
        raise ValueError(f"need one slot per row: {len(rows)} rows, {len(slots)} slots")
    progress = _Progress(callback, len(rows) * steps)
    out = torch.empty((len(rows), *shape), device=device)
    for batch in micro_batch_grid(slots, micro_batch):
        real = [i for i in batch if i is not None]
        x = _sample_chain(
            model,
            covariate_encoder,
            scheduler,
            [rows[i] if i is not None else {} for i in batch],
            shape,
            steps,
            guidance_scale,
            [gens[i] if i is not None else torch.Generator().manual_seed(FILLER_SEED) for i in batch],
            device,
            functools.partial(progress.advance, len(real)),
            guidance_interval,
            rest_guidance_scale,
        )
        for position, i in enumerate(batch):
            if i is not None:
                out[i] = x[position]
    return out


class _Progress:
    def __init__(self, callback: Callable[[int, int], None] | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)


def _sample_chain(
    model: nn.Module,
    encoder: CovariateEncoder,
    scheduler,
    rows: Sequence[Mapping[str, object]],
    shape: Sequence[int],
    steps: int,
    guidance_scale: float,
    gens: list[torch.Generator],
    device: torch.device | str,
    after_step: Callable[[], None],
    guidance_interval: Sequence[float] | None = None,
    rest_guidance_scale: float = 1.0,
) -> torch.Tensor:
    """One batched reverse-diffusion chain over ``rows`` (see the module docstring for the noise)."""
    scheduler = copy.deepcopy(scheduler)  # schedulers are stateful (timesteps, multistep history)
    branches = _guidance_branches(encoder, encoder.encode_values(rows), device, guidance_scale, rest_guidance_scale)
    emb, tokens = (torch.cat(parts) for parts in zip(*branches, strict=True))
    k = len(branches)

    x = torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(device)
    x = x * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        if k > 1 and not guided_step(scheduler, t, guidance_interval):
            out = model(x_in, t, *branches[0]).float()  # outside the interval: conditional only
        else:
            outs = model(torch.cat([x_in] * k) if k > 1 else x_in, t, emb, tokens).float().chunk(k)
            out = _guided(outs, guidance_scale, rest_guidance_scale)
        x = scheduler.step(out, t, x, generator=gens).prev_sample
        after_step()
    return x


def _guidance_branches(
    encoder: CovariateEncoder, batch, device, guidance_scale: float, rest_guidance_scale: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The conditionings each step runs the network with: the conditional alone (guidance 1), the reference
    alone (guidance 0), conditional and reference (one guidance term), or conditional, reference and
    unconditional (two terms: a guided group with ``rest_guidance_scale != 1``)."""
    if rest_guidance_scale != 1:
        if encoder.guided is None:
            raise ValueError(
                "rest_guidance_scale needs a model trained with a guided covariate group "
                "(diffusion.train.guided_covariates); this model guides every covariate together"
            )
        parts = (batch, encoder.guidance_reference(batch), encoder.null_like(batch))
    elif guidance_scale == 1:
        parts = (batch,)
    elif guidance_scale == 0:
        parts = (encoder.guidance_reference(batch),)
    else:
        parts = (batch, encoder.guidance_reference(batch))
    return [encoder(p.to(device)) for p in parts]


def _guided(outs: Sequence[torch.Tensor], scale: float, rest_scale: float) -> torch.Tensor:
    """Classifier-free guidance of the network's outputs per branch (see :func:`_guidance_branches`)."""
    if len(outs) == 1:
        return outs[0]
    if len(outs) == 2:
        cond, reference = outs
        return reference + scale * (cond - reference)
    cond, reference, null = outs
    return null + rest_scale * (reference - null) + scale * (cond - reference)


def guided_step(scheduler, t: torch.Tensor, interval: Sequence[float] | None) -> bool:
    """Whether the step at timestep ``t`` is inside the guidance interval (see :func:`sample_latents`)."""
    if interval is None:
        return True
    low, high = interval
    sigma = float(signal_to_noise(scheduler, torch.as_tensor(t).reshape(1)).rsqrt())
    return low < sigma <= high
