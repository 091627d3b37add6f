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

``prediction: flow`` is rectified flow / flow matching (Liu et al. 2022, Lipman et al. 2023; as in SD3 and
MAISI) instead of the DDPM process: at ``σ = t / T`` (``T = num_train_timesteps``) the forward process is
``x_t = (1 - σ)·x0 + σ·noise``, the network predicts the velocity ``v = noise - x0``, and
``x0 = x_t - σ·v``. The training scheduler is then diffusers' ``FlowMatchEulerDiscreteScheduler`` (shift 1,
the beta_* settings are unused), and every helper below dispatches on it. The network sees ``t = σ·T``
both in training and in sampling (diffusers' flow samplers hand it ``σ·1000``-style timesteps, with
``1000 = T``):

- training timesteps are the integers ``1 .. T`` (``σ = 1/T .. 1``), not ``0 .. T-1``: the grid of diffusers'
  own flow training sigmas. It holds ``σ = 1`` (pure noise), where both flow samplers start, and leaves out
  ``σ = 0``, where ``x_t = x0`` carries no noise (the target's noise is unpredictable, the SNR infinite);
- samplers: ``ddim`` → deterministic Euler (:class:`FlowEulerScheduler`; on the straight path of rectified
  flow, DDIM with eta = 0 *is* the Euler step ``x ← x + (σ_next - σ)·v``), ``dpm_solver`` → DPM-Solver++
  2M with ``prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1``. Its n steps go from
  ``σ = 1 - 1/T`` down to 0 in equal steps, and it hands the network ``int(σ·T)`` (timesteps cast to int64,
  i.e. truncated: within 1/T of its σ). ``ddpm`` has no flow counterpart here (diffusers' stochastic flow
  Euler re-noises the *mean* x0 prediction, which is not ancestral sampling): a ValueError.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from synthmri.config import ScheduleParams

SamplerName = Literal["ddpm", "ddim", "dpm_solver"]
TimestepDensity = Literal["uniform", "logit_normal"]
_BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
_SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler}
FLOW_SAMPLERS = ("ddim", "dpm_solver")


class FlowEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """diffusers' deterministic flow-matching Euler sampler, on ``n`` equal steps from ``σ = 1`` to 0.

    ``FlowMatchEulerDiscreteScheduler.set_timesteps(n)`` alone puts its ``n`` network calls at
    ``σ = linspace(1, 1/T, n)`` and then steps to 0, so the last call only moves ``σ`` from ``1/T`` to 0:
    10 steps are 9 steps of 1/9 and one of 1/1000. diffusers' SD3 and Flux pipelines pass
    ``sigmas = linspace(1, 1/n, n)`` instead; this does the same for ``set_timesteps(n)``. It also has the
    two attributes that :func:`~synthmri.diffusion.sampling.sample_latents` uses and diffusers' flow Euler
    lacks (0.42): unit initial noise and no input scaling.
    """

    init_noise_sigma = 1.0

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, **kwargs) -> None:
        if sigmas is None and kwargs.get("timesteps") is None and num_inference_steps is not None:
            sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        super().set_timesteps(num_inference_steps, device, sigmas=sigmas, **kwargs)


def is_flow(scheduler) -> bool:
    """Whether ``scheduler`` belongs to a ``prediction: flow`` model: its training scheduler, its Euler sampler, or
    DPM-Solver++ on flow sigmas (whose own ``alphas_cumprod`` are a DDPM default, not the model's)."""
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or bool(
        getattr(scheduler.config, "use_flow_sigmas", False)
    )


def make_training_scheduler(p: ScheduleParams) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The forward (noising) process of training, from ``params.yaml``'s ``diffusion.schedule``."""
    if p.prediction == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=p.num_train_timesteps, shift=1.0)
    return DDPMScheduler(
        num_train_timesteps=p.num_train_timesteps,
        beta_start=p.beta_start,
        beta_end=p.beta_end,
        beta_schedule=_BETA_SCHEDULES[p.beta_schedule],
        prediction_type=p.prediction,
        clip_sample=False,
        timestep_spacing="trailing",
    )


def make_sampler(
    name: SamplerName, p: ScheduleParams
) -> DDPMScheduler | DDIMScheduler | DPMSolverMultistepScheduler | FlowEulerScheduler:
    """A reverse-process sampler consistent with the training schedule ``p``.

    ``ddpm``: ancestral sampling (stochastic; best fidelity with many steps). ``ddim``: deterministic
    (eta = 0) few-step sampler. ``dpm_solver``: DPM-Solver++ 2nd-order multistep, deterministic, the
    best quality at 10–25 steps. A flow model (``prediction: flow``) samples with ``ddim`` (its Euler
    step) or ``dpm_solver`` (on the flow sigmas); see the module docstring.
    """
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose one of {sorted(_SAMPLERS)}")
    if p.prediction == "flow":
        if name == "ddim":
            return FlowEulerScheduler.from_config(make_training_scheduler(p).config)
        if name == "dpm_solver":
            return DPMSolverMultistepScheduler(
                num_train_timesteps=p.num_train_timesteps,
                prediction_type="flow_prediction",
                use_flow_sigmas=True,
                flow_shift=1.0,
                algorithm_type="dpmsolver++",
                solver_order=2,
                final_sigmas_type="zero",
            )
        raise ValueError(f"sampler '{name}' has no flow-matching version: a flow model samples with {FLOW_SAMPLERS}")
    return _SAMPLERS[name].from_config(make_training_scheduler(p).config)


