"""The built-in demo cohort: BIDS layout, known covariate effects visible in the images, determinism,
and regeneration only when the demo parameters change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from synthmri.config import Params
from synthmri.data import demo
from synthmri.data.mni import ventricle_proxy_ml
from synthmri.io import sha256_file
from synthmri.viz import three_plane_grid

SEED = 20261125
N_SUBJECTS = 16
ML_COLUMNS = ["ventricle_ml", "csf_ml", "gm_ml", "wm_ml", "brain_ml", "icv_ml"]


def make_params(**demo_overrides) -> Params:
    """Validated parameters independent of any params.yaml in the working directory."""
    return Params.model_validate({"demo": {"seed": SEED, "n_subjects": N_SUBJECTS, **demo_overrides}})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "cohort"
    assert demo.ensure_demo_cohort(make_params(), out) == out
    return out


@pytest.fixture(scope="module")
def table(cohort) -> pd.DataFrame:
    return pd.read_csv(cohort / "participants.tsv", sep="\t", dtype={"participant_id": str})


@pytest.fixture(scope="module")
def simulated() -> dict[int, demo.DemoSubject]:
    """A few subjects simulated in memory (with their ground-truth label maps)."""
    params = make_params()
    return {index: demo.simulate_subject(params, index) for index in (0, 5)}


def load_t1w(cohort: Path, participant_id: str) -> nib.Nifti1Image:
    return nib.load(cohort / participant_id / "anat" / f"{participant_id}_T1w.nii.gz")


def dark_central_ml(image: nib.Nifti1Image) -> float:
    """Ventricle size read from the image alone: voxels darker than half the white-matter level
    inside a box (MNI mm) around the lateral ventricles."""
    data = np.asarray(image.dataobj, dtype=np.float32)
    ijk = np.indices(data.shape).reshape(3, -1)
    x, y, z = image.affine[:3, :3] @ ijk + image.affine[:3, 3:4]
    box = (np.abs(x) <= 25) & (y >= -45) & (y <= 30) & (z >= -5) & (z <= 32)
    values = data.reshape(-1)[box]
    white_matter = np.percentile(values, 95)
    voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000
    return float((values < 0.5 * white_matter).sum() * voxel_ml)


# ----------------------------------------------------------------------------------------------
# layout and metadata


def test_bids_layout_and_table(cohort, table):
    ids = [f"sub-{i:03d}" for i in range(1, N_SUBJECTS + 1)]
    assert sorted(p.name for p in cohort.glob("sub-*")) == ids
    assert list(table.columns) == ["participant_id", "age", "sex", "site", *ML_COLUMNS]
    assert list(table.participant_id) == ids
    assert table.age.between(20, 90).all()
    assert (table.age == table.age.round(1)).all()
    assert set(table.sex) == {"F", "M"}
    assert set(table.site) <= {"site1", "site2", "site3"} and table.site.nunique() >= 2
    assert np.isfinite(table[ML_COLUMNS].to_numpy()).all()
    assert (table[ML_COLUMNS] > 0).all().all()
    assert np.allclose(table.brain_ml, table.gm_ml + table.wm_ml, atol=0.01)
    assert (table.csf_ml > table.ventricle_ml).all()
    assert np.allclose(table.icv_ml, table.csf_ml + table.gm_ml + table.wm_ml, atol=0.01)

    sidecar = json.loads((cohort / "participants.json").read_text())
    assert set(sidecar) == set(table.columns)
    assert all(sidecar[c]["Units"] == "ml" for c in ML_COLUMNS)
    assert sidecar["age"]["Units"] == "years"
    assert all("simulated" in sidecar[c]["Description"] for c in ML_COLUMNS)

    description = json.loads((cohort / "dataset_description.json").read_text())
    assert description["BIDSVersion"] and description["Name"]
    assert "simulated" in description["Name"].lower()
    assert "demonstration and tests" in description["GeneratedBy"][0]["Description"]
    assert description[demo.STAMP_KEY] == demo.demo_stamp(make_params())


def _world_centre(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return affine[:3, :3] @ ((np.asarray(shape[:3]) - 1) / 2.0) + affine[:3, 3]


def test_nifti_files_are_clean_float32_at_their_protocols_voxel_size(cohort, table):
    """Each image is on its protocol's voxel grid (template spacing x voxel_scale), over the template's field of
    view, so the raw voxel size differs between protocols as between real scanners."""
    from synthmri.data.physics import SCANNERS

    scales = {p.name: p.voxel_scale for scanner in SCANNERS for p in scanner.protocols}
    base = demo.base_anatomy(2)
    seen = set()
    for participant_id in table.participant_id:
        image = load_t1w(cohort, participant_id)
        sidecar = json.loads((cohort / participant_id / "anat" / f"{participant_id}_T1w.json").read_text())
        voxel = 2.0 * scales[sidecar["ProtocolName"]]
        seen.add(voxel)
        assert image.get_data_dtype() == np.float32
        assert image.header.get_zooms() == pytest.approx((voxel,) * 3)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        extent = np.asarray(image.shape) * voxel
        assert np.all(np.abs(extent - np.asarray(base.labels.shape) * 2.0) <= voxel)
        assert np.allclose(
            _world_centre(image.affine, image.shape), _world_centre(base.affine, base.labels.shape), atol=voxel / 2
        )
        assert image.header["descrip"].tobytes().rstrip(b"\0") == b"SynthMRI demo cohort (simulated)"
        assert int(image.header["sform_code"]) > 0 and int(image.header["qform_code"]) > 0
        data = np.asarray(image.dataobj)
        assert np.isfinite(data).all()
        assert data.std() > 0 and data.min() >= 0


# ----------------------------------------------------------------------------------------------
# covariate effects


def test_ventricles_grow_with_age_in_the_table_and_in_the_images(cohort, table):
    assert np.corrcoef(table.age, table.ventricle_ml)[0, 1] > 0.7
    from_images = np.array([dark_central_ml(load_t1w(cohort, sub)) for sub in table.participant_id])
    assert np.corrcoef(table.age, from_images)[0, 1] > 0.7
    # old subjects have clearly larger ventricles in the image than young ones
    young, old = table.age < table.age.quantile(0.3), table.age > table.age.quantile(0.7)
    assert from_images[old.to_numpy()].mean() > 1.5 * from_images[young.to_numpy()].mean()
    # the package's own image-only proxy agrees with this independent measurement
    images = [load_t1w(cohort, sub) for sub in table.participant_id[:3]]
    proxy = [ventricle_proxy_ml(np.asarray(image.dataobj), image.affine) for image in images]
    assert np.corrcoef(proxy, from_images[:3])[0, 1] > 0.9


def test_cortex_thins_and_csf_widens_with_age(table):
    assert np.corrcoef(table.age, table.csf_ml)[0, 1] > 0.5
    sulcal_fraction = (table.csf_ml - table.ventricle_ml) / table.icv_ml  # outside the ventricles
    assert np.corrcoef(table.age, sulcal_fraction)[0, 1] > 0.7
    assert np.corrcoef(table.age, table.gm_ml / table.icv_ml)[0, 1] < -0.7
    assert np.corrcoef(table.age, table.brain_ml / table.icv_ml)[0, 1] < -0.7


def test_men_have_larger_heads_by_a_realistic_margin(table):
    """Male/female ICV ratio of real adult cohorts: about 1.12-1.15 (simulated: 1.13 in expectation)."""
    by_sex = table.groupby("sex").icv_ml.mean()
    assert 1.05 < by_sex["M"] / by_sex["F"] < 1.22, by_sex


def test_tissue_intensities_follow_t1_contrast(simulated):
    for subject in simulated.values():
        labels = subject.labels_on_image_grid()
        means = {
            label: subject.image[labels == label].mean()
            for label in (demo.BACKGROUND, demo.CSF, demo.GM, demo.WM, demo.VENTRICLE)
        }
        assert means[demo.WM] > means[demo.GM] > means[demo.CSF] > means[demo.BACKGROUND]
        assert means[demo.GM] > means[demo.VENTRICLE]
        assert means[demo.BACKGROUND] < 0.15 * means[demo.WM]


def test_table_volumes_are_measured_on_the_final_label_maps(cohort, table, simulated):
    for index, subject in simulated.items():
        row = table.iloc[index]
        assert row.participant_id == subject.participant_id
        assert (row.age, row.sex, row.site) == (subject.age, subject.sex, subject.site)
        for column, value in subject.volumes_ml().items():
            assert row[column] == pytest.approx(value, abs=1e-3)
        # the deformed map differs from the template map: volumes are not the template's
        assert row.icv_ml != pytest.approx(
            demo.tissue_volumes_ml(demo.base_anatomy(2).labels, subject.affine)["icv_ml"], abs=1.0
        )


# ----------------------------------------------------------------------------------------------
# determinism


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> Path:
    """A second, separate generation with the same seed but only 2 subjects."""
    out = tmp_path_factory.mktemp("small") / "demo"
    return demo.generate_demo_cohort(make_params(n_subjects=2), out)


def test_written_images_are_the_simulated_ones(cohort, simulated):
    for subject in simulated.values():
        written = np.asarray(load_t1w(cohort, subject.participant_id).dataobj)
        assert written.tobytes() == subject.image.astype(np.float32).tobytes()


def test_same_seed_gives_identical_files_whatever_the_cohort_size(cohort, small_cohort):
    for sub in ("sub-001", "sub-002"):
        name = f"{sub}/anat/{sub}_T1w.nii.gz"
        assert sha256_file(small_cohort / name) == sha256_file(cohort / name)
    small = pd.read_csv(small_cohort / "participants.tsv", sep="\t", dtype={"participant_id": str})
    full = pd.read_csv(cohort / "participants.tsv", sep="\t", dtype={"participant_id": str})
    pd.testing.assert_frame_equal(small, full.iloc[:2])


def test_one_process_writes_the_same_files_as_several(cohort, tmp_path):
    """The cohort is simulated in one process per core; one process must give the same bytes."""
    demo._write_cohort(make_params(n_subjects=2), tmp_path, workers=1)
    for sub in ("sub-001", "sub-002"):
        name = f"{sub}/anat/{sub}_T1w.nii.gz"
        assert sha256_file(tmp_path / name) == sha256_file(cohort / name)


def test_another_seed_gives_another_subject(simulated):
    other = demo.simulate_subject(make_params(seed=SEED + 1), 0)
    assert not np.array_equal(other.image, simulated[0].image)
    assert not np.array_equal(other.labels, simulated[0].labels)


# ----------------------------------------------------------------------------------------------
# ensure_demo_cohort: regenerate only when needed, never leave half a cohort


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_ensure_skips_unchanged_and_regenerates_changed(tmp_path, small_cohort):
    out = tmp_path / "raw" / "demo"
    shutil.copytree(small_cohort, out)  # keeps the files' modification times
    params = make_params(n_subjects=2)
    before = _mtimes(out)
    first = np.asarray(load_t1w(out, "sub-001").dataobj)

    assert demo.ensure_demo_cohort(params, out) == out
    assert _mtimes(out) == before  # untouched

    changed = make_params(n_subjects=2, noise_std=0.08)
    demo.ensure_demo_cohort(changed, out)
    assert json.loads((out / "dataset_description.json").read_text())[demo.STAMP_KEY] == demo.demo_stamp(changed)
    assert not np.array_equal(np.asarray(load_t1w(out, "sub-001").dataobj), first)
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo"]  # no temporary folders left
    assert demo.is_current_demo_cohort(changed, out)

    # other changes that must trigger a regeneration: more subjects, a missing file
    assert not demo.is_current_demo_cohort(make_params(n_subjects=3, noise_std=0.08), out)
    (out / "sub-002" / "anat" / "sub-002_T1w.nii.gz").unlink()
    assert not demo.is_current_demo_cohort(changed, out)


def test_a_failed_run_leaves_the_previous_cohort_intact(tmp_path, monkeypatch, simulated):
    out = tmp_path / "demo"
    (out / "sub-001" / "anat").mkdir(parents=True)
    stamp = {demo.STAMP_KEY: {"generator_version": -1}}
    (out / "dataset_description.json").write_text(json.dumps(stamp))
    before = _mtimes(out)

    def boom(params, index):
        if index == 1:
            raise KeyboardInterrupt  # like a user pressing Ctrl-C half way
        return simulated[0]

    monkeypatch.setattr(demo, "simulate_subject", boom)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_cohort(make_params(n_subjects=3), out)
    assert _mtimes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_refuses_to_replace_a_folder_that_is_not_a_demo_cohort(tmp_path):
    out = tmp_path / "mydata"
    out.mkdir()
    (out / "precious.nii.gz").write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        demo.ensure_demo_cohort(make_params(n_subjects=2), out)
    assert (out / "precious.nii.gz").read_bytes() == b"not ours"


# ----------------------------------------------------------------------------------------------
# figures


def test_demo_figure_is_small_png(cohort, tmp_path):
    path = demo.render_demo_figure(cohort, tmp_path / "figs" / "demo.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size < 200_000
    assert [p.name for p in path.parent.iterdir()] == ["demo.png"]


def test_three_plane_grid_is_generic(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    volumes = [rng.random((20, 30, 10)), torch.rand(1, 20, 30, 10)]
    path = three_plane_grid(volumes, ["numpy", "tensor"], tmp_path / "grid.png", affine_spacing=(1, 1, 3))
    from PIL import Image

    with Image.open(path) as image:
        assert image.size[0] > 0 and image.size[1] > image.size[0] * 0.5
    with pytest.raises(ValueError):
        three_plane_grid(volumes, ["only one title"], tmp_path / "bad.png")
    with pytest.raises(ValueError):
        three_plane_grid([np.zeros((4, 4))], ["2d"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
