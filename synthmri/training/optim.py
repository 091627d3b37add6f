"""Optimizer, learning-rate schedule and the guarded optimizer step of both training stages.

The schedules are diffusers' (``diffusers.optimization.get_scheduler``), stepped once per optimizer
step; the scheduler is part of the checkpoint so that a resumed run continues on the same curve.
:func:`clipped_step` skips a step whose gradients are not finite, as ``torch.amp.GradScaler`` does for
fp16: one NaN gradient would otherwise turn every weight (and every later step) into NaN without a word.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from synthmri.config import TrainParams


def adamw(
    parameters: Iterable[torch.nn.Parameter] | Iterable[dict], t: TrainParams, lr: float | None = None
) -> torch.optim.AdamW:
    """AdamW with ``t``'s betas and weight decay; ``parameters`` may be groups (dicts) with their own ``lr``."""
    return torch.optim.AdamW(parameters, lr=t.lr if lr is None else lr, betas=t.betas, weight_decay=t.weight_decay)


def lr_scheduler(optimizer: torch.optim.Optimizer, t: TrainParams) -> torch.optim.lr_scheduler.LRScheduler:
    """``t.lr_schedule`` over ``t.steps`` optimizer steps after ``t.warmup_steps`` of linear warm-up."""
    from diffusers.optimization import get_scheduler  # diffusers is a heavy import: only when training starts

    return get_scheduler(t.lr_schedule, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps)


def clipped_step(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the gradients of ``parameters`` to ``max_norm`` and step ``optimizer``, unless their norm is not
    finite (NaN/inf): then the step is skipped and the weights and the optimizer's moments stay as they were.

    Returns the gradient norm before clipping (non-finite for a skipped step). Under DDP the gradients are
    already all-reduced, so every rank takes the same decision.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    if torch.isfinite(grad_norm):
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def skipped(grad_norm: float) -> float:
    """1.0 for a step :func:`clipped_step` skipped, else 0.0: the ``skipped_step`` value trainers report."""
    return 0.0 if math.isfinite(grad_norm) else 1.0
