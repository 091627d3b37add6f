"""Steps against quality: each sampler at several step counts, the same model and seeds, scored by the report.

    make demo && .venv/bin/python benchmarks/bench_sampler_steps.py \\
        [--settings ddpm:1000 ddim:50 dpm_solver:25 dpm_solver:10 ...] [--volumes 32] [--repeats 2]

Every setting generates the same planned volumes (same covariate rows, same per-volume seeds; repeat r uses
``sample.seed`` = r, so repeats are disjoint draws) with the ``sample`` stage's own shard function
(classifier-free guidance, the configured decoding), in ``--workers`` threads, and the volumes are scored
by the ``report`` stage's code (:func:`synthmri.report.compute.compute_set_metrics`, no privacy, no
intervals) against the real held-out volumes: FD ratio, precision, coverage, effect ratios, predictor
checks, diversity. Seconds per setting give the speed-up over the reference (the first setting,
DDPM-1000 by default). The spread over repeats says which differences mean something.

Appends to ``benchmarks/results/sampler_steps.csv``; ``--plot`` draws ``sampler_steps.png`` from it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
from bench_diffusion_curve import KEPT
from bench_sample_throughput import run_setting, shard_size_for
from bench_vqgan_curve import append_rows
from common import add_run_args, run_stamp

from synthmri.catalog import LATENT_DIR, LDM_DIR, PROCESSED_DIR, SPACE_NAME, VQGAN_DIR
from synthmri.config import load_params
from synthmri.data.latents import LatentSet
from synthmri.report.compute import compute_set_metrics
from synthmri.report.gate import evaluate_gate
from synthmri.report.inputs import load_report_data
from synthmri.stages.sample import SampleJob, recorded_manifest
from synthmri.synthesis.plan import make_plan

OUT = Path(__file__).parent / "results" / "sampler_steps.csv"


def parse_setting(text: str) -> tuple[str, int]:
    name, _, steps = text.partition(":")
    return name, int(steps)


def score(params, out: Path) -> dict:
    """The report's set metrics of the volumes in ``out`` (its shard records become the manifest)."""
    recorded_manifest(out).to_csv(out / "manifest.csv", index=False)
    data = load_report_data(params, PROCESSED_DIR, out)
    metrics = compute_set_metrics(params, data, privacy=False, intervals=False).metrics
    checks = evaluate_gate(metrics, params.report.thresholds)
    row = {column: metrics.get(key) for key, column in KEPT.items() if key in metrics}
    row["gate_failed"] = ",".join(c.name for c in checks if c.status == "fail")
    return row


def plot(csv: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.read_csv(csv)
    metrics = [
        ("fd_ratio", "FD ratio (lower is better)"),
        ("precision", "precision"),
        ("coverage", "coverage"),
        ("diversity", "diversity ratio (synthetic / real)"),
        ("effect_ventricles", "ventricles-vs-age effect ratio"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.4))
    axes = axes.ravel()
    for name, group in frame.groupby("sampler"):
        mean = group.groupby("steps").mean(numeric_only=True)
        spread = group.groupby("steps").agg(["min", "max"])
        for ax, (column, label) in zip(axes, metrics):
            low, high = mean[column] - spread[column]["min"], spread[column]["max"] - mean[column]
            ax.errorbar(mean.index, mean[column], yerr=[low, high], fmt="o-", capsize=3, label=name)
            ax.set(xscale="log", xlabel="sampler steps", title=label)
            if column in ("precision", "coverage"):
                ax.set_ylim(-0.05, 1.05)  # fractions: a flat 0 reads as 0, not as an axis offset
        axes[-1].plot(mean.index, mean["volumes_per_min"], "o-", label=name)
    axes[-1].set(xscale="log", yscale="log", xlabel="sampler steps", title="volumes/min (this CPU)")
    axes[0].legend()
    fig.suptitle("Sampler steps against the report's fidelity (mean, bars: range over repeats; same model, same seeds)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["ddpm:1000", "ddim:100", "ddim:50", "ddim:25", "dpm_solver:25", "dpm_solver:10", "dpm_solver:5"],
    )
    parser.add_argument("--volumes", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None, help="default: sample.workers")
    parser.add_argument("--plot", action="store_true", help="only draw the figure from --out")
    add_run_args(parser, OUT)
    args = parser.parse_args()
    if args.plot:
        plot(args.out, args.out.with_suffix(".png"))
        return
    params = load_params(args.params, [f"sample.n_samples={args.volumes}", *args.overrides])
    workers = args.workers or params.sample.workers
    space = json.loads((PROCESSED_DIR / SPACE_NAME).read_text())
    plan = make_plan(params, LatentSet(LATENT_DIR, "train").manifest)
    guidance = params.diffusion.sampler.guidance_scale
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for setting in args.settings:
                sampler, steps = parse_setting(setting)
                out = Path(tmp) / f"{sampler}-{steps}-r{repeat}"
                job = SampleJob.from_params(
                    params, LDM_DIR, VQGAN_DIR, LATENT_DIR, out, space["affine"], sampler=sampler, steps=steps,
                    seed=repeat, release="bench", voxel_size_covariate=None,
                )  # fmt: skip
                if not rows:  # load the models outside the clock
                    run_setting(replace(job, out_dir=str(Path(tmp) / "warm-up")), plan[:1], 1, 1)
                started = time.perf_counter()
                seconds = run_setting(job, plan, shard_size_for(job.micro_batch, params.sample.shard_size), workers)
                row = {
                    "sampler": sampler,
                    "steps": steps,
                    "repeat": repeat,
                    "volumes": len(plan),
                    "guidance_scale": guidance,
                    "guidance_interval": str(params.diffusion.sampler.guidance_interval or "all steps"),
                    "rest_guidance_scale": params.diffusion.sampler.rest_guidance_scale,
                    "seconds": round(seconds, 1),
                    "volumes_per_min": round(60 * len(plan) / seconds, 2),
                    **score(params, out),
                    "score_seconds": round(time.perf_counter() - started - seconds, 1),
                    **run_stamp(),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    reference = rows[0]
    for row in rows:
        same = [r for r in rows if (r["sampler"], r["steps"]) == (reference["sampler"], reference["steps"])]
        row["speedup_vs_first"] = round(sum(r["seconds"] for r in same) / len(same) / row["seconds"], 1)
    append_rows(args.out, rows)
    plot(args.out, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
