"""Image measures the quality gate does not use, read as standardized mean differences against real subjects.

The gate judges a set in one feature space (``report.extractor``); a model tuned until that space is satisfied
can still draw the wrong anatomy. These per-volume measures are computed independently of that extractor, with
tissue thresholds fixed once from the real held-out set (not re-fitted per volume, as the ``stats`` features
do), so a set with too little grey matter or smeared tissue boundaries shows it in numbers a reader can
interpret:

* ``csf_fraction`` / ``gm_fraction`` / ``wm_fraction``: fraction of the head in each of three intensity classes
  (≈ CSF / GM / WM on T1), thresholds from a 3-class Otsu of the pooled real held-out head intensities;
* ``gm_wm_interface``: fraction of head voxels that are white matter with a grey-matter face neighbour: the
  grey/white boundary per unit head volume, which cortical folding makes large and a smooth brain makes small;
* ``edge_sharpness``: root-mean-square gradient magnitude inside the head (intensity units per voxel; the
  gradient energy of Tenengrad-like focus measures): blur spreads an edge over more voxels and lowers it, where
  the mean gradient magnitude (a total variation) of a blurred step stays the same;
* ``intensity_spread``: standard deviation of the in-head intensities.

:func:`standardized_mean_differences` compares two sets measure by measure as Cohen's d (difference of means
over the pooled standard deviation) with a bootstrap interval; two sets of real subjects give the scale that
chance alone reaches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.filters import threshold_multiotsu

from synthmri.metrics.features import as_volumes, head_mask_normalized

__all__ = ["MEASURES", "tissue_thresholds", "image_measures", "standardized_mean_differences"]

FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)
MEASURES = ("csf_fraction", "gm_fraction", "wm_fraction", "gm_wm_interface", "edge_sharpness", "intensity_spread")


def tissue_thresholds(volumes, value_range: tuple[float, float] = (-1.0, 1.0)) -> tuple[float, float]:
    """The two thresholds of a 3-class Otsu (``skimage.filters.threshold_multiotsu``) of the pooled in-head
    intensities of ``volumes`` (the real reference set): one CSF/GM and one GM/WM cut for every volume."""
    pooled = np.concatenate([v[head_mask_normalized(v, value_range)] for v in as_volumes(volumes)])
    low, high = threshold_multiotsu(pooled, classes=3)
    return float(low), float(high)


def image_measures(
    volumes, thresholds: tuple[float, float], value_range: tuple[float, float] = (-1.0, 1.0)
) -> pd.DataFrame:
    """One row per volume (``(N, D, H, W)``), one column per name in :data:`MEASURES`.

    Args:
        thresholds: the CSF/GM and GM/WM cuts (:func:`tissue_thresholds` of the real reference set).
        value_range: intensity range of the volumes, background at its low end.
    """
    low, high = thresholds
    rows = []
    for volume in as_volumes(volumes):
        head = head_mask_normalized(volume, value_range)
        values = volume[head]
        grey = head & (volume >= low) & (volume < high)
        white = head & (volume >= high)
        gradient = np.linalg.norm(np.stack(np.gradient(volume.astype(np.float64))), axis=0)[head]
        next_to_grey = ndimage.binary_dilation(grey, structure=FACE_NEIGHBOURS)
        rows.append(
            {
                "csf_fraction": float((values < low).mean()),
                "gm_fraction": float(grey.sum() / head.sum()),
                "wm_fraction": float(white.sum() / head.sum()),
                "gm_wm_interface": float((white & next_to_grey).sum() / head.sum()),
                "edge_sharpness": float(np.sqrt(np.mean(gradient**2))),
                "intensity_spread": float(values.std()),
            }
        )
    return pd.DataFrame(rows, columns=list(MEASURES))


def _cohens_d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cohen's d of ``b`` against ``a`` along axis -1 (pooled SD; 0 where both sets are constant)."""
    pooled = np.sqrt((a.var(axis=-1, ddof=1) + b.var(axis=-1, ddof=1)) / 2.0)
    diff = b.mean(axis=-1) - a.mean(axis=-1)
    return np.divide(diff, pooled, out=np.zeros_like(diff), where=pooled > 0)


def standardized_mean_differences(
    real: pd.DataFrame,
    other: pd.DataFrame,
    measures: Sequence[str] = MEASURES,
    draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Cohen's d of ``other`` against ``real`` for each measure, with a percentile bootstrap interval (both sets
    resampled with replacement, ``draws`` times, seeded). ``{measure: {"smd", "low", "high"}}``; |d| ≈ 0.2 is a
    small difference, 0.8 a large one."""
    if len(real) < 2 or len(other) < 2:
        raise ValueError("standardized mean differences need at least 2 volumes in each set")
    rng = np.random.default_rng(seed)
    pick_real = rng.integers(0, len(real), size=(draws, len(real)))
    pick_other = rng.integers(0, len(other), size=(draws, len(other)))
    out = {}
    tail = (1.0 - level) / 2.0
    for name in measures:
        a, b = real[name].to_numpy(np.float64), other[name].to_numpy(np.float64)
        boot = _cohens_d(a[pick_real], b[pick_other])
        out[name] = {
            "smd": float(_cohens_d(a, b)),
            "low": float(np.quantile(boot, tail)),
            "high": float(np.quantile(boot, 1.0 - tail)),
        }
    return out
