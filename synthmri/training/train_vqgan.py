"""The ``train_vqgan`` stage: train the 3D VQ-GAN (or, with perceptual = adversarial = 0, the VQ-VAE).

Generator loss: L1 + perceptual (2.5D LPIPS) + commitment, and once the discriminator is switched
on (``disc_start_step``) hinge adversarial loss scaled by the adaptive weight plus GAN feature
matching. Checkpoints every ``checkpoint_every`` steps; a restarted stage resumes from the newest
checkpoint of the same configuration (models, optimizers, codebook, step, history).
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

from synthmri.catalog import PROCESSED_DIR, VQGAN_CHECKPOINT_DIR, VQGAN_DIR, VQGAN_METRICS_FILE, VQGAN_REPORT_DIR
from synthmri.config import Params
from synthmri.data.datasets import ProcessedVolumes
from synthmri.errors import StageError
from synthmri.io import sha256_file, write_csv_atomic, write_text_atomic
from synthmri.logs import get_logger
from synthmri.losses.adversarial import (
    adaptive_gan_weight,
    disc_factor,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
)
from synthmri.losses.perceptual import LPIPS25D
from synthmri.metrics.reconstruction import score_reconstructions
from synthmri.models.discriminator import PatchDiscriminator, SliceDiscriminator
from synthmri.models.loading import save_weights
from synthmri.models.vqgan import VQGAN
from synthmri.training import distributed
from synthmri.training.checkpoint import config_fingerprint
from synthmri.training.distributed import Context
from synthmri.training.loop import ResumableTrainer, train_loop
from synthmri.training.optim import adamw, lr_scheduler
from synthmri.training.runtime import autocast, batch_indices, pick_device, seed_everything, to_device
from synthmri.viz import three_plane_grid

log = get_logger(__name__)


def build_models(
    params: Params, device: torch.device, checkpointing: bool = False
) -> tuple[VQGAN, torch.nn.ModuleList]:
    cfg = params.vqgan
    model = VQGAN.from_params(cfg.model, cfg.quantizer, checkpointing=checkpointing).to(device)
    discriminators = torch.nn.ModuleList()
    if cfg.loss.adversarial > 0:
        discriminators.append(PatchDiscriminator.from_params(cfg.discriminator))
        if cfg.discriminator.slice_discriminator:
            discriminators.append(SliceDiscriminator.from_params(cfg.discriminator))
    return model, discriminators.to(device)


def validate(
    model: VQGAN, volumes: ProcessedVolumes, lpips: LPIPS25D, device: torch.device, value_range: tuple[float, float]
) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """PSNR, SSIM (3D, scikit-image) and 2.5D LPIPS of the reconstructions of ``volumes``, and one example."""
    scores = score_reconstructions(model, volumes.volumes, lpips, device, value_range)
    summary = scores.summary()
    return {k: summary[k] for k in ("psnr", "ssim", "lpips")}, scores.example


def mirror_left_right(volumes: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Mirror the volumes selected by the boolean ``which`` along the first spatial axis (left-right in
    the pipeline's RAS space): a brain's mirror image is a plausible brain, so it is free extra data."""
    if not bool(which.any()):
        return volumes
    return torch.where(which.view(-1, *[1] * (volumes.dim() - 1)), volumes.flip(2), volumes)


