"""The ``report`` stage: quality and privacy of ``data/synthetic`` against the real held-out data.

Writes ``reports/metrics.json`` (flat keys, DVC metrics), ``reports/report.html`` (self-contained) and
``reports/figures/*.png``, and evaluates the quality gate of ``report.thresholds``. A failing gate is
a result, not an error: the stage logs it loudly, records ``gate: fail``, ``gate_passed: false`` and
``gate_failed_checks`` in metrics.json and returns normally; the publish step reads metrics.json.
Everything is logged to MLflow as a ``report`` run, tagged with the model versions of the synthetic
set and with the set itself as an evaluation dataset input.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

from synthmri import tracking
from synthmri.catalog import (
    LATENT_DIR,
    LDM_DIR,
    PROCESSED_DIR,
    REPORT_FIGURES_NAME,
    REPORT_HTML_NAME,
    REPORT_METRICS_NAME,
    REPORTS_DIR,
    SYNTHETIC_DIR,
    UTILITY_METRICS_FILE,
    VQGAN_DIR,
)
from synthmri.config import Params
from synthmri.data.synthetic import PROVENANCE_COLUMNS
from synthmri.io import dvc_directory_hash, write_text_atomic
from synthmri.logs import get_logger
from synthmri.report.compute import compute_report
from synthmri.report.families import clean_number
from synthmri.report.gate import Check, evaluate_gate, gate_summary
from synthmri.report.inputs import ReportData, load_report_data

log = get_logger(__name__)

COMPARED = ("val_psnr", "val_ssim", "val_lpips", "codebook_usage", "perplexity", "steps")


def synthetic_provenance(manifest: pd.DataFrame) -> dict[str, str]:
    """Model versions and checksums recorded in the synthetic manifest (distinct values, comma-joined)."""
    out = {}
    for column in PROVENANCE_COLUMNS:
        if column in manifest.columns:
            values = sorted({str(v) for v in manifest[column].dropna()})
            if values:
                out[column] = ",".join(values)
    return out


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("Ignoring %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def model_comparison(reports_dir: Path, vqvae_metrics: str | None) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """VQ-GAN (``reports/vqgan.json``) and VQ-VAE (``report.vqvae_metrics``) validation metrics side by
    side, when the VQ-VAE file exists. Returns the table and its flat ``compare.<model>.<metric>`` keys."""
    vqvae = _read_json(Path(vqvae_metrics)) if vqvae_metrics else None
    if vqvae is None:
        return None, {}
    vqgan = _read_json(reports_dir / "vqgan.json") or {}
    columns = {"VQ-GAN": vqgan, "VQ-VAE": vqvae}
    table = pd.DataFrame(
        {name: [clean_number(values.get(k)) for k in COMPARED] for name, values in columns.items()},
        index=list(COMPARED),
    )
    flat = {
        f"compare.{name.lower().replace('-', '')}.{k}": clean_number(values[k])
        for name, values in columns.items()
        for k in COMPARED
        if isinstance(values.get(k), (int, float)) and not isinstance(values.get(k), bool)
    }
    log.info("VQ-VAE metrics from %s shown next to the VQ-GAN's", vqvae_metrics)
    return table, flat


def utility_metrics(reports_dir: Path) -> dict[str, Any]:
    """The utility stage's numbers (``reports/utility.json``) as ``utility.<key>``, for the gate and the page;
    empty when the stage did not run (the gate's utility check is then skipped as not applicable)."""
    utility = _read_json(Path(reports_dir) / UTILITY_METRICS_FILE.name)
    if utility is None:
        log.info("No %s: the gate's utility check does not apply", UTILITY_METRICS_FILE)
        return {}
    return {f"utility.{k}": v for k, v in utility.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _explain_utility(check: Check, metrics: dict) -> Check:
    """The utility check's value is the lower end of an interval; its note says which gain, next to the real
    reference's (what a set as good as the real data reaches with the same protocol)."""
    if check.name != "utility_pretrain_gain" or metrics.get("utility.primary_gain") is None:
        return check
    at = f"{metrics.get('utility.primary')}.k{metrics.get('utility.gate_k')}"

    def gain(prefix: str) -> str:
        value, low, high = (metrics.get(f"utility.{prefix}{part}.{at}") for part in ("", "_ci_low", "_ci_high"))
        if value is None or low is None or high is None:
            return "n/a"
        return f"{100 * value:+.0f} % [{100 * low:+.0f}, {100 * high:+.0f}]"

    note = (
        f"lower end of the {metrics.get('utility.primary')} gain at k = {metrics.get('utility.gate_k')}: "
        f"{gain('pretrain_gain')}; real pre-training {gain('real_pretrain_gain')}"
    )
    return replace(check, note=note)


def _log_to_mlflow(
    metrics: dict, data: ReportData, digest: str, files: list[Path], figures_dir: Path, seconds: float
) -> None:
    import mlflow

    numbers = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and v is not None and math.isfinite(float(v))
    }
    mlflow.log_metrics({**numbers, "report_seconds": seconds})
    mlflow.set_tags(
        {
            "gate": metrics["gate"],
            "gate_failed_checks": metrics["gate_failed_checks"] or "-",
            "extractor": str(metrics.get("extractor", "")),
        }
    )
    run = mlflow.active_run()
    tracking.log_dataset(
        run.info.run_id,
        Path(data.synthetic_dir) / "manifest.csv",
        name="synthetic",
        digest=digest,
        source=Path(data.synthetic_dir).resolve().as_uri(),
        context="evaluation",
    )
    for path in files:
        mlflow.log_artifact(str(path))
    if figures_dir.is_dir():
        mlflow.log_artifacts(str(figures_dir), artifact_path=REPORT_FIGURES_NAME)


def run_report(
    params: Params,
    processed_dir: Path = PROCESSED_DIR,
    synthetic_dir: Path = SYNTHETIC_DIR,
    vqgan_dir: Path = VQGAN_DIR,
    reports_dir: Path = REPORTS_DIR,
    track: bool = True,
    ldm_dir: Path | None = LDM_DIR,
    latent_dir: Path | None = LATENT_DIR,
) -> dict:
    """Compute the report, write metrics.json, report.html and figures, evaluate the gate, log to MLflow.

    ``ldm_dir`` and ``latent_dir`` (the diffusion model and the latents it was trained on) are read only for
    "one subject under each protocol" (:mod:`synthmri.report.protocol_sweep`); without them it is skipped.

    Returns the flat metrics (as written to ``reports/metrics.json``). Never raises because the gate
    fails; raises :class:`~synthmri.errors.StageError` when an input is missing or unusable.
    """
    from synthmri.report.html import build_html, render_figures, write_html

    start = time.perf_counter()
    reports_dir = Path(reports_dir)
    data = load_report_data(params, Path(processed_dir), Path(synthetic_dir))
    provenance = synthetic_provenance(data.synthetic)
    digest = dvc_directory_hash(data.synthetic_dir)
    tags = {**provenance, "synthetic_digest": digest}
    run_ctx = (
        tracking.stage_run("report", params.model_dump(mode="json"), tags=tags) if track else contextlib.nullcontext()
    )
    blas = (
        threadpool_limits(limits=params.report.blas_threads, user_api="blas")
        if params.report.blas_threads
        else contextlib.nullcontext()
    )
    with run_ctx:
        with blas:
            result = compute_report(
                params,
                data,
                Path(vqgan_dir) if vqgan_dir is not None else None,
                Path(ldm_dir) if ldm_dir is not None else None,
                Path(latent_dir) if latent_dir is not None else None,
            )
        metrics = result.metrics
        comparison, compared = model_comparison(reports_dir, params.report.vqvae_metrics)
        metrics.update(compared)
        metrics.update(utility_metrics(reports_dir))
        checks = [_explain_utility(c, metrics) for c in evaluate_gate(metrics, params.report.thresholds)]
        metrics.update(gate_summary(checks))

        figures_dir = reports_dir / REPORT_FIGURES_NAME
        covariate_names = [c.name for c in params.covariates]
        figures = render_figures(data, result, covariate_names, params.report.n_examples, figures_dir, reports_dir)
        metrics = {k: clean_number(v) for k, v in metrics.items()}
        metrics_path = reports_dir / REPORT_METRICS_NAME
        write_text_atomic(metrics_path, json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        html_path = write_html(
            build_html(
                metrics, checks, result, figures, {**provenance, "synthetic set digest": digest[:16]}, comparison
            ),
            reports_dir / REPORT_HTML_NAME,
        )

        failed = [c for c in checks if c.status == "fail"]
        if failed:
            log.warning(
                "QUALITY GATE FAILED: %d of %d checks failed: %s",
                len(failed),
                metrics["gate_n_checked"],
                "; ".join(
                    f"{c.name} ({c.key} = {c.value if c.value is not None else 'n/a'}, "
                    f"needs {c.rule}{', ' + c.note if c.note else ''})"
                    for c in failed
                ),
            )
            log.warning("The synthetic set must not be published (gate_passed: false in %s)", metrics_path)
        else:
            log.info("Quality gate passed: %d checks", metrics["gate_n_checked"])
        # the duration goes to the log and MLflow only: metrics.json and report.html depend on the inputs
        # alone, so a rerun on the same inputs reproduces their dvc.lock hashes
        seconds = round(time.perf_counter() - start, 2)
        log.info("Wrote %s, %s and %d figures in %.1f s", metrics_path, html_path, len(figures), seconds)
        if track:
            _log_to_mlflow(metrics, data, digest, [metrics_path, html_path], figures_dir, seconds)
    return metrics
