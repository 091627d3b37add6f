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
  This matters when chains are batched (``batch_invariant=False``); the tests check that path too
  (alone vs in a batch of 3 agree to float rounding, not to an independent noise draw).
- the network's result for one sample is NOT bitwise independent of the batch size (measured on CPU:
  oneDNN conv3d and ``Linear`` with few rows differ in the last bits, ~4e-6; GPU kernels are also
  chosen per shape). So by default (``batch_invariant=True``) each sample's chain runs on its own,
  with its conditional and unconditional inputs batched together (a fixed shape for every sample).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from synthmri.diffusion.conditioning import CovariateEncoder


def sample_seed(global_seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample ``index`` of a run seeded with ``global_seed``.

    ``numpy.random.SeedSequence`` hashes the pair, so neighbouring indices get unrelated streams
    (``global_seed + index`` would make run ``s`` sample ``i+1`` equal run ``s+1`` sample ``i``).
    63 bits: fits a signed int64 column of a manifest (parquet).
    """
    state = np.random.SeedSequence([int(global_seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & (2**63 - 1))


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
    batch_invariant: bool = True,
    callback: Callable[[int, int], None] | None = None,
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
        guidance_scale: ``s`` in ``eps = eps_uncond + s·(eps_cond - eps_uncond)``; 1 = conditional only
            (one forward per step), 0 = unconditional only, > 1 = stronger adherence to the covariates.
            Otherwise the conditional and unconditional inputs share one forward pass.
        generators: one CPU generator per sample, or
        seeds: one seed per sample (e.g. from :func:`sample_seed`).
        device: where the network runs.
        batch_invariant: run each sample's chain on its own (default), so that sample ``i`` is bitwise
            identical whether generated alone or in a batch of any size. Measured on CPU: oneDNN
            conv3d and small-batch ``Linear`` results change in the last bits (~4e-6) with the batch
            size, so one batched forward cannot give that guarantee. ``False`` batches all samples in
            each forward: faster on a GPU with small latents; same seeds + same batch layout still
            reproduce exactly, a different layout only to ~1e-5.
        callback: ``callback(done, total)`` after each step, counted in sample-steps
            (``total = len(rows) * steps``), for progress bars.

    Returns:
        ``(len(rows), *shape)`` float32 latents on ``device``, in the model's (scaled) latent space:
        divide by the latent scale factor before decoding.
    """
    gens = _generators(generators, seeds, len(rows))
    model.eval()
    covariate_encoder.eval()
    chunks = [[i] for i in range(len(rows))] if batch_invariant else [list(range(len(rows)))]
    progress = _Progress(callback, len(rows) * steps)
    out = [
        _sample_chain(
            model,
            covariate_encoder,
            scheduler,
            [rows[i] for i in idx],
            shape,
            steps,
            guidance_scale,
            [gens[i] for i in idx],
            device,
            progress,
        )
        for idx in chunks
    ]
    return torch.cat(out)


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
    progress: _Progress,
) -> torch.Tensor:
    """One batched reverse-diffusion chain over ``rows`` (see the module docstring for the noise)."""
    scheduler = copy.deepcopy(scheduler)  # schedulers are stateful (timesteps, multistep history)
    batch = encoder.encode_values(rows)
    cond = encoder(batch.to(device))
    uncond = encoder(encoder.null_like(batch).to(device))
    if guidance_scale == 1:
        emb, tokens = cond
    elif guidance_scale == 0:
        emb, tokens = uncond
    else:
        emb, tokens = (torch.cat([c, u]) for c, u in zip(cond, uncond, strict=True))

    x = torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(device)
    x = x * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        if guidance_scale in (0, 1):
            out = model(x_in, t, emb, tokens).float()
        else:
            out_cond, out_uncond = model(torch.cat([x_in, x_in]), t, emb, tokens).float().chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        x = scheduler.step(out, t, x, generator=gens).prev_sample
        progress.advance(len(rows))
    return x
