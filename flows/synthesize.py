"""Prefect flow ``synthesize``: the DVC pipeline stage by stage, the quality report, then publishing.

Thin on purpose: every stage is ``dvc repro --single-item <stage>`` (so DVC's cache decides what
re-runs, exactly as a plain ``dvc repro``), in the order a plain ``dvc repro`` runs them; the
release steps are :func:`synthmri.publish.publish`; MLflow bookkeeping is in :mod:`synthmri.tracking`.

- One task per stage, retried on transient failures (a DVC lock held by a manual ``dvc repro``, a
  tracking server restart…; a configuration error is not retried). The stage's output is streamed
  into the Prefect run's logs line by line (progress bars at most every 15 s).
- One pipeline run at a time: the flow holds ``.synthmri.lock`` in the repository while it runs.
  ``on_busy="fail"`` (default) ends a second run at once with a message naming the holder;
  ``on_busy="wait"`` queues it.
- A markdown artifact ``synthmri-quality-report`` summarizes ``reports/metrics.json``.
- ``publish`` runs only when the quality gate passed; a failed gate fails the flow run (nothing was
  published) unless ``publish=False``.
- MLflow: a parent run per pipeline run (tags: git commit, ``dvc.lock`` digest, data-set tag, Prefect
  flow-run id); the training stages' runs nest under it; after a publish, the alias ``production``
  moves to the model versions that made the set, and the set is logged as an MLflow dataset.

Run it ad hoc with ``python flows/synthesize.py`` (from the repository root), or through the
``nightly`` deployment of ``prefect.yaml`` (``scripts/nightly-local.sh``).
"""

from __future__ import annotations

import codecs
import contextlib
import datetime as dt
import json
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from synthmri import publish as pub
from synthmri import tracking
from synthmri.catalog import MODEL_REGISTRY_FILES, REPORT_METRICS_FILE, SYNTHETIC_DIR
from synthmri.io import sha256_file

PROGRESS_EVERY_S = 15.0
# A failing stage is retried unless its output says the failure cannot go away by itself.
PERMANENT = re.compile(
    r"configuration error|exited with (?:code )?2\b|unknown stage|is not a valid|"
    r"does not exist in dvc\.yaml|Stage .* not found",
    re.IGNORECASE,
)


class StageFailed(RuntimeError):
    """``dvc repro`` of one stage failed; ``transient`` says whether a retry may help."""

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message, transient)
        self.message, self.transient = message, transient

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------------------------------
# helpers (plain functions: tested without Prefect)


def list_stages(repo: Path) -> list[str]:
    """The stages that a plain ``dvc repro`` runs, upstream first: those of ``dvc.yaml`` in file order
    (templated ``foreach`` stages expanded), preceded by the stages of other pipeline files that they
    depend on (the demo cohort's ``demo/dvc.yaml:demo`` while ``ingest.root`` is ``data/raw/demo``)."""
    import networkx as nx
    from dvc.repo import Repo

    with contextlib.chdir(repo), Repo(".") as dvc_repo:  # DVC reads targets and writes addresses cwd-relative
        file_order = {stage: i for i, stage in enumerate(dvc_repo.stage.collect("dvc.yaml"))}
        needed = set(dvc_repo.stage.collect("dvc.yaml", with_deps=True))
        upstream_first = dvc_repo.index.graph.reverse().subgraph(needed)  # DVC's edges point to dependencies
        ordered = nx.lexicographical_topological_sort(
            upstream_first, key=lambda s: (file_order.get(s, -1), s.addressing)
        )
        return [stage.addressing for stage in ordered]


def stage_env(parent_run_id: str | None) -> dict[str, str]:
    """The environment of a stage: this one, plus the MLflow parent run, minus Prefect's run identity."""
    env = pub._env()
    for key in list(env):
        if key.startswith("PREFECT__"):  # the stage's own Prefect flows (sampling shards) are new runs
            env.pop(key)
    if parent_run_id:
        env["SYNTHMRI_PARENT_RUN_ID"] = parent_run_id
    if "PREFECT_API_URL" not in env:  # share this run's API (an ephemeral server) with the stage's flows
        with contextlib.suppress(Exception):
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                url = str(client.api_url)
            if url.startswith("http") and "ephemeral" not in url and "ephem/" not in url:
                env["PREFECT_API_URL"] = url
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TQDM_MININTERVAL", "5")
    return env


