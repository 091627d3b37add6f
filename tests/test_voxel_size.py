"""A requested voxel size: the grid it is written on (same field of view), the resampling both ways, the readers.

The sample stage's use of it (a tiny trained model chain) is in test_sample_stage.py.
"""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import make_params
from scipy import ndimage

from synthmri.config import Covariate
from synthmri.data.acquisition import voxel_size_covariate
from synthmri.data.spacing import is_voxel_size_of, isotropic_grid, resample, same_grid
from synthmri.data.synthetic import SyntheticDataset
from synthmri.io import save_nifti, sha256_file
from synthmri.stages.sample import voxel_size_lines

VOXEL_SIZE = Covariate(
    name="voxel_size", kind="continuous", range=(0.5, 8.0), required=False, source="header", key="voxel_size_mm"
)
SHAPE = (20, 24, 16)


def training_affine(spacing=(4.0, 4.0, 4.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-38.3, -45.9, -29.1)
    return affine


def fov_corners(affine: np.ndarray, shape) -> np.ndarray:
    """World coordinates of the 8 outer corners of the field of view (voxel edges, not centres)."""
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in shape])))
    return nib.affines.apply_affine(affine, corners)


def smooth_head(shape=SHAPE, seed=0) -> np.ndarray:
    """A smooth [0, 1] head-like volume (ellipsoid with low-frequency texture, zero at the border)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.6
    texture = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 3.0)
    volume = inside * (0.6 + 0.3 * texture / np.abs(texture).max())
    return ndimage.gaussian_filter(volume, 1.0).astype(np.float32)


@pytest.mark.parametrize("spacing", [1.0, 2.0, 3.0, 4.0, 6.0, 0.7])
@pytest.mark.parametrize("rotated", [False, True])
def test_isotropic_grid_has_the_voxel_size_and_the_same_field_of_view(spacing, rotated):
    affine = training_affine()
    if rotated:  # directions other than RAS are kept, not assumed
        c, s = np.cos(0.3), np.sin(0.3)
        affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ affine[:3, :3]
    target, shape = isotropic_grid(affine, SHAPE, spacing)
    np.testing.assert_allclose(np.linalg.norm(target[:3, :3], axis=0), spacing, rtol=1e-12)
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(target[:3, :3] / spacing, directions, atol=1e-12)
    centre = nib.affines.apply_affine(affine, (np.array(SHAPE) - 1) / 2)
    np.testing.assert_allclose(nib.affines.apply_affine(target, (np.array(shape) - 1) / 2), centre, atol=1e-9)
    # each face of the field of view moves by at most a quarter of a new voxel (the extent rounds to whole voxels)
    assert np.abs(fov_corners(target, shape) - fov_corners(affine, SHAPE)).max() <= spacing / 4 + 1e-9


def test_the_training_spacing_gives_back_the_training_grid_bit_for_bit():
    affine = training_affine()
    target, shape = isotropic_grid(affine, SHAPE, 4.0)
    assert target is affine and shape == SHAPE
    volume = smooth_head()
    assert resample(volume, affine, target, shape, antialias=True) is volume
    with pytest.raises(ValueError, match="positive"):
        isotropic_grid(affine, SHAPE, 0.0)


def test_anisotropic_training_space_gets_an_isotropic_grid_over_its_field_of_view():
    affine = training_affine((2.0, 2.0, 5.0))
    target, shape = isotropic_grid(affine, SHAPE, 2.5)
    assert shape == (16, 19, 32)  # 40 / 2.5, 48 / 2.5 = 19.2, 80 / 2.5
    np.testing.assert_allclose(np.linalg.norm(target[:3, :3], axis=0), 2.5)


@pytest.mark.parametrize("spacing", [2.0, 3.0, 6.0])
def test_resampling_to_a_voxel_size_and_back_keeps_the_volume(spacing):
    affine, volume = training_affine(), smooth_head()
    target, shape = isotropic_grid(affine, SHAPE, spacing)
    written = resample(volume, affine, target, shape, antialias=True)
    assert written.shape == shape and written.dtype == np.float32
    back = resample(written, target, affine, SHAPE, antialias=False)
    assert back.shape == SHAPE
    error = np.abs(back - volume)
    # finer grids come back almost exactly (cubic B-spline both ways, no low-pass on the way back; linear with a
    # low-pass lost ~10x more); a 6 mm grid keeps less of a 4 mm volume: it is a low-pass
    assert error.mean() < (0.001 if spacing < 4 else 0.02) and np.corrcoef(back.ravel(), volume.ravel())[0, 1] > 0.97

    # the same physical point holds the same value on both grids (the head is where it was)
    def at_centre(data: np.ndarray) -> float:
        return float(ndimage.map_coordinates(data, ((np.array(data.shape) - 1) / 2)[:, None], order=1)[0])

    assert abs(at_centre(written) - at_centre(volume)) < 0.02
    assert np.array_equal(resample(volume, affine, target, shape, antialias=True), written), "deterministic"


def test_a_voxel_size_grid_is_recognised_and_a_foreign_grid_is_not():
    affine = training_affine()
    for spacing in (1.0, 2.0, 3.0, 0.7):
        assert is_voxel_size_of(*isotropic_grid(affine, SHAPE, spacing), affine, SHAPE)
    assert is_voxel_size_of(affine.astype(np.float32), SHAPE, affine, SHAPE)  # a NIfTI header's float32
    shifted = isotropic_grid(affine, SHAPE, 2.0)[0].copy()
    shifted[:3, 3] += 2.0
    assert not is_voxel_size_of(shifted, isotropic_grid(affine, SHAPE, 2.0)[1], affine, SHAPE)
    assert not is_voxel_size_of(affine, (20, 24, 18), affine, SHAPE)
    assert not same_grid(affine, SHAPE, training_affine((4.0, 4.0, 4.1)), SHAPE)


def _without_voxel_size(params):
    """params.yaml's covariates less the header ones (the demo declares ``voxel_size``)."""
    return params.model_copy(update={"covariates": [c for c in params.covariates if c.source != "header"]})


