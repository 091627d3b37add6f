"""How the report's cost grows with the synthetic set's size: seconds per metric family and peak memory.

    .venv/bin/python benchmarks/bench_report_scaling.py --project DIR --sizes 32 128 512 2048 [--label after]

``DIR`` is a SynthMRI project with ``data/processed`` and a (possibly still growing) ``data/synthetic``:
the first M generated volumes (from ``manifest.csv``, or from the recorded shards while the ``sample``
stage is still running) are scored by the report's own code (:func:`synthmri.report.inputs.load_report_data`
and :func:`synthmri.report.compute.compute_set_metrics`, privacy and bootstrap intervals included), each
size in a fresh process so that its peak resident memory is its own. Every metric family is timed
separately, so a family that grows faster than the set shows itself: the ``growth`` column is the
exponent b of seconds ~ M^b between consecutive sizes (1 = linear, 2 = quadratic).

``--features-only`` times just the set comparisons (FD/MMD/PRDC and their bootstrap intervals) on random
features of the report's sizes (26 held-out, 102 training, M synthetic), once comparing the whole set
(``report.compare_size=null``) and once in subsets of ``report.compare_size``: seconds, no volumes needed.

Appends to ``benchmarks/results/report_scaling.csv`` and prints each row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from bench_vqgan_curve import append_rows
from common import run_stamp

OUT = Path(__file__).parent / "results" / "report_scaling.csv"
FAMILIES = (
    "make_extractor",
    "fidelity_metrics",
    "diversity_metrics",
    "conditioning_metrics",
    "gate_intervals",
    "intensity_metrics",
    "privacy_metrics",
)


def generated_records(synthetic_dir: Path) -> pd.DataFrame:
    """The set's rows in index order: the manifest if the stage has finished, else its recorded shards."""
    from synthmri.stages.sample import recorded_manifest

    if (synthetic_dir / "manifest.csv").is_file():
        return pd.read_csv(synthetic_dir / "manifest.csv")
    return recorded_manifest(synthetic_dir)


def one_size(project: Path, size: int, params_path: Path, overrides: list[str]) -> dict:
    """Score the first ``size`` volumes in this process; seconds per family and peak RSS."""
    from synthmri.config import load_params
    from synthmri.report import compute
    from synthmri.report.inputs import load_report_data

    seconds: dict[str, float] = {}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started

        return wrapper

    for name in FAMILIES:
        setattr(compute, name, timed(name, getattr(compute, name)))
    params = load_params(params_path, overrides)
    records = generated_records(project / "data" / "synthetic")
    if len(records) < size:
        raise SystemExit(f"only {len(records)} volumes generated so far, {size} asked")
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp)
        records.iloc[:size].to_csv(subset / "manifest.csv", index=False)
        (subset / "volumes").symlink_to(project / "data" / "synthetic" / "volumes")
        started = time.perf_counter()
        data = load_report_data(params, project / "data" / "processed", subset)
        seconds["load"] = time.perf_counter() - started
        started = time.perf_counter()
        compute.compute_set_metrics(params, data)
        total = time.perf_counter() - started
    return {
        "volumes": size,
        "load_s": round(seconds.pop("load"), 2),
        "metrics_s": round(total, 2),
        **{f"{name}_s": round(seconds.get(name, 0.0), 2) for name in FAMILIES},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def features_only(size: int, compare_size: int | None, k: int = 5, seed: int = 0) -> dict:
    """Seconds of the feature comparisons alone at ``size`` synthetic volumes (random 40-dim features)."""
    import numpy as np

    from synthmri.report.families import fidelity_metrics
    from synthmri.report.intervals import gate_intervals

    rng = np.random.default_rng(seed)
    ref, train, syn = rng.normal(size=(26, 40)), rng.normal(size=(102, 40)), rng.normal(0.1, 1.1, size=(size, 40))
    started = time.perf_counter()
    fidelity = fidelity_metrics(ref, syn, train, k, seed, compare_size, 32)
    middle = time.perf_counter()
    gate_intervals({}, train, ref, syn, k, seed, compare_size)
    done = time.perf_counter()
    return {
        "volumes": size,
        "compare_size": compare_size,
        "fidelity_metrics_s": round(middle - started, 2),
        "gate_intervals_s": round(done - middle, 2),
        "metrics_s": round(done - started, 2),
        "coverage": round(fidelity["coverage"], 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def add_growth(rows: list[dict]) -> None:
    """Exponent of seconds ~ M^b between consecutive sizes, for the whole report."""
    for previous, row in zip(rows, rows[1:]):
        ratio = row["volumes"] / previous["volumes"]
        if previous["metrics_s"] > 0 and row["metrics_s"] > 0:
            row["growth"] = round(math.log(row["metrics_s"] / previous["metrics_s"]) / math.log(ratio), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=None, help="required unless --features-only")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 512, 2048])
    parser.add_argument("--label", default="")
    parser.add_argument("--params", type=Path, default=None, help="default: the project's params.yaml")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--features-only", action="store_true", help="time the set comparisons on random features")
    parser.add_argument("--compare-sizes", nargs="+", default=["none", "32"], help="with --features-only")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child process: one size
    parser.add_argument("-S", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if args.features_only:
        rows = []
        for compare in args.compare_sizes:
            series = []
            for size in args.sizes:
                size_row = features_only(size, None if compare == "none" else int(compare))
                series.append({"label": args.label or "features-only", **size_row, **run_stamp()})
                add_growth(series)
                print(json.dumps(series[-1]), flush=True)
            rows += series
        append_rows(args.out, rows)
        return
    project = args.project.resolve()
    params_path = args.params or project / "params.yaml"
    if args.one is not None:
        print(json.dumps(one_size(project, args.one, params_path, args.overrides)))
        return
    rows = []
    for size in args.sizes:
        command = [
            sys.executable,
            __file__,
            "--project",
            str(project),
            "--one",
            str(size),
            "--params",
            str(params_path),
        ]
        command += [a for o in args.overrides for a in ("-S", o)]
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), check=False)
        if done.returncode != 0:
            raise SystemExit(f"size {size} failed:\n{done.stderr[-3000:]}")
        rows.append({"label": args.label, **json.loads(done.stdout.strip().splitlines()[-1]), **run_stamp()})
        rows[-1]["load_average"] = round(os.getloadavg()[0], 2)
        add_growth(rows)
        print(json.dumps(rows[-1]), flush=True)
    append_rows(args.out, rows)


if __name__ == "__main__":
    main()
