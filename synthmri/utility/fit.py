"""Training and prediction of the utility ViT: one function per phase, deterministic from a seed."""

from __future__ import annotations

import numpy as np
import torch

from synthmri.config import FitParams
from synthmri.utility.targets import TargetCodec


def fit(
    model: torch.nn.Module,
    volumes: torch.Tensor,
    values: np.ndarray,
    known: np.ndarray,
    codec: TargetCodec,
    phase: FitParams,
    seed: int,
) -> list[float]:
    """Train ``model`` in place for ``phase.steps`` AdamW steps (cosine decay to 0) on random batches of
    ``volumes`` ``(N, 1, D, H, W)``; returns the loss of every step. Batches are drawn with replacement from a
    generator seeded by ``seed``, so a run is reproducible whatever ran before it."""
    if len(volumes) == 0:
        raise ValueError("no volumes to train on")
    device = next(model.parameters()).device
    y = torch.as_tensor(values, device=device)
    mask = torch.as_tensor(known, device=device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=phase.lr, weight_decay=phase.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=phase.steps)
    model.train()
    losses = []
    for _ in range(phase.steps):
        batch = torch.randint(len(volumes), (phase.batch_size,), generator=generator)
        loss = codec.loss(model(volumes[batch].to(device)), y[batch.to(device)], mask[batch.to(device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return losses


@torch.inference_mode()
def predict(model: torch.nn.Module, volumes: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """Raw outputs ``(N, n_outputs)`` of ``model`` in evaluation mode."""
    device = next(model.parameters()).device
    model.eval()
    return np.concatenate(
        [
            model(volumes[s : s + batch_size].to(device)).float().cpu().numpy()
            for s in range(0, len(volumes), batch_size)
        ]
    )
