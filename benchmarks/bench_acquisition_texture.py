"""Which features tell the acquisitions apart, and whether the autoencoder keeps them.

    make demo && .venv/bin/python benchmarks/bench_acquisition_texture.py [--noise white:0.25 spectrum:0.5 ...]

The report's acquisition predictors (site, field strength, voxel size, ...) are fitted on the real training
volumes' ``stats`` features and fail on synthetic volumes, and on decoded real ones too (the autoencoder's
ceiling). This probe fits the same predictors (:func:`synthmri.metrics.conditioning.fit_covariate_predictor`) on
three feature groups, all / without the GLCM texture / GLCM only, and scores each on the real held-out volumes and
on their reconstructions by ``models/vqgan``: a group whose error grows from real to decoded carries what the
decoder loses. Then it adds noise inside the head of the decoded volumes, ``white`` (each acquisition's residual
std) or ``spectrum`` (stationary Gaussian noise with each acquisition's mean residual power spectrum), times a
factor, and records the predictors and the ceiling's fidelity (decoded training volumes against the held-out ones)
for each: whether the lost texture is noise that could be added back.

Two more variants separate *lost* from *shifted*: the predictors refitted on the decoded training volumes (column
``fitted_on``: an error near the real one means the decoded volumes still hold the acquisition, only moved in
feature space), and refitted on the real volumes seen only at the latent's scale (average-pooled by the
autoencoder's downsampling factor, trilinear back: an error near chance means the acquisition lives above the
latent grid's Nyquist frequency, where the decoder has to draw it). For these the ``decoded`` column holds the
variant's own volumes' error, and ``chance`` the error without features (majority class or training mean).

Appends to ``benchmarks/results/acquisition_texture.csv``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import torch
from bench_vqgan_curve import append_rows
from common import RESULTS_DIR, add_run_args, run_stamp

from synthmri.catalog import PROCESSED_DIR, SPACE_NAME, VQGAN_DIR
from synthmri.config import load_params
from synthmri.data.datasets import ProcessedVolumes
from synthmri.logs import progress
from synthmri.metrics.conditioning import fit_covariate_predictor, predictor_error
from synthmri.metrics.features import get_extractor, head_mask_normalized
from synthmri.models.loading import load_vqgan
from synthmri.report.families import fidelity_metrics

OUT = RESULTS_DIR / "acquisition_texture.csv"
GROUPS = ("all", "without_glcm", "glcm_only")


def decode(model, volumes: np.ndarray, value_range) -> np.ndarray:
    out = np.empty_like(volumes)
    with torch.inference_mode():
        for i, volume in enumerate(progress(volumes, "Decoding real volumes", "vol")):
            x = torch.from_numpy(volume)[None, None]
            out[i] = model.decode(model.encode(x)).clamp(*value_range)[0, 0].numpy()
    return out


def at_latent_scale(volumes: np.ndarray, factor: int) -> np.ndarray:
    """The volumes with only what the latent grid can resolve: ``factor``-average-pooled, trilinear back."""
    x = torch.from_numpy(volumes)[:, None]
    pooled = torch.nn.functional.avg_pool3d(x, factor, ceil_mode=True)
    return torch.nn.functional.interpolate(pooled, size=volumes.shape[1:], mode="trilinear")[:, 0].numpy()


def noise_models(real: np.ndarray, decoded: np.ndarray, acquisition: np.ndarray, value_range) -> dict:
    """Per acquisition: the residual's std inside the head and its mean power spectrum (head-masked)."""
    std, power = {}, {}
    for x, d, a in zip(real, decoded, acquisition, strict=True):
        mask = head_mask_normalized(x, value_range)
        residual = np.where(mask, x - d, 0.0)
        std.setdefault(a, []).append(residual[mask].std())
        power.setdefault(a, []).append(np.abs(np.fft.fftn(residual / np.sqrt(mask.mean()))) ** 2)
    return {a: (float(np.mean(std[a])), np.sqrt(np.mean(power[a], axis=0))) for a in std}


