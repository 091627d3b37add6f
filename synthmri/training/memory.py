"""Peak-memory planning of a training step, without a GPU: ``synthmri plan-memory``.

The models are built on the ``meta`` device (shapes, no storage), one training forward is traced, and
every tensor autograd saves for the backward pass is counted (``saved_tensors_hooks``): that is the
activation memory. Around it come the persistent parts (fp32 weights, gradients, AdamW moments, EMA
weights, bf16 weight copies under autocast) and the backward's transient gradient buffers.

Activation checkpointing is planned from the same trace: every checkpointed block keeps only its inputs
and, during the backward, one block at a time is recomputed (the largest one sets the peak).

Accuracy: bf16 is planned as if every saved tensor were bf16 (autocast keeps normalisation outputs in
fp32), allocator fragmentation and the CUDA context are added as fixed margins; expect ±25 %. It is a
planner to choose batch size, checkpointing and GPU, not a guarantee.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from synthmri.config import Params

GiB = 1024**3
CUDA_CONTEXT_BYTES = int(0.6 * GiB)  # driver + kernels, outside torch's allocator
FRAGMENTATION = 0.10  # caching-allocator slack
_SDPA = F.scaled_dot_product_attention


class SavedTensorCounter:
    """Bytes of the non-parameter tensors saved for backward while active (each tensor counted once).

    ``checkpoint`` stands in for ``torch.utils.checkpoint.checkpoint`` during the trace: it runs the block
    directly and records its input bytes and the bytes it saved, for the checkpointing plan."""

    def __init__(self, parameters: set[int]) -> None:
        self.parameters, self.seen, self.keep = parameters, set(), []
        self.total = 0
        self.largest = 0
        self.blocks: list[tuple[int, int]] = []  # (input bytes, saved bytes) per checkpointed block

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        owner = tensor._base if tensor._base is not None else tensor  # a view shares its base's memory
        if id(owner) not in self.seen and id(owner) not in self.parameters:
            self.seen.add(id(owner))
            self.keep.append(owner)  # ids stay unique while we hold the tensor
            size = owner.numel() * owner.element_size()
            self.total += size
            self.largest = max(self.largest, size)
        return tensor

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Fused attention as the GPU (and CPU) kernels run it: keeps q, k, v, the output and the row
        log-sum-exp, never the N x N matrix (the meta device would trace the unfused math path)."""
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # inner hooks win: not counted
            out = _SDPA(q, k, v, *args, **kwargs)
        for tensor in (q, k, v, out):
            self._pack(tensor)
        self.total += 4 * out.numel() // out.shape[-1]  # fp32 log-sum-exp per query row
        return out

    def checkpoint(self, function, *args, use_reentrant: bool = False, **kwargs):
        before = self.total
        output = function(*args, **kwargs)
        inputs = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        self.blocks.append((inputs, self.total - before))
        return output

    @contextlib.contextmanager
    def tracing(self):
        from synthmri.models import unet as unet_module
        from synthmri.models import vqgan as vqgan_module

        with (
            torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t),
            mock.patch.object(vqgan_module, "checkpoint", self.checkpoint),
            mock.patch.object(unet_module, "checkpoint", self.checkpoint),
            mock.patch.object(F, "scaled_dot_product_attention", self.attention),
        ):
            yield self

    def activation_bytes(self, checkpointing: bool) -> int:
        """Saved activations at the end of the forward (+ the recompute peak with checkpointing)."""
        if not checkpointing or not self.blocks:
            return self.total
        inside = sum(saved for _, saved in self.blocks)
        kept_inputs = sum(inputs for inputs, _ in self.blocks)
        return self.total - inside + kept_inputs + max(saved for _, saved in self.blocks)


