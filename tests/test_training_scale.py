"""Scaling training: N gloo processes must train exactly like one process with an N-times batch,
gradient accumulation like the larger batch, and the execution options (activation checkpointing,
channels-last-3d) must not change what is learned.

The ranks are real processes joined in a gloo process group on 127.0.0.1 (what torchrun sets up);
the CLI test goes through the stage command, which relaunches itself under torchrun.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from conftest import REPO, make_encoded
from safetensors.torch import load_file

from synthmri.stages.train_diffusion import run_train_diffusion
from synthmri.stages.train_vqgan import run_train_vqgan

DIFFUSION = (
    "diffusion.train.cpu_bf16=false",  # fp32, as VQGAN below: these tests compare algorithms, not precisions
    "diffusion.unet.channels=[8,16]",
    "diffusion.unet.num_heads=2",
    "diffusion.unet.norm_groups=4",
    "diffusion.train.steps=5",
    "diffusion.train.log_every=1",
    "diffusion.train.val_every=100",
    "diffusion.train.checkpoint_every=100",
    "diffusion.train.condition_dropout=0.5",
)
VQGAN = (
    # fp32: these tests compare algorithms to float-noise tolerances, below bf16's rounding
    "vqgan.train.cpu_bf16=false",
    "vqgan.train.channels_last=false",  # contiguous (the code default is channels-last): the option test compares both
    "vqgan.train.steps=3",
    "vqgan.train.val_every=100",
    "vqgan.train.checkpoint_every=100",
    "vqgan.loss.disc_start_step=0",
    "vqgan.model.attention=false",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A tiny processed cohort, a VQ-GAN trained on it for two steps, and its latents."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("ddp")
    _, processed = make_encoded(work)
    return work, processed


def _stage_outputs(stage: str, work: Path, run: Path) -> dict:
    if stage == "diffusion":
        return dict(
            latent_dir=work / "latents",
            vqgan_dir=work / "vqgan",
            model_dir=run / "model",
            checkpoint_dir=run / "ckpt",
            report_dir=run / "report",
            metrics_file=run / "metrics.json",
        )
    return dict(
        processed_dir=work / "processed",
        model_dir=run / "model",
        checkpoint_dir=run / "ckpt",
        report_dir=run / "report",
        metrics_file=run / "metrics.json",
    )


def _run_stage(stage: str, params, work: Path, run: Path) -> None:
    train = run_train_diffusion if stage == "diffusion" else run_train_vqgan
    train(params, **_stage_outputs(stage, work, run), track=False)


def _rank(rank: int, world: int, port: int, stage: str, overrides: tuple[str, ...], work: Path, run: Path) -> None:
    """One rank, with the environment torchrun would give it."""
    from conftest import make_params

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    _run_stage(stage, make_params(*overrides), work, run)


def train(stage: str, work: Path, run: Path, overrides: tuple[str, ...], processes: int = 1) -> pd.DataFrame:
    """Train in ``processes`` gloo ranks (1: in this process); the loss history rank 0 wrote."""
    params_overrides = (*_base_overrides(work), *overrides)
    if processes == 1:
        from conftest import make_params

        _run_stage(stage, make_params(*params_overrides), work, run)
    else:
        mp.spawn(_rank, args=(processes, free_port(), stage, params_overrides, work, run), nprocs=processes)
    return pd.read_csv(run / "report" / "losses.csv")


def _base_overrides(work: Path) -> tuple[str, ...]:
    from conftest import TINY_VQGAN

    return (
        "ingest.source=bids",
        f"ingest.root={work / 'bids'}",
        "ingest.min_subjects=2",
        "normalize.spacing=[3,3,3]",
        "normalize.shape=[16,16,16]",
        *TINY_VQGAN,
    )


def assert_same_trajectory(a: pd.DataFrame, b: pd.DataFrame, columns: list[str], rtol: float = 1e-4) -> None:
    assert list(a["step"]) == list(b["step"])
    for column in columns:
        torch.testing.assert_close(
            torch.tensor(a[column].values),
            torch.tensor(b[column].values),
            rtol=rtol,
            atol=1e-5,
            msg=lambda m, column=column: f"{column}: {m}",
        )


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5, skip: str = "-") -> None:
    first, second = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert first.keys() == second.keys()
    for key in (k for k in first if not k.startswith(skip)):
        torch.testing.assert_close(first[key], second[key], rtol=1e-3, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


def test_diffusion_two_gloo_processes_train_like_one_with_the_doubled_batch(cohort, tmp_path):
    work, _ = cohort
    single = train("diffusion", work, tmp_path / "single", (*DIFFUSION, "diffusion.train.batch_size=4"))
    ddp = train("diffusion", work, tmp_path / "ddp", (*DIFFUSION, "diffusion.train.batch_size=2"), processes=2)
    assert_same_trajectory(single, ddp, ["loss", "grad_norm"])
    assert_same_weights(tmp_path / "single", tmp_path / "ddp")
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["processes"] == 2
    # a sanity check that the comparison can fail: half the batch is a different trajectory
    half = train("diffusion", work, tmp_path / "half", (*DIFFUSION, "diffusion.train.batch_size=2"))
    assert not torch.allclose(torch.tensor(half["loss"].values), torch.tensor(single["loss"].values), rtol=1e-3)


def test_diffusion_gradient_accumulation_equals_the_larger_batch(cohort, tmp_path):
    work, _ = cohort
    single = train("diffusion", work, tmp_path / "single", (*DIFFUSION, "diffusion.train.batch_size=4"))
    accumulated = train(
        "diffusion",
        work,
        tmp_path / "acc",
        (*DIFFUSION, "diffusion.train.batch_size=1", "diffusion.train.grad_accumulation=4"),
    )
    assert_same_trajectory(single, accumulated, ["loss", "grad_norm"])
    assert_same_weights(tmp_path / "single", tmp_path / "acc")


def test_vqgan_two_gloo_processes_train_like_one_with_the_doubled_batch(cohort, tmp_path):
    """Codebook initialisation and EMA, dead-code restarts, the adaptive GAN weight and the discriminator
    all see the global batch. The first step must match tightly; later steps only closely, because
    Adam's first update is ``lr·sign(g)``: a gradient that is 0 up to rounding (summed in another order
    over two ranks) may flip sign, and the nearest-code argmin turns such tiny differences into a few
    different code assignments. That drift is float noise, not a different algorithm (the diffusion
    tests, without argmin, match to 1e-4 throughout)."""
    work, _ = cohort
    columns = [
        "loss",
        "l1",
        "perceptual",
        "vq",
        "g_adv",
        "feature_matching",
        "gan_weight",
        "d_loss",
        "perplexity",
        "codebook_usage",
    ]
    gan = (*VQGAN, "vqgan.loss.adversarial=0.1", "vqgan.loss.perceptual=0.1")  # the demo default has no GAN
    single = train("vqgan", work, tmp_path / "single", (*gan, "vqgan.train.batch_size=2"))
    ddp = train("vqgan", work, tmp_path / "ddp", (*gan, "vqgan.train.batch_size=1"), processes=2)
    assert (single["d_loss"] != 0).all() and (single["gan_weight"] > 0).all()  # the GAN terms really ran
    assert_same_trajectory(single.iloc[:1], ddp.iloc[:1], columns)
    # the adaptive GAN weight (a ratio of two gradient norms) drifts most: on an Ice Lake Xeon one process alone moved
    # it by 9.5 % at step 3 between 1 and 2 intra-op threads (summation order only; RESULTS.md, 17th session)
    assert_same_trajectory(single, ddp, [c for c in columns if c != "gan_weight"], rtol=0.1)
    assert_same_trajectory(single, ddp, ["gan_weight"], rtol=0.25)
    # learned weights within a few Adam steps of lr 2e-4 (codebook buffers: covered by vq/perplexity above)
    assert_same_weights(tmp_path / "single", tmp_path / "ddp", atol=2e-3, skip="quantizer.")


@pytest.mark.parametrize("option", ["activation_checkpointing", "channels_last"])
@pytest.mark.parametrize("stage", ["diffusion", "vqgan"])
def test_execution_options_do_not_change_what_is_learned(cohort, tmp_path, stage, option):
    work, _ = cohort
    base = DIFFUSION if stage == "diffusion" else VQGAN
    plain = train(stage, work, tmp_path / "plain", base)
    with_option = train(stage, work, tmp_path / "option", (*base, f"{stage}.train.{option}=true"))
    assert_same_trajectory(plain, with_option, ["loss"], rtol=1e-3 if stage == "vqgan" else 1e-4)


def test_cpu_bf16_autocasts_only_where_asked_and_where_the_cpu_has_native_bf16(monkeypatch):
    from synthmri.training import runtime

    conv, x = torch.nn.Conv3d(2, 2, 3), torch.randn(1, 2, 5, 5, 5)
    cpu = torch.device("cpu")

    def output_dtype(precision: str, cpu_bf16: bool) -> torch.dtype:
        with runtime.autocast(cpu, precision, cpu_bf16):
            return conv(x).dtype

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert output_dtype("bf16", True) == torch.bfloat16 and runtime.precision_text(cpu, "bf16", True) == "bf16"
    assert output_dtype("bf16", False) == torch.float32 and runtime.precision_text(cpu, "bf16", False) == "fp32"
    assert output_dtype("fp32", True) == torch.float32
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)  # emulated bf16 would be slower: fp32
    assert output_dtype("bf16", True) == torch.float32 and runtime.precision_text(cpu, "bf16", True) == "fp32"


@pytest.mark.parametrize(
    "flags,native",
    [
        ("fpu avx2 avx512f avx512bw avx512_vnni avx512_vbmi2", False),  # Ice Lake: bf16 only emulated
        ("fpu avx2 avx512f avx512_vnni avx512_bf16", True),  # Zen 4 EPYC, Cooper Lake
        ("fpu avx2 avx512f amx_tile amx_bf16", True),  # Sapphire Rapids
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags_not_from_onednn_emulation(tmp_path, flags, native):
    from synthmri.training.runtime import cpu_has_native_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_has_native_bf16(cpuinfo) is native
    arm = tmp_path / "cpuinfo-arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert cpu_has_native_bf16(arm) is True


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_the_diffusion_trainer_runs_its_model_in_bf16_only_with_cpu_bf16(cohort, monkeypatch, cpu_bf16):
    """The trainer passes ``train.cpu_bf16`` to autocast: the U-Net's convolutions compute in bf16 with it, except
    on maps under 4 voxels a side, which stay fp32 (oneDNN's bf16 weight gradients there were non-finite). The
    cohort's 4³ latents are upsampled to 8³ here so that the U-Net has maps of both kinds."""
    from conftest import make_params

    from synthmri.data.covariates import covariate_rows
    from synthmri.data.latents import LatentSet
    from synthmri.models.blocks import FP32_BELOW_VOXELS
    from synthmri.training import runtime
    from synthmri.training.train_diffusion import DiffusionTrainer

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    work, _ = cohort
    params = make_params(*_base_overrides(work), *DIFFUSION, f"diffusion.train.cpu_bf16={str(cpu_bf16).lower()}")
    latents = LatentSet(work / "latents", "train", params.diffusion.schedule)
    trainer = DiffusionTrainer(params, latents, None, work / "bf16-ckpt", "test")
    dtypes = {"tiny": set(), "large": set()}
    for module in trainer.model.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.register_forward_hook(
                lambda _m, i, out: dtypes["tiny" if min(i[0].shape[2:]) < FP32_BELOW_VOXELS else "large"].add(out.dtype)
            )
    rows = trainer.model.encoder.encode_values(covariate_rows(latents.manifest, params.covariates))
    x0 = torch.nn.functional.interpolate(latents.latents, scale_factor=2.0)
    trainer.loss(trainer.model, x0, rows, torch.randn_like(x0), torch.full((len(x0),), 500))
    assert dtypes == {"tiny": {torch.float32}, "large": {torch.bfloat16 if cpu_bf16 else torch.float32}}


@pytest.mark.slow
def test_cli_relaunches_itself_under_torchrun_when_processes_is_above_one(cohort, tmp_path):
    """What `dvc repro` runs: `synthmri train_diffusion` with diffusion.train.processes=2."""
    work, _ = cohort
    (tmp_path / "data").mkdir()
    (tmp_path / "models").mkdir()
    os.symlink(work / "latents", tmp_path / "data" / "latents")
    os.symlink(work / "vqgan", tmp_path / "models" / "vqgan")
    overrides = [
        arg
        for o in (*_base_overrides(work), *DIFFUSION, "diffusion.train.processes=2", "diffusion.train.batch_size=2")
        for arg in ("-S", o)
    ]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "synthmri.cli", "train_diffusion", "--params", str(REPO / "params.yaml"), *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Launching 2 training processes with torchrun" in result.stderr
    assert "2 process(es)" in result.stderr
    assert json.loads((tmp_path / "reports" / "ldm.json").read_text())["processes"] == 2
    assert (tmp_path / "models" / "ldm" / "model.safetensors").is_file()
    assert not (tmp_path / "models" / "checkpoints" / "ldm").exists()


def test_extending_or_resampling_a_run_keeps_its_identity_but_changing_what_it_learns_does_not(cohort):
    from conftest import make_params

    from synthmri.stages.train_diffusion import run_fingerprint

    work, _ = cohort
    base = run_fingerprint(make_params(*DIFFUSION), work / "latents")
    for same in (
        "diffusion.train.steps=500",
        "diffusion.train.checkpoint_every=7",
        "diffusion.sampler.steps=5",
        "diffusion.train.activation_checkpointing=true",
        "diffusion.train.cpu_bf16=true",
    ):
        assert run_fingerprint(make_params(*DIFFUSION, same), work / "latents") == base, same
    for other in (
        "diffusion.train.lr=0.001",
        "diffusion.train.batch_size=3",
        "diffusion.train.processes=2",
        "diffusion.unet.num_heads=4",
        "seed=7",
    ):
        assert run_fingerprint(make_params(*DIFFUSION, other), work / "latents") != base, other
