"""Conditioning, schedules, EMA, guided sampling and its reproducibility, and a real learning check."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from pydantic import ValidationError

from synthmri.config import Covariate, DiffusionParams, Params, SamplerParams, ScheduleParams
from synthmri.diffusion import (
    ConditionedUNet,
    CovariateBatch,
    CovariateEncoder,
    add_noise,
    loss_weights,
    make_ema,
    make_sampler,
    make_training_scheduler,
    micro_batch_grid,
    predicted_x0,
    sample_latents,
    sample_seed,
    sample_timesteps,
    signal_to_noise,
    training_target,
)
from synthmri.diffusion.ema import ema_decay
from synthmri.diffusion.sampling import _guided, guided_step
from synthmri.diffusion.schedulers import FlowEulerScheduler, noise_levels
from synthmri.models.unet import DiffusionUNet

EMB = 32
COVS = Params().covariates[:3]  # age (continuous 18-100), sex (F/M), site (3 levels, optional)


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def _perturbed(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Random non-zero weights everywhere: the zero-initialised U-Net would otherwise predict 0 for any
    input, and every sample / reproducibility check on it would pass vacuously."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def _tiny_unet(**kw) -> DiffusionUNet:
    return DiffusionUNet(3, 4, [16, 32], [False, True], num_heads=2, norm_groups=8, emb_dim=EMB, **kw)


# ------------------------------------------------------------------------------------------------
# conditioning


def test_encode_values_normalises_and_marks_missing():
    enc = CovariateEncoder(COVS, EMB)
    batch = enc.encode_values(
        [
            {"age": 18, "sex": "F", "site": "site3"},
            {"age": 100.0, "sex": "M"},
            {"age": "59", "sex": None, "site": "n/a"},
            {"age": float("nan"), "extra": 1},
        ]
    )
    assert torch.allclose(batch.continuous[:, 0], torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    assert batch.present[:, 0].tolist() == [True, True, True, False]
    assert batch.categorical.tolist() == [[1, 3], [2, 0], [0, 0], [0, 0]]  # NULL = 0, level i -> i + 1
    with pytest.raises(ValueError, match="age"):
        enc.encode_values([{"age": 120}])
    with pytest.raises(ValueError, match="sex"):
        enc.encode_values([{"sex": "X"}])
    with pytest.raises(ValueError, match="range"):
        CovariateEncoder([Covariate(name="bmi", kind="continuous")], EMB)


def test_condition_dropout_p1_is_exactly_null_and_p0_is_identity():
    enc = _perturbed(CovariateEncoder(COVS, EMB))
    batch = enc.encode_values([{"age": 30, "sex": "F", "site": "site1"}, {"age": 70, "sex": "M"}])
    g = torch.Generator().manual_seed(0)
    null_emb, null_tok = enc(enc.null_like(batch))
    dropped_emb, dropped_tok = enc(CovariateEncoder.drop(batch, 1.0, g))
    assert torch.equal(dropped_emb, null_emb) and torch.equal(dropped_tok, null_tok)
    # the null state is a learned vector, not zeros, and it is what the encoder gives for {} rows
    assert null_emb.abs().max() > 0
    assert torch.equal(enc(enc.encode_values([{}, {}]))[0], null_emb)
    kept = CovariateEncoder.drop(batch, 0.0, g)
    assert all(torch.equal(a, b) for a, b in zip(kept, batch, strict=True))
    assert torch.equal(enc(kept)[0], enc(batch)[0])


def test_condition_dropout_drops_whole_samples_reproducibly():
    enc = CovariateEncoder(COVS, EMB)
    batch = enc.encode_values([{"age": 50, "sex": "F", "site": "site2"}] * 400)
    a = CovariateEncoder.drop(batch, 0.3, torch.Generator().manual_seed(7))
    b = CovariateEncoder.drop(batch, 0.3, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    full = a.present[:, 0] & (a.categorical != 0).all(1)
    null = ~a.present[:, 0] & (a.categorical == 0).all(1)
    assert bool((full | null).all())  # never partly dropped: whole condition, as CFG needs
    assert 0.2 < null.float().mean() < 0.4
    each = CovariateEncoder.drop(batch, 0.0, torch.Generator().manual_seed(7), p_each=0.5)
    given = torch.cat([each.present, each.categorical != 0], dim=1)
    partial = given.any(1) & ~given.all(1)
    assert partial.any()  # p_each creates partially specified conditions


def test_a_guided_group_is_the_reference_of_guidance_and_is_dropped_alone():
    """With ``guided=[age, sex]`` guidance's reference is "age and sex unspecified, site as asked", and
    training drops exactly that group (the site kept) at the given rate."""
    enc = _perturbed(CovariateEncoder(COVS, EMB, guided=["age", "sex"]))
    batch = enc.encode_values([{"age": 30, "sex": "F", "site": "site1"}, {"age": 70, "sex": "M", "site": "site3"}])
    ref = enc.guidance_reference(batch)
    assert not ref.present[:, 0].any() and not ref.continuous[:, 0].any()  # age unspecified
    assert not ref.categorical[:, 0].any()  # sex unspecified
    assert torch.equal(ref.categorical[:, 1], batch.categorical[:, 1])  # site as asked
    tokens_ref, tokens_full, tokens_null = enc(ref)[1], enc(batch)[1], enc(enc.null_like(batch))[1]
    assert torch.equal(tokens_ref[:, :2], tokens_null[:, :2]) and torch.equal(tokens_ref[:, 2], tokens_full[:, 2])
    # without a group the reference is the whole null condition, and group dropout draws nothing
    plain = CovariateEncoder(COVS, EMB)
    assert all(torch.equal(a, b) for a, b in zip(plain.guidance_reference(batch), plain.null_like(batch), strict=True))
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert plain.drop_guided(batch, 0.5, g) is batch and torch.equal(g.get_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(enc.drop_guided(batch, 1.0, g), ref, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(enc.drop_guided(batch, 0.0, g), batch, strict=True))
    many = enc.encode_values([{"age": 50, "sex": "F", "site": "site2"}] * 400)
    dropped = enc.drop_guided(many, 0.3, torch.Generator().manual_seed(1))
    group_null = ~dropped.present[:, 0] & (dropped.categorical[:, 0] == 0)
    group_kept = dropped.present[:, 0] & (dropped.categorical[:, 0] != 0)
    assert bool((group_null | group_kept).all()) and bool((dropped.categorical[:, 1] == 2).all())
    assert 0.2 < group_null.float().mean() < 0.4
    with pytest.raises(ValueError, match="guided covariates"):
        CovariateEncoder(COVS, EMB, guided=["bmi"])
    with pytest.raises(ValidationError, match="guided_covariates"):
        Params(diffusion={"train": {"guided_covariates": ["age", "bmi"]}})


def test_partial_conditioning_differs_from_full_and_null():
    enc = _perturbed(CovariateEncoder(COVS, EMB))
    full, partial, null = (
        enc(enc.encode_values([row])) for row in ({"age": 50, "sex": "F"}, {"age": 50, "sex": None}, {})
    )
    assert (full[0] - partial[0]).abs().max() > 1e-3
    assert (partial[0] - null[0]).abs().max() > 1e-3
    # tokens: the given age is embedded as in the full row; the missing sex is the null sex token
    assert torch.equal(partial[1][:, 0], full[1][:, 0])
    assert torch.equal(partial[1][:, 1], null[1][:, 1])
    assert torch.allclose(partial[0], partial[1].sum(1))
    # "age unspecified" is its own learned state, not the mid-range age (which encodes to 0.0)
    mid, unknown = (enc(enc.encode_values([row]))[0] for row in ({"age": 59, "sex": "F"}, {"sex": "F"}))
    assert (mid - unknown).abs().max() > 1e-3


def test_covariate_batch_is_a_tuple_that_selects_and_concatenates():
    enc = CovariateEncoder(COVS, EMB)
    batch = enc.encode_values([{"age": 20, "sex": "F"}, {"sex": "M"}, {}])
    one = batch.select([1])
    assert one.batch_size == 1 and one.categorical.tolist() == [[2, 0]]
    again = CovariateBatch.cat([batch.select(slice(0, 1)), batch.select(slice(1, 3))])
    assert all(torch.equal(x, y) for x, y in zip(again, batch, strict=True))


def test_no_covariates_gives_zero_embedding():
    enc = CovariateEncoder([], EMB)
    emb, tokens = enc(enc.encode_values([{}, {}]))
    assert emb.shape == (2, EMB) and tokens.shape == (2, 0, EMB) and not emb.any()


# ------------------------------------------------------------------------------------------------
# schedules


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_targets_are_consistent_with_noising(schedule, prediction):
    p = ScheduleParams(beta_schedule=schedule, prediction=prediction)
    sched = make_training_scheduler(p)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 3, 4, 5, generator=g), torch.randn(4, 2, 3, 4, 5, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    x_t = add_noise(sched, x0, noise, t)
    assert torch.allclose(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6)
    target = training_target(sched, x0, noise, t)
    expected = noise if prediction == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
    assert torch.allclose(target, expected, atol=1e-6)
    # a perfect prediction gives back x0 (epsilon: except where sqrt(abar) ~ 0 amplifies rounding)
    rec = predicted_x0(sched, x_t, target, t)
    ok = abar.view(-1) > 1e-3 if prediction == "epsilon" else torch.ones(4, dtype=torch.bool)
    assert torch.allclose(rec[ok], x0[ok], atol=1e-4)


def test_flow_noising_target_and_x0_identities():
    """``prediction: flow``: x_t = (1 - s)·x0 + s·noise at s = t / T, i.e. diffusers' own flow noising at its
    training timesteps (integer or fractional), the target is noise - x0, and predicted_x0 inverts it at every
    noise level, pure noise (s = 1) included."""
    sched = make_training_scheduler(ScheduleParams(prediction="flow"))
    assert isinstance(sched, FlowMatchEulerDiscreteScheduler) and sched.config.shift == 1.0
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 2, 3, 4, 5, generator=g), torch.randn(5, 2, 3, 4, 5, generator=g)
    for t in (torch.tensor([1, 250, 600, 999, 1000]), torch.tensor([0.5, 123.4, 500.0, 987.6, 1000.0])):
        sigma = (t / 1000).view(-1, 1, 1, 1, 1)
        x_t = add_noise(sched, x0, noise, t)
        assert torch.allclose(x_t, (1 - sigma) * x0 + sigma * noise, atol=1e-6)
        assert torch.equal(x_t[-1], noise[-1])  # t = T: pure noise, where the flow samplers start
        target = training_target(sched, x0, noise, t)
        assert torch.equal(target, noise - x0)
        assert torch.allclose(predicted_x0(sched, x_t, target, t), x0, atol=1e-5)
        a, s = noise_levels(sched, t)
        assert torch.allclose(a, 1 - sigma.view(-1)) and torch.allclose(s, sigma.view(-1))
    # diffusers' forward process of flow matching, at its own training timesteps (sigma * T, T .. 1)
    t = sched.timesteps[[999, 750, 400, 1, 0]]
    assert torch.allclose(t, torch.tensor([1.0, 250.0, 600.0, 999.0, 1000.0]))
    assert torch.allclose(add_noise(sched, x0, noise, t), sched.scale_noise(x0, t, noise), atol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "flow"])
def test_min_snr_weights_are_the_capped_snr_on_the_x0_error(prediction):
    """Hang et al. 2023: weight x (error on the network's target)^2 == min(SNR, gamma) x (implied x0 error)^2,
    checked against the x0 that :func:`predicted_x0` recovers from a perturbed prediction (flow: SNR at
    sigma = t / T is ((1 - sigma) / sigma)^2)."""
    sched = make_training_scheduler(ScheduleParams(prediction=prediction))
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1, 50, 200, 500, 999])
    x0, noise = torch.randn(5, 2, 3, 3, 3, generator=g), torch.randn(5, 2, 3, 3, 3, generator=g)
    target = training_target(sched, x0, noise, t)
    wrong = target + 0.1 * torch.randn(target.shape, generator=g)
    x_t = add_noise(sched, x0, noise, t)
    x0_error = (predicted_x0(sched, x_t, wrong, t) - x0).square().flatten(1).sum(1).double()
    target_error = (wrong - target).square().flatten(1).sum(1).double()
    snr = signal_to_noise(sched, t).double()
    if prediction == "flow":
        sigma = t.double() / 1000
        assert torch.allclose(snr, ((1 - sigma) / sigma).square(), rtol=1e-5)
    else:
        assert torch.allclose(snr, (sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])).double(), rtol=1e-5)
    gamma = 5.0
    weights = loss_weights(sched, t, "min_snr", gamma).double()
    assert torch.allclose(weights * target_error, snr.clamp(max=gamma) * x0_error, rtol=2e-3)
    assert (snr[:2] > gamma).all() and (snr[-2:] < gamma).all()  # both sides of the cap are exercised
    assert torch.equal(loss_weights(sched, t, "none"), torch.ones(5))
    with pytest.raises(ValueError, match="loss weighting"):
        loss_weights(sched, t, "p2")


def test_samplers_share_the_training_schedule():
    p = ScheduleParams(beta_schedule="cosine", prediction="v_prediction", num_train_timesteps=500)
    train = make_training_scheduler(p)
    assert train.config.beta_schedule == "squaredcos_cap_v2" and not train.config.clip_sample
    for name, cls in [
        ("ddpm", "DDPMScheduler"),
        ("ddim", "DDIMScheduler"),
        ("dpm_solver", "DPMSolverMultistepScheduler"),
    ]:
        s = make_sampler(name, p)
        assert type(s).__name__ == cls
        assert s.config.num_train_timesteps == 500 and s.config.prediction_type == "v_prediction"
        assert torch.allclose(s.alphas_cumprod, train.alphas_cumprod)
        s.set_timesteps(10)
        assert int(s.timesteps[0]) == 499  # trailing spacing: start from pure noise
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("euler", p)


def test_flow_samplers_hand_the_network_the_training_timestep_scale():
    """A flow model samples with ddim (deterministic Euler, on n equal steps) or DPM-Solver++ on the flow
    sigmas; both start at pure noise and hand the network t = sigma·T, the scale it was trained on (DPM-Solver
    truncates it to an integer: within 1/T), and only timesteps that training draws."""
    p = ScheduleParams(prediction="flow", num_train_timesteps=500)
    train = make_training_scheduler(p)
    trained = sample_timesteps(train, 20_000, torch.Generator().manual_seed(0))
    euler, dpm = make_sampler("ddim", p), make_sampler("dpm_solver", p)
    assert isinstance(euler, FlowEulerScheduler) and isinstance(euler, FlowMatchEulerDiscreteScheduler)
    assert not euler.config.stochastic_sampling and euler.config.shift == 1.0
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert dpm.config.prediction_type == "flow_prediction" and dpm.config.use_flow_sigmas
    assert dpm.config.flow_shift == 1.0 and dpm.config.algorithm_type == "dpmsolver++"
    for s in (euler, dpm):
        assert s.config.num_train_timesteps == 500
        s.set_timesteps(10)
        t, sigmas = s.timesteps.double(), s.sigmas.double()
        assert len(t) == 10 and sigmas[-1] == 0
        assert sigmas[0] >= 1 - 1 / 500  # the chain starts from (nearly) pure noise
        assert (t / 500 - sigmas[:-1]).abs().max() <= 1 / 500  # the network's t means what training's t means
        assert t.min() >= trained.min() and t.max() <= trained.max()  # timesteps the model was trained on
    assert torch.allclose(euler.sigmas, torch.linspace(1, 0, 11))  # 10 equal Euler steps
    assert torch.equal(euler.timesteps, euler.sigmas[:-1] * 500)
    with pytest.raises(ValueError, match="flow"):
        make_sampler("ddpm", p)
    with pytest.raises(ValueError, match="flow model samples with"):
        DiffusionParams(schedule=p, sampler=SamplerParams(sampler="ddpm"))


def test_sample_timesteps_uniform_and_reproducible():
    sched = make_training_scheduler(ScheduleParams(num_train_timesteps=10, prediction="v_prediction"))
    a = sample_timesteps(sched, 1000, torch.Generator().manual_seed(1))
    assert torch.equal(a, sample_timesteps(sched, 1000, torch.Generator().manual_seed(1)))
    assert a.min() == 0 and a.max() == 9
    # flow: t = 1 .. T (sigma = t / T: pure noise included, the noiseless sigma = 0 left out)
    flow = make_training_scheduler(ScheduleParams(num_train_timesteps=10, prediction="flow"))
    b = sample_timesteps(flow, 1000, torch.Generator().manual_seed(1))
    assert torch.equal(b, sample_timesteps(flow, 1000, torch.Generator().manual_seed(1)))
    assert b.dtype == torch.int64 and b.min() == 1 and b.max() == 10


def test_logit_normal_timesteps_follow_sd3_density_and_are_reproducible():
    """SD3's logit-normal density: t / T = sigmoid(z), z ~ N(0, 1), from the CPU generator; fractional for flow,
    the integer floor(t) in [0, T) for DDPM. P(1/4 < t/T < 3/4) = P(|z| < ln 3) = 0.7275 (uniform: 0.5)."""
    for prediction in ("flow", "v_prediction"):
        sched = make_training_scheduler(ScheduleParams(prediction=prediction))
        draw = [sample_timesteps(sched, 20_000, torch.Generator().manual_seed(3), density="logit_normal") for _ in "ab"]
        assert torch.equal(draw[0], draw[1])
        t = draw[0]
        if prediction == "flow":
            assert t.is_floating_point() and 0 < t.min() and t.max() < 1000
        else:
            assert t.dtype == torch.int64 and 0 <= t.min() and t.max() <= 999
        z = torch.logit((t.double() + (0 if prediction == "flow" else 0.5)) / 1000)
        assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
        assert abs(((t > 250) & (t < 750)).double().mean() - 0.7275) < 0.015
    with pytest.raises(ValueError, match="timestep density"):
        sample_timesteps(sched, 4, density="beta")


class _ExactDenoiser(torch.nn.Module):
    """The exact prediction for latents whose elements are i.i.d. N(mean, std²): the posterior mean
    ``E[x0 | x_t]`` (the Wiener filter) under the training scheduler's forward process, turned into the
    network's target by the training helpers. It reads the timestep that the sampler hands it the way training
    does (``t_scale`` != 1: a network that reads it on another scale), and records them."""

    def __init__(self, scheduler, mean: float, std: float, t_scale: float = 1.0) -> None:
        super().__init__()
        self.scheduler, self.mean, self.std, self.t_scale, self.seen = scheduler, mean, std, t_scale, []

    def forward(self, x, t, emb, tokens):
        self.seen.append(float(t))
        t = torch.as_tensor(t).reshape(1).expand(len(x))
        t = t * self.t_scale if self.t_scale != 1 else t
        a, s = (v.view(-1, *[1] * (x.ndim - 1)) for v in noise_levels(self.scheduler, t))
        x0 = self.mean + a * self.std**2 / (a**2 * self.std**2 + s**2) * (x - a * self.mean)
        return training_target(self.scheduler, x0, (x - a * x0) / s, t)


@pytest.mark.parametrize(
    "prediction,sampler",
    [("flow", "ddim"), ("flow", "dpm_solver"), ("v_prediction", "ddim"), ("v_prediction", "dpm_solver")],
)
def test_samplers_turn_noise_into_the_data_given_the_exact_denoiser(prediction, sampler):
    """With the exact prediction for data N(0.5, 0.3²), the sampler's output has the data's mean and std, and the
    network saw the training scale of t starting from pure noise. Measured (100 steps, 16 samples of 4^4): means
    within 0.007 of 0.5, stds 0.286-0.301 (v_prediction's ddim converges slowest); a flow network reading t at
    half its scale puts the mean at 0.60 and fails. (At 10 steps the stds fall to 0.25-0.28 for flow, 0.18-0.19
    for v: the steps' discretization error, not the convention.)"""
    p = ScheduleParams(prediction=prediction)
    train = make_training_scheduler(p)

    def draw(model):
        return sample_latents(
            model, CovariateEncoder([], EMB), make_sampler(sampler, p), [{}] * 16, (4, 4, 4, 4), 100, 1.0,
            seeds=list(range(16)), micro_batch=16,
        )  # fmt: skip

    exact = _ExactDenoiser(train, 0.5, 0.3)
    z = draw(exact)
    assert abs(z.mean().item() - 0.5) < 0.02 and abs(z.std().item() - 0.3) < 0.03, (z.mean(), z.std())
    assert exact.seen[0] >= 999 and len(exact.seen) == 100  # pure noise first, on the scale T = 1000
    if prediction == "flow":
        assert 1 <= min(exact.seen) and max(exact.seen) <= 1000  # inside the training timesteps 1 .. T
        assert abs(draw(_ExactDenoiser(train, 0.5, 0.3, t_scale=0.5)).mean().item() - 0.5) > 0.05


# ------------------------------------------------------------------------------------------------
# EMA


def test_ema_warmup_average_and_state_round_trip():
    model = torch.nn.Linear(3, 2)
    ema = make_ema(model, decay=0.9)
    ema.update_parameters(model)  # first update copies
    assert torch.equal(ema.module.weight, model.weight)
    with torch.no_grad():
        before = ema.module.weight.clone()
        model.weight.add_(1.0)
    ema.update_parameters(model)
    d = ema_decay(0.9, 1)  # warm-up: (1 + 1) / (10 + 1) < 0.9
    assert d == pytest.approx(2 / 11)
    assert torch.allclose(ema.module.weight, d * before + (1 - d) * model.weight)
    assert ema_decay(0.9, 10_000) == 0.9 and ema_decay(0.9, 0, warmup=False) == 0.9
    # round trip through a checkpoint dict: same weights, same update count, same next update
    restored = make_ema(torch.nn.Linear(3, 2), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert int(restored.n_averaged) == 2
    for e in (ema, restored):
        e.update_parameters(model)
    assert torch.equal(ema.module.weight, restored.module.weight)
    assert not any(p.requires_grad for p in ema.parameters())


# ------------------------------------------------------------------------------------------------
# sampling: guidance and reproducibility


def _random_model_and_encoder():
    covs = [
        Covariate(name="age", kind="continuous", range=(0, 1)),
        Covariate(name="sex", kind="categorical", levels=["F", "M"]),
    ]
    return _perturbed(_tiny_unet(cross_attention=True), seed=3), _perturbed(CovariateEncoder(covs, EMB), seed=4)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest value (a random network's samples reach ~100s)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


ROWS = [{"age": 0.2, "sex": "F"}, {"age": 0.9, "sex": None}, {"sex": "M"}]


@pytest.mark.parametrize(
    "sampler,prediction",
    [("ddpm", "v_prediction"), ("ddim", "v_prediction"), ("dpm_solver", "v_prediction"), ("ddim", "flow"),
     ("dpm_solver", "flow")],
)  # fmt: skip
def test_sampling_is_reproducible_and_per_sample(sampler, prediction):
    model, enc = _random_model_and_encoder()
    sched = make_sampler(sampler, ScheduleParams(prediction=prediction))
    seeds = [sample_seed(1234, i) for i in range(3)]

    def run(rows, sds, **kw):
        return sample_latents(model, enc, sched, rows, (4, 5, 6, 5), steps=8, guidance_scale=2.0, seeds=sds, **kw)

    batch = run(ROWS, seeds)
    assert batch.shape == (3, 4, 5, 6, 5) and torch.isfinite(batch).all()
    assert torch.equal(batch, run(ROWS, seeds))  # same seeds -> bitwise identical
    for i in range(3):  # any sample regenerated alone is bitwise identical
        assert torch.equal(run(ROWS[i : i + 1], seeds[i : i + 1]), batch[i : i + 1])
    assert (batch[0] - batch[1]).abs().max() > 1e-2
    assert not torch.equal(run(ROWS, [s + 1 for s in seeds]), batch)
    # micro-batched chains: per-sample noise streams (also DDPM's per-step noise) and the fixed grid keep
    # each sample's bits whatever its neighbours (fillers or other rows); another micro-batch size only
    # changes the network's rounding, where a shared noise stream would differ by O(1)
    fast = run(ROWS, seeds, micro_batch=4)
    assert _rel_diff(fast, batch) < 1e-4
    for i in range(3):
        assert torch.equal(run(ROWS[i : i + 1], seeds[i : i + 1], micro_batch=4, slots=[i]), fast[i : i + 1])
    others = [{"age": 0.5, "sex": "M"}, {"sex": "F"}, {"age": 0.1}]
    mixed = run([others[0], ROWS[1], others[2]], [7, seeds[1], 9], micro_batch=4)
    assert torch.equal(mixed[1], fast[1])
    # explicit generators are accepted as well, and give the same result as their seeds
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    assert torch.equal(sample_latents(model, enc, sched, ROWS, (4, 5, 6, 5), 8, 2.0, generators=gens), batch)


def test_micro_batch_grid_places_each_row_at_its_slot_and_pads_the_rest():
    assert micro_batch_grid([0, 1, 2, 3, 4], 4) == [[0, 1, 2, 3], [4, None, None, None]]
    assert micro_batch_grid([9, 5], 4) == [[None, 1, None, None], [None, 0, None, None]]  # slots 5 and 9
    assert micro_batch_grid([3], 1) == [[0]]
    with pytest.raises(ValueError, match="unique"):
        micro_batch_grid([1, 1], 2)
    with pytest.raises(ValueError, match=">= 1"):
        micro_batch_grid([0], 0)


def test_guidance_zero_ignores_covariates_and_positive_uses_them():
    model, enc = _random_model_and_encoder()
    sched = make_sampler("ddim", ScheduleParams())
    rows, seeds = [{"age": 0.1, "sex": "F"}, {"age": 0.8, "sex": "M"}], [5, 5]
    uncond = sample_latents(model, enc, sched, rows, (4, 4, 4, 4), 6, guidance_scale=0.0, seeds=seeds)
    assert torch.equal(uncond[0], uncond[1])
    guided = sample_latents(model, enc, sched, rows, (4, 4, 4, 4), 6, guidance_scale=3.0, seeds=seeds)
    assert (guided[0] - guided[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one generator/seed per sample"):
        sample_latents(model, enc, sched, rows, (4, 4, 4, 4), 6, 1.0, seeds=[1])


class _EmbeddingSpy(torch.nn.Module):
    """The denoiser, recording the condition embeddings it is called with."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.embeddings = inner, []

    def forward(self, x, t, emb, tokens):
        self.embeddings.append(emb.detach().clone())
        return self.inner(x, t, emb, tokens)


def test_guidance_with_a_guided_group_amplifies_against_the_group_null():
    model, enc = _random_model_and_encoder()  # age, sex
    grouped = CovariateEncoder(enc.covariates, EMB, guided=["age"])
    grouped.load_state_dict(enc.state_dict())
    sched = make_sampler("dpm_solver", ScheduleParams(prediction="flow"))
    rows, seeds = [{"age": 0.2, "sex": "F"}], [5]

    def run(encoder, scale):
        spy = _EmbeddingSpy(model)
        z = sample_latents(spy, encoder, sched, rows, (4, 4, 4, 4), 6, scale, seeds=seeds)
        return z, spy.embeddings

    z_group, calls = run(grouped, 3.0)
    age_null = grouped(grouped.encode_values([{"sex": "F"}]))[0]
    whole_null = grouped(grouped.encode_values([{}]))[0]
    assert all(torch.equal(emb[1:], age_null) for emb in calls)  # the reference: age unspecified, sex as asked
    assert (age_null - whole_null).abs().max() > 1e-3
    z_all, _ = run(enc, 3.0)
    assert (z_group - z_all).abs().max() > 1e-3
    assert torch.equal(run(grouped, 1.0)[0], run(enc, 1.0)[0])  # conditional only: no reference at all


def test_two_guidance_terms_guide_the_group_and_the_rest_at_their_own_scales():
    """``rest_guidance_scale`` r: ``eps_null + r (eps_ref - eps_null) + s (eps_cond - eps_ref)``, run as one forward
    of three branches (conditional, group unspecified, all unspecified). r = 1 is the one-term group guidance
    (two branches), r = s guides every covariate at s; a model without a group refuses r != 1."""
    model, enc = _random_model_and_encoder()  # age, sex
    grouped = CovariateEncoder(enc.covariates, EMB, guided=["age"])
    grouped.load_state_dict(enc.state_dict())
    sched = make_sampler("dpm_solver", ScheduleParams(prediction="flow"))
    rows, seeds = [{"age": 0.2, "sex": "F"}, {"age": 0.7, "sex": "M"}], [5, 6]

    def run(encoder, scale, rest=1.0):
        spy = _EmbeddingSpy(model)
        z = sample_latents(
            spy, encoder, sched, rows, (4, 4, 4, 4), 6, scale, seeds=seeds, micro_batch=2, rest_guidance_scale=rest
        )  # both rows in one chain: one network call per step
        return z, spy.embeddings

    two_terms, calls = run(grouped, 3.0, 1.5)
    cond = grouped(grouped.encode_values(rows))[0]
    age_null = grouped(grouped.encode_values([{"sex": r["sex"]} for r in rows]))[0]
    whole_null = grouped(grouped.encode_values([{}, {}]))[0]
    assert all(torch.equal(emb, torch.cat([cond, age_null, whole_null])) for emb in calls)
    one_term, one_calls = run(grouped, 3.0)
    assert all(len(emb) == 2 * len(rows) for emb in one_calls)  # r = 1: no unconditional branch
    assert (two_terms - one_term).abs().max() > 1e-3
    every = run(enc, 3.0)[0]  # every covariate guided at 3
    assert (two_terms - every).abs().max() > 1e-3
    assert _rel_diff(run(grouped, 3.0, 3.0)[0], every) < 1e-4  # r = s: the same guidance, up to rounding
    cond_out, ref_out, null_out = torch.tensor(5.0), torch.tensor(3.0), torch.tensor(2.0)  # the combination itself
    assert float(_guided((cond_out, ref_out, null_out), 3.0, 1.5)) == 2.0 + 1.5 * (3.0 - 2.0) + 3.0 * (5.0 - 3.0)
    assert float(_guided((cond_out, ref_out), 3.0, 1.0)) == 3.0 + 3.0 * (5.0 - 3.0)
    with pytest.raises(ValueError, match="guided covariate group"):
        run(enc, 3.0, 1.5)
    with pytest.raises(ValidationError, match="rest_guidance_scale"):
        DiffusionParams(train={"guided_covariates": None}, sampler={"rest_guidance_scale": 1.5})
    assert DiffusionParams(train={"guided_covariates": ["age"]}, sampler={"rest_guidance_scale": 1.5})
    # a params.yaml from before the second term, with the group off: no second term (not an error)
    assert DiffusionParams(train={"guided_covariates": None}, sampler={"steps": 10}).sampler.rest_guidance_scale == 1
    assert DiffusionParams(train={"guided_covariates": None}).sampler.rest_guidance_scale == 1


@pytest.mark.parametrize("prediction,sampler", [("flow", "dpm_solver"), ("v_prediction", "ddim")])
def test_guidance_interval_guides_only_the_steps_inside_it(prediction, sampler):
    model, enc = _random_model_and_encoder()
    sched = make_sampler(sampler, ScheduleParams(prediction=prediction))
    rows, seeds = [{"age": 0.1, "sex": "F"}, {"age": 0.8, "sex": "M"}], [5, 6]

    def run(scale, interval=None):
        return sample_latents(model, enc, sched, rows, (4, 4, 4, 4), 6, scale, seeds=seeds, guidance_interval=interval)

    guided, conditional = run(3.0), run(1.0)
    assert torch.equal(run(3.0, (0.0, 1e9)), guided)  # every step inside: plain guidance
    assert torch.equal(run(3.0, (1e6, 1e7)), conditional)  # no step inside: conditional only
    partial = run(3.0, (0.28, 5.42))
    assert (partial - guided).abs().max() > 1e-4 and (partial - conditional).abs().max() > 1e-4
    # the noise level is EDM's sigma = 1/sqrt(SNR): the first step (pure noise) is outside, a middle one inside
    sched.set_timesteps(6)
    levels = signal_to_noise(sched, sched.timesteps).rsqrt()
    inside = [guided_step(sched, t, (0.28, 5.42)) for t in sched.timesteps]
    assert inside == [bool(0.28 < s <= 5.42) for s in levels.tolist()] and not inside[0] and any(inside)


def test_guidance_interval_must_be_ordered():
    assert SamplerParams(guidance_interval=(0.28, 5.42)).guidance_interval == (0.28, 5.42)
    with pytest.raises(ValidationError, match="low < high"):
        SamplerParams(guidance_interval=(5.0, 1.0))


def test_sample_seed_is_stable_and_unrelated_across_indices():
    seeds = [sample_seed(1234, i) for i in range(100)]
    assert len(set(seeds)) == 100 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [sample_seed(1234, i) for i in range(100)]
    assert sample_seed(1234, 1) != sample_seed(1235, 0)


# ------------------------------------------------------------------------------------------------
# learning: conditioning + guidance actually steer samples


def _two_cluster_setup(prediction: str):
    """Latents are +1 (sex F) or -1 (sex M) everywhere plus noise of 0.1; a tiny U-Net + encoder."""
    torch.manual_seed(0)
    covs = [
        Covariate(name="sex", kind="categorical", levels=["F", "M"]),
        Covariate(name="age", kind="continuous", range=(0, 1), required=False),
    ]
    enc = CovariateEncoder(covs, 64)
    model = DiffusionUNet(3, 4, [16, 32], [False, True], num_heads=2, emb_dim=64)
    p = ScheduleParams(prediction=prediction)
    g = torch.Generator().manual_seed(0)
    n = 32
    sex = ["F", "M"] * (n // 2)
    centre = torch.tensor([1.0 if s == "F" else -1.0 for s in sex]).view(n, 1, 1, 1, 1)
    latents = centre + 0.1 * torch.randn(n, 4, 4, 4, 4, generator=g)
    return model, enc, p, latents, enc.encode_values([{"sex": s} for s in sex]), g


def _train(model, enc, p, latents, covariates, g, steps: int, batch_size: int = 16) -> list[float]:
    """The training step of the diffusion stage: condition dropout, uniform t, L2 on the target (eps, v or
    the flow velocity, whichever ``p.prediction`` says).

    The learning rate decays to 0 (cosine) so that the weights settle by the last step: at a constant
    2e-3 the final weights still jump with the last batches, and where a sample lands varied by up to
    0.3 across training seeds and CPU code paths; with the decay, by at most 0.15 (guidance 1).
    """
    sched = make_training_scheduler(p)
    denoiser = ConditionedUNet(model, enc)  # one module: what DDP / EMA / checkpoints see
    opt = torch.optim.AdamW(denoiser.parameters(), lr=2e-3, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    denoiser.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        cond = CovariateEncoder.drop(covariates.select(idx), 0.15, g)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = sample_timesteps(sched, batch_size, g)
        pred = denoiser(add_noise(sched, x0, noise, t), t, cond)
        loss = (pred - training_target(sched, x0, noise, t)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        losses.append(loss.item())
    return losses


def test_noise_prediction_loss_decreases():
    losses = _train(*_two_cluster_setup("epsilon"), steps=80)
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("prediction", ["v_prediction", "flow"])
def test_model_learns_two_clusters_and_guidance_hits_each(prediction):
    """After a short training with condition dropout, each condition's samples land on its own cluster,
    and swapping the condition on the same noise swaps the cluster.

    v-prediction (the ``prediction: v_prediction`` option) is used here because it fits this in budget:
    measured with this very setup, an eps-prediction model had not learned the conditioning even
    after 700 steps (samples at +1.2 / +0.9 for F / M, each sample's mean following its initial
    noise), while v-prediction puts every sample within ~0.1 of its cluster after 300 steps. The
    eps loss weights the high-noise timesteps, where the covariates decide the cluster, by the tiny
    SNR, so its conditioning is learned much later.

    What is asserted, and why it holds on any CPU: with the learning rate decayed to 0 (``_train``),
    the conditional model (guidance 1) puts every sample within 0.15 of its cluster centre, measured
    over 8 training seeds x 2 CPU code paths (ATEN_CPU_CAPABILITY=avx2 and =default, i.e. vectorized
    and scalar kernels), both samplers, both condition orders; the test asks for 0.25. Guidance 2
    extrapolates past the conditional model, so where it lands depends more on the model's last bits
    (measured: within 0.34; at a constant learning rate one Intel machine put the +1 cluster at 0.69):
    the test asks for 0.5, i.e. the right side of the boundary between the clusters.

    Rectified flow (``prediction: flow``, sampled with Euler as ``ddim`` and DPM-Solver++ on the flow sigmas)
    trains the same way and meets the same bounds: measured over 8 training seeds x both condition orders
    (and 4 seeds on the scalar kernels, one order), every sample within 0.17 of its centre at guidance 1 and
    2. Its loss falls less (the velocity noise - x0 keeps an unpredictable part at every t): last/first 0.78
    at this seed, 0.29-0.57 at 7 others. Neither model learns the clusters' 0.1 spread in 300 steps (each
    sample's voxels keep a std of 0.3-1.0 with flow over the 8 seeds, 0.8-1.0 with v at this seed), so only
    where the samples land is asserted here; the samplers' means and stds are checked against the exact
    denoiser (``test_samplers_turn_noise_into_the_data_given_the_exact_denoiser``).
    """
    model, enc, p, latents, covariates, g = _two_cluster_setup(prediction)
    losses = _train(model, enc, p, latents, covariates, g, steps=300)
    assert sum(losses[-50:]) / 50 < (0.6 if prediction == "v_prediction" else 0.9) * sum(losses[:20]) / 20

    seeds = [sample_seed(0, i) for i in range(8)]
    for name in ("ddim", "dpm_solver"):
        for sexes in (["F"] * 4 + ["M"] * 4, ["M"] * 4 + ["F"] * 4):  # the same noise, conditions swapped
            rows = [{"sex": s} for s in sexes]
            centre = torch.tensor([1.0 if s == "F" else -1.0 for s in sexes])
            for scale, tolerance in ((1.0, 0.25), (2.0, 0.5)):
                out = sample_latents(
                    model, enc, make_sampler(name, p), rows, (4, 4, 4, 4), steps=20, guidance_scale=scale, seeds=seeds
                )
                per_sample = out.mean(dim=(1, 2, 3, 4))
                assert ((per_sample - centre).abs() < tolerance).all(), (name, scale, sexes, per_sample)
        # unconditional sampling from the same seeds ignores the requested sex
        uncond = sample_latents(
            model, enc, make_sampler(name, p), rows, (4, 4, 4, 4), steps=20, guidance_scale=0.0, seeds=seeds
        )
        assert torch.equal(
            uncond[:4],
            sample_latents(
                model, enc, make_sampler(name, p), rows[4:], (4, 4, 4, 4), steps=20, guidance_scale=0.0, seeds=seeds[:4]
            ),
        )


def _write_latent_dir(path, latents: torch.Tensor, **columns) -> None:
    """A ``data/latents``-like folder: latents, a manifest (all in the training split) and ``scale.json``."""
    import json

    import pandas as pd
    from safetensors.torch import save_file

    n = len(latents)
    save_file({"latents": latents}, str(path / "latents.safetensors"))
    pd.DataFrame({"subject_id": [f"s{i}" for i in range(n)], "split": ["train"] * n, **columns}).to_csv(
        path / "manifest.csv", index=False
    )
    mean, std = latents.mean(dim=(0, 2, 3, 4)), latents.std(dim=(0, 2, 3, 4))
    (path / "scale.json").write_text(
        json.dumps({"mean": mean.tolist(), "std": std.tolist(), "shape": list(latents.shape[1:])})
    )


INVERSION_TIMES = (0.8, 0.9, 1.0, 1.1)  # s: the demo's MPRAGE protocols (synthmri.data.physics)


def _inversion_time_latents(path, n: int = 48, seed: int = 0) -> torch.Tensor:
    """A latent set in which the inversion time, and nothing else, moves channel 0: its mean rises linearly from
    -1 at 0.8 s to +1 at 1.1 s (the physics: GM/WM contrast rises with the inversion time), under noise of 0.3.
    Age, sex, site and field strength vary at random, as nuisance covariates. Returns the inversion times."""
    g = torch.Generator().manual_seed(seed)
    inversion_time = torch.tensor(INVERSION_TIMES).repeat(n // len(INVERSION_TIMES))
    latents = 0.3 * torch.randn(n, 4, 4, 4, 4, generator=g)
    latents[:, 0] += ((inversion_time - 0.95) / 0.15).view(n, 1, 1, 1)
    pick = torch.randint(0, 6, (n,), generator=g).tolist()
    _write_latent_dir(
        path,
        latents,
        age=(20 + 70 * torch.rand(n, generator=g)).round().tolist(),
        sex=["FM"[i % 2] for i in pick],
        site=[f"site{1 + i % 3}" for i in pick],
        field_strength=[(1.5, 3.0)[i % 2] for i in pick],
        inversion_time=inversion_time.tolist(),
    )
    return inversion_time


def test_sampling_the_same_seed_at_two_inversion_times_moves_the_latent_the_right_way(tmp_path):
    """Issue 17: the conditioning responds, i.e. the same seed sampled at two inversion times changes what the
    inversion time changes in the data, in the right direction.

    The diffusion stage's own trainer (``DiffusionTrainer`` in ``train_loop``: condition dropout, EMA, a U-Net
    conditioned on every covariate of params.yaml) trains for 200 steps on latents where the inversion time
    shifts channel 0 (:func:`_inversion_time_latents`); the EMA model then samples 8 seeds at 0.8, 0.95 and 1.1 s
    with the stage's sampler and guidance (DPM-Solver++, 10 steps, guidance 2), everything else held fixed.
    Measured over training seeds 1234 and 1-5, and 1234, 1, 2 on the scalar CPU kernels
    (ATEN_CPU_CAPABILITY=default): every seed moved up by 2.3-3.8 standardized units from 0.8 to 1.1 s (the
    training latents move by 2.5; guidance 2 extrapolates), and 0.95 s landed strictly in between (by >= 0.58).

    What it catches, measured: an inversion time the model ignores (nulled when encoding, in training and
    sampling) or guidance 0 leaves the two samples of a seed identical (change 0); latents whose inversion times
    were shuffled (nothing real to learn) moved by 0.1-0.3, or by up to 1.4 in 2 seeds of 8 that jumped modes in
    another draw. So the test asks for more than half the data's shift in at least 7 seeds of 8 and a mean change
    above 0.7 of it. 7 s on one CPU thread.
    """
    from synthmri.config import load_params
    from synthmri.data.latents import LatentSet
    from synthmri.training.loop import train_loop
    from synthmri.training.train_diffusion import DiffusionTrainer

    inversion_time = _inversion_time_latents(tmp_path)
    steps = 200
    params = load_params(
        REPO / "params.yaml",
        [
            "diffusion.unet.channels=[16,32]",
            "diffusion.unet.patch_size=1",
            "diffusion.train.device=cpu",
            f"diffusion.train.steps={steps}",
            "diffusion.train.batch_size=16",
            "diffusion.train.lr=0.002",
            "diffusion.train.lr_schedule=cosine",  # the weights settle by the last step (see _train)
            f"diffusion.train.checkpoint_every={steps}",
            f"diffusion.train.val_every={steps}",
            f"diffusion.train.log_every={steps}",
        ],
    )
    schedule = params.diffusion.schedule
    latents = LatentSet(tmp_path, "train", schedule)
    trainer = DiffusionTrainer(params, latents, None, tmp_path / "checkpoints", "test")
    train_loop(trainer, params.diffusion.train, tmp_path / "checkpoints", "test", validate=lambda: None)

    channel0 = latents.latents[:, 0].mean(dim=(1, 2, 3))  # standardized, as the model sees and samples them
    data_shift = (channel0[inversion_time == 1.1].mean() - channel0[inversion_time == 0.8].mean()).item()
    assert data_shift > 2.0  # the set is what the docstring says: a strong, clean effect

    model, sampler = trainer.ema.module, params.diffusion.sampler
    seeds = [sample_seed(0, i) for i in range(8)]
    measured = {}
    for value in (0.8, 0.95, 1.1):
        rows = [{"age": 50.0, "sex": "F", "field_strength": 3.0, "inversion_time": value}] * len(seeds)
        z = sample_latents(
            model.unet,
            model.encoder,
            make_sampler(sampler.sampler, schedule),
            rows,
            tuple(latents.latents.shape[1:]),
            sampler.steps,
            sampler.guidance_scale,
            seeds=seeds,
        )
        measured[value] = z[:, 0].mean(dim=(1, 2, 3))
    change = measured[1.1] - measured[0.8]
    assert int((change > 0.5 * data_shift).sum()) >= 7, (change, data_shift)
    assert change.mean().item() > 0.7 * data_shift, (change, data_shift)
    between = (measured[0.95] > measured[0.8]) & (measured[0.95] < measured[1.1])
    assert int(between.sum()) >= 7, measured


@pytest.mark.parametrize("prediction", ["v_prediction", "flow"])
def test_trainer_weights_each_sample_by_min_snr(tmp_path, prediction):
    """The training loss with ``loss_weighting: min_snr`` is the mean over the batch of each sample's plain
    loss times its min-SNR weight (so the weighting is applied per timestep, not to the batch mean)."""
    from synthmri.config import load_params
    from synthmri.data.covariates import covariate_rows
    from synthmri.data.latents import LatentSet
    from synthmri.training.train_diffusion import DiffusionTrainer

    g = torch.Generator().manual_seed(0)
    _write_latent_dir(tmp_path, torch.randn(4, 4, 4, 4, 4, generator=g), age=[30, 40, 50, 60], sex=["F", "M"] * 2)
    latents = LatentSet(tmp_path, "train")
    noise, t = torch.randn(latents.latents.shape, generator=g), torch.tensor([5, 100, 400, 900])
    losses = {}
    for weighting in ("none", "min_snr"):
        params = load_params(
            REPO / "params.yaml",
            [
                "diffusion.unet.channels=[16,32]",
                "diffusion.unet.patch_size=1",
                "diffusion.train.device=cpu",
                f"diffusion.train.loss_weighting={weighting}",
                f"diffusion.schedule.prediction={prediction}",
            ],
        )
        trainer = DiffusionTrainer(params, latents, None, tmp_path / "ckpt", "test")
        model = trainer.model.eval()
        rows = model.encoder.encode_values(covariate_rows(latents.manifest, params.covariates))
        with torch.no_grad():
            losses[weighting] = trainer.loss(model, latents.latents, rows, noise, t)
            if weighting == "none":
                single = torch.stack(
                    [trainer.loss(model, latents.latents[[i]], rows.select([i]), noise[[i]], t[[i]]) for i in range(4)]
                )
                weights = loss_weights(trainer.scheduler, t, "min_snr", params.diffusion.train.min_snr_gamma)
    assert torch.allclose(losses["none"], single.mean(), rtol=1e-5)
    assert torch.allclose(losses["min_snr"], (weights * single).mean(), rtol=1e-5)
    assert not torch.allclose(losses["min_snr"], losses["none"], rtol=1e-2)


def test_trainer_drops_the_guided_group_and_the_saved_model_guides_on_it(tmp_path):
    """``diffusion.train.guided_covariates``: the trainer's draws null the group alone at ``guided_dropout``
    (the other covariates kept), and the group travels with the saved model (its config) to sampling."""
    from synthmri.config import load_params
    from synthmri.data.covariates import covariate_rows
    from synthmri.data.latents import LatentSet
    from synthmri.models.loading import load_ldm, save_weights
    from synthmri.training.train_diffusion import DiffusionTrainer

    n = 200
    _write_latent_dir(tmp_path, torch.zeros(n, 4, 4, 4, 4), age=[40] * n, sex=["F"] * n, site=["site2"] * n)
    latents = LatentSet(tmp_path, "train")
    overrides = ["diffusion.unet.channels=[16,32]", "diffusion.unet.patch_size=1", "diffusion.train.device=cpu",
                 "diffusion.train.guided_covariates=[age,sex]"]  # fmt: skip
    params = load_params(REPO / "params.yaml", overrides)
    trainer = DiffusionTrainer(params, latents, None, tmp_path / "ckpt", "test")
    assert trainer.model.encoder.guided == ["age", "sex"]
    rows = trainer.model.encoder.encode_values(covariate_rows(latents.manifest, params.covariates))
    _, _, drawn = trainer.draw(latents.latents.shape, rows, torch.Generator().manual_seed(0), 0.0, 0.5)
    age_null, sex_null = ~drawn.present[:, 0], drawn.categorical[:, 0] == 0
    assert torch.equal(age_null, sex_null) and 0.35 < age_null.float().mean() < 0.65
    assert bool((drawn.categorical[:, 1] == 2).all())  # the site is never dropped with the group
    _, _, validation = trainer.draw(latents.latents.shape, rows, torch.Generator().manual_seed(0), 0.0)
    assert all(torch.equal(a, b) for a, b in zip(validation, rows, strict=True))  # validation: as asked
    config = {"diffusion": params.diffusion.model_dump(mode="json"), "latent_shape": [4, 4, 4, 4],
              "covariates": [c.model_dump(mode="json") for c in params.covariates]}  # fmt: skip
    save_weights(trainer.ema.module, config, tmp_path / "ldm")
    assert load_ldm(tmp_path / "ldm").encoder.guided == ["age", "sex"]
    del config["diffusion"]["train"]["guided_covariates"]  # a model written before groups existed
    save_weights(trainer.ema.module, config, tmp_path / "old")
    assert load_ldm(tmp_path / "old").encoder.guided is None


def test_trainer_trains_flow_on_the_flow_target_at_the_configured_timesteps(tmp_path):
    """``prediction: flow`` in the diffusion stage's trainer: its loss is the MSE between the network's output
    on (1 - t/T)·x0 + (t/T)·noise at t and noise - x0, and ``timestep_sampling: logit_normal`` draws fractional
    t in (0, T) from the step's generator (uniform: integers 1 .. T)."""
    from synthmri.config import load_params
    from synthmri.data.covariates import covariate_rows
    from synthmri.data.latents import LatentSet
    from synthmri.training.train_diffusion import DiffusionTrainer

    g = torch.Generator().manual_seed(0)
    _write_latent_dir(tmp_path, torch.randn(4, 4, 4, 4, 4, generator=g), age=[30, 40, 50, 60], sex=["F", "M"] * 2)
    latents = LatentSet(tmp_path, "train")
    base = ["diffusion.unet.channels=[16,32]", "diffusion.unet.patch_size=1", "diffusion.train.device=cpu"]
    drawn = {}
    for density in ("uniform", "logit_normal"):
        params = load_params(
            REPO / "params.yaml",
            [*base, "diffusion.schedule.prediction=flow", f"diffusion.train.timestep_sampling={density}"],
        )
        trainer = DiffusionTrainer(params, latents, None, tmp_path / "ckpt", "test")
        model = trainer.model.eval()
        rows = model.encoder.encode_values(covariate_rows(latents.manifest, params.covariates))
        draws = [trainer.draw((256, 1), rows.select([0] * 256), torch.Generator().manual_seed(5), 0.0) for _ in "ab"]
        drawn[density] = t = draws[0][1]
        assert torch.equal(t, draws[1][1])
    assert drawn["uniform"].dtype == torch.int64 and 1 <= drawn["uniform"].min() and drawn["uniform"].max() <= 1000
    t = drawn["logit_normal"]
    assert t.is_floating_point() and 0 < t.min() and t.max() < 1000 and t.frac().abs().max() > 0
    x0, noise, t = latents.latents, torch.randn(latents.latents.shape, generator=g), t[:4]
    sigma = (t / 1000).view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        expected = (model(x0 * (1 - sigma) + sigma * noise, t, rows) - (noise - x0)).square().mean()
        assert torch.allclose(trainer.loss(model, x0, rows, noise, t), expected, rtol=1e-5)


def test_input_scale_lowers_the_signal_of_standardized_latents_and_sampling_undoes_it(tmp_path):
    from synthmri.data.latents import LatentSet

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 2, 4, 4, 4, generator=g) * torch.tensor([3.0, 0.5]).view(1, 2, 1, 1, 1) + 1.0
    _write_latent_dir(tmp_path, latents)
    channel = ScheduleParams(standardize="channel")
    plain = LatentSet(tmp_path, "train", channel)
    scaled = LatentSet(tmp_path, "train", channel.model_copy(update={"input_scale": 0.5}))
    assert torch.allclose(plain.latents.std(dim=(0, 2, 3, 4)), torch.ones(2), atol=1e-5)
    assert torch.allclose(scaled.latents, plain.latents * 0.5)
    # what the sampler hands back in the diffusion space decodes to the original latents
    assert torch.allclose(scaled.unstandardize(scaled.latents), latents, atol=1e-5)
    assert ScheduleParams().input_scale == 1.0
    with pytest.raises(ValueError):
        ScheduleParams(input_scale=0)


def test_position_standardization_removes_the_average_latent_and_is_undone_when_sampling(tmp_path):
    """Per position: zero mean and unit std over the training latents, a floor where every training subject
    has the same value (no division by ~0), other splits mapped with the training statistics, and
    ``unstandardize`` the exact inverse."""
    import pandas as pd

    from synthmri.data.latents import POSITION_STD_FLOOR, LatentSet
    from synthmri.errors import StageError

    g = torch.Generator().manual_seed(0)
    template = torch.randn(1, 2, 4, 4, 4, generator=g) * 1.5  # the "average brain": most of the variance
    latents = template + 0.5 * torch.randn(8, 2, 4, 4, 4, generator=g)
    latents[:, :, 0, 0, 0] = 5.0  # a position where every subject has the same code
    _write_latent_dir(tmp_path, latents)
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    manifest.loc[6:, "split"] = "val"
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    schedule = ScheduleParams(standardize="position")
    train, val, every = (LatentSet(tmp_path, split, schedule) for split in ("train", "val", None))
    assert torch.allclose(train.latents.mean(0), torch.zeros(2, 4, 4, 4), atol=1e-5)
    varying = torch.ones(2, 4, 4, 4, dtype=torch.bool)
    varying[:, 0, 0, 0] = False
    assert torch.allclose(train.latents.std(0)[varying], torch.ones(int(varying.sum())), atol=1e-4)
    channel_std = LatentSet(tmp_path, "train", ScheduleParams(standardize="channel")).std.view(2)
    assert torch.allclose(train.std[:, 0, 0, 0], POSITION_STD_FLOOR * channel_std)
    assert torch.equal(train.latents[:, :, 0, 0, 0], torch.zeros(6, 2))
    # held-out latents use the training statistics; sampling's inverse recovers every latent
    assert torch.allclose(val.latents, every.latents[6:]) and torch.allclose(val.mean, train.mean)
    assert torch.allclose(every.unstandardize(every.latents), latents, atol=1e-5)
    manifest["split"] = ["train"] + ["val"] * 7
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(StageError, match="at least 2 training latents"):
        LatentSet(tmp_path, "val", schedule)


def test_encode_adds_the_training_volumes_mirror_images_and_the_diffusion_model_trains_on_them(tmp_path):
    """encode.mirror_training: the latent of each training volume's left-right mirror image (the volume flipped
    along its first axis, left-right in RAS; encoded, not the flipped latent), none of the held-out ones; the
    trainer's set has both, the plan's set and the held-out sets only the subjects; the per-position average brain
    includes the mirror images, whichever set is loaded, so training and sampling standardize alike."""
    import nibabel as nib
    import numpy as np
    from conftest import make_encoded
    from safetensors.torch import load_file

    from synthmri.data.datasets import ProcessedVolumes
    from synthmri.data.latents import MIRRORED_KEY, LatentSet, encode_volumes
    from synthmri.models.loading import load_vqgan
    from synthmri.stages.encode import run_encode
    from synthmri.stages.train_diffusion import training_latents

    params, processed = make_encoded(tmp_path)
    stored = load_file(str(tmp_path / "latents" / "latents.safetensors"))
    volumes = ProcessedVolumes(processed, split=None)
    train_rows = [i for i, split in enumerate(volumes.manifest["split"]) if split == "train"]
    assert 0 < len(train_rows) < len(volumes) and stored[MIRRORED_KEY].shape[0] == len(train_rows)
    vqgan = load_vqgan(tmp_path / "vqgan", "cpu")
    again = encode_volumes(vqgan, volumes, 3, torch.device("cpu"), train_rows, mirrored=True)
    assert torch.allclose(stored[MIRRORED_KEY], again, atol=1e-5)  # training rows, in order

    class KeepsPlaces:  # an "encoder" that keeps where things are: the test sees which way a volume was mirrored
        def encode(self, x, quantize=True):
            return torch.nn.functional.avg_pool3d(x, 2)

    pooled = encode_volumes(KeepsPlaces(), volumes, 3, torch.device("cpu"), train_rows, mirrored=True)
    for k, row in enumerate(train_rows):
        array = np.asarray(nib.load(processed / volumes.manifest["processed_path"][row]).dataobj, np.float32)
        assert not np.allclose(array, array[::-1], atol=1e-3)  # a volume whose mirror image differs from it
        mirror = torch.from_numpy(array[::-1].copy())[None, None]  # first axis: left-right in RAS
        assert torch.allclose(pooled[k], torch.nn.functional.avg_pool3d(mirror, 2)[0], atol=1e-6)
    schedule = ScheduleParams(standardize="position")
    train, val = training_latents(tmp_path / "latents", schedule)
    subjects = LatentSet(tmp_path / "latents", "train", schedule)
    assert len(train) == 2 * len(subjects) == 2 * len(train_rows)
    assert len(val) == int((volumes.manifest["split"] == "val").sum())
    assert train.manifest["mirrored"].tolist() == [False] * len(train_rows) + [True] * len(train_rows)
    assert train.manifest["subject_id"].tolist()[len(train_rows) :] == subjects.manifest["subject_id"].tolist()
    assert torch.allclose(train.latents[len(train_rows) :], subjects.standardize(stored[MIRRORED_KEY]))
    assert torch.allclose(train.latents.mean(0), torch.zeros_like(train.mean), atol=1e-5)  # average of both
    assert torch.allclose(subjects.mean, train.mean) and "mirrored" not in val.manifest
    # off: the same subjects, no mirror images anywhere
    off = params.model_copy(update={"encode": params.encode.model_copy(update={"mirror_training": False})})
    run_encode(off, processed, tmp_path / "vqgan", tmp_path / "plain")
    assert MIRRORED_KEY not in load_file(str(tmp_path / "plain" / "latents.safetensors"))
    plain, _ = training_latents(tmp_path / "plain", schedule)
    assert len(plain) == len(train_rows) and torch.allclose(
        plain.latents.mean(0), torch.zeros_like(plain.mean), atol=1e-5
    )


def test_encode_writes_the_encoders_continuous_output_when_asked_and_the_codes_otherwise(tmp_path):
    """encode.latents: ``codes`` are codebook vectors (what the quantizer snaps to); ``continuous`` is the
    encoder's output before the codebook, for the subjects and their mirror images alike."""
    from conftest import make_encoded
    from safetensors.torch import load_file

    from synthmri.data.datasets import ProcessedVolumes
    from synthmri.data.latents import MIRRORED_KEY
    from synthmri.models.loading import load_vqgan
    from synthmri.stages.encode import run_encode

    params, processed = make_encoded(tmp_path)
    vqgan = load_vqgan(tmp_path / "vqgan", "cpu").eval()
    volumes = ProcessedVolumes(processed, split=None)
    x = volumes.batch(list(range(len(volumes))))
    codes = load_file(str(tmp_path / "latents" / "latents.safetensors"))
    with torch.no_grad():
        before_codebook = vqgan.encode_pre_quant(x)
        assert torch.allclose(codes["latents"], vqgan.encode(x), atol=1e-5)
    codebook = vqgan.quantizer.embedding
    distances = torch.cdist(codes["latents"].movedim(1, -1).reshape(-1, codebook.shape[-1]), codebook)
    assert distances.min(1).values.max() < 1e-3  # every code position is a codebook vector (cdist rounds)
    asked = params.model_copy(update={"encode": params.encode.model_copy(update={"latents": "continuous"})})
    run_encode(asked, processed, tmp_path / "vqgan", tmp_path / "continuous")
    continuous = load_file(str(tmp_path / "continuous" / "latents.safetensors"))
    assert torch.allclose(continuous["latents"], before_codebook, atol=1e-5)
    assert not torch.allclose(continuous["latents"], codes["latents"], atol=1e-3)
    assert continuous[MIRRORED_KEY].shape == codes[MIRRORED_KEY].shape
    assert not torch.allclose(continuous[MIRRORED_KEY], codes[MIRRORED_KEY], atol=1e-3)


def test_the_covariate_encoder_learns_at_its_own_learning_rate(tmp_path):
    """``diffusion.train.covariate_lr_scale``: Adam's first step moves a weight by about its group's lr, so the
    covariate encoder's weights move ``scale`` times farther than at scale 1 and the U-Net's exactly as far; at
    scale 1 the two groups train bit for bit as one."""
    from synthmri.config import load_params
    from synthmri.data.latents import LatentSet
    from synthmri.training.optim import adamw, lr_scheduler
    from synthmri.training.train_diffusion import DiffusionTrainer

    g = torch.Generator().manual_seed(0)
    _write_latent_dir(tmp_path, torch.randn(4, 4, 4, 4, 4, generator=g), age=[30, 40, 50, 60], sex=["F", "M"] * 2)
    latents = LatentSet(tmp_path, "train")
    base = ["diffusion.unet.channels=[16,32]", "diffusion.unet.patch_size=1", "diffusion.train.device=cpu",
            "diffusion.train.cpu_bf16=false", "diffusion.train.condition_dropout=0", "diffusion.train.guided_dropout=0"]  # fmt: skip
    moved = {}
    for scale in (1.0, 5.0):
        params = load_params(REPO / "params.yaml", [*base, f"diffusion.train.covariate_lr_scale={scale}"])
        trainer = DiffusionTrainer(params, latents, None, tmp_path / f"ckpt{scale}", "test")
        groups = trainer.optimizer.param_groups
        assert [group["lr"] for group in groups] == [params.diffusion.train.lr, params.diffusion.train.lr * scale]
        named = dict(trainer.model.named_parameters())
        assert sum(len(group["params"]) for group in groups) == len(named)  # every weight in exactly one group
        assert {id(p) for p in groups[1]["params"]} == {id(p) for n, p in named.items() if n.startswith("encoder.")}
        _perturbed(trainer.model)  # the zero-initialised output layers would pass the encoder no gradient
        before = {n: p.detach().clone() for n, p in named.items()}
        trainer.next_step()
        moved[scale] = {
            part: max((named[n] - before[n]).abs().max().item() for n in named if n.startswith("encoder.") == is_enc)
            for part, is_enc in (("encoder", True), ("unet", False))
        }
    lr = params.diffusion.train.lr
    assert moved[1.0]["encoder"] == pytest.approx(lr, rel=0.05)
    assert moved[5.0]["encoder"] == pytest.approx(5 * lr, rel=0.05)
    assert moved[5.0]["unet"] == pytest.approx(moved[1.0]["unet"], rel=1e-6)
    # at scale 1 the two groups train exactly as the single group the stage had before the key existed
    params = load_params(REPO / "params.yaml", [*base, "diffusion.train.covariate_lr_scale=1"])
    runs = []
    for single in (False, True):
        trainer = DiffusionTrainer(params, latents, None, tmp_path / f"single{single}", "test")
        if single:
            trainer.optimizer = adamw(trainer.model.parameters(), params.diffusion.train)
            trainer.lr_schedule = lr_scheduler(trainer.optimizer, params.diffusion.train)
        _perturbed(trainer.model)
        for _ in range(3):
            trainer.next_step()
        runs.append(trainer.model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