class VQGANTrainer(ResumableTrainer):
    """One training run: holds the models, optimizers and history so that resume is one load."""

    name = "VQ-GAN"

    def __init__(
        self,
        params: Params,
        train_set: ProcessedVolumes | None = None,
        val_set: ProcessedVolumes | None = None,
        checkpoint_dir: Path = VQGAN_CHECKPOINT_DIR,
        fingerprint: str = "",
        ctx: Context | None = None,
    ) -> None:
        self.params, self.cfg = params, params.vqgan
        t = self.cfg.train
        self.ctx = ctx or Context(device=pick_device(t.device))
        self.device = self.ctx.device
        seed_everything(params.seed)
        self.train_set, self.val_set = train_set, val_set
        self.value_range = tuple(params.normalize.out_range)
        self.model, self.discriminators = build_models(params, self.device, t.activation_checkpointing)
        self.train_model = self.ctx.prepare(self.model, t.channels_last, t.compile)
        self.train_discriminators = [self.ctx.prepare(d, t.channels_last, t.compile) for d in self.discriminators]
        self.opt_g = adamw(self.model.parameters(), t)
        self.lr_schedule_g = lr_scheduler(self.opt_g, t)
        self.opt_d = (
            adamw(self.discriminators.parameters(), t, t.lr_discriminator) if len(self.discriminators) else None
        )
        self.lpips_metric, self.backbone = LPIPS25D.from_params(self.cfg.loss, random_slices=False)
        self.lpips_loss = LPIPS25D(self.lpips_metric.net, self.cfg.loss.lpips_slices_per_axis, random_slices=True)
        self.lpips_metric.to(self.device), self.lpips_loss.to(self.device)
        self.checkpoint_dir, self.fingerprint = checkpoint_dir, fingerprint
        self.step, self.history, self.val_history = 0, [], []

    # -- state -----------------------------------------------------------------------------------

    def stateful(self) -> dict:
        parts = {
            "model": self.model,
            "discriminators": self.discriminators,
            "opt_g": self.opt_g,
            "lr_schedule_g": self.lr_schedule_g,
        }
        return {**parts, "opt_d": self.opt_d} if self.opt_d else parts

    # -- one step --------------------------------------------------------------------------------

    def next_step(self) -> dict[str, float]:
        """One optimizer step on the global batch of this step: this rank's ``grad_accumulation`` micro-batches."""
        t, ctx = self.cfg.train, self.ctx
        global_batch = t.batch_size * ctx.world_size * t.grad_accumulation
        indices = batch_indices(len(self.train_set), global_batch, self.params.seed, self.step)
        rows = torch.arange(global_batch)
        flips = (
            torch.rand(global_batch, generator=torch.Generator().manual_seed(self.params.seed + self.step)) < t.flip_lr
        )
        micro_batches = []
        for m in range(t.grad_accumulation):
            mine = ctx.micro_batch(rows, m, t.batch_size)
            micro_batches.append(mirror_left_right(self.train_set.batch(indices[mine]), flips[mine]))
        return ctx.mean(self.train_step(*micro_batches))

    def train_step(self, *micro_batches: torch.Tensor) -> dict[str, float]:
        """Generator step, then discriminator step, each accumulating gradients over ``micro_batches``;
        returns the losses averaged over them."""
        loss_cfg, t, ctx = self.cfg.loss, self.cfg.train, self.ctx
        gan_on = self.opt_d is not None and disc_factor(self.step, loss_cfg.disc_start_step) > 0
        generator = torch.Generator().manual_seed(self.params.seed + self.step)
        n = len(micro_batches)
        inputs = [to_device(x, self.device, t.pin_memory, t.channels_last) for x in micro_batches]
        totals: dict[str, float] = {}
        recons = []
        self.opt_g.zero_grad(set_to_none=True)
        for i, x in enumerate(inputs):
            with ctx.no_sync(self.train_model, sync=i == n - 1):
                with autocast(self.device, t.precision):
                    recon, vq_loss, stats = self.train_model(x)
                    l1 = (recon - x).abs().mean()
                    perceptual = self.lpips_loss(x, recon, generator) if loss_cfg.perceptual > 0 else torch.zeros(())
                    rec_loss = loss_cfg.l1 * l1 + loss_cfg.perceptual * perceptual
                    g_adv = fm = gan_weight = torch.zeros((), device=x.device)
                    if gan_on:  # the generator's view of the critics: plain modules, their gradients are discarded
                        outputs_fake = [d(recon) for d in self.discriminators]
                        with torch.no_grad():
                            outputs_real = [d(x) for d in self.discriminators]
                        g_adv = sum(hinge_g_loss(logits) for logits, _ in outputs_fake)
                        fm = sum(
                            feature_matching_loss(real_f, fake_f)
                            for (_, real_f), (_, fake_f) in zip(outputs_real, outputs_fake)
                        )
                        gan_weight = (
                            adaptive_gan_weight(rec_loss, g_adv, self.model.last_layer_weight) * loss_cfg.adversarial
                        )
                    loss = rec_loss + vq_loss + gan_weight * g_adv + loss_cfg.feature_matching * fm
                (loss / n).backward()
            recons.append(recon.detach())
            values = {
                "loss": loss,
                "l1": l1,
                "perceptual": perceptual,
                "vq": vq_loss,
                "g_adv": g_adv,
                "feature_matching": fm,
                "gan_weight": gan_weight,
                "perplexity": stats["perplexity"],
                "codebook_usage": stats["usage"],
            }
            for name, value in values.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach()) / n
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.opt_g.step()
        self.lr_schedule_g.step()
        totals["lr"] = self.lr_schedule_g.get_last_lr()[0]

        totals["d_loss"] = 0.0
        if gan_on:
            self.opt_d.zero_grad(set_to_none=True)
            for i, (x, recon) in enumerate(zip(inputs, recons)):
                with contextlib.ExitStack() as stack:
                    for d in self.train_discriminators:
                        stack.enter_context(ctx.no_sync(d, sync=i == n - 1))
                    with autocast(self.device, t.precision):
                        # real and fake in one forward: one DDP forward per backward
                        d_loss = sum(
                            hinge_d_loss(*d(torch.cat([x, recon]))[0].chunk(2)) for d in self.train_discriminators
                        )
                    (d_loss / n).backward()
                totals["d_loss"] += float(d_loss.detach()) / n
            torch.nn.utils.clip_grad_norm_(self.discriminators.parameters(), t.grad_clip)
            self.opt_d.step()
        return totals


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
            "Training the %s on %d volumes (%d validation) for %d steps on %s, %d process(es) x %d x %d "
            "volumes per step; LPIPS backbone: %s",
            "VQ-GAN" if trainer.opt_d else "VQ-VAE",
            len(trainer.train_set),
            len(trainer.val_set),
            t.steps,
            trainer.device,
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
