"""What DVC does with a large synthetic set: loose NIfTI files against WebDataset tar shards, and a crowd of pulls.

    .venv/bin/python benchmarks/bench_dvc_layouts.py --set DIR [--layouts files webdataset] \\
        [--volumes-per-tar 1000] [--pulls 20] [--work /tmp/dvc-layouts]

``DIR`` is a finished set of the ``sample`` stage in the loose layout (``manifest.csv`` + ``volumes/``).
For each layout, in a fresh git + DVC repository with a local remote (the user's path, with the network
taken out), it times:

- ``pack``: loose files -> tar shards (:func:`synthmri.data.shards.pack_tar_shards`; webdataset only);
- ``dvc add data/synthetic`` (hashing and caching), ``dvc status`` (nothing changed), ``dvc push``,
  ``dvc status -c`` (against the remote);
- the version published: git commit, tag ``synth-YYYYMMDD`` with ``reports/release.json``;
- ``dvc get`` of the set at the tag from a plain git clone (every object comes from the remote);
- ``load_version`` into an empty cache (download + sha256 of every volume), then again (cache hit + verify);
- ``--pulls`` processes calling ``load_version`` at once on one new cache: wall time, and whether every
  process got the whole set with every checksum verified.

Each step's peak RSS is recorded too (``peak_rss_mb``, with GNU time; ``load_version``'s is this process's peak so
far, and each concurrent pull reports its own).

Writes ``benchmarks/results/dvc_layouts.json`` (or ``--out``) and prints it. Each layout's folder is
deleted after its measurements (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from common import run_stamp

from synthmri.data.shards import pack_tar_shards

OUT = Path(__file__).parent / "results" / "dvc_layouts.json"
BIN = Path(sys.executable).parent
ENV = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
TAG = "synth-" + time.strftime("%Y%m%d")


PEAK_MB: dict[str, float | None] = {}  # step -> peak RSS of its process (MB), filled by run()
#: GNU time measures a command's own peak RSS: its child is forked from a small process. (``os.wait4`` on a
#: child forked from this process reports this process's RSS at the fork, about 600 MB, for every command.)
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def run(*cmd: str, cwd: Path, step: str | None = None) -> float:
    """Seconds ``cmd`` took; its peak RSS goes to ``PEAK_MB[step]`` (None without GNU time)."""
    started = time.perf_counter()
    with tempfile.NamedTemporaryFile("w+", suffix=".rss") as rss:
        prefix = [GNU_TIME, "-f", "%M", "-o", rss.name] if GNU_TIME and step else []
        done = subprocess.run(prefix + list(cmd), cwd=cwd, env=ENV, capture_output=True, text=True)
        seconds = round(time.perf_counter() - started, 1)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        if step:
            text = Path(rss.name).read_text().strip().splitlines()
            PEAK_MB[step] = round(int(text[-1]) / 1024, 1) if prefix and text else None  # KiB
    return seconds


def peak_rss_mb() -> float:
    """This process's own peak RSS (``VmHWM``: the current memory map's high-water mark), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def place_set(source: Path, target: Path, layout: str, per_tar: int) -> float:
    """The set in ``target`` in the given layout (loose files are hard links: no copy time); pack seconds."""
    target.mkdir(parents=True)
    for name in ("manifest.csv", "README.md", "software.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    (target / "volumes").mkdir()
    for path in (source / "volumes").iterdir():
        os.link(path, target / "volumes" / path.name)
    if layout == "files":
        return 0.0
    started = time.perf_counter()
    manifest = pack_tar_shards(target, per_tar)
    manifest.to_csv(target / "manifest.csv", index=False)
    shutil.rmtree(target / "volumes")
    return round(time.perf_counter() - started, 1)


def pulls(clone: Path, cache: Path, n: int, volumes: int) -> dict:
    """``n`` processes load the version at once into one cache; each verifies every checksum."""
    script = textwrap.dedent(f"""\
        import time
        from pathlib import Path
        from synthmri.versions import load_version
        started = time.perf_counter()
        dataset = load_version({TAG!r}, repo={str(clone)!r}, cache_dir={str(cache)!r})
        ok = len(dataset) == {volumes} and dataset.verify() == []
        status = Path("/proc/self/status").read_text().splitlines()
        peak_mb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
        print(ok, round(time.perf_counter() - started, 1), round(peak_mb, 1))
        """)
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(n)
    ]
    outputs = [p.communicate() for p in procs]
    wall = round(time.perf_counter() - started, 1)
    results = [out.strip().split() for out, _ in outputs]
    verified = sum(1 for p, r in zip(procs, results) if p.returncode == 0 and r and r[0] == "True")
    per_process = sorted(float(r[1]) for r in results if len(r) == 3)
    peaks = [float(r[2]) for r in results if len(r) == 3]
    return {
        "processes": n,
        "wall_s": wall,
        "all_verified": verified == n,
        "verified": verified,
        "slowest_process_s": per_process[-1] if per_process else None,
        "fastest_process_s": per_process[0] if per_process else None,
        "peak_rss_mb_per_process_max": max(peaks) if peaks else None,
        "errors": [err.strip().splitlines()[-1] for p, (_, err) in zip(procs, outputs) if p.returncode != 0][:3],
    }


