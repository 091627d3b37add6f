"""The report's metric families, each a pure function of arrays: reconstruction (the VQ-GAN), fidelity
(FD/MMD/PRDC against a real-vs-real baseline), diversity, intensity, privacy and conditioning (known
effects and covariate predictors).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthmri.config import Covariate, ReportParams, VQGANLossParams
from synthmri.data.covariates import covariate_column
from synthmri.logs import get_logger, progress
from synthmri.report.inputs import ReportData

log = get_logger(__name__)

#: Threshold of :func:`synthmri.metrics.conditioning.ventricle_volume_ml` on processed demo volumes: with
#: 0.4 the image proxy correlates with the demo's ground-truth ventricle_ml at r ≈ 0.98 (0.5: r ≈ 0.89).
VENTRICLE_THRESHOLD = 0.4
#: Ground-truth column that marks the demo cohort (written by synthmri.data.demo into participants.tsv).
DEMO_TRUTH_COLUMN = "ventricle_ml"
#: Random real training subsets averaged for the Fréchet-distance baseline.
FD_BASELINE_DRAWS = 5
#: A real effect must be significant at this level before a synthetic/real effect ratio is judged.
EFFECT_P_VALUE = 0.05
#: :func:`covariate_kept` judges only a real predictor at least this far ahead of chance (MAE: this fraction of
#: chance's; accuracy: this much higher).
MIN_ADVANTAGE = 0.1
#: Per-volume loops over at least this many synthetic volumes show a progress bar.
LARGE_SET = 1000


def _each(volumes: np.ndarray, what: str):
    """``volumes`` one by one, with a progress bar on a large set (a per-volume measure of 10,000 volumes takes
    about a minute)."""
    return progress(volumes, f"{what} of the synthetic set", "vol", total=len(volumes), min_total=LARGE_SET)


def feature_key(name: str) -> str:
    """An extractor name as a metric-key part: ``"medicalnet-resnet10(random weights)"`` ->
    ``"medicalnet-resnet10-random-weights"`` (MLflow keys allow letters, digits, ``_ - . /`` and spaces)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-").lower() or "features"


