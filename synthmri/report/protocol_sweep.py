"""One subject under each protocol: does the model change a subject's contrast the way the scanners do?

The report's acquisition effects (:func:`synthmri.report.families.conditioning_metrics`) fit slopes over a whole
set, where every volume differs from the next in subject, noise and acquisition at once. Here the subject is held
fixed: a few subjects (covariates of training rows; ``report.protocol_sweep.unspecified``, the site by default,
left unspecified) are generated with the **same seed** under every acquisition combination found in the real
training set, with the sample stage's own shard function (:func:`synthmri.stages.sample.generate_shard`), so
the protocol is the only difference between the volumes of a subject. Each volume's GM/WM contrast
(:func:`synthmri.metrics.conditioning.gm_wm_contrast`) is set beside the real cohort's mean contrast under the
same protocol: a model that follows the acquisition orders the protocols as the real scans do
(:func:`sweep_metrics`). Reported under ``conditioning.protocol_sweep.*``; no gate check reads it.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthmri.config import Covariate, Params
from synthmri.data.covariates import covariate_rows
from synthmri.io import sha256_file
from synthmri.logs import get_logger
from synthmri.report.inputs import ReportData

log = get_logger(__name__)

ACQUISITION_SOURCES = ("sidecar", "header")  # synthmri.data.acquisition: what the scanner, not the subject, set


def acquisition_covariates(covariates: Sequence[Covariate]) -> list[Covariate]:
    """The declared covariates that describe the acquisition (read from sidecars or image headers)."""
    return [c for c in covariates if c.source in ACQUISITION_SOURCES]


def training_protocols(manifest: pd.DataFrame, acquisition: Sequence[Covariate], max_protocols: int) -> list[dict]:
    """The distinct acquisition combinations of ``manifest``, the ``max_protocols`` most frequent ones, sorted by
    their values: one dict ``{name: value}`` per protocol. A value missing beside present ones is part of the
    protocol (an SPGR has no inversion time: the model is asked for it unspecified, as it was trained); rows with
    no acquisition value at all are left out (their acquisition is unknown)."""
    rows = [row for row in covariate_rows(manifest, acquisition) if any(v is not None for v in row.values())]
    counts: dict[tuple, int] = {}
    for row in rows:
        key = tuple(row[c.name] for c in acquisition)
        counts[key] = counts.get(key, 0) + 1
    frequent = sorted(counts, key=lambda k: -counts[k])[:max_protocols]  # stable: ties keep first-seen order
    if len(counts) > max_protocols:
        log.info(
            "Protocol sweep: %d acquisition combinations in the training set, the %d most frequent are swept",
            len(counts),
            max_protocols,
        )

    def order(key: tuple) -> tuple:  # None (not applicable) after the values, which may mix numbers and text
        return tuple((value is None, str(type(value)), value if value is not None else 0) for value in key)

    return [dict(zip((c.name for c in acquisition), key)) for key in sorted(frequent, key=order)]


def protocol_members(manifest: pd.DataFrame, protocol: dict, acquisition: Sequence[Covariate]) -> np.ndarray:
    """Which rows of ``manifest`` were acquired with ``protocol`` (every acquisition value equal)."""
    rows = covariate_rows(manifest, acquisition)
    return np.array([all(row[name] == value for name, value in protocol.items()) for row in rows], dtype=bool)


def value_text(value: object) -> str:
    """A covariate value as figures and keys show it: ``1.5``, ``3.0``, ``0.8``, ``M``; ``na`` when unspecified."""
    if value is None:
        return "na"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.1f}" if float(value).is_integer() else f"{value:g}"
    return str(value)


def protocol_label(protocol: dict) -> str:
    """A protocol as a metric-key part: ``{field_strength: 3, inversion_time: 0.8}`` ->
    ``field_strength_3p0_inversion_time_0p8`` (no dots: metrics.json keys use them as separators)."""
    text = "_".join(f"{name}_{value_text(value).replace('.', 'p')}" for name, value in protocol.items())
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text)


def sweep_subjects(
    train: pd.DataFrame, covariates: Sequence[Covariate], n: int, unspecified: Sequence[str], seed: int
) -> list[dict]:
    """Covariates of ``n`` training rows drawn with ``seed``, those named in ``unspecified`` and the acquisition
    ones set to None (the protocol is filled in per column of the sweep)."""
    names = {c.name for c in covariates}
    unknown = [name for name in unspecified if name not in names]
    if unknown:
        log.info("Protocol sweep: report.protocol_sweep.unspecified names undeclared covariates %s", unknown)
    rows = covariate_rows(train, covariates)
    picks = np.sort(np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False))
    blank = set(unspecified) | {c.name for c in acquisition_covariates(covariates)}
    return [{k: (None if k in blank else v) for k, v in rows[i].items()} for i in picks]


def column_means(values: np.ndarray) -> np.ndarray:
    """Per-protocol means over subjects, NaN where no subject could be measured (without numpy's warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.asarray(values, dtype=np.float64), axis=0)


def sweep_metrics(synthetic: np.ndarray, real_means: np.ndarray) -> dict[str, float]:
    """How far the same-seed volumes follow the real protocol differences.

    Args:
        synthetic: ``(subjects, protocols)`` GM/WM contrast of each same-seed volume (NaN where unmeasurable).
        real_means: ``(protocols,)`` the real cohort's mean contrast under each protocol.

    Returns:
        ``pearson`` and ``spearman``: correlation of the synthetic per-protocol means (over subjects) with the
        real means (NaN with fewer than 3 protocols or a constant side); ``slope_synthetic_on_real``: least-squares
        slope of the synthetic means on the real means (1: the real protocol differences at full size, 0: none);
        ``sign_agreement``: the fraction of same-seed protocol pairs (one subject, two protocols whose real means
        differ) whose contrast difference has the sign of the real means' difference, over ``n_pairs`` pairs (1:
        every subject follows the real ordering; a volume that does not change with the protocol counts as
        disagreeing, so a model deaf to the acquisition scores 0, not the 0.5 of a random ordering).
    """
    from scipy import stats

    synthetic = np.asarray(synthetic, dtype=np.float64)
    real_means = np.asarray(real_means, dtype=np.float64)
    if synthetic.ndim != 2 or synthetic.shape[1] != real_means.shape[0]:
        raise ValueError(f"synthetic {synthetic.shape} must be (subjects, {real_means.shape[0]} protocols)")
    means = column_means(synthetic)
    ok = np.isfinite(means) & np.isfinite(real_means)
    nan = float("nan")
    out = {"pearson": nan, "spearman": nan, "slope_synthetic_on_real": nan}
    x, y = real_means[ok], means[ok]
    if ok.sum() >= 3 and np.ptp(x) > 0:
        out["slope_synthetic_on_real"] = float(np.polyfit(x, y, 1)[0])
        if np.ptp(y) > 0:
            out["pearson"] = float(stats.pearsonr(x, y)[0])
            out["spearman"] = float(stats.spearmanr(x, y)[0])
    agree = pairs = 0
    for p, q in itertools.combinations(range(len(real_means)), 2):
        real_sign = np.sign(real_means[p] - real_means[q])
        if not np.isfinite(real_sign) or real_sign == 0:
            continue
        for subject in synthetic:
            if np.isfinite(subject[p]) and np.isfinite(subject[q]):
                pairs += 1
                agree += bool(np.sign(subject[p] - subject[q]) == real_sign)
    out["sign_agreement"] = agree / pairs if pairs else nan
    out["n_pairs"] = pairs
    return out


def generate_sweep(
    params: Params,
    ldm_dir: Path,
    vqgan_dir: Path,
    latent_dir: Path,
    affine: list,
    shape: Sequence[int],
    subjects: list[dict],
    protocols: list[dict],
    value_range: tuple[float, float],
) -> np.ndarray:
    """``(subjects, protocols, *shape)`` volumes in ``value_range``: subject ``s`` is sample ``s`` of a set seeded
    with ``report.seed`` (the same noise under every protocol), generated and decoded by the sample stage's
    shard function with ``diffusion.sampler``, one shard per protocol, written to a temporary folder and read
    back as the report reads a synthetic set (a protocol with a voxel size is written at it, then resampled back
    onto the training grid ``(affine, shape)``: :mod:`synthmri.data.spacing`). One thread and one chain per
    volume, the seed and the release set here (every ``sample.*`` field the job reads is overridden): the
    report's bytes then depend on the models, the sampler and ``report.*`` only."""
    import nibabel as nib

    from synthmri.data.spacing import resample
    from synthmri.stages.sample import SampleJob, generate_shard, sample_volume_name

    low, high = value_range
    out: list[list[np.ndarray]] = [[] for _ in subjects]
    with tempfile.TemporaryDirectory(prefix="synthmri-protocol-sweep-") as tmp:
        for p, protocol in enumerate(protocols):
            folder = Path(tmp) / f"protocol-{p}"
            job = SampleJob.from_params(
                params, ldm_dir, vqgan_dir, latent_dir, folder, affine,
                seed=params.report.seed, release="report protocol sweep", torch_threads=1, micro_batch=1,
            )  # fmt: skip
            generate_shard(job, 0, [(s, {**row, **protocol}) for s, row in enumerate(subjects)])
            for s in range(len(subjects)):
                image = nib.load(folder / "volumes" / sample_volume_name(s))
                unit = resample(
                    np.asarray(image.dataobj, dtype=np.float32),
                    image.affine,
                    np.asarray(affine),
                    shape,
                    antialias=False,
                )
                out[s].append(unit * np.float32(high - low) + np.float32(low))  # [0, 1] -> processed range
    return np.stack([np.stack(row) for row in out])


def _skip_reason(params: Params, ldm_dir: Path | None, vqgan_dir: Path | None, latent_dir: Path | None) -> str:
    """Why the sweep cannot run here ("" when it can)."""
    acquisition = acquisition_covariates(params.covariates)
    if params.report.protocol_sweep.subjects == 0:
        return "report.protocol_sweep.subjects is 0"
    if not acquisition:
        return "no acquisition covariate (source: sidecar or header) is declared"
    for name, folder, weights in (
        ("diffusion model", ldm_dir, "model.safetensors"),
        ("VQ-GAN", vqgan_dir, "model.safetensors"),
        ("latent set", latent_dir, "latents.safetensors"),
    ):
        if folder is None or not (Path(folder) / weights).is_file():
            return f"no {name} ({folder}/{weights} not found)"
    config = json.loads((Path(ldm_dir) / "config.json").read_text())
    conditioned = {c["name"] for c in config.get("covariates", [])}
    missing = [c.name for c in acquisition if c.name not in conditioned]
    if missing:
        return f"the diffusion model in {ldm_dir} is not conditioned on {missing}"
    if config.get("vqgan_sha256") not in (None, sha256_file(Path(vqgan_dir) / "model.safetensors")):
        return f"the diffusion model in {ldm_dir} was trained on the latents of another VQ-GAN than {vqgan_dir}"
    return ""


def protocol_sweep(
    params: Params, data: ReportData, ldm_dir: Path | None, vqgan_dir: Path | None, latent_dir: Path | None
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The sweep's flat metrics (``conditioning.protocol_sweep.`` is prefixed by the caller) and the details the
    figure draws; None, with a log line that says why, when it does not apply."""
    from synthmri.metrics.conditioning import gm_wm_contrast

    reason = _skip_reason(params, ldm_dir, vqgan_dir, latent_dir)
    cfg = params.report.protocol_sweep
    acquisition = acquisition_covariates(params.covariates)
    train = data.real.iloc[data.train_index].reset_index(drop=True)
    protocols = [] if reason else training_protocols(train, acquisition, cfg.max_protocols)
    if not reason and len(protocols) < 2:
        reason = f"the training set has {len(protocols)} complete acquisition combination(s) of {acquisition}"
    if reason:
        log.info("One subject under each protocol: skipped (%s)", reason)
        return None

    subjects = sweep_subjects(train, params.covariates, cfg.subjects, cfg.unspecified, params.report.seed)
    log.info(
        "One subject under each protocol: %d subject(s) x %d protocols of %s, same seed per subject",
        len(subjects),
        len(protocols),
        ", ".join(c.name for c in acquisition),
    )
    volumes = generate_sweep(
        params,
        ldm_dir,
        vqgan_dir,
        latent_dir,
        data.space["affine"],
        data.space["shape"],
        subjects,
        protocols,
        data.value_range,
    )
    contrast = np.array([[gm_wm_contrast(v, data.value_range) for v in row] for row in volumes])
    real_means, n_real = [], []
    for protocol in protocols:
        members = np.flatnonzero(protocol_members(data.real, protocol, acquisition))
        values = np.array([gm_wm_contrast(data.real_volumes[i], data.value_range) for i in members])
        values = values[np.isfinite(values)]
        real_means.append(float(values.mean()) if values.size else math.nan)
        n_real.append(int(values.size))
    flat: dict[str, Any] = {"n_subjects": len(subjects), "n_protocols": len(protocols)}
    flat.update(sweep_metrics(contrast, np.array(real_means)))
    for protocol, syn, real, n in zip(protocols, column_means(contrast), real_means, n_real):
        label = protocol_label(protocol)
        flat.update({f"{label}.synthetic_mean": float(syn), f"{label}.real_mean": real, f"{label}.n_real": n})
    details = {
        "protocols": protocols,
        "subjects": subjects,
        "volumes": volumes,
        "contrast": contrast,
        "real_means": np.array(real_means),
        "n_real": n_real,
        "metrics": flat,
    }
    return flat, details