@dataclass
class MemoryPlan:
    """Estimated peak memory of one training step of one stage, in bytes, by component."""

    stage: str
    batch_size: int
    precision: str
    checkpointing: bool
    parameters: int
    components: dict[str, int] = field(default_factory=dict)
    per_sample: int = 0  # activation bytes that scale with the batch

    @property
    def allocated(self) -> int:
        return sum(self.components.values())

    @property
    def peak(self) -> int:
        """What the GPU must hold: allocations + allocator slack + CUDA context."""
        return int(self.allocated * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES

    def fits(self, capacity_bytes: float) -> bool:
        return self.peak <= capacity_bytes

    def max_batch(self, capacity_bytes: float) -> int:
        """Largest per-GPU batch that fits (activations scale with the batch, the rest does not)."""
        if self.per_sample <= 0:
            return 0
        fixed = self.allocated - self.per_sample * self.batch_size
        room = (capacity_bytes - CUDA_CONTEXT_BYTES) / (1 + FRAGMENTATION) - fixed
        return max(0, math.floor(room / self.per_sample))


def _persistent(n_params: int, precision: str, ema: bool) -> dict[str, int]:
    parts = {"weights (fp32)": 4 * n_params, "gradients (fp32)": 4 * n_params, "AdamW moments": 8 * n_params}
    if ema:
        parts["EMA weights"] = 4 * n_params
    if precision == "bf16":
        parts["bf16 weight copies"] = 2 * n_params
    return parts


def _dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _trace(modules: list[nn.Module], forward) -> SavedTensorCounter:
    counter = SavedTensorCounter({id(p) for m in modules for p in m.parameters()})
    with counter.tracing():
        forward()
    return counter


def plan_vqgan(
    params: Params, batch_size: int | None = None, precision: str | None = None, device: str = "meta"
) -> MemoryPlan:
    """Generator step of the VQ-GAN (the peak: encoder, decoder and the critics' view of the fake)."""
    from synthmri.training.train_vqgan import build_models

    t = params.vqgan.train
    batch = batch_size or t.batch_size
    precision = precision or t.precision
    dtype = _dtype(precision)
    with torch.device(device):
        model, discriminators = build_models(params, torch.device(device), checkpointing=True)
    model.to(dtype).train()
    discriminators.to(dtype).train()
    x = torch.zeros(batch, 1, *params.normalize.shape, device=device, dtype=dtype, requires_grad=False)

    def forward():  # the quantizer saves only latent-size tensors; its data-dependent codebook update is skipped
        z = model.encode_pre_quant(x)
        recon = model.decoder(z + (z.detach() - z))  # straight-through: same graph shape as the quantizer's
        for d in discriminators:
            d(recon)

    counter = _trace([model, *discriminators], forward)
    n_params = sum(p.numel() for p in model.parameters())
    n_disc = sum(p.numel() for p in discriminators.parameters())
    activations = counter.activation_bytes(t.activation_checkpointing)
    components = {name: value for name, value in _persistent(n_params, precision, ema=False).items()}
    for name, value in _persistent(n_disc, precision, ema=False).items():
        components[f"discriminator {name}"] = value
    components["activations"] = activations
    components["backward transient"] = 2 * counter.largest
    return MemoryPlan(
        "train_vqgan",
        batch,
        precision,
        t.activation_checkpointing,
        n_params + n_disc,
        components,
        per_sample=(activations + 2 * counter.largest) // batch,
    )


def plan_diffusion(
    params: Params,
    batch_size: int | None = None,
    precision: str | None = None,
    latent_shape: tuple[int, ...] | None = None,
    device: str = "meta",
) -> MemoryPlan:
    """Diffusion U-Net step on the latents the VQ-GAN of ``params`` produces."""
    from synthmri.models.loading import build_ldm

    t = params.diffusion.train
    batch = batch_size or t.batch_size
    precision = precision or t.precision
    dtype = _dtype(precision)
    factor = 2 ** (len(params.vqgan.model.channels) - 1)
    latent_shape = latent_shape or (params.vqgan.model.latent_channels, *(s // factor for s in params.normalize.shape))
    with torch.device(device):
        model = build_ldm(params.diffusion.unet, params.covariates, latent_shape[0], checkpointing=True)
    model.to(dtype).train()
    rows = [{c.name: None for c in params.covariates}] * batch
    covariates = model.encoder.encode_values(rows)
    x = torch.zeros(batch, *latent_shape, device=device, dtype=dtype)
    timesteps = torch.zeros(batch, dtype=torch.long, device=device)

    counter = _trace([model], lambda: model(x, timesteps, covariates))
    n_params = sum(p.numel() for p in model.parameters())
    activations = counter.activation_bytes(t.activation_checkpointing)
    components = _persistent(n_params, precision, ema=True)
    components["activations"] = activations
    components["backward transient"] = 2 * counter.largest
    return MemoryPlan(
        "train_diffusion",
        batch,
        precision,
        t.activation_checkpointing,
        n_params,
        components,
        per_sample=(activations + 2 * counter.largest) // batch,
    )


def format_plan(plan: MemoryPlan, capacity_gb: float) -> str:
    """A small table a user reads before renting a GPU."""
    capacity = capacity_gb * GiB
    lines = [
        f"{plan.stage}: batch {plan.batch_size} per GPU, {plan.precision}, activation checkpointing "
        f"{'on' if plan.checkpointing else 'off'}, {plan.parameters / 1e6:.1f} M parameters"
    ]
    for name, value in plan.components.items():
        lines.append(f"  {name:<36} {value / GiB:9.2f} GiB")
    lines.append(f"  {'allocator slack (10 %) + CUDA context':<36} {(plan.peak - plan.allocated) / GiB:9.2f} GiB")
    lines.append(f"  {'estimated peak':<36} {plan.peak / GiB:9.2f} GiB")
    verdict = "fits" if plan.fits(capacity) else "does NOT fit"
    lines.append(f"  -> {verdict} a {capacity_gb:g} GiB GPU; largest batch that fits: {plan.max_batch(capacity)}")
    return "\n".join(lines)