def clean_number(value: Any) -> Any:
    """JSON-safe scalar: numpy scalars to Python, NaN/inf to None; strings and bools as they are."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def put_flat(metrics: dict, prefix: str, values: dict) -> None:
    for key, value in values.items():
        metrics[f"{prefix}.{key}"] = clean_number(value)


def reconstruction_metrics(
    vqgan_dir: Path,
    volumes: np.ndarray,
    value_range: tuple[float, float],
    loss_params: VQGANLossParams,
    device: str = "auto",
    also: tuple[np.ndarray, ...] = (),
    quantize: bool = True,
) -> tuple[dict, tuple | None, list[np.ndarray]]:
    """PSNR, 3D SSIM and 2.5D LPIPS of the VQ-GAN's reconstructions of ``volumes`` (means over volumes), through
    the latents the diffusion model learns: the codes, or without ``quantize`` the encoder's output before them.

    The LPIPS settings (net, weights, slices) are the ones the model was trained with (its
    ``config.json``), else ``loss_params``. Returns the metrics, one (real, reconstruction) example, and
    the reconstructions of each volume set in ``also`` (for :func:`autoencoder_ceiling`).
    """
    from synthmri.losses.perceptual import LPIPS25D
    from synthmri.metrics.reconstruction import score_reconstructions
    from synthmri.models.loading import load_vqgan, read_config
    from synthmri.training.runtime import pick_device

    torch_device = pick_device(device)
    model = load_vqgan(vqgan_dir, torch_device)
    trained_loss = read_config(Path(vqgan_dir)).get("vqgan", {}).get("loss")
    if trained_loss:
        loss_params = VQGANLossParams(**trained_loss)
    lpips, backbone = LPIPS25D.from_params(loss_params)
    lpips.to(torch_device)
    scores = score_reconstructions(model, volumes, lpips, torch_device, value_range, quantize=quantize)
    decoded = [
        np.stack(
            score_reconstructions(
                model, vols, lpips, torch_device, value_range, keep=True, quantize=quantize
            ).reconstructions
        )
        for vols in also
    ]
    return {**scores.summary(), "lpips_backbone": backbone.split(" (")[0]}, scores.example, decoded


def autoencoder_ceiling(
    f_reference: np.ndarray,
    f_decoded_reference: np.ndarray,
    f_decoded_train: np.ndarray,
    f_train: np.ndarray,
    k: int,
    seed: int = 0,
    compare_size: int | None = None,
    max_comparisons: int = 1,
) -> dict[str, float]:
    """The fidelity metrics of decoded *real* volumes: what the synthetic set would score if the diffusion
    model generated the autoencoder's latents of real subjects perfectly, so a reader sees which model
    limits fidelity. ``train.*``: the decoded training volumes against the held-out ones (unpaired, like
    the synthetic set: the ceiling to compare it with); ``heldout.*``: the held-out volumes' own
    reconstructions (paired with the reference, so optimistic: how much the autoencoder alone moves them).
    """
    out: dict[str, float] = {}
    for name, decoded in (("train", f_decoded_train), ("heldout", f_decoded_reference)):
        scores = fidelity_metrics(f_reference, decoded, f_train, k, seed, compare_size, max_comparisons)
        for key, value in scores.items():
            out[f"{name}.{key}"] = value
    return out


@dataclass(frozen=True)
class RealPredictor:
    """A covariate's predictor fitted once on the real training split's features, with the subjects it was fitted and
    scored on: the conditioning checks apply it to the synthetic set, the autoencoder ceiling compares it with a
    predictor refitted on decoded volumes (:func:`covariate_kept`).

    ``train`` / ``reference``: ``(values, known)`` over the training / held-out split; ``error``: on the held-out
    real volumes (mean absolute error for ``"continuous"``, accuracy for ``"categorical"``).
    """

    kind: str
    model: Any
    train: tuple[np.ndarray, np.ndarray]
    reference: tuple[np.ndarray, np.ndarray]
    error: float

    @classmethod
    def fit(
        cls,
        kind: str,
        f_train: np.ndarray,
        train: tuple[np.ndarray, np.ndarray],
        f_reference: np.ndarray,
        reference: tuple[np.ndarray, np.ndarray],
    ) -> RealPredictor:
        from synthmri.metrics import conditioning as cond

        (tv, tok), (rv, rok) = train, reference
        model = cond.fit_covariate_predictor(f_train[tok], tv[tok], kind)
        return cls(kind, model, train, reference, cond.predictor_error(model, f_reference[rok], rv[rok]))


def fit_real_predictors(
    data: ReportData, covariates: Sequence[Covariate], f_train: np.ndarray, f_reference: np.ndarray
) -> dict[str, RealPredictor]:
    """A :class:`RealPredictor` per covariate with at least 3 known training values, one known held-out value and,
    for a categorical one, two levels in the training split (others are logged and skipped)."""
    out: dict[str, RealPredictor] = {}
    for cov in covariates:
        train_v = covariate_column(data.real.iloc[data.train_index], cov)
        ref_v = covariate_column(data.real.iloc[data.reference_index], cov)
        if train_v is None or ref_v is None:
            continue
        if train_v[1].sum() < 3 or ref_v[1].sum() < 1:
            log.info(
                "Conditioning: too few values of '%s' for a predictor (train %d, held-out %d)",
                cov.name,
                train_v[1].sum(),
                ref_v[1].sum(),
            )
            continue
        if cov.kind == "categorical" and len(set(train_v[0][train_v[1]])) < 2:
            log.info("Conditioning: '%s' has a single level in the training split; no predictor", cov.name)
            continue
        out[cov.name] = RealPredictor.fit(cov.kind, f_train, train_v, f_reference, ref_v)
    return out


def covariates_kept(
    predictors: dict[str, RealPredictor], f_decoded_train: np.ndarray, f_decoded_reference: np.ndarray
) -> dict[str, float]:
    """How much of each covariate the decoded volumes still hold (:func:`covariate_kept`), for every covariate with
    a real predictor (:func:`fit_real_predictors`); keys ``<covariate>.<measure>``."""
    out: dict[str, float] = {}
    for name, real in predictors.items():
        kept = covariate_kept(real, f_decoded_train, f_decoded_reference)
        out.update({f"{name}.{key}": value for key, value in (kept or {}).items()})
    return out


def covariate_kept(
    real: RealPredictor, f_decoded_train: np.ndarray, f_decoded_reference: np.ndarray
) -> dict[str, float] | None:
    """Whether the autoencoder lost a covariate or only moved it in feature space.

    The gate's predictors are fitted on real volumes; on decoded ones they fail either because the autoencoder
    lost the covariate or because it shifted the features the predictor reads. Refitting the same predictor on
    the decoded training volumes (``f_decoded_train``: the whole training split, in order) and scoring it on the
    decoded held-out ones tells the two apart (a better-aimed autoencoder training can fix a shift; a loss needs
    a decoder that draws what its latent does not carry).

    Returns ``real`` (``real.error``: fitted and scored on real volumes), ``decoded_refit``, ``chance`` (no
    features: the training values' majority level or mean) and ``kept``: the share of the real predictor's
    advantage over chance that the decoded volumes keep (1: all of it, 0: none), on accuracy for
    ``"categorical"`` and mean absolute error for ``"continuous"``; None when the real predictor does not beat
    chance by :data:`MIN_ADVANTAGE` (a tenth of chance's MAE, or 0.1 accuracy): a share of next to nothing is noise.
    """
    (tv, tok), (rv, rok) = real.train, real.reference
    refit = RealPredictor.fit(real.kind, f_decoded_train, real.train, f_decoded_reference, real.reference).error
    y_train, y_reference = tv[tok], rv[rok]
    if real.kind == "categorical":
        chance = float(np.mean(np.asarray(y_reference) == pd.Series(y_train).mode().iloc[0]))
        advantage, kept = real.error - chance, refit - chance
    else:
        y_train, y_reference = np.asarray(y_train, np.float64), np.asarray(y_reference, np.float64)
        chance = float(np.mean(np.abs(y_reference - y_train.mean())))
        advantage, kept = chance - real.error, chance - refit
    if advantage <= 0 or advantage < MIN_ADVANTAGE * (chance if real.kind == "continuous" else 1.0):
        return None
    return {"real": real.error, "decoded_refit": refit, "chance": chance, "kept": kept / advantage}


def _mean_compare(ref: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    from synthmri.metrics.distribution import compare_features

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PRDC: k=")  # k is reported as prdc_k
        return compare_features(ref, fake, k)


def comparison_subsets(n: int, size: int | None, max_subsets: int, seed: int = 0) -> list[np.ndarray]:
    """Which synthetic volumes each set comparison uses: disjoint, seeded subsets of ``size`` volumes (at most
    ``max_subsets``), or the whole set in order when it has no more than ``size`` volumes (or ``size`` is None).

    Why: FD, MMD and PRDC depend on the set sizes (FD's bias, coverage growing with the synthetic set), and
    the gate's thresholds were derived at a fixed size (``benchmarks/bench_gate_baseline.py``); comparing a
    10,000-volume set with 26 held-out volumes in one go would judge it on another scale, and its k-NN and
    kernel terms would grow quadratically. Fixed-size subsets keep both the scale and a linear (capped) cost.
    """
    if size is None or n <= size:
        return [np.arange(n)]
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(order[i * size : (i + 1) * size]) for i in range(min(n // size, max_subsets))]


def fidelity_metrics(
    f_reference: np.ndarray,
    f_synthetic: np.ndarray,
    f_train: np.ndarray,
    k: int,
    seed: int = 0,
    compare_size: int | None = None,
    max_comparisons: int = 1,
) -> dict[str, float]:
    """FD, MMD² and PRDC of the synthetic features against the held-out features
    (:func:`synthmri.metrics.distribution.compare_features`), plus the same numbers for random real
    training subsets of the compared size (``baseline_*``, mean of :data:`FD_BASELINE_DRAWS`
    draws): what a generator that reproduced new real subjects would get with these set sizes.
    ``frechet_ratio`` = FD / baseline FD.

    A set larger than ``compare_size`` is compared in :func:`comparison_subsets` of that size; each number
    is the median over the subsets (``n_subsets``, ``n_compared``), with the subsets' range for the gate's
    three (``<key>_subset_min``/``_max``).
    """
    subsets = comparison_subsets(len(f_synthetic), compare_size, max_comparisons, seed)
    runs = [_mean_compare(f_reference, f_synthetic[subset], k) for subset in subsets]
    out: dict[str, float] = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
    out["n_compared"], out["n_subsets"] = len(subsets[0]), len(subsets)
    n = min(len(subsets[0]), len(f_train))
    if n >= 2:
        rng = np.random.default_rng(seed)
        draws = FD_BASELINE_DRAWS if len(f_train) > n else 1
        baselines = [
            _mean_compare(f_reference, f_train[np.sort(rng.choice(len(f_train), n, replace=False))], k)
            for _ in range(draws)
        ]
        for key in ("frechet_distance", "mmd2", "precision", "recall", "density", "coverage"):
            out[f"baseline_{key}"] = float(np.mean([r[key] for r in baselines]))
        out["baseline_n"] = n
        base = out["baseline_frechet_distance"]
        for run in runs:
            run["frechet_ratio"] = run["frechet_distance"] / base if base > 1e-12 else float("nan")
        out["frechet_ratio"] = out["frechet_distance"] / base if base > 1e-12 else float("nan")
    if len(subsets) > 1:
        for key in ("frechet_ratio", "precision", "coverage"):
            values = [r[key] for r in runs if key in r]
            if values:
                out[f"{key}_subset_min"], out[f"{key}_subset_max"] = float(min(values)), float(max(values))
    return out


def diversity_metrics(
    synthetic: np.ndarray, reference: np.ndarray, max_pairs: int, seed: int, data_range: float
) -> dict[str, float]:
    from synthmri.metrics.diversity import diversity_ratio

    out = diversity_ratio(synthetic, reference, max_pairs=max_pairs, seed=seed, data_range=data_range)
    out["max_pairs"] = max_pairs
    return out


def intensity_metrics(
    reference: np.ndarray, synthetic: np.ndarray, bins: int, value_range: tuple[float, float]
) -> tuple[dict, dict]:
    from synthmri.metrics.distribution import histogram_distance

    result = histogram_distance(reference, synthetic, bins=bins, value_range=value_range)
    flat = {"wasserstein": result["wasserstein"], "js_distance": result["js_distance"], "bins": bins}
    return flat, result


def image_measure_metrics(
    reference: np.ndarray,
    sets: dict[str, np.ndarray],
    value_range: tuple[float, float],
    seed: int,
    previous: dict | None = None,
) -> tuple[dict, dict]:
    """The image measures the gate does not use (:mod:`synthmri.metrics.image_measures`) of each of ``sets``
    (``{name: volumes}``), as standardized mean differences against the real ``reference`` set with bootstrap
    intervals. Flat keys ``<measure>.<set>.smd|low|high`` and ``<measure>.real_mean|real_sd``; the details keep
    the tissue thresholds and the reference's measures, so ``previous`` lets a later call (the decoded training
    volumes) be read against the same reference. A set larger than ``LARGE_SET`` is measured on a seeded
    subset of that size (the differences are then precise to about 0.05)."""
    from synthmri.metrics.image_measures import image_measures, standardized_mean_differences, tissue_thresholds
    from synthmri.report.intervals import LEVEL

    if len(reference) < 2:
        log.warning("Image measures skipped: they need at least 2 real held-out volumes, there are %d", len(reference))
        return {}, {}
    if not previous:
        thresholds = tissue_thresholds(reference, value_range)
        details = {
            "thresholds": thresholds,
            "reference": image_measures(reference, thresholds, value_range),
            "sets": {},
        }
    else:
        details = previous
    real = details["reference"]
    flat: dict[str, Any] = {}
    if not previous:
        flat.update({"csf_gm_threshold": details["thresholds"][0], "gm_wm_threshold": details["thresholds"][1]})
        for name in real.columns:
            flat[f"{name}.real_mean"], flat[f"{name}.real_sd"] = real[name].mean(), real[name].std(ddof=1)
    for set_name, volumes in sets.items():
        if len(volumes) < 2:
            log.warning("Image measures of the %s volumes skipped: there are %d, they need 2", set_name, len(volumes))
            continue
        if len(volumes) > LARGE_SET:
            keep = np.sort(np.random.default_rng(seed).choice(len(volumes), LARGE_SET, replace=False))
            volumes = volumes[keep]
        measured = image_measures(volumes, details["thresholds"], value_range)
        smd = standardized_mean_differences(real, measured, seed=seed, level=LEVEL)  # the report's one level
        details["sets"][set_name] = smd
        for name, values in smd.items():
            for what, value in values.items():
                flat[f"{name}.{set_name}.{what}"] = value
    return flat, details


def privacy_metrics(
    synthetic: np.ndarray, train: np.ndarray, reference: np.ndarray, rp: ReportParams, value_range: tuple[float, float]
) -> tuple[dict, dict]:
    """Nearest training volume of every synthetic volume by NCC and by SSIM
    (:func:`synthmri.metrics.privacy.memorization_report`), each with its own threshold calibrated on
    held-out real vs training. Adds ``excess_fraction`` = fraction of likely copies − its mean for new real
    subjects, ``excess_over_chance_bound`` = fraction − the 95 % bound of new real subjects (what the gate
    reads: :func:`synthmri.metrics.privacy.chance_copy_fraction` has the derivation), and near duplicates: scores above ``(threshold + 1) / 2``, i.e. closer to identical than to the most
    similar pair of different real subjects. The gate reads the ``report.privacy_metric`` numbers,
    repeated without the metric name (``privacy.excess_fraction``...)."""
    from synthmri.metrics.privacy import memorization_report, ncc_matrix

    flat: dict[str, Any] = {"metric": rp.privacy_metric, "quantile": rp.privacy_quantile}
    details = {}
    ncc = ncc_matrix(synthetic, train, value_range)  # both metrics need it (SSIM: its shortlist)
    for metric in ("ncc", "ssim"):
        report = memorization_report(
            synthetic,
            train,
            holdout=reference,
            metric=metric,
            quantile=rp.privacy_quantile,
            n_pairs=rp.n_pairs,
            value_range=value_range,
            shortlist=rp.ssim_shortlist if metric == "ssim" else None,
            ncc=ncc,
        )
        near = (report["threshold"] + 1.0) / 2.0
        scores = np.asarray(report["synthetic_scores"])
        report["near_duplicate_threshold"] = near
        report["near_duplicates"] = [int(i) for i in np.flatnonzero(scores > near)]
        details[metric] = report
        values = {
            "threshold": report["threshold"],
            "n_likely_copies": report["n_likely_copies"],
            "fraction": report["fraction"],
            "chance_fraction": report["chance_fraction"],
            "chance_fraction_bound": report["chance_fraction_bound"],
            "excess_fraction": report["fraction"] - report["chance_fraction"],
            "excess_over_chance_bound": report["fraction"] - report["chance_fraction_bound"],
            "near_duplicate_threshold": near,
            "n_near_duplicates": len(report["near_duplicates"]),
            "max_score": report["max_score"],
            "median_score": report["median_score"],
            "holdout_max_score": float(np.max(report["holdout_scores"])),
        }
        put_flat(flat, metric, values)
        if metric == rp.privacy_metric:
            flat.update(
                {
                    k: values[k]
                    for k in (
                        "n_likely_copies",
                        "fraction",
                        "chance_fraction",
                        "chance_fraction_bound",
                        "excess_fraction",
                        "excess_over_chance_bound",
                        "n_near_duplicates",
                        "threshold",
                    )
                }
            )
    return {k: clean_number(v) for k, v in flat.items()}, details


def _slope_block(x_real, y_real, x_syn, y_syn) -> dict[str, float]:
    from synthmri.metrics.conditioning import slope_and_correlation

    real = slope_and_correlation(x_real, y_real)
    syn = slope_and_correlation(x_syn, y_syn)
    out = {
        "slope_real": real["slope"],
        "r_real": real["r"],
        "p_real": real["p_value"],
        "n_real": real["n"],
        "slope_synthetic": syn["slope"],
        "r_synthetic": syn["r"],
        "n_synthetic": syn["n"],
    }
    if math.isfinite(real["p_value"]) and real["p_value"] < EFFECT_P_VALUE and real["slope"] != 0:
        out["effect_ratio"] = syn["slope"] / real["slope"]
    return out


def _level_difference(
    levels: Sequence[str],
    real: tuple[np.ndarray, np.ndarray],
    synthetic: tuple[np.ndarray, np.ndarray],
    y_real: np.ndarray,
    y_synthetic: np.ndarray,
) -> tuple[dict[str, Any], dict]:
    """A categorical covariate's effect on a measure: the mean per level, ``diff`` = last level − first level in
    each set, and ``effect_ratio`` = synthetic diff / real diff when the real difference is significant (Welch
    t-test, p < :data:`EFFECT_P_VALUE`). ``real`` / ``synthetic``: ``(values, present)`` of the covariate. Also
    returns the per-level groups, which the bootstrap intervals resample."""
    from scipy import stats

    first, last = levels[0], levels[-1]
    block: dict[str, Any] = {}
    groups = {}
    for name, (values, ok), y in (("real", real, y_real), ("synthetic", synthetic, y_synthetic)):
        for level in levels:
            member = ok & (values == level)
            groups[(name, level)] = y[member]
            block[f"{level}_{name}"] = float(y[member].mean()) if member.any() else float("nan")
        block[f"diff_{name}"] = block[f"{last}_{name}"] - block[f"{first}_{name}"]
    a, b = groups[("real", last)], groups[("real", first)]
    if len(a) >= 2 and len(b) >= 2:
        p_value = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
        block["p_real"] = p_value
        if p_value < EFFECT_P_VALUE and block["diff_real"] != 0:
            block["effect_ratio"] = block["diff_synthetic"] / block["diff_real"]
    block["contrast"] = f"{last}-{first}"
    return block, groups


def _subject_errors(model, features: np.ndarray, values: np.ndarray, kind: str) -> np.ndarray:
    """Absolute error per subject (continuous) or 1.0 where the predicted level is right (categorical)."""
    predicted = model.predict(np.asarray(features, dtype=np.float64))
    if kind == "continuous":
        return np.abs(predicted - np.asarray(values, dtype=np.float64))
    return (predicted == np.asarray(values)).astype(np.float64)


def conditioning_metrics(
    data: ReportData,
    covariates: list[Covariate],
    f_train: np.ndarray,
    f_reference: np.ndarray,
    f_synthetic: np.ndarray,
    extractor_key: str,
) -> tuple[dict, dict]:
    """Does the synthetic set follow the requested covariates?

    * ``age`` (continuous covariate of that name): dark-CSF fraction of the head against age
      (:func:`synthmri.metrics.conditioning.csf_fraction`), slope and correlation in the synthetic set
      (requested age) and in the whole real cohort; on the demo cohort (ground-truth columns in the
      manifest) also the ventricle proxy in ml, next to the ground truth's slope;
    * ``sex`` (categorical): mean head volume (ml, head mask) per level, and the difference between the
      last and first level (M − F), synthetic vs real;
    * every acquisition covariate from a sidecar (inversion time, field strength, sequence...): the GM/WM
      contrast (:func:`synthmri.metrics.conditioning.gm_wm_contrast`) against the covariate, slope and
      correlation in the synthetic set (requested value) and in the whole real cohort; for a categorical one
      (the sequence), the difference of its mean between the last and the first level;
    * every covariate: a predictor (ridge / logistic on the extractor's features) fitted on the real
      training split, applied to the held-out real volumes and to the synthetic volumes
      (``details["real_predictors"]``: the fitted :class:`RealPredictor` of each, for the autoencoder ceiling).

    ``effect_ratio`` = synthetic effect / real effect, only when the real effect is significant
    (p < :data:`EFFECT_P_VALUE`).
    """

    from synthmri.metrics import conditioning as cond
    from synthmri.metrics.features import head_mask_normalized

    low_high = data.value_range
    flat: dict[str, Any] = {}
    details: dict[str, Any] = {}
    by_name = {c.name: c for c in covariates}

    age = by_name.get("age")
    if age is not None and age.kind == "continuous":
        real_age, real_ok = covariate_column(data.real, age) or (None, None)
        syn = covariate_column(data.synthetic, age)
        if real_age is not None and syn is not None:
            syn_age, syn_ok = syn
            csf_real = np.array([cond.csf_fraction(v, low_high) for v in data.real_volumes])
            csf_syn = np.array([cond.csf_fraction(v, low_high) for v in _each(data.synthetic_volumes, "CSF fraction")])
            block = _slope_block(real_age[real_ok], csf_real[real_ok], syn_age[syn_ok], csf_syn[syn_ok])
            put_flat(flat, "age.csf_fraction", block)
            details["age"] = {
                "real_age": real_age,
                "real_ok": real_ok,
                "synthetic_age": syn_age,
                "synthetic_ok": syn_ok,
                "measures": {"csf_fraction": (csf_real, csf_syn)},
            }
            if DEMO_TRUTH_COLUMN in data.real.columns:
                vent_real = np.array(
                    [cond.ventricle_volume_ml(v, data.affine, low_high, VENTRICLE_THRESHOLD) for v in data.real_volumes]
                )
                vent_syn = np.array(
                    [
                        cond.ventricle_volume_ml(v, data.affine, low_high, VENTRICLE_THRESHOLD)
                        for v in _each(data.synthetic_volumes, "Ventricle volume")
                    ]
                )
                block = _slope_block(real_age[real_ok], vent_real[real_ok], syn_age[syn_ok], vent_syn[syn_ok])
                truth = pd.to_numeric(data.real[DEMO_TRUTH_COLUMN], errors="coerce").to_numpy(dtype=np.float64)
                ok = real_ok & np.isfinite(truth)
                block["slope_ground_truth"] = cond.slope_and_correlation(real_age[ok], truth[ok])["slope"]
                block["r_proxy_vs_ground_truth"] = (
                    float(np.corrcoef(vent_real[ok], truth[ok])[0, 1])
                    if ok.sum() > 2 and np.ptp(vent_real[ok]) > 0
                    else float("nan")
                )
                put_flat(flat, "age.ventricle_ml", block)
                details["age"]["measures"]["ventricle_ml"] = (vent_real, vent_syn)
        else:
            log.info(
                "Conditioning: no 'age' column in the %s manifest; age effects skipped",
                "real" if real_age is None else "synthetic",
            )

    sex = by_name.get("sex")
    if sex is not None and sex.kind == "categorical" and len(sex.levels or []) >= 2:
        real_sex, syn_sex = covariate_column(data.real, sex), covariate_column(data.synthetic, sex)
        if real_sex is not None and syn_sex is not None:

            def head_ml(volumes: np.ndarray) -> np.ndarray:
                return np.array([head_mask_normalized(v, low_high).sum() for v in volumes]) * data.voxel_ml

            head_real, head_syn = head_ml(data.real_volumes), head_ml(_each(data.synthetic_volumes, "Head size"))
            block, groups = _level_difference(sex.levels, real_sex, syn_sex, head_real, head_syn)
            put_flat(flat, "sex.head_ml", block)
            details["sex"] = {"levels": list(sex.levels), "groups": groups}

    acquisition = [c for c in covariates if c.source == "sidecar"]
    contrast_real = contrast_syn = None
    for cov in acquisition:
        real_v, syn_v = covariate_column(data.real, cov), covariate_column(data.synthetic, cov)
        if real_v is None or syn_v is None or real_v[1].sum() < 3 or len(set(real_v[0][real_v[1]])) < 2:
            continue
        if contrast_real is None:
            contrast_real = np.array([cond.gm_wm_contrast(v, low_high) for v in data.real_volumes])
            contrast_syn = np.array(
                [cond.gm_wm_contrast(v, low_high) for v in _each(data.synthetic_volumes, "GM/WM contrast")]
            )
        (rv, rok), (sv, sok) = real_v, syn_v
        rok, sok = rok & np.isfinite(contrast_real), sok & np.isfinite(contrast_syn)
        if cov.kind == "categorical":  # e.g. the sequence: last level's mean contrast minus the first's
            block, groups = _level_difference(cov.levels, (rv, rok), (sv, sok), contrast_real, contrast_syn)
            details.setdefault("acquisition", {})[cov.name] = {"levels": list(cov.levels), "groups": groups}
        else:
            block = _slope_block(rv[rok], contrast_real[rok], sv[sok], contrast_syn[sok])
            details.setdefault("acquisition", {})[cov.name] = {
                "real": (rv[rok], contrast_real[rok]),
                "synthetic": (sv[sok], contrast_syn[sok]),
            }
        put_flat(flat, f"{cov.name}.gm_wm_contrast", block)

    real_predictors = fit_real_predictors(data, covariates, f_train, f_reference)
    predictors = {}
    for cov in covariates:
        real = real_predictors.get(cov.name)
        syn_v = covariate_column(data.synthetic, cov)
        if real is None or syn_v is None:
            continue
        (rv, rok), (sv, sok) = real.reference, syn_v
        if sok.sum() < 1:
            log.info("Conditioning: no synthetic volume has a value of '%s'; its predictor is not applied", cov.name)
            continue
        model, real_err = real.model, real.error
        syn_err = cond.predictor_error(model, f_synthetic[sok], sv[sok])
        # per subject (absolute error, or 1 if right), for the bootstrap intervals of .intervals
        per_subject = {
            name: _subject_errors(model, f[ok], v[ok], cov.kind)
            for name, f, v, ok in (("reference", f_reference, rv, rok), ("synthetic", f_synthetic, sv, sok))
        }
        if cov.kind == "continuous":
            block = {"mae_real": real_err, "mae_synthetic": syn_err, "error_ratio": syn_err / max(real_err, 1e-12)}
        else:
            block = {"accuracy_real": real_err, "accuracy_synthetic": syn_err, "accuracy_drop": real_err - syn_err}
        block.update({"n_real": int(rok.sum()), "n_synthetic": int(sok.sum())})
        put_flat(flat, f"{cov.name}.predictor.{extractor_key}", block)
        predictors[cov.name] = {**block, "kind": cov.kind, "per_subject": per_subject}
    details["real_predictors"] = real_predictors
    details["predictors"] = predictors
    return flat, details
