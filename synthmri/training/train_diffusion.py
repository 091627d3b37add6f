"""Training conditional latent diffusion on the VQ-GAN's standardized latents; the stage that runs it is
:mod:`synthmri.stages.train_diffusion`.

DDPM training with the L2 loss on the predicted noise (or on v, ``diffusion.schedule.prediction``), or
rectified flow (``prediction: flow``: the L2 loss on the velocity ``noise - x0``); condition dropout for
classifier-free guidance, EMA weights for sampling. Uses the same training loop, checkpoints, resume rules
and MLflow run as the VQ-GAN stage.
"""

from __future__ import annotations

from pathlib import Path

import torch

from synthmri.config import DiffusionTrainParams, Params
from synthmri.data.covariates import covariate_rows
from synthmri.data.latents import LatentSet
from synthmri.diffusion.conditioning import CovariateBatch, CovariateEncoder
from synthmri.diffusion.ema import make_ema
from synthmri.diffusion.sampling import sample_seed
from synthmri.diffusion.schedulers import (
    add_noise,
    loss_weights,
    make_training_scheduler,
    sample_timesteps,
    training_target,
)
from synthmri.errors import StageError
from synthmri.logs import get_logger
from synthmri.models.loading import build_ldm
from synthmri.training.distributed import Context
from synthmri.training.loop import ResumableTrainer
from synthmri.training.optim import adamw, clipped_step, lr_scheduler, skipped
from synthmri.training.runtime import autocast, batch_indices, pick_device, seed_everything, to_device

log = get_logger(__name__)


def parameter_groups(model: torch.nn.Module, t: DiffusionTrainParams) -> list[dict]:
    """The optimizer's two groups: the covariate encoder's weights (``model.encoder``) at ``t.lr × t.covariate_lr_scale``
    and every other weight at ``t.lr``. Two groups at any scale, so that a checkpoint's optimizer state always fits."""
    encoder = list(model.encoder.parameters())
    in_encoder = {id(p) for p in encoder}
    rest = [p for p in model.parameters() if id(p) not in in_encoder]
    return [{"params": rest, "lr": t.lr}, {"params": encoder, "lr": t.lr * t.covariate_lr_scale}]


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
        patch, grid = self.cfg.unet.patch_size, tuple(train.latents.shape[2:])
        if any(n % patch for n in grid):
            raise StageError(
                f"diffusion.unet.patch_size={patch} does not divide the latent grid {grid}: pick a patch size "
                "that divides every latent axis (or change normalize.shape / vqgan.model.downsample_factor)"
            )
        self.model = build_ldm(
            self.cfg.unet,
            params.covariates,
            train.latents.shape[1],
            checkpointing=t.activation_checkpointing,
            guided_covariates=t.guided_covariates,
        ).to(self.device)
        self.ema = make_ema(self.model, t.ema_decay)
        self.train_model = self.ctx.prepare(self.model, t.channels_last, t.compile)
        self.optimizer = adamw(parameter_groups(self.model, t), t)
        self.lr_schedule = lr_scheduler(self.optimizer, t)
        self.scheduler = make_training_scheduler(self.cfg.schedule)
        self.train_covariates = self.model.encoder.encode_values(covariate_rows(train.manifest, params.covariates))
        self.checkpoint_dir, self.fingerprint = checkpoint_dir, fingerprint
        self.step, self.history, self.val_history = 0, [], []

    def stateful(self) -> dict:
        return {"model": self.model, "ema": self.ema, "optimizer": self.optimizer, "lr_schedule": self.lr_schedule}

    def draw(
        self,
        shape: torch.Size,
        covariates: CovariateBatch,
        generator: torch.Generator,
        dropout: float,
        guided_dropout: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, CovariateBatch]:
        """Noise, timesteps and condition dropout of a whole (global) batch, from one CPU generator:
        every rank draws the same and takes its rows, so N processes train exactly like one. ``dropout``
        nulls whole conditions, ``guided_dropout`` the guided group alone (validation: both 0)."""
        noise = torch.randn(shape, generator=generator)
        t = sample_timesteps(self.scheduler, shape[0], generator, density=self.cfg.train.timestep_sampling)
        dropped = CovariateEncoder.drop(covariates, dropout, generator)
        return noise, t, self.model.encoder.drop_guided(dropped, guided_dropout, generator)

    def loss(
        self, model: torch.nn.Module, x0: torch.Tensor, covariates: CovariateBatch, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """L2 between the network's prediction and the target (noise, v or the flow velocity) at timesteps
        ``t``, each sample weighted by ``diffusion.train.loss_weighting``
        (:func:`~synthmri.diffusion.schedulers.loss_weights`)."""
        cfg = self.cfg.train
        x0, noise = (to_device(v, self.device, cfg.pin_memory, cfg.channels_last) for v in (x0, noise))
        t, covariates = t.to(self.device), covariates.to(self.device)
        with autocast(self.device, cfg.precision, cfg.cpu_bf16):
            prediction = model(add_noise(self.scheduler, x0, noise, t), t, covariates)
        per_sample = (prediction.float() - training_target(self.scheduler, x0, noise, t)).square()
        per_sample = per_sample.flatten(1).mean(dim=1)
        return (per_sample * loss_weights(self.scheduler, t, cfg.loss_weighting, cfg.min_snr_gamma)).mean()

    def next_step(self) -> dict[str, float]:
        """One optimizer step on the global batch: ``grad_accumulation`` micro-batches per rank."""
        t, ctx = self.cfg.train, self.ctx
        global_batch = t.batch_size * ctx.world_size * t.grad_accumulation
        indices = batch_indices(len(self.train), global_batch, self.params.seed, self.step)
        generator = torch.Generator().manual_seed(sample_seed(self.params.seed, 10_000_000 + self.step))
        noise, timesteps, covariates = self.draw(
            self.train.latents[indices].shape,
            self.train_covariates.select(indices),
            generator,
            t.condition_dropout,
            t.guided_dropout,
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
        grad_norm = clipped_step(self.optimizer, self.model.parameters(), t.grad_clip)
        self.lr_schedule.step()
        self.ema.update_parameters(self.model)
        return ctx.mean({"loss": loss_value, "grad_norm": grad_norm, "skipped_step": skipped(grad_norm)})

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
