"""The ``synthesize`` flow: its helpers, a run on a tiny pipeline, and the nightly deployment end to end."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import REPO, copy_working_tree
from test_publish import DVC, DVC_YAML, ENV, make_repo, set_params, sh, tags

sys.path.insert(0, str(REPO))
from flows import synthesize as flow_module  # noqa: E402
from synthmri import publish as pub  # noqa: E402
from synthmri.synthesis.prefect_api import dies_with_parent  # noqa: E402

BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------------------------------
# helpers


def test_stream_command_passes_lines_and_throttles_progress(tmp_path):
    script = (
        "import sys, time\nprint('Running stage x', flush=True)\n"
        "for i in range(50):\n    sys.stderr.write(f'\\r{i}%'); sys.stderr.flush()\n"
        "sys.stderr.write('\\n'); print('done'); sys.exit(3)\n"
    )
    lines: list[str] = []
    code, tail = flow_module.stream_command(
        [sys.executable, "-c", script], tmp_path, dict(os.environ), lines.append, progress_every_s=3600
    )
    assert code == 3 and lines[0] == "Running stage x" and lines[-1] == "done"
    progress = [line for line in lines if line.endswith("%")]
    assert len(progress) <= 3 and "49%" in progress  # throttled, but the last state is shown
    assert tail[-1] == "done"


def test_stage_env_nests_mlflow_and_drops_prefect_run_identity(monkeypatch):
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "abc")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    env = flow_module.stage_env("run123")
    assert env["SYNTHMRI_PARENT_RUN_ID"] == "run123" and "PREFECT__FLOW_RUN_ID" not in env
    assert env["PATH"].split(os.pathsep)[0] == str(BIN) or str(BIN) in env["PATH"].split(os.pathsep)


def test_transient_failures_are_retried_and_configuration_errors_are_not():
    class FakeState:
        def __init__(self, exc):
            self.data = exc

    retry = flow_module._retry_transient
    assert retry(None, None, FakeState(flow_module.StageFailed("ERROR: 'x' is busy", True)))
    assert not retry(None, None, FakeState(flow_module.StageFailed("bad", False)))
    assert retry(None, None, FakeState(pub.PushFailed("remote down")))
    assert not retry(None, None, FakeState(pub.DirtyWorktree("dirty")))
    text = "synthmri ingest: configuration error:\nparams.yaml: unknown key\nexited with 2"
    assert flow_module.PERMANENT.search(text)
    assert not flow_module.PERMANENT.search("ERROR: failed to reproduce 'x': 'data/x' is busy")


def test_gate_markdown_lists_failures_and_metrics():
    gate = pub.Gate(False, ["coverage"], {"fd": 1.23456, "gate_passed": False}, "reports/metrics.json")
    text = flow_module.gate_markdown(gate, {"sample": "ran", "report": "up to date"})
    assert "gate FAILED" in text and "- coverage" in text and "| `fd` | 1.235 |" in text and "`sample` ran" in text


def test_stages_are_those_of_a_plain_dvc_repro_in_order(tmp_path):
    declared = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    # the demo (default params): its cohort stage, from its own pipeline file, runs first
    assert flow_module.list_stages(REPO) == ["demo/dvc.yaml:demo", *declared]
    assert declared[:2] == ["ingest", "normalize"]
    # your own data: nothing depends on the demo stage, so the flow does not run it
    work = tmp_path / "repo"
    for name in ("dvc.yaml", "demo/dvc.yaml", ".dvc/config"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text((REPO / name).read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"].update(source="bids", root=str(tmp_path / "bids"))
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    sh("git", "init", "-q", cwd=work)
    assert flow_module.list_stages(work) == declared


# --------------------------------------------------------------------------------------------------
# the flow on a tiny pipeline (Prefect test harness, local MLflow store)

TRAIN = textwrap.dedent("""\
    import json, pathlib
    from synthmri import tracking
    d = pathlib.Path("models/vqgan"); d.mkdir(parents=True, exist_ok=True)
    (d / "model.safetensors").write_bytes(b"weights")
    with tracking.stage_run("train_vqgan", {"steps": 1}) as run:
        version = tracking.register_model("synthmri-vqgan", d, run, {})
    (d / "registry.json").write_text(json.dumps({"name": "synthmri-vqgan", "version": version}))
    """)
TRAIN_STAGE = DVC_YAML.replace(
    "stages:\n",
    "stages:\n  train:\n    cmd: python train.py\n    deps: [train.py]\n"
    "    outs: [models/vqgan]\n"
    "  flaky:\n    cmd: python flaky.py\n    deps: [flaky.py]\n"
    "    outs: [flaky.txt]\n",
    1,
)
# fails on its first attempt only (a stand-in for a transient failure); the marker lives outside the repo
FLAKY = textwrap.dedent("""\
    import pathlib, sys
    marker = pathlib.Path(sys.argv[0]).resolve().parent.parent / "flaky-attempted"
    if not marker.exists():
        marker.touch()
        sys.exit("flaky: transient failure on the first attempt")
    pathlib.Path("flaky.txt").write_text("ok")
    """)


@pytest.mark.slow
def test_flow_runs_stages_publishes_and_stops_at_a_failing_gate(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, ENV[key])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("SYNTHMRI_PARENT_RUN_ID", raising=False)
    repo, remote = make_repo(tmp_path, stages=TRAIN_STAGE, files={"train.py": TRAIN, "flaky.py": FLAKY}, run=False)
    with prefect_test_harness(server_startup_timeout=180):
        first = flow_module.synthesize(repo=str(repo), retries=1, retry_delay_s=0)
        assert first["stages"] == {"train": "ran", "flaky": "ran", "make": "ran", "report": "ran"}
        assert (tmp_path / "flaky-attempted").exists()  # it failed once and was retried
        assert (
            first["gate_passed"]
            and first["tag"] in tags(repo)
            and first["production_models"] == {"synthmri-vqgan": "1"}
        )
        assert sh("git", "status", "--porcelain", cwd=repo).stdout.strip() == ""

        again = flow_module.synthesize(repo=str(repo), retries=0)  # DVC's cache decides: nothing re-runs
        assert set(again["stages"].values()) == {"up to date"} and again["already_published"]
        assert again["tag"] == first["tag"]

        set_params(repo, gate="fail")
        state = flow_module.synthesize(repo=str(repo), retries=0, return_state=True)
        assert state.is_failed() and "quality gate failed: fd > 1.0" in state.message
        assert "Nothing was published" in state.message and tags(repo) == [first["tag"]]

        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            artifact = client.read_latest_artifacts()
        keys = {a.key for a in artifact}
        assert {"synthmri-quality-report", "synthmri-release"} <= keys

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("synthmri")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("synthmri.kind") == "pipeline"]
    assert len(parents) == 3
    published = next(r for r in parents if r.info.run_id == first["mlflow_run_id"])
    assert published.data.tags["dataset_tag"] == first["tag"] and published.data.tags["gate_passed"] == "True"
    assert published.data.tags["prefect.flow_run_id"] and published.data.metrics["report.fd"] == 1.5
    lock = sh("git", "show", f"{first['tag']}:dvc.lock", cwd=repo).stdout
    assert published.data.tags["dvc_lock_sha256"] == hashlib.sha256(lock.encode()).hexdigest()
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == published.info.run_id]
    assert [r.data.tags["synthmri.stage"] for r in children] == ["train_vqgan"]
    assert published.inputs.dataset_inputs[0].dataset.digest.endswith(".dir")
    assert str(client.get_model_version_by_alias("synthmri-vqgan", "production").version) == "1"
    failed_gate = next(r for r in parents if r.data.tags.get("gate_passed") == "False")
    assert "dataset_tag" not in failed_gate.data.tags


# --------------------------------------------------------------------------------------------------
# end to end: scripts/nightly-local.sh (Prefect server, pool, deploy, worker), a real MLflow server,
# `prefect deployment run synthesize/nightly` twice at once on the smoke profile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: dict | None = None, timeout: float = 10) -> dict | list:
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _wait(predicate, timeout: float, what: str, proc_logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with_value = predicate()
        if with_value:
            return with_value
        time.sleep(1)
    logs = "\n".join(f"--- {p}:\n{Path(p).read_text(errors='replace')[-4000:]}" for p in proc_logs if Path(p).exists())
    pytest.fail(f"timed out waiting for {what}\n{logs}")


def _healthy(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).read()
        return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process group this test started (the runner script: its server and worker too)."""
    if proc.poll() is None:
        with_pg = os.getpgid(proc.pid)
        os.killpg(with_pg, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(with_pg, signal.SIGKILL)
            proc.wait()


def _smoke_clone(base: Path) -> Path:
    """The working tree (tracked + new files) as its own git repo on the smoke profile (fewer training steps,
    gate checks lenient)."""
    work = base / "repo"
    copy_working_tree(work)
    params = yaml.safe_load((work / "profiles" / "smoke.yaml").read_text())
    if "report" in params:  # a 20-step smoke model fails a real gate: keep one check that passes
        params["report"]["thresholds"] = {k: None for k in params["report"]["thresholds"]}
        params["report"]["thresholds"]["max_near_duplicates"] = 1000
    # orchestration is under test here, not model quality: half the smoke profile's training steps
    params["vqgan"]["train"].update(steps=10, checkpoint_every=10, val_every=10)
    params["diffusion"]["train"].update(steps=10, checkpoint_every=10, val_every=10, sample_every=10)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stale in ("dvc.lock",):
        (work / stale).unlink(missing_ok=True)
    sh("git", "init", "-q", "-b", "main", cwd=work)
    sh("git", "add", "-A", cwd=work)
    sh("git", "commit", "-qm", "smoke", cwd=work)
    return work


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_nightly_deployment_end_to_end(tmp_path):
    from mlflow import MlflowClient

    from synthmri.data.synthetic import SyntheticDataset

    work = _smoke_clone(tmp_path)
    has_report = "report" in yaml.safe_load((work / "dvc.yaml").read_text())["stages"]
    prefect_port, mlflow_port = _free_port(), _free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
    env = dict(
        ENV,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_PORT=str(prefect_port),
        PREFECT_API_URL=api,
        PREFECT_WORKER_QUERY_SECONDS="2",
        MLFLOW_TRACKING_URI=mlflow_uri,
        VENV=str(BIN.parent),
        PYTHONUNBUFFERED="1",
    )
    env.pop("SYNTHMRI_PARENT_RUN_ID", None)
    runner_log, mlflow_log = tmp_path / "runner.log", tmp_path / "mlflow.log"
    mlflow_server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp_path / "mlartifacts"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=mlflow_log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=dies_with_parent(signal.SIGTERM),  # a pytest killed outright stops them too
    )
    runner = subprocess.Popen(
        ["bash", "scripts/nightly-local.sh"],
        cwd=work,
        env=env,
        stdout=runner_log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=dies_with_parent(signal.SIGTERM),  # a pytest killed outright stops them too
    )
    logs = (runner_log, mlflow_log)
    try:
        _wait(lambda: "Starting a worker" in runner_log.read_text(), 240, "the runner to deploy", logs)
        _wait(lambda: _healthy(f"{mlflow_uri}/health"), 120, "the MLflow server", logs)

        deployment = _get(f"{api}/deployments/name/synthesize/nightly")
        stored = json.dumps(deployment)
        assert str(work) not in stored and str(tmp_path) not in stored, "an absolute path was baked in"
        assert deployment["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "."}}]
        assert deployment["job_variables"] == {"working_dir": "."}

        ids = []
        for _ in range(2):  # two runs at once: one builds and publishes, the other ends with a clear message
            done = sh(str(BIN / "prefect"), "deployment", "run", "synthesize/nightly", cwd=tmp_path, env=env)
            ids.append(re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout).group(1))

        def finished():
            runs = [_get(f"{api}/flow_runs/{i}") for i in ids]
            return (
                runs
                if all(r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs)
                else None
            )

        runs = _wait(finished, 600, "both flow runs to finish", logs)
        states = {r["id"]: (r["state"]["type"], r["state"].get("message") or "") for r in runs}
        winner = [i for i, (t, _) in states.items() if t == "COMPLETED"]
        loser = [i for i, (t, _) in states.items() if t != "COMPLETED"]
        if not has_report:
            pytest.skip(f"no report stage in dvc.yaml yet: nothing can pass the gate; states {states}")
        assert len(winner) == 1 and len(loser) == 1, f"{states}\n{runner_log.read_text()[-6000:]}"
        assert states[loser[0]][0] == "FAILED"
        assert "another SynthMRI pipeline run holds" in states[loser[0]][1] and "did nothing" in states[loser[0]][1]

        # stage output streamed into the Prefect run's logs; the quality artifact exists
        def stage_logs():
            messages, offset = [], 0
            while True:
                page = _get(
                    f"{api}/logs/filter",
                    {
                        "logs": {"flow_run_id": {"any_": winner}},
                        "limit": 200,
                        "offset": offset,
                        "sort": "TIMESTAMP_ASC",
                    },
                )
                messages += [entry["message"] for entry in page]
                offset += 200
                if len(page) < 200:
                    break
            text = "\n".join(messages)
            return text if "Running stage 'train_vqgan'" in text and "Stage report: ran" in text else None

        text = _wait(stage_logs, 60, "the stage logs in Prefect", logs)
        print("\n".join(re.findall(r"Stage \w+: .*", text)))  # the stage timings of this run
        artifacts = _get(f"{api}/artifacts/filter", {"artifacts": {"key": {"any_": ["synthmri-quality-report"]}}})
        assert artifacts and "gate PASSED" in artifacts[0]["data"]

        # the tag, and the data set fetched at the tag from elsewhere matches its manifest
        published = sh("git", "tag", "--list", "synth-*", cwd=work).stdout.split()
        assert len(published) == 1
        tag = published[0]
        assert sh("git", "status", "--porcelain", cwd=work).stdout.strip() == ""
        consumer = tmp_path / "consumer"
        consumer.mkdir()
        sh(DVC, "get", str(work), "data/synthetic", "--rev", tag, "-o", "synthetic", cwd=consumer)
        dataset = SyntheticDataset(consumer / "synthetic")
        assert len(dataset) == 6 and dataset.verify() == []
        release = json.loads(sh("git", "show", f"{tag}:reports/release.json", cwd=work).stdout)
        assert release["tag"] == tag and release["gate"]["passed"] and release["dataset"]["volumes"] == 6

        # MLflow: parent run with the stage runs nested under it, lineage tags, production aliases
        client = MlflowClient(tracking_uri=mlflow_uri)
        experiment = client.get_experiment_by_name("synthmri")
        runs = client.search_runs([experiment.experiment_id])
        parent = next(r for r in runs if r.data.tags.get("prefect.flow_run_id") == winner[0])
        tags_ = parent.data.tags
        assert tags_["dataset_tag"] == tag and tags_["synthmri.kind"] == "pipeline" and tags_["git_commit"]
        lock = sh("git", "show", f"{tag}:dvc.lock", cwd=work).stdout
        assert tags_["dvc_lock_sha256"] == hashlib.sha256(lock.encode()).hexdigest()
        stages = {
            r.data.tags.get("synthmri.stage")
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        }
        assert {"train_vqgan", "train_diffusion"} <= stages, stages
        for name, folder in (("synthmri-vqgan", "vqgan"), ("synthmri-ldm", "ldm")):
            expected = json.loads((work / "models" / folder / "registry.json").read_text())["version"]
            version = client.get_model_version_by_alias(name, "production")
            assert str(version.version) == str(expected) and version.tags.get("dataset_tag") == tag

        # SIGTERM to the script alone (as a service manager sends it) ends it, its worker and its server
        import psutil

        started = psutil.Process(runner.pid).children(recursive=True)
        assert started, "the runner started no server or worker"
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=60)
        gone, alive = psutil.wait_procs(started, timeout=5)
        assert not alive, f"left running after SIGTERM: pids {[p.pid for p in alive]}"
    finally:
        _stop(runner)
        _stop(mlflow_server)
