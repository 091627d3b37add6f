"""Your own data, end to end: the README's "Your own data" steps, literally, on a fresh clone with a data
set the project never saw (real anatomy, oblique and LPS volumes, sessions, sidecars, a bad file)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import copy_working_tree, tree_digest

pytestmark = pytest.mark.slow

DVC = str(Path(sys.executable).parent / "dvc")


def real_anatomy_bids(root: Path, n: int, seed: int = 0) -> Path:
    """A BIDS folder of ``n`` subjects cut from nilearn's MNI152 T1 (real anatomy, 2 mm, int16 as scanners
    write it): subject 1 is oblique (15° about x), subject 2 is stored LPS, subject 3 has two sessions,
    sidecars at the root (inherited) and per file, and one truncated file listed in participants.tsv."""
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=2)
    anatomy = np.asarray(template.dataobj, dtype=np.float32)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "own-data test", "BIDSVersion": "1.9.0"}))
    (root / "T1w.json").write_text(json.dumps({"MagneticFieldStrength": 3, "RepetitionTimeExcitation": 0.0071}))
    rows = []
    for i in range(n):
        sub = f"sub-{i + 1:02d}"
        sessions = ["ses-01", "ses-02"] if i == 3 else [None]
        for session in sessions:
            data = anatomy * rng.uniform(0.7, 1.3) + rng.normal(0, 2.0, anatomy.shape) * (anatomy > 0)
            data = np.clip(data / max(float(data.max()), 1e-6) * 1200, 0, None).astype(np.int16)
            affine = template.affine.copy()
            if i == 1:  # oblique acquisition: the voxel grid is rotated in world space
                angle = np.deg2rad(15)
                rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
                affine[:3, :3] = rotation @ affine[:3, :3]
            if i == 2:  # stored LPS: first two axes flipped, the affine says so
                flip = np.diag([-1.0, -1.0, 1.0, 1.0])
                flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
                data, affine = data[::-1, ::-1].copy(), affine @ flip
            folder = root / sub / (session or "") / "anat"
            stem = "_".join(filter(None, [sub, session, "T1w"]))
            folder.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), folder / f"{stem}.nii.gz")
            (folder / f"{stem}.json").write_text(json.dumps({"EchoTime": 0.003, "FlipAngle": 8}))
        rows.append((sub, int(rng.integers(20, 85)), "FM"[i % 2], f"site{1 + i % 3}"))
    bad = f"sub-{n + 1:02d}"
    (root / bad / "anat").mkdir(parents=True)
    (root / bad / "anat" / f"{bad}_T1w.nii.gz").write_bytes(b"\x1f\x8b\x08 truncated on the way from the scanner")
    rows.append((bad, 50, "F", "site1"))
    pd.DataFrame(rows, columns=["participant_id", "age", "sex", "site"]).to_csv(
        root / "participants.tsv", sep="\t", index=False
    )
    return root


def table_layout(bids: Path, root: Path) -> Path:
    """The same volumes as a plain folder + covariates table (``ingest.source: table``)."""
    participants = pd.read_csv(bids / "participants.tsv", sep="\t")
    rows = []
    for image in sorted(bids.rglob("*_T1w.nii.gz")):
        subject = image.name.split("_")[0]
        session = next((p for p in image.name.split("_") if p.startswith("ses-")), "")
        target = root / "images" / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
        covariates = participants.set_index("participant_id").loc[subject]
        rows.append(
            {"participant_id": subject, "session": session, "path": f"images/{image.name}", **covariates.to_dict()}
        )
    pd.DataFrame(rows).to_csv(root / "covariates.csv", index=False)
    return root


def fresh_clone(work: Path, profile: str | None) -> dict[str, str]:
    """What a user has after `git clone`: this change's files in a new git repository (and its own stores)."""
    copy_working_tree(work)
    if profile:
        shutil.copy(work / "profiles" / profile, work / "params.yaml")
    env = dict(
        os.environ,
        DVC_NO_ANALYTICS="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(work),
        PREFECT_HOME=str(work.parent / "prefect-home"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    for inherited in ("MLFLOW_TRACKING_URI", "SYNTHMRI_PARENT_RUN_ID", "PREFECT_API_URL"):
        env.pop(inherited, None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    return env


def edit_params(work: Path, source: str, root: Path, table: str | None = None) -> None:
    """The README's step 1, as a user does it: change the `source:` and `root:` lines of `ingest:`."""
    lines = (work / "params.yaml").read_text().splitlines()
    start = lines.index("ingest:")
    for i in range(start + 1, len(lines)):
        key = lines[i].strip().split(":")[0]
        if key == "source":
            lines[i] = f"  source: {source}"
        elif key == "root":
            lines[i] = f"  root: {root}"
        elif key == "table" and table:
            lines[i] = f"  table: {table}"
        if lines[i] and not lines[i].startswith(" "):
            break
    (work / "params.yaml").write_text("\n".join(lines) + "\n")


def dvc_repro(work: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([DVC, "repro"], cwd=work, env=env, capture_output=True, text=True, timeout=1800)


def test_readme_own_data_steps_run_a_bids_folder_through_report_without_the_demo(tmp_path):
    bids = real_anatomy_bids(tmp_path / "my-bids", 12)
    raw_before = tree_digest(bids)
    work = tmp_path / "clone"
    env = fresh_clone(work, "smoke.yaml")  # the smoke profile's budgets; the steps are the README's
    edit_params(work, "bids", bids)

    done = dvc_repro(work, env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Running stage 'demo" not in done.stdout and not (work / "data" / "raw" / "demo").exists()
    for stage in ("ingest", "normalize", "train_vqgan", "encode", "train_diffusion", "sample", "report"):
        assert f"Running stage '{stage}'" in done.stdout, stage
    assert (work / "reports" / "report.html").is_file()
    assert "gate_passed" in json.loads((work / "reports" / "metrics.json").read_text())

    manifest = pd.read_csv(work / "data" / "ingested" / "manifest.csv", dtype={"session": str})
    assert manifest["subject_id"].nunique() == 12 and len(manifest) == 13  # sub-04 has two sessions
    assert set(manifest.loc[manifest["subject_id"] == "sub-03", "orientation"]) == {"LPS"}
    quarantine = pd.read_csv(work / "data" / "ingested" / "quarantine.csv")
    assert list(quarantine["subject_id"]) == ["sub-13"]
    assert tree_digest(bids) == raw_before, "raw data is never modified"

    again = dvc_repro(work, env)
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout


@pytest.mark.parametrize("source", ["bids", "table"])
def test_a_cohort_too_small_for_the_report_stops_at_normalize_before_any_training(tmp_path, source):
    """10 valid subjects pass ingest (min_subjects 8), but the default 80/10/10 split leaves 2 held-out
    subjects, and the report's k-NN metrics (prdc_k 5) need 6: normalize says so in one line."""
    bids = real_anatomy_bids(tmp_path / "my-bids", 10)
    work = tmp_path / "clone"
    env = fresh_clone(work, None)  # the default params.yaml
    if source == "table":
        edit_params(work, "table", table_layout(bids, tmp_path / "my-folder"), "covariates.csv")
    else:
        edit_params(work, "bids", bids)

    done = dvc_repro(work, env)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("synthmri normalize:")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "split val+test holds 2 subject(s)" in lines[0] and "at least 6" in lines[0], lines[0]
    assert "Running stage 'train_vqgan'" not in done.stdout and not (work / "models").exists()
    assert not (work / "data" / "processed" / "manifest.csv").exists()
    assert not (work / "data" / "raw" / "demo").exists()
