"""Publishing on a tiny real git + DVC repository: the gate, refusals, push failures, tags, versions, the lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from synthmri import publish as pub
from synthmri import versions

DVC = str(Path(sys.executable).parent / "dvc")
ENV = dict(
    os.environ,
    DVC_NO_ANALYTICS="1",
    GIT_AUTHOR_NAME="t",
    GIT_AUTHOR_EMAIL="t@t",
    GIT_COMMITTER_NAME="t",
    GIT_COMMITTER_EMAIL="t@t",
)

MAKE = textwrap.dedent("""\
    import hashlib, json, pathlib, yaml
    p = yaml.safe_load(open("params.yaml"))
    out = pathlib.Path("data/synthetic"); (out / "volumes").mkdir(parents=True, exist_ok=True)
    rows = ["file,sample_index,age,sha256"]
    for i in range(p["n"]):
        f = out / "volumes" / f"sample-{i:06d}.bin"
        f.write_bytes(f"volume {i} of {p['n']}".encode())
        rows.append(f"volumes/{f.name},{i},{30 + i},{hashlib.sha256(f.read_bytes()).hexdigest()}")
    (out / "manifest.csv").write_text("\\n".join(rows) + "\\n")
    (out / "README.md").write_text("# Tiny synthetic set\\n\\n- volumes: %d\\n- models: none\\n" % p["n"])
    (out / "software.json").write_text(json.dumps({"torch": "9.9.9"}))
    """)
REPORT = textwrap.dedent("""\
    import json, pathlib, yaml
    p = yaml.safe_load(open("params.yaml"))
    ok = p["gate"] == "pass"
    pathlib.Path("reports").mkdir(exist_ok=True)
    pathlib.Path("reports/metrics.json").write_text(json.dumps(
        {"n_synthetic": p["n"], "fd": 1.5, "gate_passed": ok, "gate_failures": [] if ok else ["fd > 1.0"]}))
    """)
DVC_YAML = textwrap.dedent("""\
    stages:
      make:
        cmd: python make.py
        deps: [make.py]
        params: [n]
        outs: [data/synthetic]
      report:
        cmd: python report.py
        deps: [report.py, data/synthetic]
        params: [gate]
        metrics:
          - reports/metrics.json:
              cache: false
    """)


def sh(*cmd: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = env or dict(ENV, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
    return done


def make_repo(
    root: Path, gate: str = "pass", n: int = 3, stages: str = DVC_YAML, files: dict | None = None, run: bool = True
) -> tuple[Path, Path]:
    """A git + DVC repository with a data stage and a report stage (run once unless ``run=False``), and
    its local DVC remote."""
    repo, remote = root / "repo", root / "remote"
    repo.mkdir(parents=True)
    (repo / "make.py").write_text(MAKE)
    (repo / "report.py").write_text(REPORT)
    (repo / "dvc.yaml").write_text(stages)
    for name, text in (files or {}).items():
        (repo / name).write_text(text)
    (repo / "params.yaml").write_text(f"n: {n}\ngate: {gate}\n")
    (repo / ".gitignore").write_text("mlflow.db\nmlartifacts/\n.synthmri.lock\n")
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh(DVC, "init", "-q", cwd=repo)
    sh(DVC, "remote", "add", "-d", "local", str(remote), cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "pipeline", cwd=repo)
    if run:
        sh(DVC, "repro", cwd=repo)
    return repo, remote


def set_params(repo: Path, **values) -> None:
    import yaml

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params.update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    sh("git", "commit", "-qam", f"params {values}", cwd=repo)
    sh(DVC, "repro", cwd=repo)


def tags(repo: Path) -> list[str]:
    return sh("git", "tag", "--list", cwd=repo).stdout.split()


def head(repo: Path) -> str:
    return sh("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()


def remote_files(remote: Path) -> list[Path]:
    return [p for p in remote.rglob("*") if p.is_file()] if remote.exists() else []


@pytest.fixture(autouse=True)
def _identity(monkeypatch):
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, ENV[key])
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


def test_gate_reading(tmp_path):
    missing = pub.read_gate(tmp_path / "metrics.json")
    assert not missing.passed and "does not exist" in missing.failures[0] and "report stage" in missing.failures[0]
    (tmp_path / "m.json").write_text(json.dumps({"fd": 1.0}))
    no_key = pub.read_gate(tmp_path / "m.json")
    assert not no_key.passed and "no 'gate_passed' key" in no_key.message()
    (tmp_path / "m.json").write_text(json.dumps({"gate_passed": "yes"}))
    assert not pub.read_gate(tmp_path / "m.json").passed  # only a JSON true passes
    (tmp_path / "m.json").write_text(json.dumps({"gate_passed": False, "gate_failures": ["coverage 0.1 < 0.5"]}))
    failed = pub.read_gate(tmp_path / "m.json")
    assert not failed.passed and failed.failures == ["coverage 0.1 < 0.5"]
    (tmp_path / "m.json").write_text(json.dumps({"gate_passed": False, "gate_failed_checks": "coverage,precision"}))
    assert pub.read_gate(tmp_path / "m.json").failures == ["coverage", "precision"]
    (tmp_path / "m.json").write_text(json.dumps({"gate_passed": True, "gate_failures": []}))
    assert pub.read_gate(tmp_path / "m.json").passed
    (tmp_path / "m.json").write_text("{not json")
    assert not pub.read_gate(tmp_path / "m.json").passed


def test_failing_gate_publishes_nothing(tmp_path):
    repo, remote = make_repo(tmp_path, gate="fail")
    before = head(repo)
    with pytest.raises(pub.GateFailed, match=r"fd > 1.0.*nothing was committed, pushed or tagged"):
        pub.publish(repo)
    assert tags(repo) == [] and head(repo) == before
    assert remote_files(remote) == []
    assert not (repo / pub.RELEASE_FILE).exists()


def test_publish_commits_pushes_tags_and_versions_are_listed(tmp_path):
    repo, remote = make_repo(tmp_path)
    code_commit = head(repo)
    release = pub.publish(repo)
    today = release.tag
    assert today.startswith("synth-") and tags(repo) == [today]
    assert sh("git", "cat-file", "-t", today, cwd=repo).stdout.strip() == "tag"  # annotated
    assert sh("git", "status", "--porcelain", cwd=repo).stdout.strip() == ""
    committed = sh("git", "show", "--name-only", "--format=", "HEAD", cwd=repo).stdout.split()
    assert set(committed) == {"dvc.lock", "reports/metrics.json", "reports/release.json", "data/.gitignore"}
    record = json.loads((repo / pub.RELEASE_FILE).read_text())
    assert record["tag"] == today and record["code_commit"] == code_commit and record["dataset"]["volumes"] == 3
    assert record["dataset"]["md5"].endswith(".dir") and record["card"][0] == "Tiny synthetic set"
    assert record["software"] == {"torch": "9.9.9"}  # the versions the set was made with
    assert len(remote_files(remote)) >= 5  # 3 volumes, manifest, card, the .dir listing

    # a consumer elsewhere: dvc get at the tag gives files that match the manifest
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    sh(DVC, "get", str(repo), "data/synthetic", "--rev", today, "-o", "set", cwd=consumer)
    from synthmri.data.synthetic import SyntheticDataset

    assert len(SyntheticDataset(consumer / "set")) == 3 and SyntheticDataset(consumer / "set").verify() == []

    # nothing new: the same version, no new commit or tag
    again = pub.publish(repo)
    assert again.already_published and again.tag == today and tags(repo) == [today]

    # new data the same day: -2
    set_params(repo, n=4)
    second = pub.publish(repo)
    assert second.tag == f"{today}-2" and sorted(tags(repo)) == sorted([today, f"{today}-2"])

    listed = versions.list_versions(repo)
    assert [v.tag for v in listed] == [today, f"{today}-2"]
    assert [v.volumes for v in listed] == [3, 4] and listed[0].summary[0] == "Tiny synthetic set"
    dataset = versions.load_version(today, repo=repo, cache_dir=tmp_path / "cache")
    assert len(dataset) == 3 and dataset.verify() == []
    assert versions.main([str(repo)]) == 0


def test_push_failure_leaves_no_tag_and_a_rerun_publishes(tmp_path):
    repo, remote = make_repo(tmp_path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the remote's parent folder should be")
    sh(DVC, "remote", "modify", "--local", "local", "url", str(blocker / "remote"), cwd=repo)
    with pytest.raises(pub.PushFailed, match="nothing was tagged.*next run pushes and tags it"):
        pub.publish(repo)
    assert tags(repo) == [] and remote_files(remote) == []
    pending = head(repo)
    (repo / ".dvc" / "config.local").unlink()  # the remote is back
    release = pub.publish(repo)
    assert release.commit == pending and tags(repo) == [release.tag] and remote_files(remote)


def test_refuses_unrelated_changes(tmp_path):
    repo, remote = make_repo(tmp_path)
    (repo / "make.py").write_text(MAKE + "# an uncommitted edit\n")
    (repo / "notes.txt").write_text("untracked")
    with pytest.raises(pub.DirtyWorktree) as info:
        pub.publish(repo)
    assert "make.py" in str(info.value) and "notes.txt" in str(info.value) and "dvc.lock" not in str(info.value)
    assert tags(repo) == [] and remote_files(remote) == []
    # outputs edited by hand (not matching dvc.lock) are refused too
    sh("git", "checkout", "make.py", cwd=repo)
    (repo / "notes.txt").unlink()
    (repo / "data" / "synthetic" / "manifest.csv").write_text("file,sha256\n")
    with pytest.raises(pub.PublishError, match="do not match dvc.lock"):
        pub.publish(repo)
    assert tags(repo) == []


def test_pipeline_files_come_from_dvc_yaml(tmp_path):
    repo, _ = make_repo(tmp_path)
    files, folders = pub.pipeline_files(repo)
    assert {"dvc.lock", "reports/metrics.json", "reports/release.json", "data/.gitignore"} <= files
    assert "params.yaml" not in files and "make.py" not in files


HOLD = textwrap.dedent("""\
    import pathlib, sys, time
    from synthmri.publish import pipeline_lock
    with pipeline_lock(sys.argv[1], owner={"flow_run": "first-run"}):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
        pathlib.Path(sys.argv[1], "holder-done").touch()
    """)


def test_lock_second_run_fails_clearly_or_waits(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "4"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            pub.PipelineBusy,
            match=rf"another SynthMRI pipeline run holds .*pid {holder.pid}.*"
            r"flow_run first-run.*this run did nothing",
        ):
            with pub.pipeline_lock(tmp_path):
                pytest.fail("the lock was taken twice")
        with pytest.raises(pub.PipelineBusy, match="gave up after waiting"):
            with pub.pipeline_lock(tmp_path, wait=True, timeout_s=0.5, poll_s=0.1):
                pytest.fail("the lock was taken twice")
        with pub.pipeline_lock(tmp_path, wait=True, poll_s=0.1):
            # we got the lock only after the holder was done with it (an event, not a duration)
            assert (tmp_path / "holder-done").is_file()
            # the holder released the lock on leaving its `with`; its interpreter may still be shutting
            # down on a loaded machine, so wait for the exit instead of polling once
            assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
        holder.wait()
    # a holder that dies (kill -9) never leaves a stale lock behind
    dead = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "60"], stdout=subprocess.PIPE, text=True)
    assert dead.stdout.readline().strip() == "locked"
    dead.kill()
    dead.wait()
    with pub.pipeline_lock(tmp_path):
        pass


def _published(tmp_path, n: int = 4) -> tuple[Path, Path, str, Path]:
    """A published version, and a plain git clone of its repository: what a user pulls from (no DVC cache,
    so every volume comes from the remote)."""
    repo, remote = make_repo(tmp_path, n=n)
    tag = pub.publish(repo).tag
    sh("git", "clone", "-q", str(repo), str(tmp_path / "clone"), cwd=tmp_path)
    return repo, remote, tag, tmp_path / "clone"


def _remote_object(remote: Path, content: bytes) -> Path:
    """The remote's object file of a volume (DVC stores objects by the md5 of their bytes)."""
    import hashlib

    digest = hashlib.md5(content).hexdigest()
    (found,) = [p for p in remote_files(remote) if p.parent.name + p.name == digest]
    return found


