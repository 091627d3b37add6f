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
        raise StageError(
            f"MLflow tracking server {uri} is unreachable ({exc}); start it, or unset "
            "MLFLOW_TRACKING_URI to log to the local mlflow.db"
        ) from None


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
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> Iterator[Any]:
    """Start (or nest under ``SYNTHMRI_PARENT_RUN_ID``) an MLflow run for one stage."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_experiment(experiment_id=ensure_experiment())  # checks the server, sets the tracking URI
    parent = os.environ.get("SYNTHMRI_PARENT_RUN_ID")
    all_tags = {"synthmri.stage": stage, "git_commit": git_commit(), **(tags or {})}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=stage, tags=all_tags) as run:
        flat = {k: str(v)[:500] for k, v in flatten(params).items()}
        items = list(flat.items())
        for start in range(0, len(items), 100):
            mlflow.log_params(dict(items[start : start + 100]))
        log.info(
            "MLflow run %s (%s) in experiment '%s' at %s (UI: #/experiments/%s?workflowType=machine_learning)",
            run.info.run_id[:8],
            stage,
            EXPERIMENT,
            uri,
            run.info.experiment_id,
        )
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
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags
    )
    log.info("Registered %s version %s", name, version.version)
    return str(version.version)


# --------------------------------------------------------------------------------------------------
# Nightly runs (flows/synthesize.py): a parent run per pipeline run, lineage tags, the published data
# set as an MLflow dataset, and the ``production`` alias on the model versions behind a published set.
# The stages' own runs nest under the parent through SYNTHMRI_PARENT_RUN_ID (see stage_run).


def client() -> Any:
    """An ``MlflowClient`` on :func:`tracking_uri`, after checking that a server answers."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


# MLflow 3's UI opens an experiment in the view its kind names (without it: the GenAI view); ours trains models
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment() -> str:
    """The pipeline experiment's id, created (artifacts in ``mlartifacts/`` for a local store) if needed, and
    tagged as model development so the MLflow UI opens it on runs, metrics and models."""
    c = client()
    experiment = c.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        uri = tracking_uri()
        location = None if uri.startswith(("http://", "https://")) else Path("mlartifacts").resolve().as_uri()
        with contextlib.suppress(Exception):  # another process may have created it meanwhile
            c.create_experiment(EXPERIMENT, artifact_location=location, tags=EXPERIMENT_KIND)
        experiment = c.get_experiment_by_name(EXPERIMENT)
    for key, value in EXPERIMENT_KIND.items():
        if experiment.tags.get(key) != value:  # an experiment made by an older version, or by hand
            c.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def start_parent_run(run_name: str, tags: dict[str, str] | None = None) -> str:
    """Create the parent run of one pipeline run (left open; see :func:`end_parent_run`); return its id."""
    c = client()
    run = c.create_run(
        ensure_experiment(),
        run_name=run_name,
        tags={"synthmri.kind": "pipeline", "git_commit": git_commit(), **(tags or {})},
    )
    log.info(
        "MLflow parent run %s (%s) in experiment '%s' at %s", run.info.run_id[:8], run_name, EXPERIMENT, tracking_uri()
    )
    return run.info.run_id


def set_run_tags(run_id: str, tags: dict[str, Any]) -> None:
    c = client()
    for key, value in tags.items():
        if value is not None:
            c.set_tag(run_id, key, str(value)[:5000])


def log_run_metrics(run_id: str, metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Log the finite numbers of a flat dict as metrics (booleans as 0/1; strings are skipped)."""
    import math

    clean = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            clean[f"{prefix}{key}"] = float(value)
    if clean:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client().log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in clean.items()])
    return clean


def end_parent_run(run_id: str, status: str = "FINISHED") -> None:
    """``status``: FINISHED, FAILED or KILLED."""
    client().set_terminated(run_id, status=status)


def log_dataset(
    run_id: str, manifest_csv: Path, name: str, digest: str, source: str, context: str = "synthetic"
) -> None:
    """Log a data set (its manifest as the table, the DVC hash as digest) as an input of ``run_id``."""
    import warnings

    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    frame = pd.read_csv(manifest_csv)
    with warnings.catch_warnings():  # hints on integer columns and on two equivalent local source types
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest[:36])
        entity = dataset._to_mlflow_entity()
    client().log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])


def set_alias(
    registry_files: list[Path] | tuple[Path, ...], alias: str = "production", tags: dict[str, str] | None = None
) -> dict[str, str]:
    """Point ``alias`` at the model versions named in the stages' ``registry.json`` files.

    Returns {model name: version}. A version missing from this tracking store (trained against
    another ``MLFLOW_TRACKING_URI``) is skipped with a warning.
    """
    import json

    from mlflow.exceptions import MlflowException

    c = client()
    moved = {}
    for path in registry_files:
        if not Path(path).is_file():
            log.warning("No %s: no model version to mark '%s'", path, alias)
            continue
        entry = json.loads(Path(path).read_text())
        name, version = str(entry["name"]), str(entry["version"])
        try:
            c.set_registered_model_alias(name, alias, version)
            for key, value in (tags or {}).items():
                c.set_model_version_tag(name, version, key, value)
        except MlflowException as exc:
            log.warning("Could not set alias '%s' on %s version %s: %s", alias, name, version, exc)
            continue
        moved[name] = version
        log.info("MLflow alias %s@%s -> version %s", name, alias, version)
    return moved
