"""The ``train_diffusion`` stage: train (or resume) the conditional latent diffusion model, write the EMA
model, curves, a decoded preview and metrics, and log them to MLflow (registered as ``synthmri-ldm``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from synthmri.catalog import LATENT_DIR, LDM_CHECKPOINT_DIR, LDM_DIR, LDM_METRICS_FILE, LDM_REPORT_DIR, VQGAN_DIR
from synthmri.config import Params
from synthmri.data.covariates import covariate_rows, covariate_title
from synthmri.data.latents import LatentSet
from synthmri.diffusion.sampling import sample_latents, sample_seed
from synthmri.diffusion.schedulers import (
    make_sampler,
)
from synthmri.errors import StageError
from synthmri.io import sha256_file, write_csv_atomic, write_text_atomic
from synthmri.logs import get_logger
from synthmri.models.loading import load_vqgan, save_weights
from synthmri.training import distributed
from synthmri.training.checkpoint import config_fingerprint
from synthmri.training.loop import train_loop
from synthmri.training.runtime import precision_text
from synthmri.training.train_diffusion import DiffusionTrainer
from synthmri.viz import three_plane_grid

log = get_logger(__name__)


def decode_preview(trainer: DiffusionTrainer, vqgan, rows: list[dict], path: Path, steps: int = 10) -> Path:
    """A few EMA samples decoded by the VQ-GAN, as slice images (what MLflow shows during training)."""
    ema = trainer.ema.module
    sampler = make_sampler(trainer.cfg.sampler.sampler, trainer.cfg.schedule)
    seeds = [sample_seed(trainer.params.seed, 900_000 + i) for i in range(len(rows))]
    z = sample_latents(
        ema.unet,
        ema.encoder,
        sampler,
        rows,
        tuple(trainer.train.latents.shape[1:]),
        steps,
        trainer.cfg.sampler.guidance_scale,
        seeds=seeds,
        device=trainer.device,
        guidance_interval=trainer.cfg.sampler.guidance_interval,
        rest_guidance_scale=trainer.cfg.sampler.rest_guidance_scale,
    )
    with torch.inference_mode():
        volumes = [
            vqgan.decode(
                trainer.train.unstandardize(z[i : i + 1].cpu()).to(trainer.device),
                quantize=trainer.cfg.sampler.snap_to_codes,
            )
            .clamp(-1, 1)[0, 0]
            .float()
            .cpu()
            .numpy()
            for i in range(len(rows))
        ]
    return three_plane_grid(volumes, [f"step {trainer.step}\n{covariate_title(row, per_line=1)}" for row in rows], path)


def run_fingerprint(params: Params, latent_dir: Path = LATENT_DIR) -> str:
    """Identity of a training run for resuming: what it learns (U-Net, schedule, optimisation, covariates,
    seed, latents), not its step budget, cadence or sampler, so extending a killed run resumes it."""
    return config_fingerprint(
        {
            **params.diffusion.model_dump(mode="json", exclude={"sampler"}),
            "covariates": [c.model_dump(mode="json") for c in params.covariates],
        },
        params.seed,
        Path(latent_dir) / "latents.safetensors",
    )


def training_latents(latent_dir: Path, schedule) -> tuple[LatentSet, LatentSet]:
    """What the diffusion model learns from and is validated on: the training latents with their mirror images
    (when the encode stage made them), and the validation latents as they are."""
    return LatentSet(latent_dir, "train", schedule, mirrored=True), LatentSet(latent_dir, "val", schedule)


def run_train_diffusion(
    params: Params,
    latent_dir: Path = LATENT_DIR,
    vqgan_dir: Path = VQGAN_DIR,
    model_dir: Path = LDM_DIR,
    checkpoint_dir: Path = LDM_CHECKPOINT_DIR,
    report_dir: Path = LDM_REPORT_DIR,
    metrics_file: Path = LDM_METRICS_FILE,
    track: bool = True,
) -> dict:
    """Train (or resume) the latent diffusion model; write EMA weights, curves and metrics."""

    train, val = training_latents(latent_dir, params.diffusion.schedule)
    if len(train) == 0:
        raise StageError("no training latents: run `synthmri encode` first")
    ctx = distributed.initialize(params.diffusion.train.device)
    try:
        trainer = DiffusionTrainer(params, train, val, checkpoint_dir, run_fingerprint(params, latent_dir), ctx)
        return _train(trainer, vqgan_dir, model_dir, checkpoint_dir, report_dir, metrics_file, track and ctx.is_main)
    finally:
        distributed.shutdown()


def _train(
    trainer: DiffusionTrainer,
    vqgan_dir: Path,
    model_dir: Path,
    checkpoint_dir: Path,
    report_dir: Path,
    metrics_file: Path,
    track: bool,
) -> dict:
    """The training run of one rank; rank 0 also validates, logs and writes every output."""
    from synthmri import tracking

    params, train, ctx = trainer.params, trainer.train, trainer.ctx
    vqgan = load_vqgan(vqgan_dir, trainer.device) if ctx.is_main else None
    preview_rows = covariate_rows(train.manifest.iloc[:3], params.covariates)
    t = trainer.cfg.train
    mlflow = importlib.import_module("mlflow") if track else None
    run_ctx = (
        tracking.stage_run("train_diffusion", params.model_dump(mode="json")) if track else contextlib.nullcontext()
    )

    def validate() -> None:
        loss = trainer.validation_loss()
        trainer.val_history.append({"step": trainer.step, "val_loss": loss})
        if mlflow is not None:
            mlflow.log_metric("val_loss", loss, step=trainer.step)
            if trainer.step % t.sample_every == 0 or trainer.step == t.steps:
                figure = decode_preview(trainer, vqgan, preview_rows, report_dir / "samples.png")
                mlflow.log_artifact(str(figure), artifact_path=f"samples/step-{trainer.step:07d}")

    with run_ctx as run:
        trainer.resume()
        n_params = sum(p.numel() for p in trainer.model.parameters()) / 1e6
        log.info(
            "Training the latent diffusion model (%.2f M parameters, %s prediction, %s schedule) on %d "
            "latents of shape %s for %d steps on %s (%s), %d process(es) x %d x %d latents per step",
            n_params,
            trainer.cfg.schedule.prediction,
            "straight-path" if trainer.cfg.schedule.prediction == "flow" else trainer.cfg.schedule.beta_schedule,
            len(train),
            tuple(train.latents.shape[1:]),
            t.steps,
            trainer.device,
            precision_text(trainer.device, t.precision, t.cpu_bf16),
            ctx.world_size,
            t.grad_accumulation,
            t.batch_size,
        )
        throughput = train_loop(
            trainer,
            t,
            checkpoint_dir,
            "Training diffusion",
            validate=validate,
            mlflow=mlflow,
            postfix=("loss",),
            ctx=ctx,
        )
        if not ctx.is_main:
            return {}
        validate()
        decode_preview(trainer, vqgan, preview_rows, report_dir / "samples.png")
        config = {
            "diffusion": params.diffusion.model_dump(mode="json"),
            "covariates": [c.model_dump(mode="json") for c in params.covariates],
            "latent_shape": list(train.latents.shape[1:]),
            "steps": trainer.step,
            "vqgan_sha256": sha256_file(vqgan_dir / "model.safetensors"),
        }
        save_weights(trainer.ema.module, config, model_dir)
        write_csv_atomic(pd.DataFrame(trainer.history), report_dir / "losses.csv")
        write_csv_atomic(pd.DataFrame(trainer.val_history), report_dir / "validation.csv")
        recent = [h["loss"] for h in trainer.history[-5:]]
        metrics = {
            "train_loss": float(np.mean(recent)) if recent else float("nan"),
            "val_loss": trainer.val_history[-1]["val_loss"],
            "steps": trainer.step,
            "parameters_M": n_params,
            "processes": ctx.world_size,
        }
        write_text_atomic(metrics_file, json.dumps(metrics, indent=2))  # no wall-clock figure: dvc.lock reproduces
        log.info(
            "Diffusion training done: train loss %.4f, validation loss %.4f, %.1f latents/s",
            metrics["train_loss"],
            metrics["val_loss"],
            throughput,
        )
        if mlflow is not None:
            mlflow.log_metric("train_latents_per_s", throughput, step=trainer.step)
            mlflow.log_artifact(str(report_dir / "samples.png"), artifact_path="samples/final")
            version = tracking.register_model(
                "synthmri-ldm", model_dir, run, {"sha256": sha256_file(model_dir / "model.safetensors")}
            )
            write_text_atomic(
                model_dir / "registry.json", json.dumps({"name": "synthmri-ldm", "version": version}, indent=2)
            )
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return metrics
