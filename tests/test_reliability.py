"""Faults and privacy: unreachable tracking server, full disk, identifiers in input headers."""

from __future__ import annotations

import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

from synthmri.data.ingest import run_ingest
from synthmri.data.normalize import run_normalize
from synthmri.errors import StageError
from synthmri.io import save_nifti
from synthmri.tracking import check_reachable

from conftest import blob_volume, make_params, make_processed


def test_unreachable_tracking_server_fails_fast_with_clear_message(tmp_path, monkeypatch):
    from synthmri.training.train_vqgan import run_train_vqgan

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
    for i in range(3):
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
    params = make_params("ingest.source=bids", f"ingest.root={root}", "ingest.min_subjects=1",
                         "normalize.shape=[16,16,16]")
    run_ingest(params, out_dir=tmp_path / "ingested")
    run_normalize(params, in_dir=tmp_path / "ingested", out_dir=tmp_path / "processed")
    outputs = [*tmp_path.joinpath("ingested").rglob("*.nii.gz"), *tmp_path.joinpath("processed").rglob("*.nii.gz")]
    assert len(outputs) == 6
    for path in outputs:
        raw = nib.load(path).header
        assert len(raw.extensions) == 0
        blob = raw.binaryblock
        for secret in (b"DOE", b"MRN123456", b"HOSPITAL", b"ACC998877", b"1950"):
            assert secret not in blob, f"{secret!r} leaked into {path.name}"
