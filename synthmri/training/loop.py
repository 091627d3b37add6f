"""The training loop both training stages share: steps, progress bar, logging cadence, checkpoints."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from synthmri.config import TrainParams
from synthmri.errors import StageError
from synthmri.logs import get_logger
from synthmri.training.checkpoint import resume_state, save_checkpoint
from synthmri.training.distributed import Context
from synthmri.training.runtime import rng_state, set_rng_state

log = get_logger(__name__)

MAX_SKIPS_IN_A_ROW = 10  # non-finite steps in a row that mean the run has diverged, not a rare numerical accident


class Trainer(Protocol):
    step: int
    history: list[dict[str, float]]

    def next_step(self) -> dict[str, float]:
        """Run one optimisation step on the batch of ``self.step``; return scalar losses."""

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs (tensors and plain containers only)."""


class ResumableTrainer:
    """Checkpoint state shared by both trainers: subclasses name their stateful parts in ``stateful``
    (modules, optimizers, EMA: anything with ``state_dict``/``load_state_dict``)."""

    name = "model"
    step: int
    history: list[dict[str, float]]
    val_history: list[dict[str, float]]
    checkpoint_dir: Path
    fingerprint: str

    def stateful(self) -> dict[str, Any]:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "history": self.history,
            "val_history": self.val_history,
            "rng": rng_state(),
            **{key: part.state_dict() for key, part in self.stateful().items()},
        }

    def resume(self) -> bool:
        """Continue from the newest checkpoint of the same run, if any."""
        state = resume_state(self.checkpoint_dir, self.fingerprint)
        if state is None:
            return False
        for key, part in self.stateful().items():
            part.load_state_dict(state[key])
        self.step, self.history, self.val_history = state["step"], state["history"], state["val_history"]
        set_rng_state(state["rng"])
        log.info("Resuming %s training from the checkpoint at step %d", self.name, self.step)
        return True


def train_loop(
    trainer: Trainer,
    schedule: TrainParams,
    checkpoint_dir: Path,
    desc: str,
    validate: Callable[[], None],
    mlflow: Any | None = None,
    postfix: tuple[str, ...] = (),
    ctx: Context | None = None,
) -> float:
    """Run ``trainer`` from its current step to ``schedule.steps``; returns volumes (samples) per second.

    Losses are recorded every ``log_every`` steps (history + MLflow), ``validate`` runs every
    ``val_every`` steps, and a checkpoint is written atomically every ``checkpoint_every`` steps.
    Under DDP every rank steps; only rank 0 shows progress, validates, logs and checkpoints.
    A step whose gradients were not finite is skipped (the trainer reports ``skipped_step``) with a warning;
    :data:`MAX_SKIPS_IN_A_ROW` of them in a row stop the run with the reason, before it wastes more minutes.
    """
    ctx = ctx or Context()
    batch = schedule.batch_size * schedule.grad_accumulation * ctx.world_size  # volumes per optimizer step
    bar = tqdm(
        total=schedule.steps * batch,
        initial=trainer.step * batch,
        unit="vol",
        desc=desc,
        dynamic_ncols=True,
        mininterval=1.0,
        disable=not ctx.is_main,
    )
    started, seen, skips_in_a_row = time.perf_counter(), 0, 0
    while trainer.step < schedule.steps:
        losses = trainer.next_step()
        trainer.step += 1
        skips_in_a_row = check_skipped_step(losses, trainer.step, skips_in_a_row, desc)
        seen += batch
        bar.update(batch)
        bar.set_postfix({k: f"{losses[k]:.4f}" for k in postfix if k in losses}, refresh=False)
        if trainer.step % schedule.log_every == 0 or trainer.step == schedule.steps:
            trainer.history.append({"step": trainer.step, **losses})
            if mlflow is not None and ctx.is_main:
                mlflow.log_metrics(losses, step=trainer.step)
        if trainer.step < schedule.steps and ctx.is_main:
            if trainer.step % schedule.val_every == 0:
                validate()
            if trainer.step % schedule.checkpoint_every == 0:
                save_checkpoint(checkpoint_dir, trainer.step, trainer.state())
    bar.close()
    return seen / max(time.perf_counter() - started, 1e-9)


def check_skipped_step(losses: dict[str, float], step: int, skips_in_a_row: int, desc: str) -> int:
    """Warn about a skipped (non-finite) step; stop the run after :data:`MAX_SKIPS_IN_A_ROW` in a row.
    Returns the new count of skips in a row."""
    if not losses.get("skipped_step"):
        return 0
    skips_in_a_row += 1
    log.warning(
        "%s: step %d skipped: its gradients were not finite (NaN or inf); the weights are unchanged", desc, step
    )
    if skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
        raise StageError(
            f"{desc}: {skips_in_a_row} steps in a row up to step {step} had non-finite gradients, so training has "
            "diverged: lower the learning rate, or train in fp32 (precision: fp32, cpu_bf16: false)"
        )
    return skips_in_a_row
