"""Noise schedules and samplers: thin, consistently configured wrappers over diffusers' schedulers.

diffusers' schedulers are well tested, handle tensors of any rank (our latents are 5D), and cover
DDPM (ancestral), DDIM and DPM-Solver++ (multistep), so none is written by hand here. Every sampler
is built with ``from_config`` of the *training* scheduler, so betas, prediction type and number of
training timesteps can never disagree between training and sampling.

Choices made here (and why):

- ``clip_sample=False``: diffusers clips the predicted x0 to [-1, 1] by default, which suits images
  but not (scaled) latents, whose values are not bounded.
- ``timestep_spacing="trailing"``: few-step samplers start at the last training timestep (t = T-1),
  where the model was trained on (nearly) pure noise; the default "leading" spacing starts from a
  less noisy t with pure-noise input (Lin et al. 2024, "Common diffusion noise schedules are flawed").
- ``beta_schedule``: ``linear`` (DDPM) or ``cosine`` → diffusers' ``squaredcos_cap_v2`` (improved DDPM).
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from synthmri.config import ScheduleParams

SamplerName = Literal["ddpm", "ddim", "dpm_solver"]
_BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
_SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler}


def make_training_scheduler(p: ScheduleParams) -> DDPMScheduler:
    """The forward (noising) process of training, from ``params.yaml``'s ``diffusion.schedule``."""
    return DDPMScheduler(
        num_train_timesteps=p.num_train_timesteps,
        beta_start=p.beta_start,
        beta_end=p.beta_end,
        beta_schedule=_BETA_SCHEDULES[p.beta_schedule],
        prediction_type=p.prediction,
        clip_sample=False,
        timestep_spacing="trailing",
    )


def make_sampler(name: SamplerName, p: ScheduleParams) -> DDPMScheduler | DDIMScheduler | DPMSolverMultistepScheduler:
    """A reverse-process sampler consistent with the training schedule ``p``.

    ``ddpm``: ancestral sampling (stochastic; best fidelity with many steps). ``ddim``: deterministic
    (eta = 0) few-step sampler. ``dpm_solver``: DPM-Solver++ 2nd-order multistep, deterministic, the
    best quality at 10–25 steps.
    """
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose one of {sorted(_SAMPLERS)}")
    return _SAMPLERS[name].from_config(make_training_scheduler(p).config)


def _alphas(scheduler: DDPMScheduler, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sqrt(ᾱ_t)`` and ``sqrt(1 - ᾱ_t)`` shaped to broadcast against ``like``."""
    abar = scheduler.alphas_cumprod.to(like.device)[t.to(like.device)].to(like.dtype)
    shape = (-1,) + (1,) * (like.ndim - 1)
    return abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)


def add_noise(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise`` (diffusers' ``add_noise``)."""
    return scheduler.add_noise(x0, noise, t)


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network learns to predict: the noise (``epsilon``) or ``v = sqrt(ᾱ)·noise - sqrt(1-ᾱ)·x0``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ValueError(f"unsupported prediction_type '{kind}'")


def signal_to_noise(scheduler: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """``SNR(t) = ᾱ_t / (1 - ᾱ_t)`` of the forward process, float32 ``(len(t),)``."""
    abar = scheduler.alphas_cumprod.to(t.device)[t].float()
    return abar / (1 - abar)


def loss_weights(scheduler: DDPMScheduler, t: torch.Tensor, weighting: str, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weights of the MSE on the training target at timesteps ``t``.

    ``none``: ones. ``min_snr`` (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"):
    the loss on x0 weighted by ``min(SNR, gamma)``, which in terms of the target the network predicts is
    ``min(SNR, gamma) / SNR`` for epsilon (``|eps error|² = SNR·|x0 error|²``) and
    ``min(SNR, gamma) / (SNR + 1)`` for v (``|v error|² = (SNR + 1)·|x0 error|²``).
    """
    if weighting == "none":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting '{weighting}'; choose none or min_snr")
    snr = signal_to_noise(scheduler, t)
    capped = snr.clamp(max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return capped / snr
    if kind == "v_prediction":
        return capped / (snr + 1)
    raise ValueError(f"unsupported prediction_type '{kind}'")


def predicted_x0(
    scheduler: DDPMScheduler, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The clean latent implied by a prediction at ``t`` (for previews and checks).

    epsilon: ``x0 = (x_t - sqrt(1-ᾱ)·eps) / sqrt(ᾱ)``; v: ``x0 = sqrt(ᾱ)·x_t - sqrt(1-ᾱ)·v``.
    """
    a, s = _alphas(scheduler, t, x_t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - s * model_output) / a
    if kind == "v_prediction":
        return a * x_t - s * model_output
    raise ValueError(f"unsupported prediction_type '{kind}'")


def sample_timesteps(
    scheduler: DDPMScheduler,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniform training timesteps in ``[0, T)``, drawn on the CPU generator (reproducible on any device)."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    return t.to(device)
