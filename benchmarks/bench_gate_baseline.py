"""Real-vs-real baseline of the quality gate: how often does a *perfect* generator pass each check?

    .venv/bin/python benchmarks/bench_gate_baseline.py --processed /tmp/big/data/processed \\
        --sizes 51:13:16 51:13:64 51:26:64 --draws 40

A perfect generator produces new subjects of the real population. So the "synthetic" set here is real:
volumes of subjects disjoint from both the training split and the held-out reference, drawn from one
large cohort normalized like the demo's (e.g. ``synthmri demo -S demo.n_subjects=256`` then ingest and
normalize, in a scratch clone). For each size ``n_train:n_reference:n_synthetic`` and each draw, the cohort
is shuffled into those three disjoint sets, the ``report`` stage's metrics are computed exactly as the
stage computes them (:func:`synthmri.report.compute.compute_set_metrics`, the synthetic volumes asking
for the covariates their subjects have) and the gate of ``--params`` is applied. A check that a perfect
generator fails in more than 5 % of draws at a given size cannot tell a good set from a bad one at that
size: either the set sizes grow, or (only then, and re-derived from this baseline) the threshold moves.

Appends to ``benchmarks/results/gate_baseline.csv`` (one row per draw: every gate metric and check; rows from before
2026-12-05 02:00 score the copy check by its old rule, the excess over the chance *mean*) and
prints per size and check the pass rate and the 5th/50th/95th percentiles of the metric.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import add_run_args, run_stamp

from synthmri.config import load_params
from synthmri.data.datasets import ProcessedVolumes
from synthmri.logs import progress
from synthmri.report.compute import compute_set_metrics, make_extractor
from synthmri.report.gate import evaluate_gate
from synthmri.report.inputs import ReportData

OUT = Path(__file__).parent / "results" / "gate_baseline.csv"


class CachedExtractor:
    """The report's extractor with its features computed once per volume (keyed by the volume's bytes):
    every draw re-uses the same volumes, and the features do not depend on the draw."""

    def __init__(self, extractor, volumes: np.ndarray) -> None:
        self.name = extractor.name
        features = extractor(volumes)
        self.cache = {self._key(v): f for v, f in zip(volumes, features, strict=True)}

    @staticmethod
    def _key(volume: np.ndarray) -> str:
        return hashlib.blake2b(np.ascontiguousarray(volume, dtype=np.float32).tobytes(), digest_size=16).hexdigest()

    def __call__(self, volumes) -> np.ndarray:
        return np.stack([self.cache[self._key(v)] for v in volumes])


def one_draw(params, manifest, volumes, space, extractor, sizes, rng) -> dict:
    n_train, n_ref, n_syn = sizes
    order = rng.permutation(len(manifest))
    train, ref, syn = np.split(order[: n_train + n_ref + n_syn], [n_train, n_train + n_ref])
    real = manifest.iloc[np.concatenate([train, ref])].copy()
    real["split"] = ["train"] * n_train + ["test"] * n_ref
    synthetic = manifest.iloc[syn].drop(columns=["split"]).reset_index(drop=True)
    synthetic["file"] = [f"sample-{i:06d}.nii.gz" for i in range(n_syn)]
    data = ReportData(
        real=real.reset_index(drop=True),
        real_volumes=volumes[np.concatenate([train, ref])],
        synthetic=synthetic,
        synthetic_volumes=volumes[syn],
        space=space,
        reference_splits=["test"],
    )
    metrics = compute_set_metrics(params, data, extractor, intervals=False).metrics
    row = {}
    for check in evaluate_gate(metrics, params.report.thresholds):
        if check.status != "skipped":
            row[f"value.{check.name}"], row[f"pass.{check.name}"] = check.value, check.status == "pass"
    return row


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Per size and check: the pass rate over draws and the 5th/50th/95th percentiles of the metric."""
    rows = []
    for size, group in frame.groupby("sizes", sort=False):
        for column in [c for c in group.columns if c.startswith("pass.")]:
            check = column.removeprefix("pass.")
            values = pd.to_numeric(group[f"value.{check}"], errors="coerce")
            rows.append(
                {
                    "sizes": size,
                    "check": check,
                    "pass_rate": round(float(group[column].mean()), 3),
                    "p05": round(float(values.quantile(0.05)), 3),
                    "median": round(float(values.median()), 3),
                    "p95": round(float(values.quantile(0.95)), 3),
                }
            )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processed", type=Path, required=True, help="processed folder of a large cohort")
    parser.add_argument("--sizes", nargs="+", default=["51:13:16"], help="n_train:n_reference:n_synthetic")
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    add_run_args(parser, OUT)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    params = load_params(args.params, args.overrides)
    cohort = ProcessedVolumes(args.processed, split=None)
    manifest = cohort.manifest.reset_index(drop=True)
    volumes = np.stack([v[0].numpy() for v in cohort.volumes])
    space = json.loads((args.processed / "space.json").read_text())
    print(f"cohort: {len(manifest)} subjects from {args.processed}", flush=True)
    extractor = CachedExtractor(make_extractor(params.report, (-1.0, 1.0)), volumes)
    rng = np.random.default_rng(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frames = [pd.read_csv(args.out)] if args.out.is_file() else []  # earlier runs' rows are kept
    for spec in args.sizes:  # the table is rewritten after every size: a long run keeps what it finished
        sizes = tuple(int(s) for s in spec.split(":"))
        if sum(sizes) > len(manifest):
            raise SystemExit(f"sizes {spec} need {sum(sizes)} subjects; the cohort has {len(manifest)}")
        rows = [
            {"sizes": spec, "draw": draw, **one_draw(params, manifest, volumes, space, extractor, sizes, rng)}
            for draw in progress(range(args.draws), desc=f"Real-vs-real draws at {spec}", unit="draw")
        ]
        frame = pd.DataFrame(rows)
        frame = frame.assign(**run_stamp())
        frames.append(frame)
        pd.concat(frames, ignore_index=True).to_csv(args.out, index=False)
        print(summarize(frame).to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
