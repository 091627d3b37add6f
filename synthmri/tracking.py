"""MLflow tracking: one experiment for the pipeline, one run per stage, models registered by name.

The store is ``MLFLOW_TRACKING_URI`` when set, else a local SQLite file ``mlflow.db`` with artifacts
in ``mlartifacts/`` (both ignored by git). A remote server that does not answer makes the stage fail
within seconds, before any training starts.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from synthmri.errors import StageError
from synthmri.logs import get_logger

log = get_logger(__name__)

EXPERIMENT = os.environ.get("SYNTHMRI_EXPERIMENT", "synthmri")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (seconds, not after an hour of training) when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            response.read()
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise StageError(f"MLflow tracking server {uri} is unreachable ({exc}); start it, or unset "
                         "MLFLOW_TRACKING_URI to log to the local mlflow.db") from None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, the form MLflow params take."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> Iterator[Any]:
    """Start (or nest under ``SYNTHMRI_PARENT_RUN_ID``) an MLflow run for one stage."""
    import mlflow

    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        location = None if uri.startswith(("http://", "https://")) else Path("mlartifacts").resolve().as_uri()
        with contextlib.suppress(Exception):  # another process may have created it meanwhile
            mlflow.create_experiment(EXPERIMENT, artifact_location=location)
    mlflow.set_experiment(EXPERIMENT)
    parent = os.environ.get("SYNTHMRI_PARENT_RUN_ID")
    all_tags = {"synthmri.stage": stage, "git_commit": git_commit(), **(tags or {})}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=stage, tags=all_tags) as run:
        flat = {k: str(v)[:500] for k, v in flatten(params).items()}
        items = list(flat.items())
        for start in range(0, len(items), 100):
            mlflow.log_params(dict(items[start:start + 100]))
        log.info("MLflow run %s (%s) in experiment '%s' at %s", run.info.run_id[:8], stage, EXPERIMENT, uri)
        yield run


def register_model(name: str, artifact_dir: Path, run: Any, tags: dict[str, str]) -> str:
    """Log ``artifact_dir`` (checkpoint + config) and register it as a new version of ``name``."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow.log_artifacts(str(artifact_dir), artifact_path="model")
    client = MlflowClient()
    with contextlib.suppress(MlflowException):
        client.create_registered_model(name)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                          tags=tags)
    log.info("Registered %s version %s", name, version.version)
    return str(version.version)
