"""Covariates from BIDS sidecars (inheritance, units) and from the image header, through ingest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, blob_volume, write_nifti
from pydantic import ValidationError

from synthmri.config import Covariate, Params, load_params
from synthmri.data.acquisition import SidecarReader, check_units
from synthmri.errors import InvalidInput
from synthmri.stages.ingest import run_ingest

ACQUISITION = [
    {"name": "field_strength", "kind": "continuous", "range": [0.5, 7.5], "source": "sidecar",
     "key": "MagneticFieldStrength"},
    {"name": "tr", "kind": "continuous", "range": [0.005, 5.0], "source": "sidecar",
     "key": ["RepetitionTimePreparation", "RepetitionTime"]},
    {"name": "echo_time", "kind": "continuous", "range": [0.001, 0.1], "source": "sidecar", "key": "EchoTime",
     "required": False},
    {"name": "vendor", "kind": "categorical", "levels": ["A", "B"], "source": "sidecar", "key": "Manufacturer"},
    {"name": "voxel_size", "kind": "continuous", "range": [0.5, 3.0], "source": "header", "key": "voxel_size_mm"},
]  # fmt: skip


def params_with(tmp_path: Path, covariates: list[dict], **ingest) -> Params:
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    participants = [c for c in tree["covariates"] if c.get("source", "participants") == "participants"]
    tree["covariates"] = participants + covariates  # age, sex, site from participants.tsv, then these
    tree["ingest"].update({"min_subjects": 1, **ingest})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_params(path)


def sidecar(path: Path, **keys) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(keys))


@pytest.fixture
def bids_tree(tmp_path: Path) -> Path:
    """Root sidecar for every T1w; sub-02 overrides the field at subject level; sub-03's ses-1 overrides the echo
    time beside its image; sub-04 has a TR in milliseconds; sub-05 is scanned at 1 mm."""
    root = tmp_path / "bids"
    sidecar(root / "dataset_description.json", Name="acq", BIDSVersion="1.9.0")
    sidecar(root / "T1w.json", MagneticFieldStrength=3, RepetitionTime=2.3, EchoTime=0.003, Manufacturer="A")
    rows = []
    for sub, sessions in (("01", [""]), ("02", [""]), ("03", ["1", "2"]), ("04", [""]), ("05", [""])):
        for ses in sessions:
            folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
            stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + "_T1w"
            affine = np.diag([1.0, 1.0, 1.0, 1.0]) if sub == "05" else None
            write_nifti(folder / f"{stem}.nii.gz", blob_volume(seed=int(sub)), affine)
        rows.append({"participant_id": f"sub-{sub}", "age": 30 + int(sub), "sex": "F"})
    sidecar(root / "sub-02" / "sub-02_T1w.json", MagneticFieldStrength=1.5, Manufacturer="B")
    sidecar(root / "sub-03" / "ses-1" / "anat" / "sub-03_ses-1_T1w.json", EchoTime=0.004)
    sidecar(root / "sub-04" / "anat" / "sub-04_T1w.json", RepetitionTime=2300)
    pd.DataFrame(rows).to_csv(root / "participants.tsv", sep="\t", index=False)
    return root


def test_sidecar_inheritance_nearest_file_wins_keys_merge(bids_tree: Path):
    reader = SidecarReader(bids_tree, bids=True)

    def meta(rel: str) -> dict:
        return reader.metadata(bids_tree / rel)

    root_level = meta("sub-01/anat/sub-01_T1w.nii.gz")
    assert (root_level["MagneticFieldStrength"], root_level["EchoTime"], root_level["Manufacturer"]) == (3, 0.003, "A")
    subject_level = meta("sub-02/anat/sub-02_T1w.nii.gz")
    assert subject_level["MagneticFieldStrength"] == 1.5 and subject_level["Manufacturer"] == "B"
    assert subject_level["RepetitionTime"] == 2.3  # not overridden: inherited from the root
    session_1, session_2 = (
        meta("sub-03/ses-1/anat/sub-03_ses-1_T1w.nii.gz"),
        meta("sub-03/ses-2/anat/sub-03_ses-2_T1w.nii.gz"),
    )
    assert session_1["EchoTime"] == 0.004 and session_2["EchoTime"] == 0.003
    assert session_1["MagneticFieldStrength"] == session_2["MagneticFieldStrength"] == 3


def bids_params(tmp_path: Path, root: Path) -> Params:
    return params_with(tmp_path, ACQUISITION, source="bids", root=str(root))


def test_ingest_reads_sidecar_and_header_covariates_and_quarantines_milliseconds(bids_tree: Path, tmp_path: Path):
    manifest = run_ingest(bids_params(tmp_path, bids_tree), out_dir=tmp_path / "out").set_index("item_id")
    assert sorted(manifest.index) == ["sub-01", "sub-02", "sub-03_ses-1", "sub-03_ses-2", "sub-05"]
    assert manifest.loc["sub-02", "field_strength"] == 1.5 and manifest.loc["sub-02", "vendor"] == "B"
    assert manifest.loc["sub-01", "field_strength"] == 3 and manifest.loc["sub-01", "tr"] == 2.3  # fallback key
    assert manifest.loc["sub-03_ses-1", "echo_time"] == 0.004 and manifest.loc["sub-03_ses-2", "echo_time"] == 0.003
    assert manifest.loc["sub-05", "voxel_size"] == 1.0 and manifest.loc["sub-01", "voxel_size"] == 2.0
    quarantine = pd.read_csv(tmp_path / "out" / "quarantine.csv").set_index("subject_id")
    reason = quarantine.loc["sub-04", "reason"]
    assert "RepetitionTime = 2300" in reason and "milliseconds" in reason and "2.3 s" in reason
    # the ingest manifest carries them like any other covariate, read back by the same parser
    saved = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert {"field_strength", "tr", "echo_time", "vendor", "voxel_size"} <= set(saved.columns)


def test_missing_required_sidecar_key_and_wrong_level_are_quarantined(bids_tree: Path, tmp_path: Path):
    sidecar(bids_tree / "sub-01" / "sub-01_T1w.json", MagneticFieldStrength=3, Manufacturer="C")
    (bids_tree / "T1w.json").write_text(json.dumps({"RepetitionTime": 2.3, "Manufacturer": "A"}))  # no field
    sidecar(bids_tree / "sub-02" / "sub-02_T1w.json", MagneticFieldStrength=1.5)
    run_ingest(bids_params(tmp_path, bids_tree), out_dir=tmp_path / "out")
    reasons = pd.read_csv(tmp_path / "out" / "quarantine.csv").set_index("subject_id")["reason"]
    assert "'vendor' = 'C' is not one of A, B" in reasons["sub-01"]
    assert "missing required covariate 'field_strength'" in reasons["sub-05"]


def test_an_unreadable_sidecar_sets_aside_the_images_it_applies_to(bids_tree: Path, tmp_path: Path):
    """pybids would stop indexing the whole data set on one bad JSON; only the images under it are set aside."""
    (bids_tree / "sub-02" / "sub-02_T1w.json").write_text("{not json")
    (bids_tree / "sub-03" / "ses-1" / "anat" / "sub-03_ses-1_T1w.json").write_bytes(b"\xff\xfe")
    manifest = run_ingest(bids_params(tmp_path, bids_tree), out_dir=tmp_path / "out")
    assert sorted(manifest["item_id"]) == ["sub-01", "sub-03_ses-2", "sub-05"]  # sub-04: its TR in ms
    reasons = pd.read_csv(tmp_path / "out" / "quarantine.csv").set_index("item")["reason"]
    assert reasons["sub-02/anat/sub-02_T1w.nii.gz"].startswith("sidecar sub-02/sub-02_T1w.json, which applies")
    assert "not readable JSON" in reasons["sub-03/ses-1/anat/sub-03_ses-1_T1w.nii.gz"]


def test_table_source_reads_the_sidecar_beside_the_image(tmp_path: Path):
    root = tmp_path / "data"
    for i, field in enumerate((1.5, 3.0, None)):
        write_nifti(root / f"scan{i}.nii.gz", blob_volume(seed=i))
        if field is not None:
            sidecar(root / f"scan{i}.json", MagneticFieldStrength=field, RepetitionTime=2.0, Manufacturer="A")
    pd.DataFrame(
        {"participant_id": ["s0", "s1", "s2"], "path": [f"scan{i}.nii.gz" for i in range(3)], "age": 40, "sex": "M"}
    ).to_csv(tmp_path / "table.csv", index=False)
    params = params_with(tmp_path, ACQUISITION, source="table", root=str(root), table=str(tmp_path / "table.csv"))
    manifest = run_ingest(params, out_dir=tmp_path / "out").set_index("subject_id")
    assert manifest["field_strength"].to_dict() == {"s0": 1.5, "s1": 3.0}
    reasons = pd.read_csv(tmp_path / "out" / "quarantine.csv").set_index("subject_id")["reason"]
    assert "missing required covariate" in reasons["s2"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("RepetitionTime", 2300, "milliseconds written by mistake (2.3 s)"),
        ("InversionTime", 900, "milliseconds written by mistake (0.9 s)"),
        ("EchoTime", 4.5, "milliseconds written by mistake (0.0045 s)"),
        ("FlipAngle", 720, "outside the plausible range [0.1, 180] degrees"),
        ("MagneticFieldStrength", 30000, "outside the plausible range [0.01, 12] T"),
    ],
)
def test_units_outside_the_plausible_range_say_why(key, value, message):
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check_units(key, value)


@pytest.mark.parametrize(("key", "value"), [("RepetitionTime", 2.3), ("EchoTime", 0.0025), ("FlipAngle", 9),
                                            ("MagneticFieldStrength", 1.5), ("Manufacturer", "Siemens")])  # fmt: skip
def test_plausible_values_pass(key, value):
    check_units(key, value)


def test_covariate_sources_are_validated():
    with pytest.raises(ValueError, match="header key 'slice_gap' is not one of"):
        Covariate(name="gap", kind="continuous", range=(0, 1), source="header", key="slice_gap")
    with pytest.raises(ValueError, match="'key' is for sidecar or header sources"):
        Covariate(name="age", kind="continuous", range=(0, 1), key="Age")
    with pytest.raises(ValueError, match="a header covariate is continuous"):
        Covariate(name="voxel_size_mm", kind="categorical", levels=["1", "2"], source="header")
    assert Covariate(name="MagneticFieldStrength", kind="continuous", range=(0.5, 7), source="sidecar").key is None
    with pytest.raises(ValidationError, match="source"):
        Params.model_validate({"covariates": [{"name": "x", "kind": "continuous", "source": "scanner"}]})
