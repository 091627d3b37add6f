"""Plot benchmarks/results/vqgan_curve.csv: validation PSNR and SSIM against CPU-minutes, one colour per
recipe (label), one thin line per seed and the mean across seeds in bold.

    .venv/bin/python benchmarks/plot_vqgan_curve.py [--csv ...] [--out benchmarks/results/vqgan_curve.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=HERE / "vqgan_curve.csv")
    parser.add_argument("--out", type=Path, default=HERE / "vqgan_curve.png")
    args = parser.parse_args()
    frame = pd.read_csv(args.csv)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(frame.groupby("label", sort=False)):
        colour = colours[i % len(colours)]
        for ax, metric in zip(axes, ("val_psnr", "val_ssim")):
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
    for ax, title in zip(axes, ("validation PSNR (dB)", "validation 3D SSIM")):
        ax.set_xlabel("training CPU-minutes (1 thread)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    figure.suptitle("VQ-GAN recipes on the demo cohort: quality against CPU time (thin: seeds, bold: mean)")
    figure.savefig(args.out, dpi=90)
    print(args.out)


if __name__ == "__main__":
    main()
