"""The training loop both training stages share: steps, progress bar, logging cadence, checkpoints."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from synthmri.config import TrainParams
from synthmri.training.checkpoint import save_checkpoint


class Trainer(Protocol):
    step: int
    history: list[dict[str, float]]

    def next_step(self) -> dict[str, float]:
        """Run one optimisation step on the batch of ``self.step``; return scalar losses."""

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs (tensors and plain containers only)."""


def train_loop(trainer: Trainer, schedule: TrainParams, checkpoint_dir: Path, desc: str,
               validate: Callable[[], None], mlflow: Any | None = None, postfix: tuple[str, ...] = ()) -> float:
    """Run ``trainer`` from its current step to ``schedule.steps``; returns volumes (samples) per second.

    Losses are recorded every ``log_every`` steps (history + MLflow), ``validate`` runs every
    ``val_every`` steps, and a checkpoint is written atomically every ``checkpoint_every`` steps.
    """
    batch = schedule.batch_size
    bar = tqdm(total=schedule.steps * batch, initial=trainer.step * batch, unit="vol", desc=desc,
               dynamic_ncols=True, mininterval=1.0)
    started, seen = time.perf_counter(), 0
    while trainer.step < schedule.steps:
        losses = trainer.next_step()
        trainer.step += 1
        seen += batch
        bar.update(batch)
        bar.set_postfix({k: f"{losses[k]:.4f}" for k in postfix if k in losses}, refresh=False)
        if trainer.step % schedule.log_every == 0 or trainer.step == schedule.steps:
            trainer.history.append({"step": trainer.step, **losses})
            if mlflow is not None:
                mlflow.log_metrics(losses, step=trainer.step)
        if trainer.step < schedule.steps:
            if trainer.step % schedule.val_every == 0:
                validate()
            if trainer.step % schedule.checkpoint_every == 0:
                save_checkpoint(checkpoint_dir, trainer.step, trainer.state())
    bar.close()
    return seen / max(time.perf_counter() - started, 1e-9)
