"""Denoising U-Net of the latent diffusion model (ADM-style), generic in ``spatial_dims`` (2 or 3).

Down path: per level ``num_res_blocks`` × (residual block [+ self-attention (+ cross-attention)]),
then a stride-2 downsample (all but the last level). Middle: residual → attention (+ cross-attention)
→ residual. Up path: per level ``num_res_blocks + 1`` × (concatenate a skip → residual block
[+ attention]), then an upsample. ``num_res_blocks`` may differ per level (as in MONAI's
``DiffusionModelUNet``): 0 on the finest level gives it only the input conv, the downsample and one residual
block on the way up, a cheap full-resolution path in front of a coarse U-Net. Every residual block receives one embedding ``emb`` (B, emb_dim) by
scale-shift normalisation: the MLP of the sinusoidal timestep encoding **plus** the covariate embedding
(``cond_emb``), so time and covariates modulate every block at the cost of one addition.

Any latent size works: a stride-2 conv maps ``n`` to ``ceil(n / 2)`` and the upsample doubles it,
so on an odd axis the upsampled map is one voxel too large; it is cropped to its skip's size before
concatenation (the cropped voxel is the one computed from zero padding).

The output conv is zero-initialised (as are the residual branches of every block): the untrained
network predicts exactly 0 for any input, which is the best constant guess of the noise and makes
early training stable. Tests that check "the output depends on t / covariates" must therefore
perturb the weights first (or take an optimiser step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from synthmri.config import UNetParams, res_blocks_per_level
from synthmri.models.blocks import (
    AttentionBlock,
    Downsample,
    ResidualBlock,
    Upsample,
    conv_nd,
    depth_to_space,
    group_norm,
    space_to_depth,
    zero_module,
)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal encoding ``[cos(t·f_k), sin(t·f_k)]`` of (possibly fractional) timesteps, ``(B,) → (B, dim)``.

    Frequencies ``f_k = max_period^(-k / half)`` span wavelengths from 2π to ``2π·max_period``, so both
    neighbouring and distant timesteps are distinguishable (Transformer / DDPM convention).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class CrossAttention(nn.Module):
    """Attention from every spatial position (queries) to a few condition tokens (keys/values).

    Lets different regions read different covariates (e.g. ventricles attend to age), which a single
    additive embedding cannot express. Uses ``F.scaled_dot_product_attention`` (fused kernels on GPU);
    pre-norm, residual, zero-initialised output projection (starts as the identity).

    Args:
        channels: feature channels (= query width); divisible by ``num_heads``.
        context_dim: width of the condition tokens.
        num_heads: attention heads.
        norm_groups: GroupNorm groups.
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int = 1, norm_groups: int = 8) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"CrossAttention: {channels} channels are not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_groups)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, *spatial)``; ``context``: ``(B, T, context_dim)`` → shape of ``x``."""
        b, c, *spatial = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q = self.q(self.norm(x).flatten(2).transpose(1, 2)).view(b, -1, heads, d).transpose(1, 2)
        k, v = self.kv(context).view(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        h = self.proj(h.transpose(1, 2).reshape(b, -1, c))
        return x + h.transpose(1, 2).reshape(b, c, *spatial)


def _fit_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Crop (or zero-pad) the spatial axes of ``x`` to those of ``ref`` (odd sizes: off by one voxel)."""
    for axis in range(2, x.ndim):
        diff = ref.shape[axis] - x.shape[axis]
        if diff < 0:
            x = x.narrow(axis, 0, ref.shape[axis])
        elif diff > 0:
            pad = [0, 0] * (x.ndim - 1 - axis) + [0, diff]
            x = F.pad(x, pad)
    return x


class DiffusionUNet(nn.Module):
    """Predicts the noise (or v) of a noisy latent, conditioned on the timestep and the covariates.

    Args:
        spatial_dims: 2 or 3.
        in_channels: latent channels (the output has the same number).
        channels: width per resolution level; ``len(channels) - 1`` downsamplings.
        attention: one flag per level: self-attention (and cross-attention) after its residual blocks.
            The middle block always has attention.
        num_res_blocks: residual blocks on the down path (``+1`` on the up path): one count for every level,
            or one per level (0 allowed: the level keeps its input's width on the way down).
        num_heads: heads of every attention block.
        norm_groups: GroupNorm groups; divides every entry of ``channels``.
        dropout: dropout inside residual blocks.
        emb_dim: width of the timestep embedding, which is also the width that ``cond_emb`` and the
            condition tokens must have; default ``4 * channels[0]``.
        cross_attention: add cross-attention to ``cond_tokens`` wherever there is self-attention.
        checkpointing: activation checkpointing per block while training (memory for compute).
        patch_size: fold each ``patch_size``-cube of the latent into channels before the first conv and
            unfold after the last (:func:`~synthmri.models.blocks.space_to_depth`), so a fine latent grid
            (an autoencoder that downsamples only ×2) costs the U-Net what a grid ``patch_size`` times
            coarser would. Every latent size must then be divisible by it.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: list[int] | tuple[int, ...],
        attention: list[bool] | tuple[bool, ...],
        num_res_blocks: int | list[int] | tuple[int, ...] = 1,
        num_heads: int = 4,
        norm_groups: int = 8,
        dropout: float = 0.0,
        emb_dim: int | None = None,
        cross_attention: bool = False,
        checkpointing: bool = False,
        patch_size: int = 1,
    ) -> None:
        super().__init__()
        if len(attention) != len(channels):
            raise ValueError(f"attention needs one flag per level ({len(channels)}), got {len(attention)}")
        blocks_per_level = res_blocks_per_level(num_res_blocks, len(channels))
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.time_channels = channels[0]
        self.emb_dim = emb_dim or 4 * channels[0]
        self.cross_attention = cross_attention
        self.checkpointing = checkpointing
        self.patch_size = patch_size
        folded_channels = in_channels * patch_size**spatial_dims
        self.time_mlp = nn.Sequential(
            nn.Linear(self.time_channels, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim)
        )

        def res(cin: int, cout: int) -> ResidualBlock:
            return ResidualBlock(spatial_dims, cin, cout, norm_groups, dropout, emb_channels=self.emb_dim)

        def attn(ch: int) -> list[nn.Module]:
            blocks: list[nn.Module] = [AttentionBlock(ch, num_heads, norm_groups)]
            if cross_attention:
                blocks.append(CrossAttention(ch, self.emb_dim, num_heads, norm_groups))
            return blocks

        self.conv_in = conv_nd(spatial_dims, folded_channels, channels[0])
        self.down = nn.ModuleList()  # each entry: one layer (ModuleList of blocks) whose output is a skip
        skip_channels = [channels[0]]
        prev = channels[0]
        for level, ch in enumerate(channels):
            for _ in range(blocks_per_level[level]):
                self.down.append(nn.ModuleList([res(prev, ch), *(attn(ch) if attention[level] else [])]))
                prev = ch
                skip_channels.append(ch)
            if level < len(channels) - 1:
                self.down.append(nn.ModuleList([Downsample(spatial_dims, prev)]))
                skip_channels.append(prev)
        self.mid = nn.ModuleList([res(prev, prev), *attn(prev), res(prev, prev)])
        self.up = nn.ModuleList()  # each entry: one layer; it concatenates a skip before its first block
        for level in reversed(range(len(channels))):
            ch = channels[level]
            for i in range(blocks_per_level[level] + 1):
                blocks = [res(prev + skip_channels.pop(), ch), *(attn(ch) if attention[level] else [])]
                prev = ch
                if level > 0 and i == blocks_per_level[level]:
                    blocks.append(Upsample(spatial_dims, ch))
                self.up.append(nn.ModuleList(blocks))
        self.out = nn.Sequential(
            group_norm(prev, norm_groups), nn.SiLU(), zero_module(conv_nd(spatial_dims, prev, folded_channels))
        )

    @classmethod
    def from_params(
        cls,
        p: UNetParams,
        in_channels: int,
        cond_dim: int | None = None,
        spatial_dims: int = 3,
        checkpointing: bool = False,
    ) -> DiffusionUNet:
        """Build from ``params.yaml``'s ``diffusion.unet``; ``cond_dim`` = the covariate encoder's ``emb_dim``
        (it becomes the U-Net's embedding width, since the two are added), else ``p.emb_dim``, else the default."""
        return cls(
            spatial_dims,
            in_channels,
            list(p.channels),
            list(p.attention),
            p.num_res_blocks,
            p.num_heads,
            p.norm_groups,
            p.dropout,
            emb_dim=cond_dim or p.emb_dim,
            cross_attention=p.cross_attention,
            checkpointing=checkpointing,
            patch_size=p.patch_size,
        )

    def _layer(
        self, blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, tokens: torch.Tensor | None
    ) -> torch.Tensor:
        for block in blocks:
            if isinstance(block, ResidualBlock):
                h = block(h, emb)
            elif isinstance(block, CrossAttention):
                if tokens is not None and tokens.shape[1] > 0:  # no covariates: nothing to attend to
                    h = block(h, tokens)
            else:
                h = block(h)
        return h

    def _run(
        self, blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, tokens: torch.Tensor | None
    ) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._layer, blocks, h, emb, tokens, use_reentrant=False)
        return self._layer(blocks, h, emb, tokens)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | int | float,
        cond_emb: torch.Tensor | None = None,
        cond_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the model target for ``x`` at ``timesteps``.

        Args:
            x: noisy latents ``(B, in_channels, *spatial)``, any spatial size.
            timesteps: ``(B,)`` or a scalar (broadcast to the batch).
            cond_emb: ``(B, emb_dim)`` covariate embedding added to the timestep embedding, or ``None``.
            cond_tokens: ``(B, T, emb_dim)`` covariate tokens for cross-attention (used only if built
                with ``cross_attention``).

        Returns:
            ``(B, in_channels, *spatial)``, the shape of ``x``.
        """
        t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.time_channels).to(x.dtype))
        if cond_emb is not None:
            emb = emb + cond_emb.to(device=emb.device, dtype=emb.dtype)
        tokens = cond_tokens.to(x.dtype) if (self.cross_attention and cond_tokens is not None) else None

        if self.patch_size > 1:
            x = space_to_depth(x, self.patch_size)
        h = self.conv_in(x)
        skips = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb, tokens)
            skips.append(h)
        h = self._run(self.mid, h, emb, tokens)
        for blocks in self.up:
            skip = skips.pop()
            h = self._run(blocks, torch.cat([_fit_to(h, skip), skip], dim=1), emb, tokens)
        out = self.out(h)
        return depth_to_space(out, self.patch_size) if self.patch_size > 1 else out