def test_voxel_size_covariate_is_the_header_voxel_size_one():
    undeclared = _without_voxel_size(make_params()).covariates
    assert voxel_size_covariate(undeclared) is None
    assert voxel_size_covariate([*undeclared, VOXEL_SIZE]) == "voxel_size"
    assert voxel_size_covariate(make_params().covariates) == "voxel_size"  # params.yaml declares it
    by_name = Covariate(name="voxel_size_mm", kind="continuous", source="header")
    assert voxel_size_covariate([by_name]) == "voxel_size_mm"
    volume = Covariate(name="voxel_size", kind="continuous", source="header", key="voxel_volume_mm3")
    assert voxel_size_covariate([volume]) is None


def _mixed_set(root, affine) -> list[np.ndarray]:
    """Three volumes as the sample stage writes them: training space, 2 mm, 3 mm."""
    volume = np.clip(smooth_head(), 0, 1)
    rows, written = [], []
    for i, spacing in enumerate([None, 2.0, 3.0]):
        grid = (affine, SHAPE) if spacing is None else isotropic_grid(affine, SHAPE, spacing)
        data = resample(volume, affine, *grid, antialias=True)
        name = f"volumes/sample-{i:06d}.nii.gz"
        save_nifti(data, grid[0], root / name)
        rows.append({"file": name, "sample_index": i, "voxel_size": spacing, "sha256": sha256_file(root / name)})
        written.append(data)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return [volume, *written[1:]]


def test_synthetic_dataset_returns_volumes_as_written_or_on_a_given_space(tmp_path):
    affine = training_affine()
    volume, at_2mm, at_3mm = _mixed_set(tmp_path, affine)
    as_written = SyntheticDataset(tmp_path)
    assert [tuple(as_written[i][0].shape[1:]) for i in range(3)] == [SHAPE, at_2mm.shape, at_3mm.shape]
    assert as_written[1][1] == {"voxel_size": 2.0} and as_written[0][1] == {"voxel_size": None}
    assert as_written.verify() == []
    on_training = SyntheticDataset(tmp_path, space=(SHAPE, affine))
    assert np.array_equal(on_training[0][0][0].numpy(), volume), "the training-space volume is untouched"
    for i in (1, 2):
        back = on_training[i][0][0].numpy()
        assert back.shape == SHAPE and np.abs(back - volume).mean() < 0.01
    with pytest.raises(ValueError, match="neither"):
        SyntheticDataset(tmp_path, space=((20, 24, 18), affine))[1]


def test_card_lists_the_voxel_sizes_present():
    params = _without_voxel_size(make_params())
    manifest = pd.DataFrame({"voxel_size": [2.0, None, 3.0, 2.0]})
    assert voxel_size_lines(params, manifest) == []
    declared = params.model_copy(update={"covariates": [*params.covariates, VOXEL_SIZE]})
    (line,) = voxel_size_lines(declared, manifest)
    assert "`voxel_size` was requested is written at it" in line
    assert "2 mm (2 volumes), 3 mm (1 volume)" in line and "1 volume(s) without one" in line
    assert "not detail" in line
