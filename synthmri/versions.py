"""Published synthetic data-set versions: list them, fetch one, load it as a ``SyntheticDataset``.

A version is a git tag ``synth-YYYYMMDD[-N]`` of the SynthMRI repository (made by
:func:`synthmri.publish.publish`); at that tag, ``reports/release.json`` (in git) describes it and
``data/synthetic`` (in the DVC remote) holds the volumes, ``manifest.csv`` with the sha256 of every
file, and the data-set card ``README.md``.

```python
from synthmri.versions import list_versions, load_version

for v in list_versions("https://github.com/you/synthmri.git"):     # or a local clone's path
    print(v.tag, v.volumes, v.models, v.summary)
dataset = load_version("synth-20261125", repo="https://github.com/you/synthmri.git")
```

Fetched sets are cached under ``~/.cache/synthmri/datasets`` (or ``$SYNTHMRI_CACHE``), one folder per
repository and tag, and verified against their manifest checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthmri.catalog import RELEASE_FILE, SYNTHETIC_DIR
from synthmri.errors import StageError

TAG_PATTERN = re.compile(r"^synth-\d{8}(-\d+)?$")


@dataclass
class DatasetVersion:
    tag: str
    commit: str
    created: str | None = None
    volumes: int | None = None
    dvc_md5: str | None = None
    models: dict[str, str] = field(default_factory=dict)
    gate_passed: bool | None = None
    summary: list[str] = field(default_factory=list)
    release: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        models = ", ".join(f"{k} v{v}" for k, v in self.models.items()) or "models unknown"
        return (
            f"{self.tag}  {self.created or '?'}  {self.volumes if self.volumes is not None else '?'} volumes  {models}"
        )


def _sort_key(tag: str) -> tuple[str, int]:
    base, _, n = tag.partition("-")[2].partition("-")
    return base, int(n or 1)


def _is_local(repo: str) -> bool:
    return "://" not in repo and not re.match(r"^[\w.-]+@[\w.-]+:", repo) and Path(repo).exists()


def _git(*args: str, cwd: str | None = None) -> str:
    done = subprocess.run(
        ["git", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, GIT_TERMINAL_PROMPT="0"),
    )
    if done.returncode != 0:
        raise StageError(f"`git {' '.join(args)}` failed: {done.stderr.strip()[-1000:]}")
    return done.stdout


def tags(repo: str | Path = ".") -> dict[str, str]:
    """{tag: commit} of the published versions (``git ls-remote``: works for a path or a URL)."""
    out = _git("ls-remote", "--tags", str(repo), "refs/tags/synth-*")
    found: dict[str, str] = {}
    for line in out.splitlines():
        sha, ref = line.split("\t", 1)
        name = ref.removeprefix("refs/tags/")
        if name.endswith("^{}"):  # the commit an annotated tag points to
            found[name[:-3]] = sha
        elif TAG_PATTERN.match(name):
            found.setdefault(name, sha)
    return {t: found[t] for t in sorted((t for t in found if TAG_PATTERN.match(t)), key=_sort_key)}


def read_release(tag: str, repo: str | Path = ".") -> dict[str, Any]:
    """``reports/release.json`` at ``tag`` (``git show`` for a local clone, ``dvc.api.read`` otherwise)."""
    repo = str(repo)
    try:
        if _is_local(repo):
            text = _git("show", f"{tag}:{RELEASE_FILE.as_posix()}", cwd=repo)
        else:
            import dvc.api

            text = dvc.api.read(RELEASE_FILE.as_posix(), repo=repo, rev=tag)
        return json.loads(text)
    except (StageError, ValueError, OSError, FileNotFoundError) as exc:
        return {"error": f"no readable {RELEASE_FILE} at {tag}: {exc}"}


def list_versions(repo: str | Path = ".") -> list[DatasetVersion]:
    """Every published version of ``repo`` (a clone's path or a git URL), oldest first, with its card summary."""
    versions = []
    for tag, commit in tags(repo).items():
        release = read_release(tag, repo)
        dataset = release.get("dataset") or {}
        versions.append(
            DatasetVersion(
                tag=tag,
                commit=commit,
                created=release.get("created"),
                volumes=dataset.get("volumes"),
                dvc_md5=dataset.get("md5"),
                models=dict(release.get("models") or {}),
                gate_passed=(release.get("gate") or {}).get("passed"),
                summary=list(release.get("card") or []),
                release=release,
            )
        )
    return versions


def cache_root() -> Path:
    return Path(os.environ.get("SYNTHMRI_CACHE") or Path.home() / ".cache" / "synthmri" / "datasets")


def _repo_key(repo: str) -> str:
    ident = str(Path(repo).resolve()) if _is_local(repo) else repo
    return (
        re.sub(r"[^\w.-]+", "_", Path(ident.rstrip("/")).name)[:40] + "-" + hashlib.sha1(ident.encode()).hexdigest()[:8]
    )


def fetch_version(tag: str, repo: str | Path = ".", cache_dir: str | Path | None = None, verify: bool = True) -> Path:
    """Download ``data/synthetic`` at ``tag`` (like ``dvc get``) into the cache; return the folder.

    A cached copy is reused when it still matches its manifest; a fresh download that does not match, or
    that the DVC remote cannot serve in full, raises :class:`~synthmri.errors.StageError` naming the bad
    files, and nothing is left in the cache. Processes that fetch the same version at once share the cache:
    a lock file lets one download while the others wait, then each verifies the result itself.
    """
    from dvc.api import DVCFileSystem
    from filelock import FileLock

    from synthmri.data.synthetic import SyntheticDataset

    repo = str(repo)
    if not TAG_PATTERN.match(tag):
        raise StageError(f"'{tag}' is not a data-set version tag (synth-YYYYMMDD[-N])")
    target = Path(cache_dir or cache_root()) / _repo_key(repo) / tag
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{tag}.lock"):
        if (target / "manifest.csv").is_file() and (not verify or not SyntheticDataset(target).verify()):
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{tag}.", dir=target.parent))
        try:
            try:
                DVCFileSystem(repo, rev=tag).get(SYNTHETIC_DIR.as_posix(), str(staging / "synthetic"), recursive=True)
            except FileNotFoundError as exc:  # dvc-data: "No storage files available" for an object the remote lacks
                raise StageError(
                    f"{tag}: {exc.filename or exc} could not be downloaded: the DVC remote has no object for it "
                    f"(deleted or never pushed); nothing was written to {target.parent}"
                ) from None
            bad = SyntheticDataset(staging / "synthetic").verify() if verify else []
            if bad:
                raise StageError(
                    f"{tag}: {len(bad)} downloaded file(s) do not match manifest.csv (a damaged object in the DVC "
                    f"remote?): {', '.join(bad[:5])}; nothing was written to {target.parent}"
                )
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / "synthetic", target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_version(
    tag: str,
    repo: str | Path = ".",
    cache_dir: str | Path | None = None,
    transform=None,
    covariates: list[str] | None = None,
    verify: bool = True,
):
    """A :class:`~synthmri.data.synthetic.SyntheticDataset` of version ``tag`` (fetched if needed)."""
    from synthmri.data.synthetic import SyntheticDataset

    return SyntheticDataset(fetch_version(tag, repo, cache_dir, verify), transform=transform, covariates=covariates)


def main(argv: list[str] | None = None) -> int:
    """``python -m synthmri.versions [REPO] [--get TAG [--out DIR]]``: list versions or fetch one."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m synthmri.versions", description=main.__doc__)
    parser.add_argument("repo", nargs="?", default=".", help="clone path or git URL (default: .)")
    parser.add_argument("--get", metavar="TAG", help="fetch this version into the cache and print its folder")
    parser.add_argument("--json", action="store_true", help="list as JSON")
    args = parser.parse_args(argv)
    try:
        if args.get:
            print(fetch_version(args.get, args.repo))
            return 0
        versions = list_versions(args.repo)
    except StageError as exc:
        print(f"error: {exc}")
        return 1
    if args.json:
        print(json.dumps([v.__dict__ for v in versions], indent=2, default=str))
    else:
        for v in versions:
            print(v)
            for line in v.summary[1:4]:
                print(f"    {line}")
        if not versions:
            print(f"no published versions (tags synth-*) in {args.repo}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
