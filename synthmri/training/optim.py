"""Optimizer and learning-rate schedule of both training stages, built from one ``TrainParams`` section.

The schedules are diffusers' (``diffusers.optimization.get_scheduler``), stepped once per optimizer
step; the scheduler is part of the checkpoint so that a resumed run continues on the same curve.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from synthmri.config import TrainParams


def adamw(parameters: Iterable[torch.nn.Parameter], t: TrainParams, lr: float | None = None) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameters, lr=t.lr if lr is None else lr, betas=t.betas, weight_decay=t.weight_decay)


def lr_scheduler(optimizer: torch.optim.Optimizer, t: TrainParams) -> torch.optim.lr_scheduler.LRScheduler:
    """``t.lr_schedule`` over ``t.steps`` optimizer steps after ``t.warmup_steps`` of linear warm-up."""
    from diffusers.optimization import get_scheduler  # diffusers is a heavy import: only when training starts

    return get_scheduler(t.lr_schedule, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps)