def stream_command(
    cmd: list[str], cwd: Path, env: dict[str, str], emit, progress_every_s: float = PROGRESS_EVERY_S
) -> tuple[int, list[str]]:
    """Run ``cmd``, passing each output line to ``emit``; carriage-return progress updates are throttled.

    Returns (exit code, the last 60 lines).
    """
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail: deque[str] = deque(maxlen=60)
    buffer, last_progress, pending_progress = "", 0.0, None
    assert proc.stdout is not None
    while True:
        chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
        final = not chunk
        buffer += decoder.decode(chunk or b"", final=final)
        while True:
            match = re.search(r"[\r\n]", buffer)
            if not match:
                break
            line, sep, buffer = buffer[: match.start()], buffer[match.start()], buffer[match.end() :]
            line = line.rstrip()
            if not line:
                continue
            if sep == "\r":  # a progress bar redrawing itself
                pending_progress = line
                if time.monotonic() - last_progress >= progress_every_s:
                    emit(line)
                    last_progress, pending_progress = time.monotonic(), None
                continue
            if pending_progress is not None and pending_progress != line:
                emit(pending_progress)
            pending_progress = None
            emit(line)
            tail.append(line)
        if final:
            break
    if buffer.strip():
        emit(buffer.strip())
        tail.append(buffer.strip())
    elif pending_progress:
        emit(pending_progress)
    return proc.wait(), list(tail)


def gate_markdown(gate: pub.Gate, stages: dict[str, str]) -> str:
    icon = "PASSED" if gate.passed else "FAILED"
    lines = [f"# SynthMRI quality report: gate {icon}", ""]
    if gate.failures:
        lines += ["**Gate failures**", ""] + [f"- {f}" for f in gate.failures] + [""]
    if stages:
        lines += ["**Stages**: " + ", ".join(f"`{k}` {v}" for k, v in stages.items()), ""]
    scalars = {k: v for k, v in gate.metrics.items() if not isinstance(v, (dict, list))}
    if scalars:
        lines += ["| metric | value |", "|---|---|"]
        for key, value in scalars.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| `{key}` | {shown} |")
        lines.append("")
    lines.append(f"Source: `{gate.source}` (full report: `reports/report.html` of this run's commit).")
    return "\n".join(lines)


