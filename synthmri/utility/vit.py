"""The utility stage's model: MONAI's 3D Vision Transformer with a linear regression/classification head.

``monai.networks.nets.ViT`` with ``classification=True`` prepends a class token and ends its head in a Tanh by
default; ``post_activation=None`` removes it (a Tanh would cap a standardized age regression and squash logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from synthmri.config import ViTParams


class ViTRegressor(nn.Module):
    """``(N, 1, D, H, W)`` volumes -> ``(N, n_outputs)`` raw outputs (see :class:`~.targets.TargetCodec`)."""

    def __init__(self, vit: ViTParams, shape: Sequence[int], n_outputs: int) -> None:
        super().__init__()
        from monai.networks.nets import ViT

        bad = [s for s in shape if s % vit.patch_size]
        if bad:
            raise ValueError(f"utility.vit.patch_size {vit.patch_size} does not divide the volume shape {tuple(shape)}")
        self.vit = ViT(
            in_channels=1,
            img_size=tuple(int(s) for s in shape),
            patch_size=vit.patch_size,
            hidden_size=vit.hidden_size,
            mlp_dim=vit.mlp_dim,
            num_layers=vit.num_layers,
            num_heads=vit.num_heads,
            classification=True,
            num_classes=n_outputs,
            dropout_rate=vit.dropout,
            spatial_dims=3,
            post_activation=None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)[0]

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
