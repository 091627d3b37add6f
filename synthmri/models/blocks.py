"""Building blocks shared by the VQ-GAN and the diffusion U-Net, generic in the number of spatial dims.

As in MONAI, ``spatial_dims`` (2 or 3) picks ``Conv2d`` or ``Conv3d``, so the same block serves the
3D models and the 2D slice discriminator / tests. Normalisation is always GroupNorm (never BatchNorm:
its running statistics break under DDP and with batch size 1, the usual batch size of 3D MRI).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: A convolution whose input is smaller than this along any axis runs in fp32 under CPU bf16 autocast. oneDNN's bf16
#: conv3d weight gradient came back non-finite on 2x2x2 maps at almost every step of the test suite's tiny
#: diffusion U-Net (conv_in, an upsampling conv and a residual conv, all on 2x2x2), never on 4x4x4 or larger;
#: maps this small cost nothing in fp32 (benchmarks/RESULTS.md, "bf16 diffusion steps", 16th session).
FP32_BELOW_VOXELS = 4


class _Fp32OnTinyCpuMaps:
    """Mixin for ``nn.ConvNd``: run in fp32 when CPU bf16 autocast is on and the map is tiny (see
    :data:`FP32_BELOW_VOXELS`); otherwise exactly the parent's forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and min(x.shape[2:]) < FP32_BELOW_VOXELS and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class Conv3d(_Fp32OnTinyCpuMaps, nn.Conv3d):
    """``nn.Conv3d`` that keeps tiny maps in fp32 under CPU bf16 autocast (same parameters and state dict)."""


class Conv2d(_Fp32OnTinyCpuMaps, nn.Conv2d):
    """``nn.Conv2d`` that keeps tiny maps in fp32 under CPU bf16 autocast (same parameters and state dict)."""


def conv_nd(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    padding: int | None = None,
) -> nn.Module:
    """A ``Conv{spatial_dims}d`` (:class:`Conv3d` / :class:`Conv2d`: tiny maps in fp32 under CPU bf16 autocast);
    ``padding`` defaults to ``kernel_size // 2`` (size preserving at stride 1).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: cubic (square) kernel size.
        stride: stride along every axis.
        padding: zero padding; ``None`` for "same" padding of odd kernels.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    conv = Conv3d if spatial_dims == 3 else Conv2d
    return conv(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2 if padding is None else padding
    )


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm that fails early, naming both numbers, when ``groups`` does not divide ``channels``."""
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible by {groups} groups")
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of ``module``, so a residual branch ending in it starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def space_to_depth(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Fold every ``patch``-sized cube (square) of ``x`` into channels: ``(B, C, *S)`` → ``(B, C·patch^d, *S/patch)``.

    The channel order is that of ``torch.nn.functional.pixel_unshuffle`` (which exists for 2D only):
    input channel first, then the offsets inside the patch in row-major order. Every spatial size must
    be divisible by ``patch``. This is DiT's "patchify" for a convolutional network: a U-Net on the
    folded map costs what it costs at the coarse grid, whatever the latent grid's resolution.
    """
    b, c, *sizes = x.shape
    if any(n % patch for n in sizes):
        raise ValueError(f"spatial size {tuple(sizes)} is not divisible by the patch size {patch}")
    d = len(sizes)
    x = x.reshape(b, c, *[v for n in sizes for v in (n // patch, patch)])
    x = x.permute(0, 1, *[3 + 2 * i for i in range(d)], *[2 + 2 * i for i in range(d)])
    return x.reshape(b, c * patch**d, *[n // patch for n in sizes])


def depth_to_space(x: torch.Tensor, patch: int) -> torch.Tensor:
    """The inverse of :func:`space_to_depth`: ``(B, C·patch^d, *S)`` → ``(B, C, *S·patch)``."""
    b, folded, *sizes = x.shape
    d = len(sizes)
    c = folded // patch**d
    x = x.reshape(b, c, *[patch] * d, *sizes)
    x = x.permute(0, 1, *[v for i in range(d) for v in (2 + d + i, 2 + i)])
    return x.reshape(b, c, *[n * patch for n in sizes])


class ResidualBlock(nn.Module):
    """GroupNorm → SiLU → conv → GroupNorm (+ embedding) → SiLU → dropout → conv, plus a skip.

    The output conv is zero-initialised, so every block starts as the identity (or the 1x1 skip
    projection): deep encoders/U-Nets then train stably from the first step without warm-up tricks.

    The optional embedding (diffusion timestep + covariates, shape ``(B, emb_channels)``) enters by
    scale-shift normalisation (``h = norm(h) * (1 + scale) + shift``, as in the ADM / improved-DDPM U-Net),
    which conditions every channel more strongly than adding the embedding before the conv.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels; ``None`` keeps ``in_channels``. When it differs, the skip is a 1x1 conv.
        norm_groups: GroupNorm groups; must divide both channel counts.
        dropout: dropout probability before the output conv.
        emb_channels: width of the conditioning embedding, or ``None`` for an unconditional block.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int | None = None,
        norm_groups: int = 8,
        dropout: float = 0.0,
        emb_channels: int | None = None,
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = conv_nd(spatial_dims, in_channels, out_channels)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.emb_proj = (
            nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels)) if emb_channels is not None else None
        )
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(conv_nd(spatial_dims, out_channels, out_channels))
        self.skip = (
            conv_nd(spatial_dims, in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B, in_channels, *spatial)``; ``emb``: ``(B, emb_channels)``, required iff built with one."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb_proj is not None:
            if emb is None:
                raise ValueError("this ResidualBlock was built with emb_channels and needs an embedding")
            scale, shift = self.emb_proj(emb).view(*emb.shape[:1], -1, *(1,) * (h.ndim - 2)).chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve every spatial size with a stride-2 3x3 conv (learned, unlike pooling; exact for even sizes)."""

    def __init__(self, spatial_dims: int, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = conv_nd(spatial_dims, channels, out_channels or channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double every spatial size: nearest-neighbour interpolation, then a 3x3 conv.

    Nearest + conv avoids the checkerboard artefacts of transposed convolutions.
    """

    def __init__(self, spatial_dims: int, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = conv_nd(spatial_dims, channels, out_channels or channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, with a GroupNorm pre-norm and a residual.

    Uses ``torch.nn.functional.scaled_dot_product_attention`` so that flash / memory-efficient kernels
    are picked on GPU: the attention matrix over a 3D grid is the first memory wall otherwise. Works
    for any number of spatial dims (positions are flattened). The output projection is zero-initialised
    so the block starts as the identity.

    Args:
        channels: input = output channels; must be divisible by ``num_heads``.
        num_heads: attention heads.
        norm_groups: GroupNorm groups.
    """

    def __init__(self, channels: int, num_heads: int = 1, norm_groups: int = 8) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"AttentionBlock: {channels} channels are not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, *spatial)`` → same shape."""
        b, c, *spatial = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(tokens).view(b, -1, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        h = self.proj(h.transpose(1, 2).reshape(b, -1, c))
        return x + h.transpose(1, 2).reshape(b, c, *spatial)
