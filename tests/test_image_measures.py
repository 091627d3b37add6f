"""Image measures the gate does not use: tissue fractions, the grey/white boundary, sharpness, and their
standardized mean differences, on phantoms whose answers are known by construction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter

from synthmri.metrics.image_measures import (
    MEASURES,
    image_measures,
    standardized_mean_differences,
    tissue_thresholds,
)

SHAPE = (32, 32, 32)
CSF, GM, WM = -0.4, 0.2, 0.8


def _phantom(radius: float = 13.0, core: float = 9.0, ventricle: float = 3.0, folds: int = 0) -> np.ndarray:
    """A head (sphere) of grey matter around a white-matter core with a CSF ventricle at its centre; ``folds``
    corrugates the grey/white boundary (the core's radius varies with the angle), as cortical folding does."""
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij"))
    r = np.linalg.norm(grid, axis=0)
    angle = np.arctan2(grid[1], grid[0])
    boundary = core + (2.5 * np.sin(folds * angle) if folds else 0.0)
    volume = np.full(SHAPE, -1.0, np.float32)
    volume[r <= radius] = GM
    volume[r <= boundary] = WM
    volume[r <= ventricle] = CSF
    return volume


def test_thresholds_separate_the_three_tissues_and_fractions_count_their_voxels():
    labels = np.stack([_phantom(), _phantom(core=8.0, ventricle=4.0)])
    noise = np.random.default_rng(0).normal(0.0, 0.03, labels.shape).astype(np.float32)
    volumes = np.where(labels > -1, labels + noise, labels)  # scanner noise inside the head
    low, high = tissue_thresholds(volumes)
    assert CSF < low < GM < high < WM
    measures = image_measures(volumes, (low, high))
    assert list(measures.columns) == list(MEASURES) and len(measures) == 2
    for label, volume, (_, row) in zip(labels, volumes, measures.iterrows()):
        head = label > -1
        for name, value in (("csf_fraction", CSF), ("gm_fraction", GM), ("wm_fraction", WM)):
            assert row[name] == pytest.approx((label[head] == value).sum() / head.sum(), abs=1e-3)
        assert row["intensity_spread"] == pytest.approx(volume[head].std(), rel=1e-5)
    # a larger ventricle and a smaller core: more CSF and less white matter
    assert measures["csf_fraction"][1] > measures["csf_fraction"][0]
    assert measures["wm_fraction"][1] < measures["wm_fraction"][0]


def test_folding_lengthens_the_grey_white_boundary_and_blur_lowers_sharpness():
    smooth, folded = _phantom(), _phantom(folds=8)
    thresholds = ((CSF + GM) / 2, (GM + WM) / 2)
    measures = image_measures(np.stack([smooth, folded, gaussian_filter(smooth, 1.0)]), thresholds)
    assert measures["gm_wm_interface"][1] > 1.3 * measures["gm_wm_interface"][0]
    # the boundary is white matter with a grey face neighbour, counted by hand
    white, grey = smooth == WM, smooth == GM
    neighbour = np.zeros_like(grey)
    for axis in range(3):
        for shift in (1, -1):
            neighbour |= np.roll(grey, shift, axis)  # the head does not touch the grid's edge: no wrap-around
    assert measures["gm_wm_interface"][0] == pytest.approx((white & neighbour).sum() / (smooth > -1).sum())
    assert measures["edge_sharpness"][2] < 0.8 * measures["edge_sharpness"][0]


def test_standardized_mean_differences_find_a_known_shift_and_no_shift_between_equal_sets():
    rng = np.random.default_rng(0)
    real = pd.DataFrame({name: rng.normal(1.0, 0.2, 200) for name in MEASURES})
    shifted = real + 0.1  # half a standard deviation
    shifted["intensity_spread"] = real["intensity_spread"]
    out = standardized_mean_differences(real, shifted, draws=500, seed=1)
    expected = 0.1 / real["gm_fraction"].std(ddof=1)  # the same SD in both sets: the shift over it
    assert abs(expected - 0.5) < 0.05
    assert out["gm_fraction"]["smd"] == pytest.approx(expected, rel=1e-9)
    assert out["gm_fraction"]["low"] < expected < out["gm_fraction"]["high"] and out["gm_fraction"]["low"] > 0.2
    assert out["intensity_spread"]["smd"] == 0.0
    assert out["intensity_spread"]["low"] < 0 < out["intensity_spread"]["high"]
    negative = standardized_mean_differences(shifted, real, draws=500, seed=1)
    assert negative["gm_fraction"]["smd"] == pytest.approx(-expected, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        standardized_mean_differences(real, real.iloc[:1])


def test_report_family_reads_later_sets_against_the_same_reference_and_skips_sets_too_small():
    from synthmri.report.families import image_measure_metrics

    rng = np.random.default_rng(0)
    reference = np.stack([_phantom(core=c) for c in (8.0, 8.5, 9.0, 9.5)])
    reference = np.where(reference > -1, reference + rng.normal(0, 0.03, reference.shape), reference)
    smaller_cores = np.stack([_phantom(core=c) for c in (7.0, 7.5, 8.0)])
    flat, details = image_measure_metrics(reference, {"synthetic": smaller_cores, "one": smaller_cores[:1]}, (-1, 1), 0)
    assert flat["wm_fraction.synthetic.smd"] < -1 and "wm_fraction.one.smd" not in flat
    thresholds = details["thresholds"]
    later, same = image_measure_metrics(reference, {"decoded_train": reference[::-1]}, (-1, 1), 0, details)
    assert same["thresholds"] == thresholds and "gm_wm_threshold" not in later
    assert all(later[f"{name}.decoded_train.smd"] == pytest.approx(0.0, abs=1e-12) for name in MEASURES)
    assert image_measure_metrics(reference[:1], {"synthetic": smaller_cores}, (-1, 1), 0) == ({}, {})