def flow_sigma(scheduler: FlowMatchEulerDiscreteScheduler, t: torch.Tensor) -> torch.Tensor:
    """``σ = t / T`` of a flow model's (integer or fractional) timesteps ``t``, float32 ``(len(t),)``."""
    return t.float() / scheduler.config.num_train_timesteps


def noise_levels(scheduler, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a_t, s_t)`` of the forward process ``x_t = a_t·x0 + s_t·noise``, float32 ``(len(t),)`` each:
    ``(sqrt(ᾱ_t), sqrt(1 - ᾱ_t))`` for DDPM, ``(1 - σ, σ)`` for flow."""
    if is_flow(scheduler):
        sigma = flow_sigma(scheduler, t)
        return 1 - sigma, sigma
    abar = scheduler.alphas_cumprod.to(t.device)[t].float()
    return abar.sqrt(), (1 - abar).sqrt()


def _alphas(scheduler, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`noise_levels` shaped to broadcast against ``like`` (and in its dtype and device)."""
    shape = (-1,) + (1,) * (like.ndim - 1)
    return tuple(level.to(like.dtype).view(shape) for level in noise_levels(scheduler, t.to(like.device)))


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise`` (diffusers' ``add_noise``); flow ``(1 - σ)·x0 + σ·noise``."""
    if is_flow(scheduler):
        a, s = _alphas(scheduler, t, x0)
        return a * x0 + s * noise
    return scheduler.add_noise(x0, noise, t)


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network learns to predict: the noise (``epsilon``), ``v = sqrt(ᾱ)·noise - sqrt(1-ᾱ)·x0``,
    or for flow the velocity ``noise - x0`` of the straight path (the same at every ``t``)."""
    if is_flow(scheduler):
        return noise - x0
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ValueError(f"unsupported prediction_type '{kind}'")


def signal_to_noise(scheduler, t: torch.Tensor) -> torch.Tensor:
    """``SNR(t) = ᾱ_t / (1 - ᾱ_t)`` of the forward process (flow: ``((1 - σ) / σ)²``), float32 ``(len(t),)``."""
    if is_flow(scheduler):
        sigma = flow_sigma(scheduler, t)
        return ((1 - sigma) / sigma).square()
    abar = scheduler.alphas_cumprod.to(t.device)[t].float()
    return abar / (1 - abar)


def loss_weights(scheduler, t: torch.Tensor, weighting: str, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weights of the MSE on the training target at timesteps ``t``.

    ``none``: ones. ``min_snr`` (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"):
    the loss on x0 weighted by ``min(SNR, gamma)``, which in terms of the target the network predicts is
    ``min(SNR, gamma) / SNR`` for epsilon (``|eps error|² = SNR·|x0 error|²``),
    ``min(SNR, gamma) / (SNR + 1)`` for v (``|v error|² = (SNR + 1)·|x0 error|²``) and
    ``min(SNR, gamma)·σ²`` for flow (``x0 = x_t - σ·v``, so ``|v error|² = |x0 error|² / σ²``). Flow's
    ``σ = 1`` (SNR 0) gets weight 0, as v's last, near-zero-SNR timestep gets ~0.
    """
    if weighting == "none":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting '{weighting}'; choose none or min_snr")
    snr = signal_to_noise(scheduler, t)
    capped = snr.clamp(max=gamma)
    if is_flow(scheduler):
        return capped * flow_sigma(scheduler, t).square()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return capped / snr
    if kind == "v_prediction":
        return capped / (snr + 1)
    raise ValueError(f"unsupported prediction_type '{kind}'")


def predicted_x0(scheduler, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean latent implied by a prediction at ``t`` (for previews and checks).

    epsilon: ``x0 = (x_t - sqrt(1-ᾱ)·eps) / sqrt(ᾱ)``; v: ``x0 = sqrt(ᾱ)·x_t - sqrt(1-ᾱ)·v``;
    flow: ``x0 = x_t - σ·v``.
    """
    a, s = _alphas(scheduler, t, x_t)
    if is_flow(scheduler):
        return x_t - s * model_output
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - s * model_output) / a
    if kind == "v_prediction":
        return a * x_t - s * model_output
    raise ValueError(f"unsupported prediction_type '{kind}'")


def sample_timesteps(
    scheduler,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    density: TimestepDensity = "uniform",
) -> torch.Tensor:
    """Training timesteps, drawn on the CPU generator (reproducible on any device).

    ``uniform``: integers in ``[0, T)`` (DDPM) or ``[1, T]`` (flow, ``σ = t/T``: see the module docstring).
    ``logit_normal`` (Esser et al. 2024, SD3's "lognorm(0, 1)"): ``u = sigmoid(z)``, ``z ~ N(0, 1)``, which
    favours the middle noise levels; flow trains at ``t = u·T`` itself (fractional timesteps, ``σ = u``),
    DDPM at the integer ``floor(u·T)``.
    """
    n = scheduler.config.num_train_timesteps
    if density == "logit_normal":
        u = torch.sigmoid(torch.randn(batch_size, generator=generator))
        t = u * n if is_flow(scheduler) else (u * n).long().clamp(0, n - 1)
    elif density != "uniform":
        raise ValueError(f"unknown timestep density '{density}'; choose uniform or logit_normal")
    elif is_flow(scheduler):
        t = torch.randint(1, n + 1, (batch_size,), generator=generator)
    else:
        t = torch.randint(0, n, (batch_size,), generator=generator)
    return t.to(device)
