"""Training the 3D VQ-GAN (or, with perceptual = adversarial = 0, the VQ-VAE); the stage that runs it is
:mod:`synthmri.stages.train_vqgan`.

Generator loss: L1 + perceptual (2.5D LPIPS) + commitment, and once the discriminator is switched
on (``disc_start_step``) hinge adversarial loss scaled by the adaptive weight plus GAN feature
matching. Checkpoints every ``checkpoint_every`` steps; a restarted stage resumes from the newest
checkpoint of the same configuration (models, optimizers, codebook, step, history).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from synthmri.catalog import VQGAN_CHECKPOINT_DIR
from synthmri.config import Params
from synthmri.data.datasets import ProcessedVolumes, mirror_left_right
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
from synthmri.models.vqgan import VQGAN
from synthmri.training.distributed import Context
from synthmri.training.loop import ResumableTrainer
from synthmri.training.optim import adamw, clipped_step, lr_scheduler, skipped
from synthmri.training.runtime import autocast, batch_indices, pick_device, seed_everything, to_device

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
                with autocast(self.device, t.precision, t.cpu_bf16):
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
        g_norm = clipped_step(self.opt_g, self.model.parameters(), t.grad_clip)
        self.lr_schedule_g.step()
        totals["lr"] = self.lr_schedule_g.get_last_lr()[0]
        totals["skipped_step"] = skipped(g_norm)

        totals["d_loss"] = 0.0
        if gan_on:
            self.opt_d.zero_grad(set_to_none=True)
            for i, (x, recon) in enumerate(zip(inputs, recons)):
                with contextlib.ExitStack() as stack:
                    for d in self.train_discriminators:
                        stack.enter_context(ctx.no_sync(d, sync=i == n - 1))
                    with autocast(self.device, t.precision, t.cpu_bf16):
                        # real and fake in one forward: one DDP forward per backward
                        d_loss = sum(
                            hinge_d_loss(*d(torch.cat([x, recon]))[0].chunk(2)) for d in self.train_discriminators
                        )
                    (d_loss / n).backward()
                totals["d_loss"] += float(d_loss.detach()) / n
            d_norm = clipped_step(self.opt_d, self.discriminators.parameters(), t.grad_clip)
            totals["skipped_step"] = max(totals["skipped_step"], skipped(d_norm))
        return totals
