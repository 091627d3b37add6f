"""Shared helpers for tests: small synthetic volumes and parameter objects."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from synthmri.config import Params, load_params
from synthmri.io import save_nifti, sha256_file

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """A SIGTERM (a CI job cancelled, ``kill`` of the runner) ends the session like Ctrl-C: pytest unwinds, so
    every ``finally`` and fixture teardown runs and stops the servers and workers that the tests started."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def blob_volume(shape=(24, 28, 20), seed=0) -> np.ndarray:
    """A head-like smooth ellipsoid with texture: enough structure for every stage's checks."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt(((grid / 0.75) ** 2).sum(0))
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    return np.where(radius < 1, 100 + 40 * (radius < 0.5) + 20 * texture, 0).astype(np.float32)


def write_nifti(path: Path | bytes, data: np.ndarray, affine=None) -> None:
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    path_str = os.fsdecode(path)
    Path(path_str).parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path_str)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every regular file under root (links are recorded, not followed)."""
    digests = {}
    for dirpath, _, files in os.walk(os.fsencode(root)):
        for name in files:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                digests[os.fsdecode(full)] = "link->" + os.fsdecode(os.readlink(full))
            else:
                with open(full, "rb") as handle:
                    digests[os.fsdecode(full)] = hashlib.sha256(handle.read()).hexdigest()
    return digests


