"""Publishing a synthetic data-set version: quality gate, git commit, ``dvc push``, annotated tag.

This module is plain Python (git and DVC through their command lines), so the nightly Prefect flow
(``flows/synthesize.py``) and anyone scripting a release by hand use the same steps:

1. the quality gate of ``reports/metrics.json`` (written by the ``report`` stage) must have passed:
   a missing file or a missing ``gate_passed`` key counts as failed, and nothing is published;
2. the work tree may differ from ``HEAD`` only in files that the pipeline itself writes and git keeps
   (``dvc.lock``, the ``cache: false`` metrics/plots/reports of ``dvc.yaml``, the ``.gitignore`` files DVC
   maintains, ``reports/release.json``), and the outputs must match ``dvc.lock`` (``dvc status``);
   anything else is an unrelated change and publishing is refused with the list of paths;
3. ``reports/release.json`` (the release record: tag, data-set hash, model versions, gate, card
   summary) is written, and it and the pipeline files are committed;
4. ``dvc push`` sends every output to the DVC remote; if it fails, no tag is made: the commit stays,
   and the next run (``publish`` again) pushes and tags it;
5. an annotated tag ``synth-YYYYMMDD`` (``-2``, ``-3``… when the day already has one) marks the commit.

The synthetic set's own card, ``data/synthetic/README.md``, is a DVC output written by the ``sample``
stage; editing it would change the output's hash and make DVC re-run or re-push it. The tag is
therefore recorded next to it, in the committed ``reports/release.json``, in the tag's message, and in
MLflow (by the flow).

Runs that repro and publish serialize on :func:`pipeline_lock` (``fcntl.flock`` on ``.synthmri.lock``
in the repository), so two at once never race on DVC outputs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from synthmri.catalog import (
    MODEL_REGISTRY_FILES,
    RELEASE_FILE,
    REPORT_METRICS_FILE,
    SOFTWARE_NAME,
    SYNTHETIC_DIR,
    UTILITY_METRICS_FILE,
)
from synthmri.errors import StageError
from synthmri.io import sha256_file
from synthmri.versions import TAG_PATTERN

log = logging.getLogger(__name__)

LOCK_FILE = ".synthmri.lock"
TAG_PREFIX = "synth-"


class PublishError(StageError):
    """Publishing cannot go on; the message says why and what to do."""


class GateFailed(PublishError):
    """The quality gate did not pass (or there is no report): nothing is published."""


class DirtyWorktree(PublishError):
    """The work tree has changes that are not the pipeline's own outputs."""


class PushFailed(PublishError):
    """``dvc push`` failed: nothing was tagged; a rerun publishes the same commit."""


class PipelineBusy(StageError):
    """Another run holds the pipeline lock."""


# --------------------------------------------------------------------------------------------------
# commands


def _bin(name: str) -> str:
    """A tool of this environment (the venv's ``dvc``) first, then the one on PATH."""
    sibling = Path(sys.executable).parent / name
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    return shutil.which(name) or name


def _env() -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_TERMINAL_PROMPT="0")
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def _run(cmd: list[str], repo: Path, check: bool = True, timeout: float = 3600) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=repo, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise PublishError(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{output[-3000:]}")
    return done


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["git", *args], repo, check=check, timeout=600)


def dvc(repo: Path, *args: str, check: bool = True, timeout: float = 6 * 3600) -> subprocess.CompletedProcess:
    return _run([_bin("dvc"), *args], repo, check=check, timeout=timeout)


# --------------------------------------------------------------------------------------------------
# the quality gate


@dataclass
class Gate:
    passed: bool
    failures: list[str]
    metrics: dict[str, Any]
    source: str

    def message(self) -> str:
        if self.passed:
            return f"quality gate passed ({self.source})"
        reasons = "; ".join(self.failures) if self.failures else "no reason given"
        return f"quality gate failed ({self.source}): {reasons}"


