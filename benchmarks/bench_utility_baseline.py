"""Real-vs-real baseline of the utility check: what does a *perfect* generator's set gain, and how often does
it pass the gate's ``utility_pretrain_gain``?

    .venv/bin/python benchmarks/bench_utility_baseline.py --processed /tmp/big/data/processed \\
        [--sizes 102:26:256] [--draws 3] [--threads 2]

A perfect generator produces new subjects of the real population, so the "synthetic" set here is real:
subjects disjoint from both the training split and the held-out test subjects, drawn from one large cohort
normalized like the demo's (``synthmri demo -S demo.n_subjects=400`` then ``ingest`` and ``normalize`` in a
scratch clone). For each draw the cohort is shuffled into ``n_train`` training, ``n_test`` held-out and
``n_synthetic`` "synthetic" subjects (the latter keep their own covariates as the generator's requested ones),
and the ``utility`` stage's protocol runs exactly as the stage runs it (``params.yaml``'s ``utility`` section).
Prints and appends to ``benchmarks/results/utility_baseline.csv`` one row per draw: the gains with their
intervals at every k, the TSTR ratio, and whether the gate's check passes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from synthmri.config import load_params
from synthmri.data.datasets import ProcessedVolumes
from synthmri.utility.protocol import Protocol, UtilitySets
from synthmri.utility.summary import summarize
from synthmri.utility.targets import TargetCodec

OUT = Path(__file__).parent / "results" / "utility_baseline.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processed", type=Path, required=True, help="a large processed cohort")
    parser.add_argument("--sizes", default="102:26:256", help="n_train:n_test:n_synthetic subjects")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    up = params.utility
    n_train, n_test, n_syn = (int(v) for v in args.sizes.split(":"))
    cohort = ProcessedVolumes(args.processed, split=None)
    table = cohort.manifest.reset_index(drop=True)
    volumes = torch.stack([v for v in cohort.volumes])  # (N, 1, D, H, W)
    subjects = table["subject_id"].astype(str).unique()
    if len(subjects) < n_train + n_test + n_syn:
        raise SystemExit(
            f"{args.processed} has {len(subjects)} subjects; {args.sizes} needs {n_train + n_test + n_syn}"
        )
    names = up.targets or [c.name for c in params.covariates]
    codec = TargetCodec([params.covariate(n) for n in names])
    threshold = params.report.thresholds.min_utility_gain_ci_low
    for draw in range(args.draws):
        order = np.random.default_rng(1000 + draw).permutation(subjects)
        parts = np.split(order, [n_train, n_train + n_test, n_train + n_test + n_syn])[:3]
        rows = [np.flatnonzero(table["subject_id"].astype(str).isin(p).to_numpy()) for p in parts]
        sets = UtilitySets(
            table.iloc[rows[0]].reset_index(drop=True),
            volumes[rows[0]],
            table.iloc[rows[1]].reset_index(drop=True),
            volumes[rows[1]],
            table.iloc[rows[2]].reset_index(drop=True).drop(columns=["subject_id"]),
            volumes[rows[2]],
        )
        start = time.time()
        summary = summarize(Protocol(up, codec, sets, torch.device("cpu")).run(), up)
        row = {"draw": draw, "sizes": args.sizes, "repeats": up.repeats, "seconds": round(time.time() - start)}
        for k in up.k:
            for key in ("pretrain_gain", "real_pretrain_gain", "negative_control_gain"):
                for part in ("", "_ci_low", "_ci_high"):
                    row[f"{key}{part}.k{k}"] = round(summary[f"{key}{part}.{up.primary}.k{k}"], 3)
        row["tstr_ratio"] = round(summary[f"tstr_ratio.{up.primary}"], 3)
        low = summary["primary_gain_ci_low"]
        row["check_passes"] = threshold is None or (low is not None and low >= threshold)
        print(row, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([row]).to_csv(args.out, mode="a", header=not args.out.exists(), index=False)


if __name__ == "__main__":
    main()
