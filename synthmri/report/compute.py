"""The report's numbers: the synthetic set against the real held-out volumes, and the quality gate.

Every metric comes from :mod:`synthmri.metrics` (tested there); this module loads the volumes, calls
them on the right sets, flattens the results into ``reports/metrics.json`` keys and evaluates the
gate. The sets:

* **train**: real training split (the models saw it): covariate predictors are fitted on it, and the
  privacy check looks for the nearest training volume of every synthetic volume;
* **reference**: real held-out volumes (``report.reference_splits``, default val + test): what the
  synthetic set is compared with (fidelity, coverage, diversity, intensities, predictor errors) and
  what calibrates the "likely copy" threshold (held-out real vs training similarity);
* **synthetic**: ``data/synthetic`` (volumes in [0, 1], mapped back to the processed intensity range).

Key names: ``<family>.<...>``; feature-space numbers carry the extractor's name in the key
(``fidelity.stats.frechet_distance``), and ``extractor`` holds its full name.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from synthmri.catalog import SPACE_NAME, SYNTHETIC_DIR
from synthmri.config import Covariate, Params, ReportParams, ReportThresholds, VQGANLossParams
from synthmri.data.covariates import covariate_column
from synthmri.errors import StageError
from synthmri.logs import get_logger

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


# ----------------------------------------------------------------------------------------------
# inputs


@dataclass
class ReportData:
    """Every volume the report needs, in memory, in the processed intensity range."""

    real: pd.DataFrame  # processed manifest (one row per real volume, with its split)
    real_volumes: np.ndarray  # (N, D, H, W) float32
    synthetic: pd.DataFrame  # synthetic manifest
    synthetic_volumes: np.ndarray  # (M, D, H, W) float32, mapped from [0, 1] to value_range
    space: dict
    reference_splits: list[str]
    synthetic_dir: Path = SYNTHETIC_DIR

    @property
    def value_range(self) -> tuple[float, float]:
        low, high = self.space.get("intensity_range", (-1.0, 1.0))
        return float(low), float(high)

    @property
    def data_range(self) -> float:
        return self.value_range[1] - self.value_range[0]

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.space["affine"], dtype=np.float64)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.space["spacing_mm"])

    @property
    def voxel_ml(self) -> float:
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def split_index(self, splits) -> np.ndarray:
        return np.flatnonzero(self.real["split"].isin(list(splits)).to_numpy())

    @property
    def train_index(self) -> np.ndarray:
        return self.split_index(["train"])

    @property
    def reference_index(self) -> np.ndarray:
        return self.split_index(self.reference_splits)

    @property
    def train(self) -> np.ndarray:
        return self.real_volumes[self.train_index]

    @property
    def reference(self) -> np.ndarray:
        return self.real_volumes[self.reference_index]


def load_report_data(params: Params, processed_dir: Path, synthetic_dir: Path) -> ReportData:
    """Read the processed real volumes (all splits) and the synthetic set; check that they match."""
    from synthmri.data.datasets import ProcessedVolumes

    processed_dir, synthetic_dir = Path(processed_dir), Path(synthetic_dir)
    space_path = processed_dir / SPACE_NAME
    if not space_path.is_file():
        raise StageError(f"{space_path} not found: run `synthmri normalize` first")
    space = json.loads(space_path.read_text())
    real = ProcessedVolumes(processed_dir, split=None)
    real_volumes = np.stack([v[0].numpy() for v in real.volumes]) if len(real) else np.zeros((0, 1, 1, 1), np.float32)

    manifest_path = synthetic_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise StageError(f"{manifest_path} not found: run `synthmri sample` first")
    synthetic = pd.read_csv(manifest_path)
    if "file" not in synthetic.columns:
        raise StageError(f"{manifest_path} has no 'file' column")
    low, high = space.get("intensity_range", (-1.0, 1.0))
    shape = tuple(int(s) for s in space["shape"])
    volumes = []
    for rel in synthetic["file"]:
        path = synthetic_dir / rel
        if not path.is_file():
            raise StageError(f"synthetic volume {path} listed in {manifest_path} does not exist")
        array = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        if array.shape != shape:
            raise StageError(f"{path}: shape {array.shape} differs from the processed space {shape}")
        volumes.append(np.float32(low) + array * np.float32(high - low))  # [0, 1] -> processed range
    data = ReportData(
        real=real.manifest,
        real_volumes=real_volumes,
        synthetic=synthetic,
        synthetic_volumes=np.stack(volumes) if volumes else np.zeros((0, *shape), np.float32),
        space=space,
        reference_splits=list(params.report.reference_splits),
        synthetic_dir=synthetic_dir,
    )
    n_train, n_ref, n_syn = len(data.train_index), len(data.reference_index), len(synthetic)
    if n_train < 1 or n_ref < 2 or n_syn < 2:
        raise StageError(
            f"the report needs at least 1 real training volume, 2 held-out real volumes "
            f"({'+'.join(data.reference_splits)}) and 2 synthetic volumes; got {n_train}, {n_ref} and "
            f"{n_syn}"
        )
    log.info(
        "Report: %d synthetic volumes vs %d held-out real (%s); %d training volumes for predictors and privacy",
        n_syn,
        n_ref,
        "+".join(data.reference_splits),
        n_train,
    )
    return data


# ----------------------------------------------------------------------------------------------
# helpers


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


def _put(metrics: dict, prefix: str, values: dict) -> None:
    for key, value in values.items():
        metrics[f"{prefix}.{key}"] = clean_number(value)


# ----------------------------------------------------------------------------------------------
# metric families


def reconstruction_metrics(
    vqgan_dir: Path,
    volumes: np.ndarray,
    value_range: tuple[float, float],
    loss_params: VQGANLossParams,
    device: str = "auto",
) -> tuple[dict, tuple | None]:
    """PSNR, 3D SSIM and 2.5D LPIPS of the VQ-GAN's reconstructions of ``volumes`` (means over volumes).

    The LPIPS settings (net, weights, slices) are the ones the model was trained with (its
    ``config.json``), else ``loss_params``. Returns the metrics and one (real, reconstruction) example.
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
    scores = score_reconstructions(model, volumes, lpips, torch_device, value_range)
    return {**scores.summary(), "lpips_backbone": backbone.split(" (")[0]}, scores.example