def read_gate(path: str | Path = REPORT_METRICS_FILE) -> Gate:
    """The gate verdict of the report stage; anything but ``"gate_passed": true`` is a failure."""
    path = Path(path)
    if not path.is_file():
        return Gate(False, [f"{path} does not exist: the report stage has not run (is it in dvc.yaml?)"], {}, str(path))
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return Gate(False, [f"{path} is not readable JSON ({exc})"], {}, str(path))
    if not isinstance(metrics, dict):
        return Gate(False, [f"{path} is not a JSON object"], {}, str(path))
    if "gate_passed" not in metrics:
        return Gate(False, [f"{path} has no 'gate_passed' key"], metrics, str(path))
    raw = metrics.get("gate_failures", metrics.get("gate_failed_checks")) or []
    if isinstance(raw, str):  # the report stage writes a comma-separated gate_failed_checks
        raw = [part.strip() for part in raw.split(",") if part.strip()]
    failures = [str(f) for f in raw] if isinstance(raw, (list, tuple)) else [str(raw)]
    passed = metrics["gate_passed"] is True
    if not passed and not failures:
        failures = [f"gate_passed is {metrics['gate_passed']!r}"]
    return Gate(passed, failures if not passed else [], metrics, str(path))


# --------------------------------------------------------------------------------------------------
# what the pipeline may change in a clean checkout


def pipeline_files(repo: Path) -> tuple[set[str], set[str]]:
    """(files, folders) that DVC stages write and git keeps: ``dvc.lock``, ``cache: false`` outputs
    (metrics, plots, small reports), the ``.gitignore`` files next to cached outputs, the release record."""
    from dvc.repo import Repo

    files = {"dvc.lock", RELEASE_FILE.as_posix()}
    folders: set[str] = set()
    root = repo.resolve()
    with Repo(str(root)) as dvc_repo:
        for stage in dvc_repo.index.stages:
            lock = Path(os.path.relpath(stage.dvcfile.path, root)).with_name("dvc.lock")
            if (root / lock).is_file():  # each pipeline file has its own (demo/dvc.lock for the demo)
                files.add(lock.as_posix())
            for out in stage.outs:
                rel = Path(os.path.relpath(out.fs_path, root)).as_posix()
                if out.use_cache:
                    parent = Path(rel).parent.as_posix()
                    files.add(".gitignore" if parent == "." else f"{parent}/.gitignore")
                elif (root / rel).is_dir():
                    folders.add(rel.rstrip("/") + "/")
                else:
                    files.add(rel)
    return files, folders


def _status(repo: Path) -> list[tuple[str, str]]:
    """``git status`` as (XY code, path) pairs, untracked files included, ignored ones not."""
    out = git(repo, "status", "--porcelain=v1", "-z", "--untracked-files=all").stdout
    entries, items = [], out.split("\0")
    i = 0
    while i < len(items):
        item = items[i]
        i += 1
        if not item:
            continue
        code, path = item[:2], item[3:]
        if code[0] in "RC":  # a rename/copy is followed by its source path
            entries.append((code, items[i]))
            i += 1
        entries.append((code, path))
    return entries


def classify_changes(repo: Path) -> tuple[list[str], list[str]]:
    """(pipeline paths that changed, unrelated paths that changed)."""
    files, folders = pipeline_files(repo)
    ours, unrelated = [], []
    for _, path in _status(repo):
        if path == LOCK_FILE:
            continue
        if path in files or any(path.startswith(f) for f in folders):
            ours.append(path)
        else:
            unrelated.append(path)
    return sorted(set(ours)), sorted(set(unrelated))


def check_publishable(repo: Path) -> list[str]:
    """Refuse unrelated changes and outputs that do not match ``dvc.lock``; return the pipeline's changes."""
    ours, unrelated = classify_changes(repo)
    if unrelated:
        shown = "\n  ".join(unrelated[:20]) + ("\n  …" if len(unrelated) > 20 else "")
        raise DirtyWorktree(
            "refusing to publish: the work tree has uncommitted changes that are not pipeline outputs, so the "
            f"release commit would not describe the code and parameters that made the data:\n  {shown}\n"
            "Commit them (then rerun the pipeline), or stash / .gitignore them."
        )
    status = dvc(repo, "status", "--json", check=False)
    if status.returncode != 0:
        raise PublishError(f"`dvc status` failed: {(status.stdout + status.stderr).strip()[-2000:]}")
    try:
        changed = json.loads(status.stdout or "{}")
    except ValueError:
        changed = {"?": status.stdout.strip()}
    if changed:
        raise PublishError(
            "refusing to publish: the outputs do not match dvc.lock (stages changed: "
            f"{', '.join(sorted(changed))}); run `dvc repro` first"
        )
    return ours


