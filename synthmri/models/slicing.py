"""2.5D views of a 3D volume: 2D slices along each of the three axes.

Shared by the 2.5D perceptual loss and the slice discriminator, which both judge a volume by 2D
networks applied to slices of all three orientations (axial, coronal, sagittal).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def slice_indices(
    spatial_shape: Sequence[int],
    per_axis: int,
    random: bool = False,
    generator: torch.Generator | None = None,
    central_fraction: float = 0.6,
) -> list[torch.Tensor]:
    """Slice positions along each of the three axes, inside the central ``central_fraction`` of the axis.

    Edge slices of a brain volume are mostly background, so they would dilute any slice-wise score.

    Args:
        spatial_shape: ``(D, H, W)``.
        per_axis: slices per axis.
        random: ``False``: evenly spaced (centres of ``per_axis`` equal bins; one slice is the mid-slice).
            ``True``: distinct random positions drawn with ``generator`` (or the global RNG).
        generator: CPU generator for reproducible random slices.
        central_fraction: part of each axis (centred) the slices are taken from.

    Returns:
        three ``int64`` tensors of positions, one per axis.
    """
    if len(spatial_shape) != 3:
        raise ValueError(f"expected a 3D spatial shape, got {tuple(spatial_shape)}")
    out = []
    for size in spatial_shape:
        width = max(1, round(size * central_fraction))
        start = (size - width) // 2
        if random:
            pos = (
                torch.randperm(width, generator=generator)[:per_axis]
                if per_axis <= width
                else torch.randint(width, (per_axis,), generator=generator)
            )
        else:
            pos = ((torch.arange(per_axis) + 0.5) * width / per_axis).long()
        out.append(pos + start)
    return out


def take_slices(x: torch.Tensor, indices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Cut ``x`` ``(B, C, D, H, W)`` into 2D batches, one per axis:
    ``(B*k0, C, H, W)``, ``(B*k1, C, D, W)``, ``(B*k2, C, D, H)`` (batch-major order)."""
    if x.ndim != 5:
        raise ValueError(f"expected a (B, C, D, H, W) volume, got shape {tuple(x.shape)}")
    slices = []
    for axis, idx in enumerate(indices):
        s = x.index_select(2 + axis, idx.to(x.device)).movedim(2 + axis, 1)  # (B, k, C, *2D)
        slices.append(s.reshape(-1, *s.shape[2:]))
    return slices
