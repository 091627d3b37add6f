"""Does the trained model respond to an acquisition covariate? The same seeds sampled at two values of it.

    make demo && .venv/bin/python benchmarks/bench_acquisition_response.py [--covariate inversion_time] \\
        [--values 0.9 1.1] [--fixed field_strength=3.0] [--volumes 16]

Each of ``--volumes`` planned rows (the training set's covariates, ``match_training``; the site left unspecified,
``--fixed`` values set) is generated once per ``--values`` entry with the ``sample`` stage's own shard function:
volume *i* has the same noise at every value, only the requested covariate changes. Each volume's GM/WM contrast
(:func:`synthmri.metrics.conditioning.gm_wm_contrast`) is measured; the physics says it rises with the inversion
time (:mod:`synthmri.data.physics`). Reports, per pair of values, the fraction of seeds whose contrast moves in
the direction of the real cohort's slope, the mean change, and the change the real cohort's slope predicts.
Appends to ``benchmarks/results/acquisition_response.csv`` and prints each row.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from bench_vqgan_curve import append_rows
from common import add_run_args, run_stamp

from synthmri.catalog import LATENT_DIR, LDM_DIR, PROCESSED_DIR, SPACE_NAME, VQGAN_DIR
from synthmri.config import load_params
from synthmri.data.covariates import covariate_column
from synthmri.data.datasets import ProcessedVolumes
from synthmri.data.latents import LatentSet
from synthmri.metrics.conditioning import gm_wm_contrast, slope_and_correlation
from synthmri.stages.sample import SampleJob, generate_shard, sample_volume_name
from synthmri.synthesis.plan import make_plan

OUT = Path(__file__).parent / "results" / "acquisition_response.csv"


def real_slope(params, name: str, value_range: tuple[float, float]) -> float:
    """Slope of GM/WM contrast against the covariate over the real processed cohort."""
    real = ProcessedVolumes(PROCESSED_DIR, None)
    cov = next(c for c in params.covariates if c.name == name)
    values, ok = covariate_column(real.manifest, cov)
    contrast = np.array([gm_wm_contrast(v[0].numpy(), value_range) for v in real.volumes])
    ok &= np.isfinite(contrast)
    return slope_and_correlation(values[ok], contrast[ok])["slope"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--covariate", default="inversion_time")
    parser.add_argument("--values", type=float, nargs=2, default=[0.9, 1.1])
    parser.add_argument("--fixed", nargs="*", default=["field_strength=3.0"], help="covariate=value")
    parser.add_argument("--volumes", type=int, default=16)
    add_run_args(parser, OUT)
    args = parser.parse_args()
    params = load_params(
        args.params, [f"sample.n_samples={args.volumes}", "sample.plan=match_training", *args.overrides]
    )
    fixed = {k: float(v) for k, v in (item.split("=", 1) for item in args.fixed)}
    plan = [{**row, "site": None, **fixed} for row in make_plan(params, LatentSet(LATENT_DIR, "train").manifest)]
    space = json.loads((PROCESSED_DIR / SPACE_NAME).read_text())
    sampler = params.diffusion.sampler
    contrasts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for value in args.values:
            out = Path(tmp) / f"v{value}"
            rows = [{**row, args.covariate: value} for row in plan]
            job = SampleJob.from_params(
                params, LDM_DIR, VQGAN_DIR, LATENT_DIR, out, space["affine"], release="bench", micro_batch=1,
                voxel_size_covariate=None,
            )  # fmt: skip
            generate_shard(job, 0, list(enumerate(rows)))
            contrasts[value] = np.array(
                [gm_wm_contrast(nib.load(out / "volumes" / sample_volume_name(i)).get_fdata(), (0.0, 1.0))
                 for i in range(len(rows))]
            )  # fmt: skip
    low, high = args.values
    change = contrasts[high] - contrasts[low]
    slope = real_slope(params, args.covariate, tuple(space.get("intensity_range", (-1.0, 1.0))))
    row = {
        "covariate": args.covariate,
        "low": low,
        "high": high,
        "fixed": " ".join(args.fixed),
        "volumes": len(change),
        "contrast_low_mean": round(float(contrasts[low].mean()), 4),
        "contrast_high_mean": round(float(contrasts[high].mean()), 4),
        "change_mean": round(float(change.mean()), 4),
        "change_sd": round(float(change.std(ddof=1)), 4),
        "fraction_in_real_direction": round(float((np.sign(change) == np.sign(slope)).mean()), 3),
        "real_slope_per_unit": round(float(slope), 4),
        "change_real_slope_predicts": round(float(slope * (high - low)), 4),
        "steps": sampler.steps,
        **run_stamp(),
    }
    print(row, flush=True)
    append_rows(args.out, [row])
    pd.DataFrame({"low": contrasts[low], "high": contrasts[high]}).to_csv(
        args.out.with_name(f"acquisition_response_{args.covariate}_pairs.csv"), index=False
    )


if __name__ == "__main__":
    main()
