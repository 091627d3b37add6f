"""The report's numbers: the synthetic set against the real held-out volumes, and the quality gate.

Every metric comes from :mod:`synthmri.metrics` (tested there). :mod:`.inputs` loads the volumes,
:mod:`.families` calls each metric family on the right sets and flattens it into ``reports/metrics.json``
keys, :mod:`.gate` judges the flat metrics; this module puts them together. The sets:

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

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from synthmri.config import Params, ReportParams
from synthmri.errors import StageError
from synthmri.logs import get_logger
from synthmri.report.families import (
    autoencoder_ceiling,
    clean_number,
    conditioning_metrics,
    covariates_kept,
    diversity_metrics,
    feature_key,
    fidelity_metrics,
    image_measure_metrics,
    intensity_metrics,
    privacy_metrics,
    put_flat,
    reconstruction_metrics,
)
from synthmri.report.gate import Check, evaluate_gate
from synthmri.report.inputs import ReportData
from synthmri.report.intervals import BOOTSTRAP_DRAWS, gate_intervals
from synthmri.report.protocol_sweep import protocol_sweep

log = get_logger(__name__)


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


def compute_set_metrics(
    params: Params, data: ReportData, extractor=None, privacy: bool = True, intervals: bool = True
) -> ReportResult:
    """Every metric that needs no model: fidelity, diversity, conditioning, privacy (unless ``privacy`` is
    False), intensities, and the bootstrap intervals of the gate's set metrics (``interval.<check>.low/high``;
    unless ``intervals`` is False)."""
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
    details["features"] = {"train": f_train, "reference": f_ref}

    put_flat(
        metrics,
        f"fidelity.{key}",
        fidelity_metrics(f_ref, f_syn, f_train, rp.prdc_k, rp.seed, rp.compare_size, rp.max_comparisons),
    )
    log.info("Diversity: mean pairwise MS-SSIM (at most %d pairs per set)", rp.max_pairs)
    put_flat(
        metrics,
        "diversity",
        diversity_metrics(data.synthetic_volumes, data.reference, rp.max_pairs, rp.seed, data.data_range),
    )
    log.info("Conditioning fidelity")
    flat, details["conditioning"] = conditioning_metrics(data, list(params.covariates), f_train, f_ref, f_syn, key)
    put_flat(metrics, "conditioning", flat)
    if intervals:
        log.info("Bootstrap intervals of the gate's set metrics (%d replicates)", BOOTSTRAP_DRAWS)
        details["intervals"] = gate_intervals(
            details["conditioning"], f_train, f_ref, f_syn, rp.prdc_k, rp.seed, rp.compare_size
        )
        for name, (low, high) in details["intervals"].items():
            metrics[f"interval.{name}.low"], metrics[f"interval.{name}.high"] = low, high
    flat, details["intensity"] = intensity_metrics(
        data.reference, data.synthetic_volumes, rp.histogram_bins, data.value_range
    )
    put_flat(metrics, "intensity", flat)
    log.info("Image measures the gate does not use (tissue fractions, grey/white boundary, sharpness, spread)")
    flat, details["measures"] = image_measure_metrics(
        data.reference, {"synthetic": data.synthetic_volumes, "train": data.train}, data.value_range, rp.seed
    )
    put_flat(metrics, "measures", flat)
    if not privacy:
        return ReportResult(metrics, details)
    log.info("Memorization: nearest training volume of every synthetic volume (NCC, SSIM)")
    flat, details["privacy"] = privacy_metrics(data.synthetic_volumes, data.train, data.reference, rp, data.value_range)
    put_flat(metrics, "privacy", flat)
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


CEILING_NOT_APPLICABLE = ("recon_", "privacy_")  # the autoencoder's own checks; decoded training volumes are copies


def ceiling_checks(params: Params, data: ReportData, decoded_train, extractor) -> list[Check]:
    """The gate's set checks on the decoded *training* volumes, each with its own covariates, as if they were
    the synthetic set: what a perfect diffusion model (one that generates real subjects' latents) would score
    through this autoencoder. A check that fails here cannot pass by training the diffusion model longer.

    The covariate predictors were fitted on these subjects' real volumes, so their errors here are optimistic
    (a perfect autoencoder would score below the held-out error); the reconstruction and privacy checks do
    not apply (they judge the autoencoder itself, and a decoded training volume is a copy by construction).
    """
    train = data.real.iloc[data.train_index].reset_index(drop=True)
    train["file"] = [f"decoded-{i:06d}" for i in range(len(train))]
    decoded = replace(data, synthetic=train, synthetic_volumes=decoded_train)
    metrics = compute_set_metrics(params, decoded, extractor, privacy=False, intervals=False).metrics
    return [
        c
        for c in evaluate_gate(metrics, params.report.thresholds)
        if not c.name.startswith(CEILING_NOT_APPLICABLE) and c.status != "skipped"
    ]


def compute_report(
    params: Params,
    data: ReportData,
    vqgan_dir: Path | None,
    ldm_dir: Path | None = None,
    latent_dir: Path | None = None,
) -> ReportResult:
    """All metrics of the report: the set metrics, and when ``vqgan_dir`` holds a model the VQ-GAN's
    reconstruction scores and the autoencoder's ceiling (fidelity of decoded real volumes, and the gate's
    checks on decoded training volumes: :func:`ceiling_checks`); when ``ldm_dir`` holds the diffusion model too
    and acquisition covariates are declared, one subject under each protocol
    (:mod:`synthmri.report.protocol_sweep`, ``conditioning.protocol_sweep.*``)."""
    import torch

    from synthmri.training.runtime import pick_device

    rp = params.report
    extractor = make_extractor(rp, data.value_range, str(pick_device(rp.device)))
    result = compute_set_metrics(params, data, extractor)
    recon_index = data.split_index([rp.recon_split])
    split = rp.recon_split
    if len(recon_index) == 0:
        split = "val" if rp.recon_split == "test" else "test"
        recon_index = data.split_index([split])
        log.warning("The %s split is empty: VQ-GAN reconstruction is measured on the %s split", rp.recon_split, split)
    if vqgan_dir is not None and (Path(vqgan_dir) / "model.safetensors").is_file() and len(recon_index):
        log.info("VQ-GAN reconstruction of %d %s volumes", len(recon_index), split)
        recon, example, (decoded_reference, decoded_train) = reconstruction_metrics(
            Path(vqgan_dir),
            data.real_volumes[recon_index],
            data.value_range,
            params.vqgan.loss,
            rp.device,
            also=(data.reference, data.train),
            quantize=params.encode.quantized,
        )
        recon["split"] = split
        recon["latents"] = params.encode.latents
        put_flat(result.metrics, "recon", recon)
        log.info(
            "Autoencoder ceiling: features of %d decoded training and %d decoded held-out volumes",
            len(decoded_train),
            len(decoded_reference),
        )
        features = result.details["features"]
        with torch.inference_mode():
            f_dec_ref, f_dec_train = extractor(decoded_reference), extractor(decoded_train)
        ceiling = autoencoder_ceiling(
            features["reference"],
            f_dec_ref,
            f_dec_train,
            features["train"],
            rp.prdc_k,
            rp.seed,
            rp.compare_size,
            rp.max_comparisons,
        )
        put_flat(result.metrics, f"ceiling.{feature_key(extractor.name)}", ceiling)
        kept = covariates_kept(result.details["conditioning"]["real_predictors"], f_dec_train, f_dec_ref)
        put_flat(result.metrics, "ceiling.kept", kept)
        log.info("Autoencoder ceiling: the gate's checks on the decoded training volumes")
        checks = ceiling_checks(params, data, decoded_train, extractor)
        failed = [c.name for c in checks if c.status == "fail"]
        put_flat(result.metrics, "ceiling.check", {c.name: c.value for c in checks})
        result.metrics.update({"ceiling.gate_failed_checks": ",".join(failed), "ceiling.gate_n_failed": len(failed)})
        result.details["ceiling_checks"] = {c.name: c for c in checks}
        if result.details.get("measures"):
            flat, _ = image_measure_metrics(
                data.reference, {"decoded_train": decoded_train}, data.value_range, rp.seed, result.details["measures"]
            )
            put_flat(result.metrics, "measures", flat)
        if failed:
            log.warning(
                "Autoencoder ceiling: even decoded real training volumes fail %s: the diffusion model alone "
                "cannot pass these checks",
                ", ".join(failed),
            )
        result.details["recon_example"] = example
        result.details["recon_id"] = str(data.real["item_id"].iloc[recon_index[0]]) if "item_id" in data.real else ""
    else:
        log.warning("No VQ-GAN model in %s (or no %s volumes): reconstruction metrics skipped", vqgan_dir, split)
    started = time.perf_counter()
    sweep = protocol_sweep(params, data, ldm_dir, vqgan_dir, latent_dir)
    if sweep is not None:
        flat, result.details["protocol_sweep"] = sweep
        put_flat(result.metrics, "conditioning.protocol_sweep", flat)
        log.info("One subject under each protocol: done in %.1f s", time.perf_counter() - started)
    return result
