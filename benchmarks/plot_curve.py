"""Plot a quality-against-CPU-minutes table: one colour per recipe (label), one thin line per seed and the
mean across seeds in bold; dashed lines are the quality gate's thresholds.

    .venv/bin/python benchmarks/plot_curve.py vqgan       # results/vqgan_curve.csv -> vqgan_curve.png
    .venv/bin/python benchmarks/plot_curve.py diffusion   # results/diffusion_curve.csv -> diffusion_curve.png
    .venv/bin/python benchmarks/plot_curve.py diffusion --csv a.csv b.csv --labels base flow --out c.png
    .venv/bin/python benchmarks/plot_curve.py diffusion-effects   # the covariate effects of the same table
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).parent / "results"
# kind -> (panels: column, title, gate threshold or None), figure title, table (results/<table>_curve.csv)
PRESETS = {
    "vqgan": (
        [("val_psnr", "validation PSNR (dB)", None), ("val_ssim", "validation 3D SSIM", None)],
        "VQ-GAN recipes on the demo cohort: quality against CPU time (thin: seeds, bold: mean)",
        "vqgan",
    ),
    "diffusion": (
        [
            ("fd_ratio", "FD ratio (stats features)", 3.0),
            ("precision", "precision", 0.5),
            ("coverage", "coverage", 0.5),
            ("gate_n_failed", "failing gate checks (set checks)", None),
        ],
        "Diffusion recipes on the demo latents (VQ-GAN fixed): the report's metrics against CPU time",
        "diffusion",
    ),
    "diffusion-effects": (
        [
            ("effect_csf", "effect ratio: CSF fraction vs age", 0.5),
            ("effect_ventricles", "effect ratio: ventricles vs age", 0.5),
            ("effect_head", "effect ratio: head size vs sex", 0.5),
            ("age_mae_ratio", "age predictor MAE ratio", 2.0),
        ],
        "Diffusion recipes on the demo latents (VQ-GAN fixed): the covariate effects against CPU time",
        "diffusion",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(PRESETS))
    parser.add_argument("--csv", type=Path, nargs="+", default=None, help="default: results/<kind>_curve.csv")
    parser.add_argument("--labels", nargs="+", default=None, help="only these recipes (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/<kind>_curve.png")
    args = parser.parse_args()
    panels, title, table = PRESETS[args.kind]
    frame = pd.concat([pd.read_csv(path) for path in args.csv or [HERE / f"{table}_curve.csv"]])
    if args.labels:
        frame = frame[frame["label"].isin(args.labels)]
    if "weights" in frame:  # diffusion: the curve is the EMA model at the recipe's own guidance scale
        first_guidance = frame.groupby(["label", "seed"])["guidance"].transform("first")
        frame = frame[(frame["weights"] == "ema") & (frame["guidance"] == first_guidance)]
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(frame.groupby("label", sort=False)):
        colour = colours[i % len(colours)]
        for ax, (metric, _, _) in zip(axes, panels):
            for _, run in runs.groupby("seed"):
                ax.plot(run["cpu_minutes"], run[metric], color=colour, alpha=0.35, linewidth=0.8)
            points = runs.assign(point=runs.groupby("seed").cumcount()).groupby("point")
            mean = points[["cpu_minutes", metric]].mean()
            ax.plot(
                mean["cpu_minutes"],
                mean[metric],
                color=colour,
                linewidth=2,
                marker="o",
                markersize=3,
                label=f"{label} ({runs['seed'].nunique()} seeds)",
            )
    for ax, (_, panel_title, threshold) in zip(axes, panels):
        if threshold is not None:
            ax.axhline(threshold, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("training CPU-minutes (1 thread)")
        ax.set_title(panel_title + (f" (gate: {threshold:g})" if threshold is not None else ""))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    figure.suptitle(title)
    out = args.out or HERE / f"{args.kind}_curve.png"
    figure.savefig(out, dpi=90)
    print(out)


if __name__ == "__main__":
    main()