def _mean_compare(ref: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    from synthmri.metrics.distribution import compare_features

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PRDC: k=")  # k is reported as prdc_k
        return compare_features(ref, fake, k)


def fidelity_metrics(
    f_reference: np.ndarray, f_synthetic: np.ndarray, f_train: np.ndarray, k: int, seed: int = 0
) -> dict[str, float]:
    """FD, MMD² and PRDC of the synthetic features against the held-out features
    (:func:`synthmri.metrics.distribution.compare_features`), plus the same numbers for random real
    training subsets of the synthetic set's size (``baseline_*``, mean of :data:`FD_BASELINE_DRAWS`
    draws): what a generator that reproduced new real subjects would get with these set sizes.
    ``frechet_ratio`` = FD / baseline FD.
    """
    out = _mean_compare(f_reference, f_synthetic, k)
    n = min(len(f_synthetic), len(f_train))
    if n >= 2:
        rng = np.random.default_rng(seed)
        draws = FD_BASELINE_DRAWS if len(f_train) > n else 1
        runs = [
            _mean_compare(f_reference, f_train[np.sort(rng.choice(len(f_train), n, replace=False))], k)
            for _ in range(draws)
        ]
        for key in ("frechet_distance", "mmd2", "precision", "recall", "density", "coverage"):
            out[f"baseline_{key}"] = float(np.mean([r[key] for r in runs]))
        out["baseline_n"] = n
        base = out["baseline_frechet_distance"]
        out["frechet_ratio"] = out["frechet_distance"] / base if base > 1e-12 else float("nan")
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


def privacy_metrics(
    synthetic: np.ndarray, train: np.ndarray, reference: np.ndarray, rp: ReportParams, value_range: tuple[float, float]
) -> tuple[dict, dict]:
    """Nearest training volume of every synthetic volume by NCC and by SSIM
    (:func:`synthmri.metrics.privacy.memorization_report`), each with its own threshold calibrated on
    held-out real vs training. Adds ``excess_fraction`` = fraction of likely copies − chance fraction,
    and near duplicates: scores above ``(threshold + 1) / 2``, i.e. closer to identical than to the most
    similar pair of different real subjects. The gate reads the ``report.privacy_metric`` numbers,
    repeated without the metric name (``privacy.excess_fraction``...)."""
    from synthmri.metrics.privacy import memorization_report

    flat: dict[str, Any] = {"metric": rp.privacy_metric, "quantile": rp.privacy_quantile}
    details = {}
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
            "excess_fraction": report["fraction"] - report["chance_fraction"],
            "near_duplicate_threshold": near,
            "n_near_duplicates": len(report["near_duplicates"]),
            "max_score": report["max_score"],
            "median_score": report["median_score"],
            "holdout_max_score": float(np.max(report["holdout_scores"])),
        }
        _put(flat, metric, values)
        if metric == rp.privacy_metric:
            flat.update(
                {
                    k: values[k]
                    for k in (
                        "n_likely_copies",
                        "fraction",
                        "chance_fraction",
                        "excess_fraction",
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
    * every covariate: a predictor (ridge / logistic on the extractor's features) fitted on the real
      training split, applied to the held-out real volumes and to the synthetic volumes.

    ``effect_ratio`` = synthetic effect / real effect, only when the real effect is significant
    (p < :data:`EFFECT_P_VALUE`).
    """
    from scipy import stats

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
            csf_syn = np.array([cond.csf_fraction(v, low_high) for v in data.synthetic_volumes])
            block = _slope_block(real_age[real_ok], csf_real[real_ok], syn_age[syn_ok], csf_syn[syn_ok])
            _put(flat, "age.csf_fraction", block)
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
                        for v in data.synthetic_volumes
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
                _put(flat, "age.ventricle_ml", block)
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

            head_real, head_syn = head_ml(data.real_volumes), head_ml(data.synthetic_volumes)
            first, last = sex.levels[0], sex.levels[-1]
            block: dict[str, Any] = {}
            groups = {}
            for name, (values, ok), head in (("real", real_sex, head_real), ("synthetic", syn_sex, head_syn)):
                for level in sex.levels:
                    member = ok & (values == level)
                    groups[(name, level)] = head[member]
                    block[f"{level}_{name}"] = float(head[member].mean()) if member.any() else float("nan")
                block[f"diff_{name}"] = block[f"{last}_{name}"] - block[f"{first}_{name}"]
            a, b = groups[("real", last)], groups[("real", first)]
            if len(a) >= 2 and len(b) >= 2:
                p_value = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
                block["p_real"] = p_value
                if p_value < EFFECT_P_VALUE and block["diff_real"] != 0:
                    block["effect_ratio"] = block["diff_synthetic"] / block["diff_real"]
            block["contrast"] = f"{last}-{first}"
            _put(flat, "sex.head_ml", block)
            details["sex"] = {"levels": list(sex.levels), "groups": groups}

    predictors = {}
    for cov in covariates:
        train_v = covariate_column(data.real.iloc[data.train_index], cov)
        ref_v = covariate_column(data.real.iloc[data.reference_index], cov)
        syn_v = covariate_column(data.synthetic, cov)
        if train_v is None or ref_v is None or syn_v is None:
            continue
        (tv, tok), (rv, rok), (sv, sok) = train_v, ref_v, syn_v
        if tok.sum() < 3 or rok.sum() < 1 or sok.sum() < 1:
            log.info(
                "Conditioning: too few values of '%s' for a predictor (train %d, held-out %d, synthetic %d)",
                cov.name,
                tok.sum(),
                rok.sum(),
                sok.sum(),
            )
            continue
        if cov.kind == "categorical" and len(set(tv[tok])) < 2:
            log.info("Conditioning: '%s' has a single level in the training split; no predictor", cov.name)
            continue
        model = cond.fit_covariate_predictor(f_train[tok], tv[tok], cov.kind)
        real_err = cond.predictor_error(model, f_reference[rok], rv[rok])
        syn_err = cond.predictor_error(model, f_synthetic[sok], sv[sok])
        if cov.kind == "continuous":
            block = {"mae_real": real_err, "mae_synthetic": syn_err, "error_ratio": syn_err / max(real_err, 1e-12)}
        else:
            block = {"accuracy_real": real_err, "accuracy_synthetic": syn_err, "accuracy_drop": real_err - syn_err}
        block.update({"n_real": int(rok.sum()), "n_synthetic": int(sok.sum())})
        _put(flat, f"{cov.name}.predictor.{extractor_key}", block)
        predictors[cov.name] = block
    details["predictors"] = predictors
    return flat, details


# ----------------------------------------------------------------------------------------------
# everything


@dataclass
class ReportResult:
    metrics: dict[str, Any]  # flat, JSON-safe
    details: dict[str, Any] = field(default_factory=dict)  # arrays and lists for figures and tables


def make_extractor(rp: ReportParams, value_range: tuple[float, float], device: str = "cpu"):
    """The feature extractor named in ``report.extractor``, built for the processed intensity range."""
    from synthmri.metrics.features import get_extractor

    kwargs: dict[str, Any] = {}
    if rp.extractor in ("stats", "medicalnet"):
        kwargs["value_range"] = value_range
    if rp.extractor in ("medicalnet", "lpips"):
        kwargs["weights_path"] = rp.extractor_weights
        kwargs["device"] = device
    try:
        return get_extractor(rp.extractor, **kwargs)
    except FileNotFoundError as exc:
        raise StageError(f"report.extractor={rp.extractor}: {exc} (set report.extractor_weights)") from None


def compute_set_metrics(params: Params, data: ReportData, extractor=None) -> ReportResult:
    """Every metric that needs no model: fidelity, diversity, conditioning, privacy, intensities."""
    import torch

    from synthmri.training.runtime import pick_device

    rp = params.report
    device = str(pick_device(rp.device))
    extractor = extractor or make_extractor(rp, data.value_range, device)
    key = feature_key(extractor.name)
    metrics: dict[str, Any] = {
        "extractor": extractor.name,
        "n_synthetic": len(data.synthetic),
        "n_reference": len(data.reference_index),
        "n_train": len(data.train_index),
        "reference_splits": "+".join(data.reference_splits),
    }
    details: dict[str, Any] = {"extractor_key": key}

    log.info(
        "Features (%s) of %d training, %d held-out and %d synthetic volumes",
        extractor.name,
        len(data.train_index),
        len(data.reference_index),
        len(data.synthetic),
    )
    with torch.inference_mode():
        f_train, f_ref, f_syn = extractor(data.train), extractor(data.reference), extractor(data.synthetic_volumes)

    _put(metrics, f"fidelity.{key}", fidelity_metrics(f_ref, f_syn, f_train, rp.prdc_k, rp.seed))
    log.info("Diversity: mean pairwise MS-SSIM (at most %d pairs per set)", rp.max_pairs)
    _put(
        metrics,
        "diversity",
        diversity_metrics(data.synthetic_volumes, data.reference, rp.max_pairs, rp.seed, data.data_range),
    )
    log.info("Conditioning fidelity")
    flat, details["conditioning"] = conditioning_metrics(data, list(params.covariates), f_train, f_ref, f_syn, key)
    _put(metrics, "conditioning", flat)
    log.info("Memorization: nearest training volume of every synthetic volume (NCC, SSIM)")
    flat, details["privacy"] = privacy_metrics(data.synthetic_volumes, data.train, data.reference, rp, data.value_range)
    _put(metrics, "privacy", flat)
    flat, details["intensity"] = intensity_metrics(
        data.reference, data.synthetic_volumes, rp.histogram_bins, data.value_range
    )
    _put(metrics, "intensity", flat)
    _name_closest_pairs(data, details["privacy"])
    closest = details["privacy"][rp.privacy_metric]["closest_pairs"][0]
    metrics.update(
        {
            "privacy.closest_synthetic": closest["synthetic_file"],
            "privacy.closest_train": closest["train_id"],
            "privacy.closest_score": clean_number(closest["score"]),
        }
    )
    return ReportResult(metrics, details)


def _name_closest_pairs(data: ReportData, privacy: dict) -> None:
    """Attach file names / subject ids to the closest pairs, and name the closest in the metrics."""
    train_ids = data.real.iloc[data.train_index]
    id_column = "item_id" if "item_id" in train_ids.columns else "subject_id"
    for report in privacy.values():
        for pair in report["closest_pairs"]:
            pair["synthetic_file"] = str(data.synthetic["file"].iloc[pair["synthetic"]])
            pair["train_id"] = str(train_ids[id_column].iloc[pair["train"]])
            pair["near_duplicate"] = bool(pair["score"] > report["near_duplicate_threshold"])


def compute_report(params: Params, data: ReportData, vqgan_dir: Path | None) -> ReportResult:
    """All metrics of the report: VQ-GAN reconstruction (when ``vqgan_dir`` holds a model) and the set metrics."""
    result = compute_set_metrics(params, data)
    rp = params.report
    recon_index = data.split_index([rp.recon_split])
    split = rp.recon_split
    if len(recon_index) == 0:
        split = "val" if rp.recon_split == "test" else "test"
        recon_index = data.split_index([split])
        log.warning("The %s split is empty: VQ-GAN reconstruction is measured on the %s split", rp.recon_split, split)
    if vqgan_dir is not None and (Path(vqgan_dir) / "model.safetensors").is_file() and len(recon_index):
        log.info("VQ-GAN reconstruction of %d %s volumes", len(recon_index), split)
        recon, example = reconstruction_metrics(
            Path(vqgan_dir), data.real_volumes[recon_index], data.value_range, params.vqgan.loss, rp.device
        )
        recon["split"] = split
        _put(result.metrics, "recon", recon)
        result.details["recon_example"] = example
        result.details["recon_id"] = str(data.real["item_id"].iloc[recon_index[0]]) if "item_id" in data.real else ""
    else:
        log.warning("No VQ-GAN model in %s (or no %s volumes): reconstruction metrics skipped", vqgan_dir, split)
    return result


# ----------------------------------------------------------------------------------------------
# the quality gate


@dataclass(frozen=True)
class Check:
    """One gate check: ``value <op> threshold``; status ``pass``, ``fail`` or ``skipped``."""

    name: str
    key: str
    op: str
    threshold: float | None
    value: Any
    status: str
    note: str = ""

    @property
    def rule(self) -> str:
        return f"{self.op} {self.threshold:g}" if self.threshold is not None else "off"


def gate_rules(metrics: dict, t: ReportThresholds) -> list[tuple[str, str, str, float | None]]:
    """``(check name, metric key, op, threshold)`` for every check that can apply to ``metrics``."""
    ext = feature_key(str(metrics.get("extractor", "stats")))
    rules = [
        ("recon_psnr", "recon.psnr", ">=", t.min_recon_psnr),
        ("recon_ssim", "recon.ssim", ">=", t.min_recon_ssim),
        ("frechet_distance", f"fidelity.{ext}.frechet_distance", "<=", t.max_frechet_distance),
        ("frechet_ratio", f"fidelity.{ext}.frechet_ratio", "<=", t.max_frechet_ratio),
        ("precision", f"fidelity.{ext}.precision", ">=", t.min_precision),
        ("recall", f"fidelity.{ext}.recall", ">=", t.min_recall),
        ("coverage", f"fidelity.{ext}.coverage", ">=", t.min_coverage),
        ("diversity_ratio", "diversity.ratio", ">=", t.min_diversity_ratio),
        ("intensity_wasserstein", "intensity.wasserstein", "<=", t.max_intensity_wasserstein),
        ("age_effect_csf", "conditioning.age.csf_fraction.effect_ratio", ">=", t.min_effect_ratio),
        ("age_effect_ventricles", "conditioning.age.ventricle_ml.effect_ratio", ">=", t.min_effect_ratio),
        ("sex_effect_head_size", "conditioning.sex.head_ml.effect_ratio", ">=", t.min_effect_ratio),
    ]
    pattern = re.compile(rf"^conditioning\.(.+)\.predictor\.{re.escape(ext)}\.(error_ratio|accuracy_drop)$")
    for key in sorted(metrics):
        match = pattern.match(key)
        if match:
            threshold = t.max_predictor_error_ratio if match[2] == "error_ratio" else t.max_predictor_accuracy_drop
            rules.append((f"predictor_{match[1]}", key, "<=", threshold))
    rules += [
        ("privacy_copies", "privacy.excess_fraction", "<=", t.max_copy_fraction_over_chance),
        ("privacy_near_duplicates", "privacy.n_near_duplicates", "<=", t.max_near_duplicates),
    ]
    return rules


def evaluate_gate(metrics: dict, thresholds: ReportThresholds) -> list[Check]:
    """Apply the thresholds: a check is skipped when its threshold is null or its metric does not apply
    (absent key); it fails when its metric is present but not a finite number (could not be computed)."""
    checks = []
    for name, key, op, threshold in gate_rules(metrics, thresholds):
        if threshold is None:
            checks.append(Check(name, key, op, None, metrics.get(key), "skipped", "threshold off"))
            continue
        if key not in metrics:
            checks.append(Check(name, key, op, threshold, None, "skipped", "not applicable"))
            continue
        value = metrics[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            checks.append(Check(name, key, op, threshold, value, "fail", "could not be computed"))
            continue
        ok = value >= threshold if op == ">=" else value <= threshold
        checks.append(Check(name, key, op, threshold, value, "pass" if ok else "fail"))
    return checks


def gate_summary(checks: list[Check]) -> dict[str, Any]:
    """Flat gate keys for metrics.json: ``gate`` (pass|fail), ``gate_passed``, ``gate_failed_checks``
    (comma-separated), ``gate_n_failed``, ``gate_n_checked`` and ``check.<name>`` (true/false)."""
    failed = [c.name for c in checks if c.status == "fail"]
    out: dict[str, Any] = {
        "gate": "fail" if failed else "pass",
        "gate_passed": not failed,
        "gate_failed_checks": ",".join(failed),
        "gate_n_failed": len(failed),
        "gate_n_checked": sum(c.status != "skipped" for c in checks),
    }
    out.update({f"check.{c.name}": c.status == "pass" for c in checks if c.status != "skipped"})
    return out
