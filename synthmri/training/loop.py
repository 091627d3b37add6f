"""The training loop both training stages share: steps, progress bar, logging cadence, checkpoints."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from synthmri.config import TrainParams
from synthmri.logs import get_logger
from synthmri.training.checkpoint import resume_state, save_checkpoint
from synthmri.training.distributed import Context
from synthmri.training.runtime import rng_state, set_rng_state

log = get_logger(__name__)


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
    started, seen = time.perf_counter(), 0
    while trainer.step < schedule.steps:
        losses = trainer.next_step()
        trainer.step += 1
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
