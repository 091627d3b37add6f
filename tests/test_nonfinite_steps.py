"""A training step whose gradients are not finite (NaN/inf: a bf16 kernel's accident, an exploding loss) is
skipped with a warning and leaves the weights and the optimizer's moments as they were; a run whose steps keep
failing stops with the reason instead of training NaNs for the rest of its minutes."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import SMALL_COHORT, TINY_VQGAN, make_encoded, make_params

from synthmri.data.datasets import ProcessedVolumes
from synthmri.data.latents import LatentSet
from synthmri.errors import StageError
from synthmri.models.blocks import FP32_BELOW_VOXELS, conv_nd
from synthmri.training import runtime
from synthmri.training.loop import MAX_SKIPS_IN_A_ROW, train_loop
from synthmri.training.optim import clipped_step
from synthmri.training.train_diffusion import DiffusionTrainer
from synthmri.training.train_vqgan import VQGANTrainer

TINY = (
    *TINY_VQGAN,
    *SMALL_COHORT,
    "normalize.spacing=[3,3,3]",
    "normalize.shape=[16,16,16]",
    "diffusion.unet.channels=[8,16]",
    "diffusion.unet.num_heads=2",
    "diffusion.unet.norm_groups=4",
    "vqgan.model.attention=false",
    "vqgan.loss.disc_start_step=0",
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A tiny processed cohort, a VQ-GAN trained on it for two steps, and its latents."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("nonfinite")
    params, processed = make_encoded(work)
    return work, processed, params


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained weights (the VQ-GAN codebook is an EMA of encoder outputs that the forward pass updates,
    not a weight the optimizer steps)."""
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _poison_gradients_at(trainer, module: torch.nn.Module, bad_step: int) -> None:
    """Every gradient of ``module`` becomes NaN during the step that starts at ``trainer.step == bad_step``."""
    for parameter in module.parameters():
        parameter.register_hook(lambda grad: grad * math.nan if trainer.step == bad_step else grad)


def test_clipped_step_skips_a_non_finite_step_and_takes_a_finite_one():
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 3)).sum().backward()
    assert math.isfinite(clipped_step(optimizer, layer.parameters(), 1.0))
    weights, moments = _snapshot(layer), {k: v.clone() for k, v in optimizer.state[layer.weight].items()}

    layer(torch.ones(1, 3)).sum().backward()
    layer.weight.grad[0, 0] = math.nan
    assert math.isnan(clipped_step(optimizer, layer.parameters(), 1.0))
    for key, value in _snapshot(layer).items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)
    for key, value in optimizer.state[layer.weight].items():
        torch.testing.assert_close(value, moments[key], rtol=0, atol=0)
    assert layer.weight.grad is None  # the poisoned gradient does not leak into the next step

    layer(torch.ones(1, 3)).sum().backward()
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in layer.parameters()])).item()
    assert clipped_step(optimizer, layer.parameters(), 1.0) == pytest.approx(norm)  # the norm before clipping
    assert not torch.equal(layer.weight, weights["weight"])


def _diffusion_trainer(cohort, tmp_path, steps: int) -> DiffusionTrainer:
    work, _, _ = cohort
    params = make_params(
        *TINY, f"diffusion.train.steps={steps}", "diffusion.train.log_every=1", "diffusion.train.val_every=100"
    )
    latents = LatentSet(work / "latents", "train", params.diffusion.schedule)
    return DiffusionTrainer(params, latents, None, tmp_path / "ckpt", "test")


def test_the_diffusion_trainer_skips_a_step_with_nan_gradients_and_trains_on(cohort, tmp_path):
    trainer = _diffusion_trainer(cohort, tmp_path, steps=5)
    _poison_gradients_at(trainer, trainer.model, bad_step=2)
    train_loop(trainer, trainer.cfg.train.model_copy(update={"steps": 2}), tmp_path / "ckpt", "test", lambda: None)
    before = _snapshot(trainer.model)

    losses = trainer.next_step()  # step 2: every gradient NaN
    trainer.step += 1
    assert losses["skipped_step"] == 1.0 and math.isnan(losses["grad_norm"])
    for key, value in _snapshot(trainer.model).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)

    train_loop(trainer, trainer.cfg.train, tmp_path / "ckpt", "test", lambda: None)
    assert [h["skipped_step"] for h in trainer.history] == [0.0, 0.0, 0.0, 0.0]  # steps 1, 2, 4, 5
    after = _snapshot(trainer.model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in before)  # steps 4 and 5 still train
    assert all(torch.isfinite(p).all() for p in trainer.ema.module.parameters())


