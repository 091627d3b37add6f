"""The ``utility`` stage: does pre-training a 3D ViT on ``data/synthetic`` help on real data? (issue 19)

Runs the protocol of :mod:`synthmri.utility.protocol` (pre-train on the synthetic set, fine-tune on k real
training-split subjects, test on the real held-out splits; scratch, real pre-training and a negative control
side by side), and writes ``reports/utility.json`` (flat keys for ``dvc metrics``: :mod:`synthmri.utility.summary`),
``reports/utility/errors.csv`` (every test subject's error in every run) and the data-efficiency figure
``reports/utility/data_efficiency.png``. Every ViT's loss curve goes to an MLflow ``utility`` run. The report
stage reads ``reports/utility.json`` into the quality gate.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

from synthmri import tracking
from synthmri.catalog import PROCESSED_DIR, SYNTHETIC_DIR, UTILITY_METRICS_FILE, UTILITY_REPORT_DIR
from synthmri.config import Params
from synthmri.io import dvc_directory_hash, write_text_atomic
from synthmri.logs import get_logger
from synthmri.report.families import clean_number
from synthmri.report.inputs import load_report_data
from synthmri.training.runtime import pick_device
from synthmri.utility.figure import data_efficiency_figure
from synthmri.utility.protocol import Protocol, UtilitySets
from synthmri.utility.summary import summarize
from synthmri.utility.targets import TargetCodec

log = get_logger(__name__)


def run_utility(
    params: Params,
    processed_dir: Path = PROCESSED_DIR,
    synthetic_dir: Path = SYNTHETIC_DIR,
    metrics_file: Path = UTILITY_METRICS_FILE,
    report_dir: Path = UTILITY_REPORT_DIR,
    track: bool = True,
) -> dict:
    """Run the protocol and write its outputs; returns the flat metrics of ``reports/utility.json``."""
    from synthmri.utility.vit import ViTRegressor

    start = time.perf_counter()
    up = params.utility
    data = load_report_data(params, Path(processed_dir), Path(synthetic_dir))
    sets = UtilitySets.from_report_data(data)
    del data  # the tensors above are copies; the report's arrays are not needed any more
    names = up.targets if up.targets is not None else [c.name for c in params.covariates]
    codec = TargetCodec([params.covariate(n) for n in names])
    device = pick_device(up.device)
    n_parameters = ViTRegressor(up.vit, tuple(sets.train_volumes.shape[2:]), codec.n_outputs).n_parameters
    log.info(
        "Utility of %d synthetic volumes: MONAI 3D ViT (%s parameters, patch %d) predicting %s; fine-tuned on k = %s "
        "of %d real training subjects, tested on %d held-out volumes; %d repeats",
        len(sets.synthetic),
        f"{n_parameters:,}",
        up.vit.patch_size,
        ", ".join(names),
        ", ".join(str(k) for k in up.k),
        sets.train["subject_id"].nunique(),
        len(sets.test),
        up.repeats,
    )
    tags = {"synthetic_digest": dvc_directory_hash(Path(synthetic_dir))}
    run_ctx = tracking.stage_run("utility", params.model_dump(mode="json"), tags=tags) if track else None
    with run_ctx or contextlib.nullcontext():
        on_curve = None
        if track:
            import mlflow

            on_curve = lambda name, step, loss: mlflow.log_metric(f"loss.{name}", loss, step=step)  # noqa: E731
        results = Protocol(up, codec, sets, device, on_curve).run()
        summary = summarize(results, up)
        summary.update(
            {
                "n_synthetic": len(sets.synthetic),
                "n_train_subjects": int(sets.train["subject_id"].nunique()),
                "n_test": len(sets.test),
                "vit_parameters": n_parameters,
                "backbone": f"monai.networks.nets.ViT (random init, {n_parameters} parameters)",
                "negative_control": up.negative_control,
            }
        )
        summary = {k: clean_number(v) for k, v in summary.items()}
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        errors_path = report_dir / "errors.csv"
        write_text_atomic(errors_path, results.to_csv(index=False))
        figure = data_efficiency_figure(
            summary,
            [(t.name, t.continuous) for t in codec.targets if t.name in (up.primary, "sex")],
            [str(k) for k in up.k],
            summary["n_train_subjects"],
            report_dir / "data_efficiency.png",
        )
        write_text_atomic(Path(metrics_file), json.dumps(summary, indent=2, allow_nan=False) + "\n")
        _log_verdict(summary, up.primary, up.gate_k)
        seconds = round(time.perf_counter() - start, 1)
        log.info("Wrote %s, %s and %s in %.0f s", metrics_file, errors_path, figure, seconds)
        if track:
            import mlflow

            mlflow.log_metrics(
                {f"utility.{k}": float(v) for k, v in summary.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and math.isfinite(v)}
            )  # fmt: skip
            mlflow.log_metric("utility_seconds", seconds)
            for path in (metrics_file, errors_path, figure):
                mlflow.log_artifact(str(path))
    return summary


def _log_verdict(summary: dict, primary: str, k: int) -> None:
    """One sentence a user reads: what pre-training on the set did, next to real pre-training and the control."""

    def gain(prefix: str) -> str:
        value = summary.get(f"{prefix}.{primary}.k{k}")
        low, high = summary.get(f"{prefix}_ci_low.{primary}.k{k}"), summary.get(f"{prefix}_ci_high.{primary}.k{k}")
        if value is None:
            return "n/a"
        return f"{100 * value:+.0f} % [{100 * low:+.0f}, {100 * high:+.0f}]" if low is not None else f"{value:+.0%}"

    log.info(
        "Pre-training on the synthetic set changes the %s error at k = %d by %s (95 %% interval; positive = lower "
        "error); real pre-training %s; negative control %s. TSTR / TRTR error ratio %.2f",
        primary,
        k,
        gain("pretrain_gain"),
        gain("real_pretrain_gain"),
        gain("negative_control_gain"),
        summary.get(f"tstr_ratio.{primary}") or float("nan"),
    )
