"""Ingest: every kind of bad input is set aside with its reason; good data goes through untouched."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import blob_volume, make_params, tree_digest, write_nifti

from synthmri.errors import StageError
from synthmri.stages.ingest import run_ingest


def _anat(root: Path, sub: str, suffix=".nii.gz") -> Path:
    return root / sub / "anat" / f"{sub}_T1w{suffix}"


def _patch_header(path: Path, fmt: str, offset: int, *values) -> None:
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, offset, *values)
    path.write_bytes(bytes(raw))


# (subject, expected reason fragment); each subject carries exactly one defect
BAD_FILES = {
    "sub-trunc": "truncated or corrupt",
    "sub-notgz": "not a readable NIfTI",
    "sub-magic": "not a readable NIfTI",
    "sub-twod": "2D image",
    "sub-fourd": "4D image with 3 volumes",
    "sub-nan": "NaN or infinite",
    "sub-inf": "NaN or infinite",
    "sub-zero": "same value",
    "sub-huge": "header claims",
    "sub-voxzero": "zero, negative",
    "sub-voxneg": "zero, negative",
    "sub-voxbig": "voxel size",
    "sub-singular": "singular",
    "sub-shear": "sheared",
    "sub-loop": "symbolic link loop",
    "sub-escape": "escapes the data root",
}
BAD_ROWS = {
    "sub-typo": ("forty", "F", "is not a number"),
    "sub-old": ("150", "F", "outside the allowed range"),
    "sub-sexx": ("40", "X", "is not one of F, M"),
    "sub-noage": ("n/a", "M", "missing required covariate 'age'"),
}
GOOD = ["sub-g01", "sub-g02", "sub-g03", "sub-onevol4d"]


@pytest.fixture
def bad_bids(tmp_path: Path) -> Path:
    root = tmp_path / "bids"
    for i, sub in enumerate(GOOD[:3]):
        write_nifti(_anat(root, sub), blob_volume(seed=i))
    write_nifti(_anat(root, "sub-onevol4d"), blob_volume(seed=9)[..., None])
    # a second session of a good subject
    write_nifti(root / "sub-g01" / "ses-2" / "anat" / "sub-g01_ses-2_T1w.nii.gz", blob_volume(seed=5))

    good = blob_volume(seed=3)
    trunc = _anat(root, "sub-trunc")
    write_nifti(trunc, good)
    trunc.write_bytes(trunc.read_bytes()[: len(trunc.read_bytes()) // 2])
    notgz = _anat(root, "sub-notgz")
    notgz.parent.mkdir(parents=True)
    notgz.write_text("this is not gzip data at all")
    magic = _anat(root, "sub-magic", ".nii")
    write_nifti(magic, good)
    _patch_header(magic, "4s", 344, b"xyz\0")
    write_nifti(_anat(root, "sub-twod"), good[:, :, 0])
    write_nifti(_anat(root, "sub-fourd"), np.stack([good] * 3, axis=-1))
    write_nifti(_anat(root, "sub-nan"), np.where(good > 130, np.nan, good))
    write_nifti(_anat(root, "sub-inf"), np.where(good > 130, np.inf, good))
    write_nifti(_anat(root, "sub-zero"), np.zeros_like(good))
    huge = _anat(root, "sub-huge", ".nii")
    write_nifti(huge, good)
    _patch_header(huge, "<8h", 40, 3, 1000, 1000, 1000, 1, 1, 1, 1)
    voxzero = _anat(root, "sub-voxzero", ".nii")
    write_nifti(voxzero, good)
    _patch_header(voxzero, "<f", 80, 0.0)
    voxneg = _anat(root, "sub-voxneg", ".nii")
    write_nifti(voxneg, good)
    _patch_header(voxneg, "<f", 80, -2.0)
    write_nifti(_anat(root, "sub-voxbig"), good, np.diag([50.0, 50.0, 50.0, 1.0]))
    singular = np.diag([2.0, 2.0, 2.0, 1.0])
    singular[:3, 1] = singular[:3, 0]
    write_nifti(_anat(root, "sub-singular"), good, singular)
    shear = np.diag([2.0, 2.0, 2.0, 1.0])
    shear[0, 1] = 0.8
    write_nifti(_anat(root, "sub-shear"), good, shear)
    loop = _anat(root, "sub-loop")
    loop.parent.mkdir(parents=True)
    os.symlink(loop.name, loop)
    outside = tmp_path / "outside_T1w.nii.gz"
    write_nifti(outside, good)
    escape = _anat(root, "sub-escape")
    escape.parent.mkdir(parents=True)
    os.symlink(outside, escape)
    # a non-UTF-8 file name
    bad_name = os.fsencode(root) + b"/sub-bad\xff/anat/sub-bad\xff_T1w.nii.gz"
    write_nifti(bad_name, good)
    # covariate problems
    for sub in BAD_ROWS:
        write_nifti(_anat(root, sub), good)
    write_nifti(_anat(root, "sub-dup"), good)
    write_nifti(_anat(root, "sub-norow"), good)

    rows = [(s, "40", "F", "site1") for s in GOOD + list(BAD_FILES)]
    rows += [(s, age, sex, "site2") for s, (age, sex, _) in BAD_ROWS.items()]
    rows += [("sub-dup", "30", "M", "site1"), ("sub-dup", "31", "M", "site1"), ("sub-ghost", "50", "M", "site3")]
    pd.DataFrame(rows, columns=["participant_id", "age", "sex", "site"]).to_csv(
        root / "participants.tsv", sep="\t", index=False
    )
    return root


def test_bad_inputs_are_quarantined_with_reasons_and_raw_is_untouched(bad_bids: Path, tmp_path: Path):
    before = tree_digest(bad_bids)
    params = make_params("ingest.source=bids", f"ingest.root={bad_bids}", "ingest.min_subjects=2")
    manifest = run_ingest(params, out_dir=tmp_path / "ingested")

    assert tree_digest(bad_bids) == before, "raw data must be byte-identical after ingest"
    assert sorted(manifest["subject_id"].unique()) == sorted(GOOD)
    assert len(manifest) == len(GOOD) + 1  # the second session is its own volume
    assert set(manifest.loc[manifest["subject_id"] == "sub-g01", "session"]) == {"", "ses-2"}

    quarantine = pd.read_csv(tmp_path / "ingested" / "quarantine.csv", keep_default_na=False)
    reasons = quarantine.groupby("subject_id")["reason"].apply(" | ".join).to_dict()
    expected = dict(BAD_FILES)
    expected.update({s: frag for s, (_, _, frag) in BAD_ROWS.items()})
    expected.update(
        {"sub-dup": "appears more than once", "sub-norow": "no row for 'sub-norow'", "sub-ghost": "has no *_T1w"}
    )
    for subject, fragment in expected.items():
        assert subject in reasons, f"{subject} was not quarantined"
        assert fragment in reasons[subject], f"{subject}: {reasons[subject]!r} lacks {fragment!r}"
    assert any("not valid UTF-8" in r for r in quarantine["reason"])
    assert quarantine["reason"].str.contains("Traceback").sum() == 0
    assert all("\n" not in r for r in quarantine["reason"])


def test_outputs_are_ras_with_clean_headers_and_manifest_checksums(bad_bids: Path, tmp_path: Path):
    params = make_params("ingest.source=bids", f"ingest.root={bad_bids}", "ingest.min_subjects=2")
    out = tmp_path / "ingested"
    manifest = run_ingest(params, out_dir=out)
    import hashlib

    for row in manifest.itertuples():
        image = nib.load(out / row.path)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert b"SynthMRI" in image.header["descrip"].tobytes()
        source = hashlib.sha256((bad_bids / row.source_path).read_bytes()).hexdigest()
        assert row.source_sha256 == source


@pytest.mark.parametrize(
    "name,affine",
    [
        ("LPS", np.array([[-2.0, 0, 0, 30], [0, -2.0, 0, 40], [0, 0, 2.0, -20], [0, 0, 0, 1]])),
        ("oblique-LPI", None),
    ],
)
def test_reorientation_keeps_landmark_world_coordinate(tmp_path: Path, name: str, affine):
    if affine is None:  # rotated 25 degrees about z, 1.5 mm voxels, flipped to L-P-I
        c, s = np.cos(np.radians(25)), np.sin(np.radians(25))
        rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([-1.5, -1.5, -1.5])
        affine = np.eye(4)
        affine[:3, :3] = rotation
        affine[:3, 3] = [12.0, -7.0, 33.0]
    root = tmp_path / "bids"
    data = blob_volume(seed=1)
    landmark = (5, 9, 13)
    data[landmark] = 1000.0
    for sub in ("sub-a", "sub-b"):
        write_nifti(_anat(root, sub), data, affine)
    pd.DataFrame({"participant_id": ["sub-a", "sub-b"], "age": [30, 40], "sex": ["F", "M"]}).to_csv(
        root / "participants.tsv", sep="\t", index=False
    )
    params = make_params("ingest.source=bids", f"ingest.root={root}", "ingest.min_subjects=1")
    manifest = run_ingest(params, out_dir=tmp_path / "out")
    row = manifest.iloc[0]
    assert row["orientation"] == "".join(nib.aff2axcodes(affine))
    out = nib.load(tmp_path / "out" / row["path"])
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    found = np.unravel_index(np.argmax(out.get_fdata()), out.shape)
    world_in = affine @ np.array([*landmark, 1.0])
    world_out = out.affine @ np.array([*found, 1.0])
    np.testing.assert_allclose(world_out, world_in, atol=1e-4)


def test_table_source_rejects_escaping_paths_and_bad_ids(tmp_path: Path):
    root = tmp_path / "data"
    for i in range(3):
        write_nifti(root / f"scan{i}.nii.gz", blob_volume(seed=i))
    write_nifti(tmp_path / "secret.nii.gz", blob_volume(seed=7))
    table = pd.DataFrame(
        {
            "participant_id": ["s0", "s1", "s2", "s3", "../evil"],
            "path": ["scan0.nii.gz", "scan1.nii.gz", "scan2.nii.gz", "../secret.nii.gz", "scan0.nii.gz"],
            "age": [20, 30, 40, 50, 60],
            "sex": ["F", "M", "F", "M", "F"],
        }
    )
    table.to_csv(tmp_path / "covariates.csv", index=False)
    params = make_params(
        "ingest.source=table",
        f"ingest.root={root}",
        f"ingest.table={tmp_path / 'covariates.csv'}",
        "ingest.min_subjects=1",
    )
    manifest = run_ingest(params, out_dir=tmp_path / "out")
    assert sorted(manifest["subject_id"]) == ["s0", "s1", "s2"]
    quarantine = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    reasons = dict(zip(quarantine["subject_id"], quarantine["reason"]))
    assert "escapes the data root" in reasons["s3"]
    assert "not allowed in a file name" in reasons["../evil"]
    assert not any((tmp_path / "out").rglob("*evil*"))


def test_too_few_subjects_fails_with_clear_message(bad_bids: Path, tmp_path: Path):
    params = make_params("ingest.source=bids", f"ingest.root={bad_bids}", "ingest.min_subjects=10")
    with pytest.raises(StageError, match="only 4 valid subject"):
        run_ingest(params, out_dir=tmp_path / "ingested")
    assert (tmp_path / "ingested" / "quarantine.csv").is_file(), "the reasons must be written before failing"


def test_gzip_helper_sanity(tmp_path: Path):
    """The truncated fixture really is a truncated gzip stream (guards the test corpus itself)."""
    path = tmp_path / "x.nii.gz"
    write_nifti(path, blob_volume())
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises((EOFError, OSError)):
        gzip.decompress(path.read_bytes())
