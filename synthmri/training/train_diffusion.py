"""The ``train_diffusion`` stage: conditional latent diffusion on the VQ-GAN's standardized latents.

DDPM training with the L2 loss on the predicted noise (or on v, ``diffusion.schedule.prediction``),
condition dropout for classifier-free guidance, EMA weights for sampling. Uses the same training
loop, checkpoints, resume rules and MLflow run as the VQ-GAN stage.
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
import torch.nn.functional as F

from synthmri.catalog import LATENT_DIR, LDM_CHECKPOINT_DIR, LDM_DIR, LDM_METRICS_FILE, LDM_REPORT_DIR, VQGAN_DIR
from synthmri.config import Params
from synthmri.data.covariates import covariate_rows
from synthmri.data.latents import LatentSet
from synthmri.diffusion.conditioning import CovariateBatch, CovariateEncoder
from synthmri.diffusion.ema import make_ema
from synthmri.diffusion.sampling import sample_latents, sample_seed
from synthmri.diffusion.schedulers import (
    add_noise,
    make_sampler,
    make_training_scheduler,
    sample_timesteps,
    training_target,
)
from synthmri.errors import StageError
from synthmri.io import sha256_file, write_csv_atomic, write_text_atomic
from synthmri.logs import get_logger
from synthmri.models.loading import build_ldm, load_vqgan, save_weights
from synthmri.training import distributed
from synthmri.training.checkpoint import config_fingerprint
from synthmri.training.distributed import Context
from synthmri.training.loop import ResumableTrainer, train_loop
from synthmri.training.optim import adamw, lr_scheduler
from synthmri.training.runtime import autocast, batch_indices, pick_device, seed_everything, to_device
from synthmri.viz import three_plane_grid

log = get_logger(__name__)


class DiffusionTrainer(ResumableTrainer):
    """One diffusion training run (model, EMA, optimizer, history), resumable from one state dict."""

    name = "diffusion"

    def __init__(
        self,
        params: Params,
        train: LatentSet,
        val: LatentSet | None,
        checkpoint_dir: Path,
        fingerprint: str,
        ctx: Context | None = None,
    ) -> None:
        self.params, self.cfg = params, params.diffusion
        t = self.cfg.train
        self.ctx = ctx or Context(device=pick_device(t.device))
        self.device = self.ctx.device
        seed_everything(params.seed)
        self.train, self.val = train, val
        self.model = build_ldm(
            self.cfg.unet, params.covariates, train.latents.shape[1], checkpointing=t.activation_checkpointing
        ).to(self.device)
        self.ema = make_ema(self.model, t.ema_decay)
        self.train_model = self.ctx.prepare(self.model, t.channels_last, t.compile)
        self.optimizer = adamw(self.model.parameters(), t)
        self.lr_schedule = lr_scheduler(self.optimizer, t)
        self.scheduler = make_training_scheduler(self.cfg.schedule)
        self.train_covariates = self.model.encoder.encode_values(covariate_rows(train.manifest, params.covariates))
        self.checkpoint_dir, self.fingerprint = checkpoint_dir, fingerprint
        self.step, self.history, self.val_history = 0, [], []

    def stateful(self) -> dict:
        return {"model": self.model, "ema": self.ema, "optimizer": self.optimizer, "lr_schedule": self.lr_schedule}

    def draw(
        self, shape: torch.Size, covariates: CovariateBatch, generator: torch.Generator, dropout: float
    ) -> tuple[torch.Tensor, torch.Tensor, CovariateBatch]:
        """Noise, timesteps and condition dropout of a whole (global) batch, from one CPU generator:
        every rank draws the same and takes its rows, so N processes train exactly like one."""
        noise = torch.randn(shape, generator=generator)
        t = sample_timesteps(self.scheduler, shape[0], generator)
        return noise, t, CovariateEncoder.drop(covariates, dropout, generator)

    def loss(
        self, model: torch.nn.Module, x0: torch.Tensor, covariates: CovariateBatch, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """L2 between the network's prediction and the target (noise or v) at timesteps ``t``."""
        cfg = self.cfg.train
        x0, noise = (to_device(v, self.device, cfg.pin_memory, cfg.channels_last) for v in (x0, noise))
        t, covariates = t.to(self.device), covariates.to(self.device)
        with autocast(self.device, cfg.precision):
            prediction = model(add_noise(self.scheduler, x0, noise, t), t, covariates)
        return F.mse_loss(prediction.float(), training_target(self.scheduler, x0, noise, t))

    def next_step(self) -> dict[str, float]:
        """One optimizer step on the global batch: ``grad_accumulation`` micro-batches per rank."""
        t, ctx = self.cfg.train, self.ctx
        global_batch = t.batch_size * ctx.world_size * t.grad_accumulation
        indices = batch_indices(len(self.train), global_batch, self.params.seed, self.step)
        generator = torch.Generator().manual_seed(sample_seed(self.params.seed, 10_000_000 + self.step))
        noise, timesteps, covariates = self.draw(
            self.train.latents[indices].shape, self.train_covariates.select(indices), generator, t.condition_dropout
        )
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = 0.0
        for micro in range(t.grad_accumulation):
            rows = ctx.micro_batch(torch.arange(global_batch), micro, t.batch_size)
            with ctx.no_sync(self.train_model, sync=micro == t.grad_accumulation - 1):
                loss = self.loss(
                    self.train_model,
                    self.train.latents[indices[rows]],
                    covariates.select(rows),
                    noise[rows],
                    timesteps[rows],
                )
                (loss / t.grad_accumulation).backward()
            loss_value += float(loss.detach()) / t.grad_accumulation
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.ema.update_parameters(self.model)
        return ctx.mean({"loss": loss_value, "grad_norm": float(grad_norm)})

    @torch.inference_mode()
    def validation_loss(self) -> float:
        """Noise-prediction loss of the EMA model on the validation latents, at fixed noise and timesteps."""
        if self.val is None or len(self.val) == 0:
            return float("nan")
        generator = torch.Generator().manual_seed(self.params.seed)
        ema = self.ema.module.eval()
        rows = ema.encoder.encode_values(covariate_rows(self.val.manifest, self.params.covariates))
        noise, t, rows = self.draw(self.val.latents.shape, rows, generator, dropout=0.0)
        return float(self.loss(ema, self.val.latents, rows, noise, t))


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
    )
    with torch.inference_mode():
        volumes = [
            vqgan.decode(trainer.train.unstandardize(z[i : i + 1].cpu()).to(trainer.device), quantize=True)
            .clamp(-1, 1)[0, 0]
            .float()
            .cpu()
            .numpy()
            for i in range(len(rows))
        ]
    titles = [", ".join(f"{k}={v}" for k, v in row.items() if v is not None) or "unconditional" for row in rows]
    return three_plane_grid(volumes, [f"step {trainer.step}: {t}" for t in titles], path)


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

    train, val = LatentSet(latent_dir, "train"), LatentSet(latent_dir, "val")
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
            "latents of shape %s for %d steps on %s, %d process(es) x %d x %d latents per step",
            n_params,
            trainer.cfg.schedule.prediction,
            trainer.cfg.schedule.beta_schedule,
            len(train),
            tuple(train.latents.shape[1:]),
            t.steps,
            trainer.device,
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
