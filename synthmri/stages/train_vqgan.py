"""The ``train_vqgan`` stage: train (or resume) the VQ-GAN, validate it, write the model, curves and
metrics, and log it all to MLflow (the model is registered as ``synthmri-vqgan``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
from pathlib import Path

import pandas as pd

from synthmri.catalog import PROCESSED_DIR, VQGAN_CHECKPOINT_DIR, VQGAN_DIR, VQGAN_METRICS_FILE, VQGAN_REPORT_DIR
from synthmri.config import Params
from synthmri.data.datasets import ProcessedVolumes
from synthmri.errors import StageError
from synthmri.io import sha256_file, write_csv_atomic, write_text_atomic
from synthmri.logs import get_logger
from synthmri.models.loading import save_weights
from synthmri.training import distributed
from synthmri.training.checkpoint import config_fingerprint
from synthmri.training.loop import train_loop
from synthmri.training.runtime import precision_text
from synthmri.training.train_vqgan import VQGANTrainer, validate
from synthmri.viz import three_plane_grid

log = get_logger(__name__)


def _write_outputs(
    trainer: VQGANTrainer, model_dir: Path, report_dir: Path, metrics_file: Path, val_scores: dict[str, float]
) -> dict:
    """Weights, curves and the DVC metrics: only what the inputs determine (no wall-clock figures), so a
    rerun reproduces every hash in dvc.lock."""
    config = {
        "vqgan": trainer.params.vqgan.model_dump(mode="json"),
        "normalize": trainer.params.normalize.model_dump(mode="json"),
        "lpips_backbone": trainer.backbone,
        "steps": trainer.step,
    }
    save_weights(trainer.model, config, model_dir)
    write_csv_atomic(pd.DataFrame(trainer.history), report_dir / "losses.csv")
    write_csv_atomic(pd.DataFrame(trainer.val_history), report_dir / "validation.csv")
    last = trainer.history[-1] if trainer.history else {}
    metrics = {
        "val_psnr": val_scores["psnr"],
        "val_ssim": val_scores["ssim"],
        "val_lpips": val_scores["lpips"],
        "codebook_usage": last.get("codebook_usage", 0.0),
        "perplexity": last.get("perplexity", 0.0),
        "steps": trainer.step,
        "model": "vqvae" if trainer.opt_d is None and trainer.cfg.loss.perceptual == 0 else "vqgan",
        "lpips_backbone": trainer.backbone,
    }
    write_text_atomic(metrics_file, json.dumps(metrics, indent=2))
    return metrics


def _log_validation(trainer: VQGANTrainer, mlflow, report_dir: Path, val_set: ProcessedVolumes):
    """Validate, record the scores, and show real vs reconstruction in MLflow."""
    scores, example = validate(trainer.model, val_set, trainer.lpips_metric, trainer.device, trainer.value_range)
    trainer.val_history.append({"step": trainer.step, **scores})
    figure = three_plane_grid(
        [example[0], example[1]],
        ["real (val)", f"reconstruction, step {trainer.step}"],
        report_dir / "reconstruction.png",
    )
    if mlflow is not None:
        mlflow.log_metrics({f"val_{k}": v for k, v in scores.items()}, step=trainer.step)
        mlflow.log_artifact(str(figure), artifact_path=f"figures/step-{trainer.step:07d}")
    return scores


def run_train_vqgan(
    params: Params,
    processed_dir: Path = PROCESSED_DIR,
    model_dir: Path = VQGAN_DIR,
    checkpoint_dir: Path = VQGAN_CHECKPOINT_DIR,
    report_dir: Path = VQGAN_REPORT_DIR,
    metrics_file: Path = VQGAN_METRICS_FILE,
    track: bool = True,
) -> dict:
    """Train (or resume), validate, write ``model_dir`` and the metrics; log everything to MLflow."""

    train_set, val_set = ProcessedVolumes(processed_dir, "train"), ProcessedVolumes(processed_dir, "val")
    if len(train_set) == 0:
        raise StageError("the training split is empty: check normalize.split")
    ctx = distributed.initialize(params.vqgan.train.device)
    try:
        trainer = VQGANTrainer(
            params,
            train_set,
            val_set,
            checkpoint_dir,
            config_fingerprint(params.vqgan.model_dump(mode="json"), params.seed, Path(processed_dir) / "manifest.csv"),
            ctx,
        )
        return _train(trainer, model_dir, checkpoint_dir, report_dir, metrics_file, track and ctx.is_main)
    finally:
        distributed.shutdown()


def _train(
    trainer: VQGANTrainer, model_dir: Path, checkpoint_dir: Path, report_dir: Path, metrics_file: Path, track: bool
) -> dict:
    """The training run of one rank; rank 0 also validates, logs and writes every output."""
    from synthmri import tracking

    t, ctx = trainer.cfg.train, trainer.ctx
    mlflow = importlib.import_module("mlflow") if track else None
    run_ctx = (
        tracking.stage_run(
            "train_vqgan", trainer.params.model_dump(mode="json"), tags={"lpips_backbone": trainer.backbone}
        )
        if track
        else contextlib.nullcontext()
    )
    with run_ctx as run:
        trainer.resume()
        log.info(
            "Training the %s on %d volumes (%d validation) for %d steps on %s (%s), %d process(es) x %d x %d "
            "volumes per step; LPIPS backbone: %s",
            "VQ-GAN" if trainer.opt_d else "VQ-VAE",
            len(trainer.train_set),
            len(trainer.val_set),
            t.steps,
            trainer.device,
            precision_text(trainer.device, t.precision, t.cpu_bf16),
            ctx.world_size,
            t.grad_accumulation,
            t.batch_size,
            trainer.backbone,
        )
        trainer.model.train()
        throughput = train_loop(
            trainer,
            t,
            checkpoint_dir,
            "Training VQ-GAN",
            mlflow=mlflow,
            postfix=("l1", "vq", "codebook_usage"),
            validate=lambda: (
                _log_validation(trainer, mlflow, report_dir, trainer.val_set) if len(trainer.val_set) else None
            ),
            ctx=ctx,
        )
        if not ctx.is_main:
            return {}
        scores = _log_validation(
            trainer, mlflow, report_dir, trainer.val_set if len(trainer.val_set) else trainer.train_set
        )
        metrics = _write_outputs(trainer, model_dir, report_dir, metrics_file, scores)
        log.info(
            "Validation after %d steps: PSNR %.2f dB, SSIM %.3f, LPIPS %.3f; codebook usage %.0f%%; %.2f volumes/s",
            trainer.step,
            scores["psnr"],
            scores["ssim"],
            scores["lpips"],
            100 * metrics["codebook_usage"],
            throughput,
        )
        if mlflow is not None:
            mlflow.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=trainer.step)
            mlflow.log_metric("train_volumes_per_s", throughput, step=trainer.step)
            version = tracking.register_model(
                "synthmri-vqgan", model_dir, run, {"sha256": sha256_file(model_dir / "model.safetensors")}
            )
            write_text_atomic(
                model_dir / "registry.json", json.dumps({"name": "synthmri-vqgan", "version": version}, indent=2)
            )
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # finished: checkpoints only serve interrupted runs
    return metrics