def measure(source: Path, work: Path, layout: str, per_tar: int, n_pulls: int) -> dict:
    import pandas as pd

    from synthmri.versions import load_version

    repo, remote = work / "repo", work / "remote"
    repo.mkdir(parents=True)
    run("git", "init", "-q", "-b", "main", cwd=repo)
    run("dvc", "init", "-q", cwd=repo)
    run("dvc", "remote", "add", "-d", "local", str(remote), cwd=repo)
    out: dict = {"layout": layout}
    out["pack_s"] = place_set(source, repo / "data" / "synthetic", layout, per_tar)
    files = [p for p in (repo / "data" / "synthetic").rglob("*") if p.is_file()]
    out["files"], out["bytes"] = len(files), sum(p.stat().st_size for p in files)
    volumes = len(pd.read_csv(repo / "data" / "synthetic" / "manifest.csv"))
    out["volumes"] = volumes
    out["dvc_add_s"] = run("dvc", "add", "-q", "data/synthetic", cwd=repo, step="dvc_add")
    out["dvc_status_s"] = run("dvc", "status", "-q", cwd=repo, step="dvc_status")
    out["dvc_push_s"] = run("dvc", "push", "-q", cwd=repo, step="dvc_push")
    out["dvc_status_cloud_s"] = run("dvc", "status", "-c", "-q", cwd=repo, step="dvc_status_cloud")
    (repo / "reports").mkdir()
    (repo / "reports" / "release.json").write_text(json.dumps({"tag": TAG, "dataset": {"volumes": volumes}}))
    run("git", "add", "-A", cwd=repo)
    run("git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "set", cwd=repo)
    run("git", "tag", TAG, cwd=repo)
    clone = work / "clone"
    run("git", "clone", "-q", str(repo), str(clone), cwd=work)
    out["dvc_get_s"] = run(
        "dvc", "get", str(clone), "data/synthetic", "--rev", TAG, "-o", str(work / "got"), cwd=work, step="dvc_get"
    )
    shutil.rmtree(work / "got")
    started = time.perf_counter()
    dataset = load_version(TAG, repo=clone, cache_dir=work / "cache")
    out["load_version_cold_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    dataset = load_version(TAG, repo=clone, cache_dir=work / "cache")
    out["load_version_warm_s"] = round(time.perf_counter() - started, 1)
    out["load_version_intact"] = len(dataset) == volumes
    out["peak_rss_mb"] = dict(PEAK_MB)
    out["peak_rss_mb"]["load_version (this process so far)"] = peak_rss_mb()
    PEAK_MB.clear()
    shutil.rmtree(work / "cache")
    if n_pulls:
        out["concurrent_pulls"] = pulls(clone, work / "cache-crowd", n_pulls, volumes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", type=Path, required=True)
    parser.add_argument("--layouts", nargs="+", default=["files", "webdataset"], choices=["files", "webdataset"])
    parser.add_argument("--volumes-per-tar", type=int, default=1000)
    parser.add_argument("--pulls", type=int, default=20)
    parser.add_argument("--pulls-layouts", nargs="+", default=["files", "webdataset"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/dvc-layouts"))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    result = {**run_stamp(), "set": str(args.set), "volumes_per_tar": args.volumes_per_tar, "layouts": []}
    for layout in args.layouts:
        work = args.work / layout
        shutil.rmtree(work, ignore_errors=True)
        n_pulls = args.pulls if layout in args.pulls_layouts else 0
        result["layouts"].append(measure(args.set.resolve(), work, layout, args.volumes_per_tar, n_pulls))
        print(json.dumps(result["layouts"][-1]), flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["load_average_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
