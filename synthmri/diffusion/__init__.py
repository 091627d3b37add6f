"""Latent diffusion: noise schedules and samplers (diffusers), covariate conditioning, guidance, EMA."""

from synthmri.diffusion.conditioning import ConditionedUNet, CovariateBatch, CovariateEncoder, encode_covariates
from synthmri.diffusion.ema import make_ema
from synthmri.diffusion.sampling import micro_batch_grid, sample_latents, sample_seed
from synthmri.diffusion.schedulers import (
    add_noise,
    loss_weights,
    make_sampler,
    make_training_scheduler,
    predicted_x0,
    sample_timesteps,
    signal_to_noise,
    training_target,
)

__all__ = [
    "ConditionedUNet",
    "CovariateBatch",
    "CovariateEncoder",
    "encode_covariates",
    "make_ema",
    "micro_batch_grid",
    "sample_latents",
    "sample_seed",
    "add_noise",
    "loss_weights",
    "make_sampler",
    "make_training_scheduler",
    "predicted_x0",
    "sample_timesteps",
    "signal_to_noise",
    "training_target",
]
