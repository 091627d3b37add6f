"""Patch discriminators for the VQ-GAN: a 3D PatchGAN and a 2D one applied to slices of the volume.

No BatchNorm anywhere: its batch statistics break under DDP and at batch size 1 (lessons of the
3D VQ-GANs in the field); GroupNorm is used instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from synthmri.config import DiscriminatorParams
from synthmri.models.blocks import conv_nd
from synthmri.models.slicing import slice_indices, take_slices


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``layers`` stride-2 4x4 convs (widths ``channels * 2**i``, capped at ``8 * channels``),
    one size-preserving 3x3 conv, then a 3x3 conv to one logit per patch.

    Every hidden conv is followed by GroupNorm (except the first, as in pix2pix) and LeakyReLU(0.2).
    The 3x3 tail (pix2pix uses 4x4) keeps the patch grid non-empty on small smoke volumes.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        channels: width of the first layer.
        layers: number of stride-2 layers (each halves the patch grid).
        norm_groups: GroupNorm groups, reduced to the largest common divisor with a layer's width.

    Returns from ``forward``: ``(logits (B, 1, *patch_grid), [activations of every hidden layer])``; the
    activations feed the feature-matching loss.
    """

    def __init__(
        self, spatial_dims: int = 3, in_channels: int = 1, channels: int = 32, layers: int = 3, norm_groups: int = 8
    ) -> None:
        super().__init__()
        widths = [min(channels * 2**i, channels * 8) for i in range(layers + 1)]
        blocks = [
            nn.Sequential(conv_nd(spatial_dims, in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2))
        ]
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1
            kernel, padding = (4, 1) if stride == 2 else (3, 1)
            blocks.append(
                nn.Sequential(
                    conv_nd(spatial_dims, widths[i - 1], widths[i], kernel, stride=stride, padding=padding),
                    nn.GroupNorm(math.gcd(norm_groups, widths[i]), widths[i]),
                    nn.LeakyReLU(0.2),
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.to_logits = conv_nd(spatial_dims, widths[-1], 1, 3)

    @classmethod
    def from_params(cls, p: DiscriminatorParams, spatial_dims: int = 3, in_channels: int = 1) -> PatchDiscriminator:
        return cls(spatial_dims, in_channels, p.channels, p.layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return self.to_logits(x), features


class SliceDiscriminator(nn.Module):
    """A 2D :class:`PatchDiscriminator` judging random 2D slices of a 3D volume along all three axes.

    Complements the 3D discriminator with sharper in-plane judgement at a fraction of the cost (as in
    the 3D VQ-GANs of the literature). Pass the same ``indices`` for a real volume and its
    reconstruction when their features are compared (feature matching).

    Args:
        disc2d: the 2D discriminator (``spatial_dims=2``).
        slices_per_axis: random slices drawn along each axis per call.

    Returns from ``forward``: ``(logits, features)``: the patch logits of all slices and axes flattened to
    ``(B, n)``, and the hidden activations of the three axes concatenated (axis 0's layers first).
    """

    def __init__(self, disc2d: PatchDiscriminator, slices_per_axis: int = 4) -> None:
        super().__init__()
        self.disc2d, self.slices_per_axis = disc2d, slices_per_axis

    @classmethod
    def from_params(cls, p: DiscriminatorParams, in_channels: int = 1, slices_per_axis: int = 4) -> SliceDiscriminator:
        return cls(PatchDiscriminator.from_params(p, spatial_dims=2, in_channels=in_channels), slices_per_axis)

    def sample_indices(
        self, spatial_shape: tuple[int, int, int], generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """Random slice positions for one call (use them for both real and reconstructed volumes)."""
        return slice_indices(spatial_shape, self.slices_per_axis, random=True, generator=generator)

    def forward(
        self, x: torch.Tensor, indices: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if indices is None:
            indices = self.sample_indices(x.shape[2:])
        logits, features = [], []
        for slices in take_slices(x, indices):
            lg, ft = self.disc2d(slices)
            logits.append(lg.reshape(x.shape[0], -1))
            features += ft
        return torch.cat(logits, dim=1), features