def test_the_vqgan_trainer_skips_a_generator_step_with_nan_gradients(cohort, tmp_path):
    work, processed, _ = cohort
    params = make_params(*TINY, "vqgan.train.steps=3", "vqgan.train.log_every=1", "vqgan.train.val_every=100")
    trainer = VQGANTrainer(params, ProcessedVolumes(processed, "train"), None, tmp_path / "ckpt", "test")
    _poison_gradients_at(trainer, trainer.model, bad_step=1)
    trainer.next_step()
    trainer.step += 1
    before = _snapshot(trainer.model)
    losses = trainer.next_step()
    assert losses["skipped_step"] == 1.0
    for key, value in _snapshot(trainer.model).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


class _Diverged:
    """A trainer whose every step from ``first_bad`` on has non-finite gradients (``every``: only each n-th)."""

    def __init__(self, first_bad: int, every: int = 1) -> None:
        self.step, self.history, self.first_bad, self.every = 0, [], first_bad, every

    def next_step(self) -> dict[str, float]:
        bad = self.step >= self.first_bad and (self.step - self.first_bad) % self.every == 0
        return {"loss": math.nan if bad else 1.0, "skipped_step": float(bad)}

    def state(self) -> dict:
        return {}


def test_a_run_whose_steps_keep_failing_stops_with_the_reason(tmp_path, cohort):
    schedule = make_params(*TINY, "diffusion.train.steps=100").diffusion.train
    with pytest.raises(StageError, match=f"{MAX_SKIPS_IN_A_ROW} steps in a row up to step 13 .* diverged"):
        train_loop(_Diverged(first_bad=3), schedule, tmp_path, "diffusion", lambda: None)


def test_rare_skipped_steps_are_warned_about_and_the_run_finishes(tmp_path, cohort, caplog):
    schedule = make_params(*TINY, "diffusion.train.steps=40").diffusion.train
    trainer = _Diverged(first_bad=0, every=2)  # every other step: never MAX_SKIPS_IN_A_ROW in a row
    with caplog.at_level(logging.WARNING, logger="synthmri.training.loop"):
        train_loop(trainer, schedule, tmp_path, "diffusion", lambda: None)
    assert trainer.step == 40
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 20 and skipped[0] == (
        "diffusion: step 1 skipped: its gradients were not finite (NaN or inf); the weights are unchanged"
    )


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_convolution_on_a_tiny_map_runs_in_fp32_under_cpu_bf16_autocast(spatial_dims):
    conv = conv_nd(spatial_dims, 4, 8)
    tiny, large = (torch.randn(1, 4, *(size,) * spatial_dims) for size in (FP32_BELOW_VOXELS - 1, FP32_BELOW_VOXELS))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(tiny).dtype == torch.float32
        assert conv(large).dtype == torch.bfloat16  # the fast path everywhere else
    assert conv(tiny).dtype == conv(large).dtype == torch.float32  # no autocast: the plain convolution
    exact = torch.nn.functional.conv3d if spatial_dims == 3 else torch.nn.functional.conv2d
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(tiny)
    torch.testing.assert_close(out, exact(tiny, conv.weight, conv.bias, padding=1), rtol=0, atol=0)


def test_the_tiny_diffusion_unet_trains_in_cpu_bf16_without_skipped_steps(cohort, tmp_path, monkeypatch):
    """Its 4x4x4 latents (patch 2) put three convolutions on 2x2x2 maps, whose bf16 weight gradients were
    non-finite at almost every step before those maps ran in fp32. On a CPU without native bf16 the trainer would
    fall back to fp32, so bf16 is forced here: oneDNN's emulation computes the same numbers, only slower."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    work, _, _ = cohort
    params = make_params(*TINY, "diffusion.train.steps=12", "diffusion.train.cpu_bf16=true")
    trainer = DiffusionTrainer(
        params, LatentSet(work / "latents", "train", params.diffusion.schedule), None, tmp_path / "ckpt", "test"
    )
    history = []
    for _ in range(params.diffusion.train.steps):
        history.append(trainer.next_step())
        trainer.step += 1
    assert [h["skipped_step"] for h in history] == [0.0] * len(history)
    assert all(math.isfinite(h["grad_norm"]) for h in history)
