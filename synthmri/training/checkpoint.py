"""Checkpoints that are safe to write and safe to read.

Written atomically (temporary file + ``os.replace``), so a killed run never leaves a half-written
checkpoint under the final name. Read with ``torch.load(weights_only=True)``: only tensors and plain
containers are accepted, and a file carrying executable pickle content is refused.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from synthmri.errors import StageError
from synthmri.io import atomic_path, sha256_file
from synthmri.logs import get_logger

log = get_logger(__name__)

_NAME = re.compile(r"^step-(\d+)\.pt$")


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep_last: int = 2) -> Path:
    """Write ``step-XXXXXXX.pt`` atomically and prune all but the ``keep_last`` newest."""
    directory = Path(directory)
    path = directory / f"step-{step:07d}.pt"
    with atomic_path(path) as tmp:
        torch.save({"step": step, **state}, tmp)
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load tensors and plain containers only; anything else is refused with a clear reason."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise StageError(
            f"refusing to load {path}: it holds objects other than tensors and plain "
            f"containers (possible executable pickle content). {first}"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise StageError(f"cannot read checkpoint {path}: {exc}") from None


def latest_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The newest readable checkpoint, or None for a fresh start."""
    found = list_checkpoints(directory)
    return load_checkpoint(found[-1]) if found else None


# Settings that change how or how long a run executes, not what it learns: resuming with them changed
# continues the same run (processes and grad_accumulation change the batch, so they are not here).
SCHEDULE_ONLY = {
    "steps",
    "checkpoint_every",
    "val_every",
    "log_every",
    "sample_every",
    "num_workers",
    "device",
    "precision",
    "cpu_bf16",
    "activation_checkpointing",
    "channels_last",
    "compile",
    "pin_memory",
}


def config_fingerprint(section: dict[str, Any], seed: int, data_file: str | Path) -> str:
    """Identity of a training run: its config section (minus step budget and logging cadence, so that
    extending a run resumes it), the seed, and the exact training data (file checksum)."""
    config = {k: v for k, v in section.items() if k != "train"}
    config["train"] = {k: v for k, v in section.get("train", {}).items() if k not in SCHEDULE_ONLY}
    blob = json.dumps({"config": config, "seed": seed}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob + sha256_file(data_file).encode()).hexdigest()[:16]


def resume_state(directory: str | Path, fingerprint: str) -> dict[str, Any] | None:
    """The newest checkpoint of the same run, or None; checkpoints of another run are discarded."""
    state = latest_checkpoint(directory)
    if state is None:
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("Discarding checkpoints in %s: they belong to another configuration or data set", directory)
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return state
