"""A large synthetic set through the real ``sample`` stage: rate, memory at 1k/5k/10k, a kill and a resume.

    .venv/bin/python benchmarks/bench_large_set.py --project DIR --volumes 10000 --kill-at 5000 \\
        [--checkpoints 1000 5000 10000] [-S sample.micro_batch=4 -S sample.shard_size=16 ...]

``DIR`` is a SynthMRI project whose ``models/`` and ``data/latents`` are built (``make demo`` there). The
script runs ``synthmri sample -S sample.n_samples=N`` in ``DIR`` exactly as a user would (Prefect task
runner, MLflow run, progress bar to ``DIR/large_set.log``) and watches it from outside:

- every second, the resident memory of the stage's whole process tree (stage, Prefect's temporary
  server, workers) and the number of recorded shards; the peak up to each checkpoint is recorded, so
  "flat memory" reads as peak(1k) ~ peak(10k);
- at ``--kill-at`` volumes it kills the whole process group with SIGKILL (what an OOM killer or a lost
  node does), notes every recorded shard's file times, and starts the stage again;
- at the end it checks that nothing was lost or duplicated: the manifest has every index once, every
  file matches its sha256, no stray files remain, and no shard recorded before the kill was rewritten.

Writes ``benchmarks/results/large_set.json`` (or ``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
from common import run_stamp

from synthmri.io import sha256_file

OUT = Path(__file__).parent / "results" / "large_set.json"


def tree_rss_mb(root: psutil.Process) -> float:
    """Resident memory of a process and all its descendants, in MB (processes that vanish count 0)."""
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def recorded_volumes(shard_dir: Path, shard_size: int) -> int:
    """Volumes in recorded shards (every shard but the last is full; close enough for checkpoints)."""
    if not shard_dir.is_dir():
        return 0
    return sum(1 for entry in os.scandir(shard_dir) if entry.name.startswith("shard-")) * shard_size


def shard_times(shard_dir: Path) -> dict[str, int]:
    return {entry.name: entry.stat().st_mtime_ns for entry in os.scandir(shard_dir) if entry.name.startswith("shard-")}


class Watch:
    """One run of the stage, watched: memory peaks per checkpoint, optional kill at a volume count."""

    def __init__(self, project: Path, command: list[str], log_path: Path, shard_size: int) -> None:
        self.project, self.command, self.log_path, self.shard_size = project, command, log_path, shard_size
        self.shard_dir = project / "data" / "synthetic" / "shards"

    def run(self, checkpoints: list[int], peaks: dict[int, float], kill_at: int | None) -> dict:
        started = time.perf_counter()
        done_before = recorded_volumes(self.shard_dir, self.shard_size)
        with open(self.log_path, "a") as log:
            proc = subprocess.Popen(
                self.command, cwd=self.project, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        root = psutil.Process(proc.pid)
        peak, killed = 0.0, False
        while proc.poll() is None:
            peak = max(peak, tree_rss_mb(root))
            done = recorded_volumes(self.shard_dir, self.shard_size)
            for mark in checkpoints:
                if done >= mark and mark not in peaks:
                    peaks[mark] = peak
            if kill_at is not None and done >= kill_at:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
                break
            time.sleep(1.0)
        seconds = time.perf_counter() - started
        done = recorded_volumes(self.shard_dir, self.shard_size)
        return {
            "returncode": proc.returncode,
            "killed": killed,
            "seconds": round(seconds, 1),
            "volumes_before": done_before,
            "volumes_after": done,
            "peak_rss_mb": round(peak, 1),
        }


def verify(out_dir: Path, n: int, before_kill: dict[str, int]) -> dict:
    """Nothing lost, nothing duplicated, nothing finished redone."""
    manifest = pd.read_csv(out_dir / "manifest.csv")
    indices = manifest["sample_index"].tolist()
    bad = [f for f, digest in zip(manifest["file"], manifest["sha256"]) if sha256_file(out_dir / f) != digest]
    on_disk = {f"volumes/{p.name}" for p in (out_dir / "volumes").iterdir()}
    after = shard_times(out_dir / "shards")
    rewritten = [name for name, mtime in before_kill.items() if after.get(name) != mtime]
    return {
        "manifest_rows": len(manifest),
        "every_index_once": sorted(indices) == list(range(n)),
        "checksum_mismatches": len(bad),
        "stray_files": len(on_disk - set(manifest["file"])),
        "missing_files": len(set(manifest["file"]) - on_disk),
        "shards_recorded_before_kill": len(before_kill),
        "shards_rewritten_after_resume": len(rewritten),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--volumes", type=int, default=10000)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--shard-size", type=int, default=4, help="must match sample.shard_size")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("-S", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    project = args.project.resolve()
    overrides = [f"sample.n_samples={args.volumes}", *args.overrides]
    command = [sys.executable, "-m", "synthmri.cli", "sample", *[a for o in overrides for a in ("-S", o)]]
    watch = Watch(project, command, project / "large_set.log", args.shard_size)
    peaks: dict[int, float] = {}
    runs = [watch.run(args.checkpoints, peaks, args.kill_at)]
    before_kill = shard_times(watch.shard_dir) if runs[0]["killed"] else {}
    if runs[0]["killed"]:
        runs.append(watch.run(args.checkpoints, peaks, None))
    result = {
        **run_stamp(),
        "load_average_end": list(os.getloadavg()),
        "volumes": args.volumes,
        "overrides": overrides,
        "runs": runs,
        "wall_seconds": round(sum(r["seconds"] for r in runs), 1),
        "volumes_per_min": round(60 * args.volumes / sum(r["seconds"] for r in runs), 1),
        "peak_rss_mb_up_to": {str(k): round(v, 1) for k, v in sorted(peaks.items())},
        "check": verify(project / "data" / "synthetic", args.volumes, before_kill),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
