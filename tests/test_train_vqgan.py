"""The train_vqgan and encode stages: learning, resume after SIGKILL, safe checkpoints, deterministic latents."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY_VQGAN, kill_after_checkpoint, make_processed, stage_command, stage_env
from safetensors.torch import load_file

from synthmri.data.latents import LatentSet
from synthmri.errors import StageError
from synthmri.stages.encode import run_encode
from synthmri.stages.train_vqgan import run_train_vqgan
from synthmri.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint


def _train(params, work: Path, **kw) -> dict:
    return run_train_vqgan(
        params,
        processed_dir=work / "processed",
        model_dir=work / "models" / "vqgan",
        checkpoint_dir=work / "ckpt",
        report_dir=work / "reports" / "vqgan",
        metrics_file=work / "reports" / "vqgan.json",
        track=False,
        **kw,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("vqgan")
    params, _ = make_processed(
        work,
        8,
        (16, 16, 16),
        "vqgan.train.steps=60",
        "vqgan.loss.perceptual=0.1",  # the full VQ-GAN path (the demo default trains L1 + quantizer only)
        "vqgan.loss.adversarial=0.1",
        "vqgan.train.betas=[0.5,0.9]",  # the GAN recipe's optimizer
        "vqgan.train.lr_schedule=constant",
        "vqgan.loss.disc_start_step=30",
        "vqgan.train.val_every=30",
        "vqgan.train.checkpoint_every=20",
    )
    metrics = _train(params, work)
    return params, work, metrics


def test_training_reduces_reconstruction_error_and_writes_outputs(trained):
    params, work, metrics = trained
    import pandas as pd

    history = pd.read_csv(work / "reports" / "vqgan" / "losses.csv")
    assert history["l1"].iloc[-5:].mean() < 0.6 * history["l1"].iloc[:5].mean()
    assert (history.loc[history["step"] > 30, "d_loss"] > 0).all(), "discriminator must be on after warm-up"
    assert (history.loc[history["step"] <= 30, "g_adv"] == 0).all(), "and off before it"
    assert (history.loc[history["step"] > 30, "gan_weight"] > 0).all()
    saved = json.loads((work / "reports" / "vqgan.json").read_text())
    assert saved["model"] == "vqgan" and saved["steps"] == 60
    assert saved["val_psnr"] > 10 and 0 < saved["val_ssim"] <= 1 and "RANDOM" in saved["lpips_backbone"]
    assert (work / "models" / "vqgan" / "model.safetensors").is_file()
    assert (work / "reports" / "vqgan" / "reconstruction.png").stat().st_size > 1000
    assert not (work / "ckpt").exists(), "checkpoints are cleared once training has finished"


def test_vqvae_baseline_has_no_discriminator_or_perceptual_term(tmp_path):
    params, _ = make_processed(
        tmp_path,
        6,
        (16, 16, 16),
        "vqgan.train.steps=6",
        "vqgan.loss.perceptual=0",
        "vqgan.loss.adversarial=0",
        "vqgan.loss.disc_start_step=0",
    )
    metrics = _train(params, tmp_path)
    assert metrics["model"] == "vqvae"
    import pandas as pd

    history = pd.read_csv(tmp_path / "reports" / "vqgan" / "losses.csv")
    assert (history[["perceptual", "g_adv", "d_loss"]] == 0).all().all()


def test_encode_is_deterministic_and_scaled_on_train_split(trained, tmp_path):
    params, work, _ = trained
    first = run_encode(params, work / "processed", work / "models" / "vqgan", tmp_path / "a")
    run_encode(params, work / "processed", work / "models" / "vqgan", tmp_path / "b")
    a = load_file(str(tmp_path / "a" / "latents.safetensors"))["latents"]
    b = load_file(str(tmp_path / "b" / "latents.safetensors"))["latents"]
    assert torch.equal(a, b)
    assert a.shape == (len(first), 4, 4, 4, 4)  # 16^3 / factor 4, 4 latent channels
    train = LatentSet(tmp_path / "a", "train", mirrored=True)  # the subjects and their mirror images
    dims = [0, 2, 3, 4]
    torch.testing.assert_close(train.latents.mean(dim=dims), torch.zeros(4), atol=1e-4, rtol=0)
    subjects = a[torch.tensor((first["split"] == "train").to_numpy())]
    torch.testing.assert_close(train.unstandardize(train.latents[: len(subjects)]), subjects)
    assert set(first["subject_id"]) == set(LatentSet(tmp_path / "a", None).manifest["subject_id"])


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_checkpoint_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "step-0000010.pt"
    torch.save({"step": 10, "model": _Exploit()}, path)
    with pytest.raises(StageError, match="refusing to load"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_checkpoints_are_pruned_and_round_trip(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"w": torch.full((3,), float(step)), "history": [{"step": step}]})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000020.pt", "step-0000030.pt"]
    state = load_checkpoint(tmp_path / "step-0000030.pt")
    assert state["step"] == 30 and torch.equal(state["w"], torch.full((3,), 30.0))
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_from_checkpoint(tmp_path):
    """Really kill the stage process mid-training; the rerun continues from the last checkpoint."""
    make_processed(tmp_path, 6, (16, 16, 16))
    (tmp_path / "data").mkdir()
    os.replace(tmp_path / "processed", tmp_path / "data" / "processed")
    base = stage_command(
        "train_vqgan",
        *TINY_VQGAN,
        "vqgan.train.checkpoint_every=5",
        "vqgan.loss.disc_start_step=10",
        "vqgan.train.val_every=1000",
        "normalize.shape=[16,16,16]",
    )
    env = stage_env(tmp_path)
    ckpt_dir = tmp_path / "models" / "checkpoints" / "vqgan"
    killed_at = kill_after_checkpoint([*base, "-S", "vqgan.train.steps=1000"], tmp_path, env, ckpt_dir, min_step=15)

    # extending or finishing a run keeps its checkpoints: the step budget is not part of the configuration
    done = subprocess.run(
        [*base, "-S", f"vqgan.train.steps={killed_at + 3}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Resuming VQ-GAN training from the checkpoint at step {killed_at}" in done.stderr
    metrics = json.loads((tmp_path / "reports" / "vqgan.json").read_text())
    assert metrics["steps"] == killed_at + 3
    assert not ckpt_dir.exists()
