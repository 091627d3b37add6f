"""Normalize: common shape, intensity range, deterministic leak-free stratified splits, Nyúl on train only."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import SMALL_COHORT, blob_volume, make_params, write_nifti

from synthmri.catalog import LANDMARKS_NAME
from synthmri.config import SplitParams
from synthmri.data.masks import head_mask
from synthmri.data.normalize import fit_histogram_landmarks
from synthmri.data.split import assign_splits
from synthmri.errors import StageError
from synthmri.stages.ingest import run_ingest
from synthmri.stages.normalize import run_normalize


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("norm")
    root = tmp / "bids"
    rows = []
    for i in range(12):
        sub = f"sub-{i:02d}"
        scale = 1.0 + 0.5 * (i % 3)  # different intensity scales, as from different scanners
        write_nifti(root / sub / "anat" / f"{sub}_T1w.nii.gz", blob_volume(seed=i) * scale)
        rows.append((sub, 20 + 5 * i, "FM"[i % 2], f"site{1 + i % 3}"))
    pd.DataFrame(rows, columns=["participant_id", "age", "sex", "site"]).to_csv(
        root / "participants.tsv", sep="\t", index=False
    )
    params = make_params("ingest.source=bids", f"ingest.root={root}", "ingest.min_subjects=2")
    run_ingest(params, out_dir=tmp / "ingested")
    return root, tmp / "ingested"


def _normalize(ingested, tmp_path, *overrides):
    root, in_dir = ingested
    params = make_params(
        "ingest.source=bids",
        f"ingest.root={root}",
        "normalize.spacing=[3,3,3]",
        "normalize.shape=[16,20,16]",
        *SMALL_COHORT,
        *overrides,
    )
    return params, run_normalize(params, in_dir=in_dir, out_dir=tmp_path / "processed")


def test_shape_spacing_and_intensity_range(ingested, tmp_path):
    params, manifest = _normalize(ingested, tmp_path, "normalize.out_range=[-1,1]")
    low, high = params.normalize.out_range
    for rel in manifest["processed_path"]:
        image = nib.load(tmp_path / "processed" / rel)
        data = image.get_fdata()
        assert data.shape == (16, 20, 16)
        np.testing.assert_allclose(image.header.get_zooms(), (3, 3, 3))
        assert data.min() >= low and data.max() <= high
        assert np.isclose(data.min(), low) and np.isclose(data.max(), high)  # the full range is used
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    space = json.loads((tmp_path / "processed" / "space.json").read_text())
    assert space["shape"] == [16, 20, 16] and space["spacing_mm"] == [3.0, 3.0, 3.0]
    np.testing.assert_allclose(np.abs(np.diag(space["affine"]))[:3], [3, 3, 3])


def test_head_is_centred_in_the_crop(ingested, tmp_path):
    _, manifest = _normalize(ingested, tmp_path)
    data = nib.load(tmp_path / "processed" / manifest["processed_path"][0]).get_fdata()
    mask = head_mask(data + 1.0)
    centre = np.array(np.nonzero(mask)).mean(axis=1)
    np.testing.assert_allclose(centre, (np.array(data.shape) - 1) / 2, atol=1.5)


def test_split_is_recorded_and_no_subject_in_two_splits(ingested, tmp_path):
    _, manifest = _normalize(ingested, tmp_path)
    assert manifest.groupby("subject_id")["split"].nunique().max() == 1
    assert set(manifest["split"]) == {"train", "val", "test"}
    saved = pd.read_csv(tmp_path / "processed" / "manifest.csv")
    assert list(saved["split"]) == list(manifest["split"])


def _cohort(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        sessions = 1 + (i % 4 == 0)  # some subjects have two sessions
        for s in range(sessions):
            rows.append(
                {
                    "subject_id": f"sub-{i:03d}",
                    "session": f"ses-{s}",
                    "sex": rng.choice(["F", "M"], p=[0.3, 0.7]),
                    "site": f"site{rng.integers(1, 4)}",
                }
            )
    frame = pd.DataFrame(rows)
    # covariates are per subject: copy the first session's values
    first = frame.drop_duplicates("subject_id").set_index("subject_id")
    frame["sex"] = frame["subject_id"].map(first["sex"])
    frame["site"] = frame["subject_id"].map(first["site"])
    return frame


def test_split_deterministic_stratified_and_proportional():
    cohort = _cohort(200)
    cfg = SplitParams(train=0.7, val=0.15, test=0.15, seed=3, stratify=["sex", "site"])
    first, again = assign_splits(cohort, cfg), assign_splits(cohort, cfg)
    pd.testing.assert_series_equal(first, again)
    other = assign_splits(cohort, cfg.model_copy(update={"seed": 4}))
    assert not first.equals(other)
    counts = first.value_counts()
    assert counts["train"] == 140 and counts["val"] == 30 and counts["test"] == 30
    sex = cohort.drop_duplicates("subject_id").set_index("subject_id")["sex"]
    overall = (sex == "M").mean()
    for name in ("train", "val", "test"):
        share = (sex[first == name] == "M").mean()
        assert abs(share - overall) < 0.05, f"{name}: {share:.2f} male vs {overall:.2f} overall"


def test_small_cohort_still_gets_val_and_test():
    split = assign_splits(_cohort(12), SplitParams(stratify=["sex", "site"]))
    assert set(split) == {"train", "val", "test"}


def test_nyul_landmarks_fitted_on_training_split_only(ingested, tmp_path):
    _, in_dir = ingested
    params, manifest = _normalize(ingested, tmp_path, "normalize.histogram_standardization=true")
    saved = np.load(tmp_path / "processed" / LANDMARKS_NAME)
    train = manifest.loc[manifest["split"] == "train", "path"]
    expected = fit_histogram_landmarks([in_dir / p for p in train], tmp_path / "check.npy")
    np.testing.assert_allclose(saved, expected)
    everything = fit_histogram_landmarks([in_dir / p for p in manifest["path"]], tmp_path / "all.npy")
    assert not np.allclose(saved, everything), "landmarks must not see val/test volumes"


def test_a_cohort_too_small_for_a_later_stage_is_refused_before_anything_is_written(ingested, tmp_path):
    """12 subjects, 80/10/10: 2 held-out subjects, fewer than the 6 that k-NN metrics with k = 5 need."""
    with pytest.raises(StageError) as info:
        _normalize(ingested, tmp_path, "report.prdc_k=5")
    message = str(info.value)
    assert "\n" not in message and "cohort of 12 subject(s)" in message
    assert "split val+test holds 2 subject(s)" in message and "report.prdc_k=5" in message and "at least 6" in message
    assert "split train" not in message, "the training split (9-10 subjects) is large enough"
    assert not (tmp_path / "processed").exists()
    # every reader's minimum is checked: an empty test split fails the reconstruction scores
    with pytest.raises(StageError, match=r"split test holds 0 subject\(s\), the report's VQ-GAN reconstruction"):
        _normalize(
            ingested,
            tmp_path,
            "normalize.split={train: 0.9, val: 0.1, test: 0.0, seed: 0, stratify: []}",
            "report.reference_splits=[val]",
            "report.prdc_k=1",
        )


def test_downsampling_low_passes_first_so_fine_detail_does_not_alias():
    """A 3 mm-period stripe pattern lies above the Nyquist limit of a 4 mm grid (8 mm): a scanner at 4 mm
    cannot see it, so the normalized volume must be flat. Plain interpolation (torchio's default) folds it
    into a false 12 mm stripe with half the input's amplitude (std 0.35; measured with antialias: 0.001)."""
    import torch
    import torchio as tio

    from synthmri.data.normalize import build_transform

    resample = next(
        t for t in build_transform(make_params("normalize.spacing=[4,4,4]"), None) if isinstance(t, tio.Resample)
    )
    z = np.arange(64)
    stripes = np.sin(2 * np.pi * z / 3.0)[:, None, None] * np.ones((64, 64, 64))
    image = tio.ScalarImage(tensor=torch.from_numpy(stripes[None].astype(np.float32)), affine=np.eye(4))
    out = resample(image).data[0, 2:-2, 2:-2, 2:-2]  # away from the borders
    assert out.shape[0] == 12 and float(out.std()) < 0.05, float(out.std())