def with_noise(volumes, acquisition, models, kind: str, factor: float, value_range, rng) -> np.ndarray:
    out = volumes.copy()
    for i, (volume, a) in enumerate(zip(volumes, acquisition, strict=True)):
        mask = head_mask_normalized(volume, value_range)
        std, amplitude = models[a]
        white = rng.standard_normal(volume.shape)
        if kind == "white":
            noise = std * white
        else:  # stationary noise with the acquisition's residual spectrum (unit-variance white noise filtered)
            noise = np.real(np.fft.ifftn(np.fft.fftn(white) * amplitude)) / np.sqrt(white.size)
        out[i][mask] += factor * noise[mask].astype(np.float32)
    return np.clip(out, *value_range)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", nargs="*", default=["white:0.25", "white:0.5", "spectrum:0.5", "spectrum:1"])
    add_run_args(parser, OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params, args.overrides)
    rp = params.report
    space = json.loads((PROCESSED_DIR / SPACE_NAME).read_text())
    value_range = tuple(space.get("intensity_range", (-1.0, 1.0)))
    real = ProcessedVolumes(PROCESSED_DIR, split=None)
    volumes = np.stack([v[0].numpy() for v in real.volumes])
    manifest = real.manifest
    train = np.flatnonzero(manifest["split"] == "train")
    held_out = np.flatnonzero(manifest["split"].isin(rp.reference_splits))
    # the acquisition's covariates (the site and what sidecars and headers give), and age as a control
    targets = [c for c in params.covariates if c.source != "participants" or c.name in ("site", "age")]
    targets = [c for c in targets if c.name in manifest.columns]
    acquisition = manifest[[c.name for c in targets if c.name != "age"]].astype(str).agg("/".join, axis=1).to_numpy()

    model = load_vqgan(VQGAN_DIR, torch.device("cpu")).eval()
    decoded = {
        "train": decode(model, volumes[train], value_range),
        "held_out": decode(model, volumes[held_out], value_range),
    }
    extractor = get_extractor("stats", value_range=value_range)
    glcm = np.array([n.startswith("glcm") for n in extractor.feature_names])
    columns = {"all": np.ones_like(glcm), "without_glcm": ~glcm, "glcm_only": glcm}
    f_train, f_held_out = extractor(volumes[train]), extractor(volumes[held_out])

    def known(cov, index) -> tuple[np.ndarray, np.ndarray]:
        """The positions in ``index`` where the covariate is known (e.g. no inversion time for SPGR), and its values."""
        column = manifest[cov.name].iloc[index].replace("", np.nan)
        values = column if cov.kind == "categorical" else pd.to_numeric(column)
        ok = values.notna().to_numpy()
        values = values.to_numpy()[ok]
        return ok, values if cov.kind == "categorical" else values.astype(np.float64)

    def chance(cov, truth) -> float:
        """The error without features: the training split's majority class, or its mean."""
        _, values = known(cov, train)
        if cov.kind == "categorical":
            return float(np.mean(truth == pd.Series(values).mode().iloc[0]))
        return float(np.mean(np.abs(truth - values.mean())))

    fitted = {
        (cov.name, group): fit_covariate_predictor(
            f_train[known(cov, train)[0]][:, cols], known(cov, train)[1], cov.kind
        )
        for cov in targets
        for group, cols in columns.items()
    }
    stamp = run_stamp()
    rows = []

    def record(variant: str, f_decoded_held_out, f_decoded_train, groups=GROUPS, fitted_on: str = "real") -> None:
        """``fitted_on``: "real" scores the real-fitted predictors on the variant's volumes; otherwise the
        predictors are refitted on the variant's training volumes (whether the acquisition is there at all)."""
        fidelity = fidelity_metrics(
            f_held_out, f_decoded_train, f_train, rp.prdc_k, rp.seed, rp.compare_size, rp.max_comparisons
        )
        for cov in targets:
            for group in groups:
                cols, model_ = columns[group], fitted[(cov.name, group)]
                ok, truth = known(cov, held_out)
                if fitted_on == "real":
                    own = model_
                else:
                    ok_train, values = known(cov, train)
                    own = fit_covariate_predictor(f_decoded_train[ok_train][:, cols], values, cov.kind)
                rows.append(
                    {
                        "variant": variant,
                        "fitted_on": fitted_on,
                        "covariate": cov.name,
                        "metric": "accuracy" if cov.kind == "categorical" else "mae",
                        "features": group,
                        "real": predictor_error(model_, f_held_out[ok][:, cols], truth),
                        "decoded": predictor_error(own, f_decoded_held_out[ok][:, cols], truth),
                        "chance": chance(cov, truth),
                        "ceiling_fd_ratio": fidelity.get("frechet_ratio"),
                        "ceiling_precision": fidelity.get("precision"),
                        "ceiling_coverage": fidelity.get("coverage"),
                        **stamp,
                    }
                )
        print(
            f"{variant}: ceiling FD ratio {fidelity.get('frechet_ratio'):.2f}, coverage {fidelity.get('coverage'):.2f}"
        )

    f_decoded = {name: extractor(volumes_) for name, volumes_ in decoded.items()}
    record("decoded", f_decoded["held_out"], f_decoded["train"])
    record("decoded", f_decoded["held_out"], f_decoded["train"], ("all",), fitted_on="decoded")
    factor = params.vqgan.model.downsample_factor
    coarse = {
        name: extractor(at_latent_scale(volumes[index], factor))
        for name, index in (("train", train), ("held_out", held_out))
    }
    record(f"real at the latent's scale (x{factor} pooled)", coarse["held_out"], coarse["train"], ("all",), "itself")
    models = noise_models(volumes[train], decoded["train"], acquisition[train], value_range)
    for spec in args.noise:
        kind, _, factor = spec.partition(":")
        if kind not in ("white", "spectrum"):
            parser.error(f"--noise {spec}: the kind is white or spectrum")
        rng = np.random.default_rng(0)
        noisy = {
            name: with_noise(decoded[name], acquisition[index], models, kind, float(factor), value_range, rng)
            for name, index in (("train", train), ("held_out", held_out))
        }
        record(f"decoded + {kind} noise x{factor}", extractor(noisy["held_out"]), extractor(noisy["train"]), ("all",))
    frame = pd.DataFrame(rows)
    print(
        frame.pivot_table(
            index=["variant", "fitted_on", "covariate"], columns="features", values=["real", "decoded"]
        ).round(2)
    )
    append_rows(args.out, rows)


if __name__ == "__main__":
    main()