# --------------------------------------------------------------------------------------------------
# tags and the release record


def head_commit(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD").stdout.strip()


def tags_at(repo: Path, rev: str = "HEAD") -> list[str]:
    out = git(repo, "tag", "--points-at", rev, "--list", f"{TAG_PREFIX}*").stdout.split()
    return sorted(t for t in out if TAG_PATTERN.match(t))


def next_tag(repo: Path, day: _dt.date | None = None) -> str:
    """``synth-YYYYMMDD``, or ``synth-YYYYMMDD-N`` with the smallest free N >= 2 (UTC date)."""
    day = day or _dt.datetime.now(_dt.UTC).date()
    base = f"{TAG_PREFIX}{day:%Y%m%d}"
    existing = set(git(repo, "tag", "--list", f"{base}*").stdout.split())
    if base not in existing:
        return base
    n = 2
    while f"{base}-{n}" in existing:
        n += 1
    return f"{base}-{n}"


def _lock_entry(repo: Path, path: str) -> dict[str, Any]:
    """The dvc.lock record of the output at ``path`` (md5, size, nfiles)."""
    import yaml

    lock = yaml.safe_load((repo / "dvc.lock").read_text()) or {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") == path:
                return {k: out[k] for k in ("md5", "size", "nfiles") if k in out}
    return {}


def card_summary(card: Path, max_lines: int = 12) -> list[str]:
    """The title and bullet points of the data-set card (``data/synthetic/README.md``)."""
    if not card.is_file():
        return []
    lines = card.read_text(encoding="utf-8").splitlines()
    keep = [line.lstrip("# ").strip() for line in lines if line.startswith("# ")][:1]
    keep += [line[2:].strip() for line in lines if line.startswith("- ")]
    return keep[:max_lines]


def model_versions(repo: Path) -> dict[str, str]:
    """{registered model name: version} from ``models/*/registry.json`` (the training stages write them)."""
    versions = {}
    for rel in MODEL_REGISTRY_FILES:
        path = repo / rel
        if path.is_file():
            with contextlib.suppress(ValueError, KeyError, OSError):
                entry = json.loads(path.read_text())
                versions[str(entry["name"])] = str(entry["version"])
    return versions


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def utility_summary(repo: Path) -> dict[str, Any] | None:
    """The headline of ``reports/utility.json`` (the utility stage): the gated pre-training gain with its
    interval, the same for real pre-training and the negative control, and the TSTR / TRTR error ratio."""
    utility = _read_json(repo / UTILITY_METRICS_FILE)
    if not isinstance(utility, dict) or "primary" not in utility:
        return None
    at = f"{utility['primary']}.k{utility.get('gate_k')}"
    return {
        "target": utility["primary"],
        "k": utility.get("gate_k"),
        **{
            f"{name}{part}": utility.get(f"{name}{part}.{at}")
            for name in ("pretrain_gain", "real_pretrain_gain", "negative_control_gain")
            for part in ("", "_ci_low", "_ci_high")
        },
        "tstr_ratio": utility.get(f"tstr_ratio.{utility['primary']}"),
        "n_synthetic": utility.get("n_synthetic"),
    }


def _utility_line(utility: dict[str, Any] | None) -> str | None:
    if not utility or utility.get("pretrain_gain") is None:
        return None
    low, high, ratio = (
        utility.get("pretrain_gain_ci_low"),
        utility.get("pretrain_gain_ci_high"),
        utility.get("tstr_ratio"),
    )
    return (
        f"utility: pre-training on this set changes the {utility['target']} error at k={utility['k']} by "
        f"{utility['pretrain_gain']:+.0%}"
        + (f" [{low:+.0%}, {high:+.0%}]" if low is not None and high is not None else "")
        + (f"; TSTR/TRTR error ratio {ratio:.2f}" if ratio is not None else "")
    )


def release_record(
    repo: Path, tag: str, gate: Gate, code_commit: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    manifest = repo / SYNTHETIC_DIR.as_posix() / "manifest.csv"
    n_volumes = None
    if manifest.is_file():
        n_volumes = max(0, sum(1 for _ in manifest.open(encoding="utf-8")) - 1)
    return {
        "tag": tag,
        "created": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
        "code_commit": code_commit,
        "dvc_lock_sha256": sha256_file(repo / "dvc.lock"),
        "dataset": {
            "path": SYNTHETIC_DIR.as_posix(),
            "volumes": n_volumes,
            **_lock_entry(repo, SYNTHETIC_DIR.as_posix()),
        },
        "models": model_versions(repo),
        "gate": {"passed": gate.passed, "failures": gate.failures},
        "metrics": {k: v for k, v in gate.metrics.items() if isinstance(v, (int, float, str, bool)) or v is None},
        "card": card_summary(repo / SYNTHETIC_DIR.as_posix() / "README.md"),
        "utility": utility_summary(repo),
        "software": _read_json(repo / SYNTHETIC_DIR / SOFTWARE_NAME),
        "fetch": f"dvc get <this repository> {SYNTHETIC_DIR.as_posix()} --rev {tag}",
        **(extra or {}),
    }


def _same_release(old: dict[str, Any], new: dict[str, Any]) -> bool:
    keys = ("tag", "dvc_lock_sha256", "dataset", "models", "gate")
    return all(old.get(k) == new.get(k) for k in keys)


# --------------------------------------------------------------------------------------------------
# publish


@dataclass
class Release:
    tag: str
    commit: str
    already_published: bool = False
    committed: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def publish(
    repo: str | Path = ".",
    *,
    metrics_file: str | Path = REPORT_METRICS_FILE,
    remote: str | None = None,
    git_remote: str | None = None,
    day: _dt.date | None = None,
    extra: dict[str, Any] | None = None,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> Release:
    """Publish the current pipeline state as a data-set version (see the module docstring).

    Raises :class:`GateFailed`, :class:`DirtyWorktree`, :class:`PushFailed` or :class:`PublishError`;
    in every case no tag is created. ``remote``: a DVC remote name (default: the configured default);
    ``git_remote``: also push the commit and tag to this git remote (e.g. ``origin``).
    """
    logger = logger or log
    repo = Path(repo).resolve()
    metrics_path = Path(metrics_file) if Path(metrics_file).is_absolute() else repo / metrics_file
    gate = read_gate(metrics_path)
    if not gate.passed:
        raise GateFailed(f"{gate.message()}; nothing was committed, pushed or tagged")
    logger.info("%s", gate.message())

    ours = check_publishable(repo)
    existing = tags_at(repo)
    if existing and not ours:
        tag = existing[-1]
        logger.info(
            "HEAD %s is already published as %s; making sure the DVC remote has its data", head_commit(repo)[:10], tag
        )
        _push(repo, remote, logger, tag=None)
        if git_remote:
            _push_git(repo, git_remote, tag, logger)
        record = json.loads((repo / RELEASE_FILE).read_text()) if (repo / RELEASE_FILE).is_file() else {}
        return Release(tag=tag, commit=head_commit(repo), already_published=True, record=record)

    tag = next_tag(repo, day)
    code_commit = head_commit(repo)
    record = release_record(repo, tag, gate, code_commit, extra)
    release_path = repo / RELEASE_FILE
    old = None
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(release_path.read_text())
    if not (isinstance(old, dict) and _same_release(old, record)):
        release_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = release_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, release_path)
    else:
        record = old

    to_add = sorted(set(ours) | {RELEASE_FILE.as_posix()})
    git(repo, "add", "--all", "--", *to_add)
    staged = git(repo, "diff", "--cached", "--name-only").stdout.split()
    if staged:
        git(
            repo,
            "commit",
            "--quiet",
            "-m",
            f"Publish synthetic data set {tag}",
            "-m",
            f"Quality gate passed. Pipeline state of {code_commit[:10]}: dvc.lock, reports, "
            f"{RELEASE_FILE.as_posix()}. Fetch: dvc get <repo> {SYNTHETIC_DIR.as_posix()} --rev {tag}",
        )
        logger.info("Committed %d file(s): %s", len(staged), ", ".join(staged))
    commit = head_commit(repo)

    _push(repo, remote, logger, tag=tag, commit=commit)

    summary = [
        f"SynthMRI synthetic data set {tag}",
        "",
        f"data/synthetic: {record['dataset'].get('volumes')} volumes, dvc md5 {record['dataset'].get('md5')}",
        "models: " + ", ".join(f"{k} v{v}" for k, v in record["models"].items()),
        f"dvc.lock sha256: {record['dvc_lock_sha256']}",
    ]
    if line := _utility_line(record.get("utility")):
        summary.append(line)
    git(repo, "tag", "-a", tag, "-m", "\n".join(summary), commit)
    logger.info("Tagged %s as %s", commit[:10], tag)
    if git_remote:
        _push_git(repo, git_remote, tag, logger)
    return Release(tag=tag, commit=commit, committed=staged, record=record)


def _push(repo: Path, remote: str | None, logger, tag: str | None, commit: str | None = None) -> None:
    args = ["push"] + (["-r", remote] if remote else [])
    logger.info("dvc %s", " ".join(args))
    done = dvc(repo, *args, check=False)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        where = f"remote '{remote}'" if remote else "the default DVC remote"
        raise PushFailed(
            f"`dvc push` to {where} failed (exit {done.returncode}), so nothing was tagged"
            + (f"; commit {commit[:10]} is kept and the next run pushes and tags it" if commit else "")
            + f":\n{output[-2000:]}"
        )
    if output:
        logger.info("%s", output.splitlines()[-1])


def _push_git(repo: Path, git_remote: str, tag: str, logger) -> None:
    branch = git(repo, "rev-parse", "--abbrev-ref", "HEAD").stdout.strip()
    refs = ([f"HEAD:refs/heads/{branch}"] if branch != "HEAD" else []) + [f"refs/tags/{tag}"]
    git(repo, "push", git_remote, *refs)
    logger.info("Pushed %s to git remote %s", " ".join(refs), git_remote)


# --------------------------------------------------------------------------------------------------
# one pipeline run at a time


def _lock_holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(path.read_text() or "{}")
        if info:
            return ", ".join(f"{k} {v}" for k, v in info.items())
    return "unknown holder"


@contextlib.contextmanager
def pipeline_lock(
    repo: str | Path = ".",
    *,
    wait: bool = False,
    timeout_s: float | None = None,
    owner: dict[str, Any] | None = None,
    poll_s: float = 1.0,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> Iterator[Path]:
    """Hold ``.synthmri.lock`` (``fcntl.flock``, released by the kernel if the holder dies).

    ``wait=False``: raise :class:`PipelineBusy` at once when another run holds it; ``wait=True``:
    wait for it (at most ``timeout_s`` seconds when given, then raise).
    """
    logger = logger or log
    path = Path(repo).resolve() / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    started = time.monotonic()
    announced = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = _lock_holder(path)
                if not wait:
                    raise PipelineBusy(
                        f"another SynthMRI pipeline run holds {path} ({holder}); this run did nothing. "
                        "Try again when it has finished (or run with on_busy='wait')."
                    ) from None
                if timeout_s is not None and time.monotonic() - started > timeout_s:
                    raise PipelineBusy(
                        f"gave up after waiting {timeout_s:.0f} s for {path} ({holder}); this run did nothing"
                    ) from None
                if not announced:
                    logger.info("Waiting for another pipeline run to finish (%s holds %s)", holder, path)
                    announced = True
                time.sleep(poll_s)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
            **(owner or {}),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
