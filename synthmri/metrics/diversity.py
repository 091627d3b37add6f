"""Diversity of a set of volumes: mean pairwise 3D MS-SSIM (lower = more diverse).

A generator that collapses onto few modes yields synthetic volumes that resemble each other more than
real subjects do, so the pairwise MS-SSIM of the synthetic set rises above that of the real set.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

__all__ = ["MS_SSIM_WEIGHTS", "ssim_components", "ms_ssim_3d", "n_scales", "mean_pairwise_ms_ssim", "diversity_ratio"]

#: Scale weights of Wang, Simoncelli & Bovik (2003), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

# Gaussian window of skimage's structural_similarity(gaussian_weights=True), as in synthmri.metrics.image.ssim3d
_SIGMA, _TRUNCATE = 1.5, 3.5
_WIN = 2 * int(_TRUNCATE * _SIGMA + 0.5) + 1  # 11 voxels
_K1, _K2 = 0.01, 0.03


def ssim_components(a: np.ndarray, b: np.ndarray, data_range: float) -> tuple[float, float]:
    """Mean SSIM (``l · cs`` per voxel) and mean contrast-structure term ``cs`` between two volumes.

    Local statistics use a Gaussian window (σ = 1.5, truncated at 3.5 σ, reflected borders) and
    population covariances; the means skip a border of half a window. These are exactly the choices
    of ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``, so the first value equals :func:`synthmri.metrics.image.ssim3d`
    (scikit-image has no public way to return ``cs`` on its own, which MS-SSIM needs).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)

    def blur(x: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(x, _SIGMA, truncate=_TRUNCATE, mode="reflect")

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    lum = (2 * mu_a * mu_b + c1) / (mu_a * mu_a + mu_b * mu_b + c1)
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    pad = (_WIN - 1) // 2
    crop = tuple(slice(pad, s - pad) for s in a.shape)
    return float((lum * cs)[crop].mean()), float(cs[crop].mean())


def n_scales(shape, max_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """Scales that fit: the coarsest scale's shortest side (after 2× average pooling per scale) must
    be at least the SSIM window (11 voxels). E.g. 40×48×40 → 2 scales, 24³ → 2, 16³ → 1, 176³ → 5."""
    side, count = min(shape), 0
    while count < max_scales and side >= _WIN:
        count += 1
        side //= 2
    if count == 0:
        raise ValueError(f"volume of shape {tuple(shape)} is smaller than the {_WIN}-voxel SSIM window")
    return count


def _downsample(x: np.ndarray) -> np.ndarray:
    """2× average pooling in every axis (an odd trailing voxel is dropped)."""
    d, h, w = (s // 2 for s in x.shape)
    x = x[: 2 * d, : 2 * h, : 2 * w]
    return x.reshape(d, 2, h, 2, w, 2).mean(axis=(1, 3, 5))


def ms_ssim_3d(a: np.ndarray, b: np.ndarray, data_range: float, max_scales: int = len(MS_SSIM_WEIGHTS)) -> float:
    """Multi-scale SSIM of two 3D volumes (Wang et al. 2003), in 3D.

    ``MS-SSIM = SSIM_M^{w_M} · Π_{j=1..M-1} cs_j^{w_j}`` with ``cs_j`` the mean contrast-structure term
    at scale j (scale 1 = full resolution, each next scale 2× average-pooled) and ``SSIM_M`` the mean
    SSIM (luminance × contrast-structure per voxel) at the coarsest scale, as in the reference
    implementations (TensorFlow ``ssim_multiscale``, pytorch-msssim). ``M`` = :func:`n_scales` (at most
    ``max_scales``); the weights are the first M of :data:`MS_SSIM_WEIGHTS`, renormalized to sum to 1.
    With M = 1 it equals 3D SSIM (:func:`synthmri.metrics.image.ssim3d`). Negative means
    (anti-correlated volumes) are clipped to 0, as those implementations do.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"expected two 3D volumes of the same shape, got {a.shape} and {b.shape}")
    scales = n_scales(a.shape, max_scales)
    weights = np.asarray(MS_SSIM_WEIGHTS[:scales])
    weights = weights / weights.sum()
    value = 1.0
    for j in range(scales):
        ssim, cs = ssim_components(a, b, data_range)
        if j == scales - 1:
            value *= max(ssim, 0.0) ** weights[j]
        else:
            value *= max(cs, 0.0) ** weights[j]
            a, b = _downsample(a), _downsample(b)
    return float(value)


def mean_pairwise_ms_ssim(volumes, max_pairs: int | None = None, seed: int = 0, data_range: float = 2.0) -> float:
    """Mean MS-SSIM over distinct pairs of ``volumes`` (N >= 2): all ``N(N-1)/2`` pairs, or
    ``max_pairs`` of them drawn without replacement with ``seed`` when there are more."""
    volumes = [np.asarray(v) for v in volumes]
    if len(volumes) < 2:
        raise ValueError("mean pairwise MS-SSIM needs at least 2 volumes")
    pairs = list(itertools.combinations(range(len(volumes)), 2))
    if max_pairs is not None and len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), size=max_pairs, replace=False))]
    return float(np.mean([ms_ssim_3d(volumes[i], volumes[j], data_range) for i, j in pairs]))


def diversity_ratio(
    synthetic, real, max_pairs: int | None = None, seed: int = 0, data_range: float = 2.0
) -> dict[str, float]:
    """Diversity of the synthetic set relative to the real set.

    Returns:
        ``ms_ssim_synthetic``, ``ms_ssim_real``: mean pairwise MS-SSIM within each set;
        ``ratio``: ``(1 - ms_ssim_synthetic) / (1 - ms_ssim_real)``, the synthetic set's diversity
        (1 - MS-SSIM) as a fraction of the real set's: 1 = as diverse as real data, < 1 less diverse
        (mode collapse, copies), > 1 more diverse than real (e.g. noise). Diversities are compared
        instead of the MS-SSIMs because brain volumes all score high, and a ratio of two numbers near
        1 would hide a collapse.
    """
    syn = mean_pairwise_ms_ssim(synthetic, max_pairs, seed, data_range)
    real_value = mean_pairwise_ms_ssim(real, max_pairs, seed, data_range)
    real_diversity = 1.0 - real_value
    ratio = (1.0 - syn) / real_diversity if real_diversity > 1e-12 else float("inf")
    return {"ms_ssim_synthetic": syn, "ms_ssim_real": real_value, "ratio": float(ratio)}
