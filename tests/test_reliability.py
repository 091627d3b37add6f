"""Faults and privacy: SIGKILL during diffusion training, unreachable tracking server, full disk, identifiers
in input headers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    SMALL_COHORT,
    SMALL_SPLIT,
    blob_volume,
    kill_after_checkpoint,
    make_params,
    make_processed,
    stage_command,
    stage_env,
)
from safetensors.torch import load_file

from synthmri.errors import StageError
from synthmri.io import save_nifti
from synthmri.stages.ingest import run_ingest
from synthmri.stages.normalize import run_normalize
from synthmri.tracking import check_reachable


def test_unreachable_tracking_server_fails_fast_with_clear_message(tmp_path, monkeypatch):
    from synthmri.stages.train_vqgan import run_train_vqgan

    params, processed = make_processed(tmp_path, 4, (16, 16, 16), "vqgan.train.steps=1000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(StageError, match="MLflow tracking server .* is unreachable"):
        run_train_vqgan(params, processed, tmp_path / "m", tmp_path / "ck", tmp_path / "r", tmp_path / "r.json")
    assert not (tmp_path / "ck").exists(), "no training step may run before the tracking check"


def test_check_reachable_ignores_local_stores():
    check_reachable("sqlite:///mlflow.db")  # local stores need no server


@pytest.fixture
def tiny_tmpfs(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield mount
    subprocess.run(["umount", str(mount)])


def test_full_disk_leaves_no_truncated_file(tiny_tmpfs):
    big = np.random.default_rng(0).normal(size=(64, 64, 64)).astype(np.float32)  # ~1 MB, does not fit
    with pytest.raises(OSError):
        save_nifti(big, np.eye(4), tiny_tmpfs / "volume.nii.gz")
    assert list(tiny_tmpfs.iterdir()) == [], "neither the final name nor a temporary file may remain"


def test_identifiers_in_input_headers_never_reach_outputs(tmp_path):
    root = tmp_path / "bids"
    rows = []
    for i in range(4):
        sub = f"sub-{i}"
        image = nib.Nifti1Image(blob_volume(seed=i), np.diag([2.0, 2.0, 2.0, 1.0]))
        header = image.header
        header["descrip"] = b"Patient DOE^JOHN DOB 1950-01-01"
        header["aux_file"] = b"MRN123456"
        header["db_name"] = b"HOSPITAL-PACS"
        header["intent_name"] = b"ACC998877"
        header.extensions.append(nib.nifti1.Nifti1Extension(6, b"PatientName=DOE^JOHN"))  # comment extension
        path = root / sub / "anat" / f"{sub}_T1w.nii.gz"
        path.parent.mkdir(parents=True)
        nib.save(image, path)
        rows.append(f"{sub}\t{40 + i}\tF")
    (root / "participants.tsv").write_text("participant_id\tage\tsex\n" + "\n".join(rows) + "\n")
    params = make_params(
        "ingest.source=bids",
        f"ingest.root={root}",
        "ingest.min_subjects=1",
        "normalize.shape=[16,16,16]",
        *SMALL_COHORT,
        SMALL_SPLIT,
    )
    run_ingest(params, out_dir=tmp_path / "ingested")
    run_normalize(params, in_dir=tmp_path / "ingested", out_dir=tmp_path / "processed")
    outputs = [*tmp_path.joinpath("ingested").rglob("*.nii.gz"), *tmp_path.joinpath("processed").rglob("*.nii.gz")]
    assert len(outputs) == 8
    for path in outputs:
        raw = nib.load(path).header
        assert len(raw.extensions) == 0
        blob = raw.binaryblock
        for secret in (b"DOE", b"MRN123456", b"HOSPITAL", b"ACC998877", b"1950"):
            assert secret not in blob, f"{secret!r} leaked into {path.name}"


TINY_LDM_RUN = (
    "diffusion.unet.channels=[16,32]",
    "diffusion.train.batch_size=4",
    "diffusion.train.log_every=1",
    "diffusion.train.checkpoint_every=2",
    "diffusion.train.val_every=3",
    "diffusion.train.sample_every=1000",
    "diffusion.sampler.steps=2",
)


@pytest.mark.slow
def test_sigkill_during_train_diffusion_then_rerun_resumes_to_identical_weights(tmp_path):
    """Really kill ``synthmri train_diffusion`` (SIGKILL, no cleanup) after a checkpoint was written: no
    half-written checkpoint remains, the rerun resumes from the newest one, and it ends with bitwise the
    same EMA weights and loss history as a run that was never interrupted (CPU, one thread: the batch,
    noise and timesteps of a step depend only on (seed, step) and the checkpoint holds model, EMA,
    optimizer and RNG state)."""
    from synthmri.stages.encode import run_encode
    from synthmri.stages.train_vqgan import run_train_vqgan

    params, processed = make_processed(
        tmp_path, 6, (16, 16, 16), "vqgan.train.steps=2", "vqgan.loss.adversarial=0", "vqgan.loss.perceptual=0"
    )
    shared = tmp_path / "shared"
    run_train_vqgan(
        params,
        processed,
        shared / "vqgan",
        tmp_path / "ckpt-vq",
        tmp_path / "rep-vq",
        tmp_path / "vq.json",
        track=False,
    )
    run_encode(params, processed, shared / "vqgan", shared / "latents")
    runs = {}
    for name in ("killed", "reference"):  # two stage folders on the same VQ-GAN and latents
        work = runs[name] = tmp_path / name
        (work / "data").mkdir(parents=True)
        (work / "models").mkdir()
        os.symlink(shared / "latents", work / "data" / "latents")
        os.symlink(shared / "vqgan", work / "models" / "vqgan")

    # the stage as `dvc repro` reruns it: same command and parameters
    total = 60
    cmd = stage_command("train_diffusion", *TINY_LDM_RUN, f"diffusion.train.steps={total}")
    killed, env = runs["killed"], stage_env(runs["killed"])
    ckpt_dir = killed / "models" / "checkpoints" / "ldm"
    killed_at = kill_after_checkpoint(cmd, killed, env, ckpt_dir, min_step=4)
    assert killed_at < total

    done = subprocess.run(cmd, cwd=killed, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Discarding checkpoints" not in done.stderr, done.stderr[-2000:]
    assert f"Resuming diffusion training from the checkpoint at step {killed_at}" in done.stderr, done.stderr[-2000:]
    assert not ckpt_dir.exists(), "checkpoints (and any temporary file the kill left) are cleared at the end"
    reference = runs["reference"]
    ref = subprocess.run(cmd, cwd=reference, env=stage_env(reference), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert "Resuming" not in ref.stderr

    for work in (killed, reference):
        assert json.loads((work / "reports" / "ldm.json").read_text())["steps"] == total
    resumed = load_file(str(killed / "models" / "ldm" / "model.safetensors"))
    uninterrupted = load_file(str(reference / "models" / "ldm" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    different = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert not different, f"resumed EMA weights differ from the uninterrupted run in {different[:5]}"
    for curve in ("losses.csv", "validation.csv"):  # every step's loss, before and after the kill
        assert (killed / "reports" / "ldm" / curve).read_text() == (reference / "reports" / "ldm" / curve).read_text()


def test_every_torch_load_in_the_package_is_weights_only():
    """Static check: no code path unpickles arbitrary objects (checkpoints, LPIPS and MedicalNet weights)."""
    import ast

    calls = []
    for path in (REPO / "synthmri").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", safe))
    assert calls, "expected torch.load calls to check"
    assert [where for where, safe in calls if not safe] == []


def test_servers_we_start_or_document_bind_to_loopback_only():
    """Static check: every server command (Prefect, MLflow) in scripts, Makefile and README names
    --host 127.0.0.1, and none mentions 0.0.0.0."""
    import re

    texts = {
        p: p.read_text()
        for p in [*(REPO / "scripts").glob("*.sh"), REPO / "Makefile", REPO / "README.md", REPO / "prefect.yaml"]
        if p.is_file()
    }
    servers = [
        (p.name, line)
        for p, text in texts.items()
        for line in text.splitlines()
        if re.search(r"\b(prefect server start|mlflow (server|ui))\b", line) and not line.lstrip().startswith("#")
    ]
    assert servers, "expected server commands to check"
    for name, line in servers:
        assert "--host 127.0.0.1" in line, f"{name}: {line.strip()}"
    assert not [p.name for p, text in texts.items() if "0.0.0.0" in text]


def test_full_disk_during_a_stage_is_one_line_and_leaves_no_partial_output(tiny_tmpfs, tmp_path):
    """`synthmri demo` into a full filesystem: exit 1, one line naming the cause, no traceback, and no
    half-written cohort under the final name."""
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(tiny_tmpfs, work / "data")  # data/ (raw and every stage output) on the full filesystem
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "synthmri.cli",
            "demo",
            "--params",
            str(REPO / "params.yaml"),
            "-S",
            "demo.n_subjects=4",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("synthmri demo: No space left on device"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not any(tiny_tmpfs.rglob("*.nii.gz")), "no volume may be left as if complete"