@pytest.mark.parametrize("damage", ["corrupted", "deleted"])
def test_a_damaged_remote_object_is_named_at_pull_and_nothing_is_handed_over(tmp_path, damage):
    repo, remote, tag, clone = _published(tmp_path)
    volume = repo / "data" / "synthetic" / "volumes" / "sample-000002.bin"
    obj = _remote_object(remote, volume.read_bytes())
    obj.chmod(0o644)
    if damage == "corrupted":
        obj.write_bytes(b"flipped bits")
    else:
        obj.unlink()
    cache = tmp_path / "cache"
    with pytest.raises(versions.StageError, match="sample-000002") as error:
        versions.load_version(tag, repo=clone, cache_dir=cache)
    assert "\n" not in str(error.value) and len(str(error.value)) < 400  # one readable line
    left = [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert not left  # no partial or wrong set left to be picked up


def test_concurrent_pulls_share_one_cache_and_all_verify(tmp_path):
    """Processes that load the same version at once: one downloads, the others wait for it, and every
    one gets a set whose files all match the manifest (no process sees a half-written or replaced folder)."""
    _, _, tag, clone = _published(tmp_path, n=6)
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""\
        from synthmri.versions import load_version
        dataset = load_version({tag!r}, repo={str(clone)!r}, cache_dir={str(cache)!r})
        assert len(dataset) == 6 and dataset.verify() == [], dataset.verify()
        print(dataset.root)
        """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    assert len({out.strip() for _, out, _ in results}) == 1  # one cached folder for all
    staging = [p for p in (cache.iterdir()) if p.is_dir()]
    assert len(staging) == 1 and [p.name for p in staging[0].iterdir() if not p.name.startswith(".")] == [tag]


def test_a_version_on_an_s3_object_store_publishes_pulls_and_names_a_lost_object(tmp_path, monkeypatch):
    """The cluster plan's remote: DVC on S3-compatible object storage (moto's S3 server on 127.0.0.1,
    started and stopped here). Publish pushes there, a clone pulls and verifies every volume, and an
    object deleted from the bucket stops the pull with the volume's name."""
    pytest.importorskip("dvc_s3", reason="dvc-s3 is in the 'cluster' extra (pip install -e '.[cluster]')")
    moto_server = pytest.importorskip("moto.server", reason="moto is in the 'cluster' extra")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="synthmri")
        repo, _ = make_repo(tmp_path, n=4)
        env = dict(ENV, **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")})
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        sh(DVC, "remote", "add", "-d", "-f", "store", "s3://synthmri/dvc", cwd=repo, env=env)
        sh(DVC, "remote", "modify", "store", "endpointurl", endpoint, cwd=repo, env=env)
        sh("git", "commit", "-qam", "DVC remote on object storage", cwd=repo)
        tag = pub.publish(repo).tag
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="synthmri")["Contents"]]
        assert len(keys) >= 5  # 4 volumes, manifest, card, software, the .dir listing
        sh("git", "clone", "-q", str(repo), str(tmp_path / "clone"), cwd=tmp_path)
        dataset = versions.load_version(tag, repo=tmp_path / "clone", cache_dir=tmp_path / "cache")
        assert len(dataset) == 4 and dataset.verify() == []

        import hashlib

        digest = hashlib.md5((repo / "data/synthetic/volumes/sample-000001.bin").read_bytes()).hexdigest()
        (lost,) = [k for k in keys if k.endswith(f"{digest[:2]}/{digest[2:]}")]
        s3.delete_object(Bucket="synthmri", Key=lost)
        with pytest.raises(versions.StageError, match="sample-000001"):
            versions.load_version(tag, repo=tmp_path / "clone", cache_dir=tmp_path / "cache-2")
    finally:
        server.stop()


def test_the_release_record_and_tag_carry_the_utility_headline(tmp_path):
    (tmp_path / "reports").mkdir()
    assert pub.utility_summary(tmp_path) is None  # no utility stage: nothing claimed
    numbers = {
        "primary": "age",
        "gate_k": 8,
        "pretrain_gain.age.k8": 0.31,
        "pretrain_gain_ci_low.age.k8": 0.12,
        "pretrain_gain_ci_high.age.k8": 0.45,
        "negative_control_gain.age.k8": -0.02,
        "tstr_ratio.age": 1.27,
        "n_synthetic": 256,
    }
    (tmp_path / "reports" / "utility.json").write_text(json.dumps(numbers))
    summary = pub.utility_summary(tmp_path)
    assert summary["pretrain_gain"] == 0.31 and summary["pretrain_gain_ci_low"] == 0.12 and summary["k"] == 8
    assert summary["negative_control_gain"] == -0.02 and summary["real_pretrain_gain"] is None
    assert pub._utility_line(summary) == (
        "utility: pre-training on this set changes the age error at k=8 by +31% [+12%, +45%]; TSTR/TRTR error ratio 1.27"
    )