def copy_working_tree(work: Path) -> Path:
    """Copy the repository's working tree (tracked + new, not ignored files) to ``work``: what a fresh
    clone of this change would contain, for end-to-end tests that run DVC in their own git repo."""
    import shutil
    import subprocess

    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, listed):
        source = REPO / os.fsdecode(rel)
        if source.is_file():
            target = work / os.fsdecode(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return work


def make_params(*overrides: str) -> Params:
    """The repository's params.yaml with overrides, as a user would get them from the CLI."""
    return load_params(REPO / "params.yaml", list(overrides))


@pytest.fixture
def seeded_single_thread():
    """Seeded and single-threaded: tiny tensors gain nothing from threads, and on a shared 2-core
    machine two spinning threads per process slow everything down many times over."""
    import torch

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_bids(root: Path, n: int = 8, shape=(24, 28, 20)) -> Path:
    """A small valid BIDS folder of blob volumes with age/sex/site covariates."""
    import pandas as pd

    rows = []
    for i in range(n):
        sub = f"sub-{i:02d}"
        write_nifti(root / sub / "anat" / f"{sub}_T1w.nii.gz", blob_volume(shape=shape, seed=i))
        rows.append((sub, 20 + 7 * i, "FM"[i % 2], f"site{1 + i % 3}"))
    pd.DataFrame(rows, columns=["participant_id", "age", "sex", "site"]).to_csv(
        root / "participants.tsv", sep="\t", index=False
    )
    return root


TINY_VQGAN = (
    "vqgan.model.channels=[8,16,32]",
    "vqgan.model.downsample_factor=4",
    "vqgan.model.latent_channels=4",
    "vqgan.quantizer.codebook_size=64",
    "vqgan.train.batch_size=2",
    "vqgan.train.log_every=1",
    "vqgan.discriminator.channels=8",
    "vqgan.loss.lpips_slices_per_axis=1",
)


# A cohort of 8-12 subjects holds 1 val and 1 test subject: the report's k-NN metrics can use k = 1 only
# (normalize refuses a cohort too small for report.prdc_k; synthmri.data.split.split_minimums).
SMALL_COHORT = ("report.prdc_k=1",)
# Fewer than 8 subjects: 80/10/10 leaves the test split empty; half/quarter/quarter gives 2/1/1 from 4.
SMALL_SPLIT = "normalize.split={train: 0.5, val: 0.25, test: 0.25, seed: 0, stratify: []}"


def make_processed(work: Path, n: int = 8, shape=(16, 16, 16), *overrides: str) -> tuple[Params, Path]:
    """Ingest + normalize a tiny cohort into ``work``; returns the params and the processed folder."""
    from synthmri.stages.ingest import run_ingest
    from synthmri.stages.normalize import run_normalize

    make_bids(work / "bids", n)
    params = make_params(
        "ingest.source=bids",
        f"ingest.root={work / 'bids'}",
        "ingest.min_subjects=2",
        *SMALL_COHORT,
        *([SMALL_SPLIT] if n < 8 else []),
        "normalize.spacing=[3,3,3]",
        f"normalize.shape={list(shape)}",
        *TINY_VQGAN,
        *overrides,
    )
    run_ingest(params, out_dir=work / "ingested")
    run_normalize(params, in_dir=work / "ingested", out_dir=work / "processed")
    return params, work / "processed"


def make_encoded(work: Path) -> tuple[Params, Path]:
    """A tiny processed cohort (8 subjects, 16³), a VQ-GAN trained on it for two steps, and its latents in
    ``work / "latents"``: what a diffusion trainer needs, in seconds. Returns the params and the processed folder."""
    from synthmri.stages.encode import run_encode
    from synthmri.stages.train_vqgan import run_train_vqgan

    params, processed = make_processed(work, 8, (16, 16, 16), "vqgan.train.steps=2", "vqgan.train.val_every=100")
    run_train_vqgan(params, processed, work / "vqgan", work / "ck", work / "rv", work / "rv.json", track=False)
    run_encode(params, processed, work / "vqgan", work / "latents")
    return params, processed


def stage_command(stage: str, *overrides: str) -> list[str]:
    """``synthmri <stage>`` as a child process, on the repository's params.yaml plus ``-S`` overrides."""
    import sys

    cmd = [sys.executable, "-m", "synthmri.cli", stage, "--params", str(REPO / "params.yaml")]
    for override in overrides:
        cmd += ["-S", override]
    return cmd


def stage_env(work: Path) -> dict[str, str]:
    """Environment of a stage child process: its own MLflow store in ``work``, one thread (reproducible
    and fast for tiny tensors on a shared machine)."""
    return dict(
        os.environ,
        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        DVC_NO_ANALYTICS="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )


def kill_after_checkpoint(
    cmd: list[str], cwd: Path, env: dict[str, str], checkpoint_dir: Path, min_step: int, timeout_s: float = 300
) -> int:
    """Start a training stage, SIGKILL it once it has written a checkpoint at ``min_step`` or later, and
    check that every checkpoint left under its final name is complete (loads with ``weights_only``).
    Returns the step of the newest checkpoint, where the rerun must resume."""
    import signal
    import subprocess
    import time

    from synthmri.training.checkpoint import list_checkpoints, load_checkpoint

    def newest() -> int:
        found = list_checkpoints(checkpoint_dir)
        return int(found[-1].stem.split("-")[1]) if found else -1

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline and newest() < min_step and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the stage ended on its own (exit {proc.returncode}) before the kill"
    saved = list_checkpoints(checkpoint_dir)
    assert saved, "no checkpoint was written before the kill"
    for path in saved:
        state = load_checkpoint(path)  # torch.load(weights_only=True): whatever has a final name is complete
        assert state["step"] == int(path.stem.split("-")[1])
    return newest()


def fake_synthetic_set(out: Path, processed: Path, copy_of: int, n_novel: int = 5) -> str:
    """A synthetic set laid out like the sample stage's: novel blob heads plus one exact copy of a training
    volume (index ``copy_of`` of the training split); returns the copy's file name."""
    space = json.loads((processed / "space.json").read_text())
    manifest = pd.read_csv(processed / "manifest.csv")
    train = manifest[manifest["split"] == "train"].reset_index(drop=True)
    rows, copy_name = [], ""
    for i in range(n_novel + 1):
        name = f"volumes/sample-{i:06d}.nii.gz"
        if i == n_novel:  # the exact copy: processed [-1, 1] -> [0, 1] as the sample stage writes volumes
            source = np.asarray(nib.load(processed / train["processed_path"][copy_of]).dataobj, dtype=np.float32)
            volume = (source + 1.0) / 2.0
            covariates = train.iloc[copy_of][["age", "sex", "site"]].to_dict()
            copy_name = name
        else:
            raw = blob_volume(tuple(space["shape"]), seed=100 + i)
            volume = np.clip(raw / np.percentile(raw[raw > 0], 99.5), 0, 1)
            covariates = {"age": 25.0 + 10 * i, "sex": "FM"[i % 2], "site": f"site{1 + i % 3}"}
        save_nifti(volume.astype(np.float32), np.asarray(space["affine"]), out / name)
        rows.append(
            {
                "file": name,
                "sample_index": i,
                "seed": 1000 + i,
                **covariates,
                "sampler": "ddim",
                "steps": 5,
                "guidance_scale": 2.0,
                "sha256": sha256_file(out / name),
                "vqgan_version": "3",
                "vqgan_sha256": "a" * 64,
                "ldm_version": "2",
                "ldm_sha256": "b" * 64,
                "synthmri_version": "0.1",
            }
        )
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    return copy_name