def _retry_transient(task_obj, task_run, state) -> bool:
    """Prefect retry condition: retry a stage only when its failure may be transient, publish only on push."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result()
        except BaseException as error:  # noqa: BLE001 - only classified here
            exc = error
    if isinstance(exc, StageFailed):
        return exc.transient
    return isinstance(exc, pub.PushFailed)


# --------------------------------------------------------------------------------------------------
# tasks


@task(name="dvc-stage", cache_policy=NO_CACHE, retry_condition_fn=_retry_transient)
def run_stage(stage: str, repo: str, parent_run_id: str | None = None) -> str:
    """``dvc repro --single-item <stage>``; returns "ran" or "up to date"."""
    logger = get_run_logger()
    cmd = [pub._bin("dvc"), "repro", "--single-item", stage]
    logger.info("$ %s", " ".join(cmd[-3:]))
    started = time.monotonic()
    ran = False

    def emit(line: str) -> None:
        nonlocal ran
        ran = ran or line.startswith("Running stage")
        logger.info("%s", line)

    code, tail = stream_command(cmd, Path(repo), stage_env(parent_run_id), emit)
    if code != 0:
        text = "\n".join(tail)
        transient = not PERMANENT.search(text)
        raise StageFailed(
            f"stage '{stage}' failed (dvc exit {code}"
            f"{'' if transient else ', not retried'}):\n" + "\n".join(tail[-25:]),
            transient,
        )
    outcome = "ran" if ran else "up to date"
    logger.info("Stage %s: %s in %.1f s", stage, outcome, time.monotonic() - started)
    return outcome


@task(name="quality-report", cache_policy=NO_CACHE)
def summarize_report(repo: str, stages: dict[str, str]) -> dict[str, Any]:
    """Read the gate of ``reports/metrics.json`` and publish it as a markdown artifact."""
    logger = get_run_logger()
    gate = pub.read_gate(Path(repo) / REPORT_METRICS_FILE)
    gate.source = REPORT_METRICS_FILE.as_posix()
    create_markdown_artifact(
        markdown=gate_markdown(gate, stages),
        key="synthmri-quality-report",
        description="Quality gate and metrics of the synthetic data set (reports/metrics.json)",
    )
    (logger.info if gate.passed else logger.warning)("%s", gate.message())
    return {"passed": gate.passed, "failures": gate.failures, "metrics": gate.metrics}


@task(name="publish", cache_policy=NO_CACHE, retry_condition_fn=_retry_transient)
def publish_release(repo: str, dvc_remote: str | None, git_remote: str | None, extra: dict[str, Any]) -> dict:
    """Commit, ``dvc push``, tag (see :mod:`synthmri.publish`); retried only when the push failed."""
    logger = get_run_logger()
    release = pub.publish(repo, remote=dvc_remote, git_remote=git_remote, extra=extra, logger=logger)
    record = release.record
    create_markdown_artifact(
        key="synthmri-release",
        description="The published synthetic data-set version",
        markdown="\n".join(
            [
                f"# Published `{release.tag}`" + (" (already published)" if release.already_published else ""),
                "",
                f"- commit `{release.commit[:10]}`; data/synthetic: {record.get('dataset', {}).get('volumes')} volumes,"
                f" DVC md5 `{record.get('dataset', {}).get('md5')}`",
                "- models: " + ", ".join(f"{k} v{v}" for k, v in record.get("models", {}).items()),
                "",
                f"Fetch: `dvc get <repo> data/synthetic --rev {release.tag}`",
            ]
        ),
    )
    return release.to_dict()


# --------------------------------------------------------------------------------------------------
# the flow


@contextlib.contextmanager
def _mlflow_parent(name: str, tags: dict[str, str], logger):
    """Start the parent run; yield its id (None when tracking is off). Status set by the caller."""
    state = {"status": "FAILED"}
    try:
        run_id = tracking.start_parent_run(name, tags)
    except Exception as exc:
        raise pub.PublishError(f"MLflow: cannot start the pipeline run at {tracking.tracking_uri()}: {exc}") from exc
    try:
        yield run_id, state
    finally:
        with contextlib.suppress(Exception):
            tracking.end_parent_run(run_id, state["status"])


@flow(
    name="synthesize",
    description="SynthMRI: DVC stages, quality report, publish a synthetic data-set version",
    validate_parameters=True,
)
def synthesize(
    stages: list[str] | None = None,
    publish: bool = True,
    on_busy: Literal["fail", "wait"] = "fail",
    wait_timeout_s: float | None = None,
    retries: int = 2,
    retry_delay_s: float = 30.0,
    dvc_remote: str | None = None,
    git_remote: str | None = None,
    repo: str = ".",
) -> dict[str, Any]:
    """Run the pipeline and publish a data-set version when the quality gate passes.

    Args:
        stages: a subset of the stages to run (default: all that a plain `dvc repro` runs, in its order).
        publish: publish when the gate passes; with False the flow only builds and reports.
        on_busy: another run holds the pipeline lock: "fail" (end now, with a message) or "wait".
        wait_timeout_s: with on_busy="wait", give up after this many seconds (default: never).
        retries / retry_delay_s: retries of a stage that failed for a transient reason.
        dvc_remote: DVC remote to push to (default: the repository's default remote).
        git_remote: also push the release commit and tag to this git remote (e.g. "origin").
        repo: the repository (default: the working directory the deployment's pull step set).
    """
    logger = get_run_logger()
    root = Path(repo).resolve()
    run_id = str(flow_run.id or "")
    owner = {"flow_run": run_id, "flow_run_name": str(flow_run.name or "")}
    with (
        contextlib.chdir(root),
        pub.pipeline_lock(root, wait=on_busy == "wait", timeout_s=wait_timeout_s, owner=owner, logger=logger),
    ):
        all_stages = list_stages(root)
        chosen = all_stages if not stages else [s for s in all_stages if s in set(stages)]
        unknown = sorted(set(stages or []) - set(all_stages))
        if unknown:
            raise pub.PublishError(f"unknown stage(s) {', '.join(unknown)}; the pipeline has {', '.join(all_stages)}")
        name = f"pipeline-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
        with _mlflow_parent(
            name, {"prefect.flow_run_id": run_id, "prefect.flow_run_name": owner["flow_run_name"]}, logger
        ) as (parent, mlflow_state):
            logger.info("Pipeline stages (dvc repro order): %s; MLflow parent run %s", ", ".join(chosen), parent)
            outcomes: dict[str, str] = {}
            for stage in chosen:
                stage_task = run_stage.with_options(
                    name=stage, task_run_name=stage, retries=retries, retry_delay_seconds=retry_delay_s
                )
                outcomes[stage] = stage_task(stage, str(root), parent)
            lock_digest = sha256_file(root / "dvc.lock") if (root / "dvc.lock").is_file() else None
            gate = summarize_report(str(root), outcomes)
            tracking.set_run_tags(
                parent,
                {
                    "dvc_lock_sha256": lock_digest,
                    "gate_passed": gate["passed"],
                    "gate_failures": "; ".join(gate["failures"]) or None,
                },
            )
            tracking.log_run_metrics(parent, gate["metrics"], prefix="report.")
            summary: dict[str, Any] = {
                "stages": outcomes,
                "gate_passed": gate["passed"],
                "gate_failures": gate["failures"],
                "mlflow_run_id": parent,
                "tag": None,
            }
            mlflow_state["status"] = "FINISHED"
            if not gate["passed"]:
                message = "; ".join(gate["failures"]) or "the gate did not pass"
                if publish:
                    raise pub.GateFailed(
                        f"quality gate failed: {message}. Nothing was published (no commit, no dvc push, no tag)."
                    )
                logger.warning("Quality gate failed (%s); publish=False, so nothing to publish anyway", message)
                return summary
            if not publish:
                logger.info("Gate passed; publish=False: not publishing")
                return summary
            release = publish_release.with_options(retries=1, retry_delay_seconds=retry_delay_s)(
                str(root), dvc_remote, git_remote, {"mlflow_run_id": parent, "prefect_flow_run_id": run_id}
            )
            tag = release["tag"]
            summary.update(tag=tag, commit=release["commit"], already_published=release["already_published"])
            tracking.set_run_tags(parent, {"dataset_tag": tag, "release_commit": release["commit"]})
            aliases = tracking.set_alias(
                [root / p for p in MODEL_REGISTRY_FILES], "production", tags={"dataset_tag": tag}
            )
            summary["production_models"] = aliases
            manifest = root / SYNTHETIC_DIR / "manifest.csv"
            digest = release["record"].get("dataset", {}).get("md5") or lock_digest or ""
            if manifest.is_file():
                with contextlib.suppress(Exception):
                    tracking.log_dataset(
                        parent,
                        manifest,
                        name=f"synthmri-synthetic@{tag}",
                        digest=digest,
                        source=str(root / SYNTHETIC_DIR),
                        context="published",
                    )
            logger.info(
                "Published %s (commit %s); production models: %s",
                tag,
                release["commit"][:10],
                ", ".join(f"{k} v{v}" for k, v in aliases.items()) or "none",
            )
            return summary


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the SynthMRI pipeline flow once, here (no deployment).")
    parser.add_argument("--no-publish", action="store_true", help="build and report only")
    parser.add_argument("--wait", action="store_true", help="wait for a running pipeline instead of failing")
    parser.add_argument("--stage", action="append", dest="stages", help="run only these stages (repeatable)")
    args = parser.parse_args()
    result = synthesize(stages=args.stages, publish=not args.no_publish, on_busy="wait" if args.wait else "fail")
    print(json.dumps(result, indent=2, default=str))
    sys.exit(0)
