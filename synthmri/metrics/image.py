"""Reconstruction metrics on whole 3D volumes, computed by scikit-image (not re-implemented)."""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float) -> float:
    return float(peak_signal_noise_ratio(reference, test, data_range=data_range))


def ssim3d(reference: np.ndarray, test: np.ndarray, data_range: float) -> float:
    """SSIM with a 3D Gaussian window (sigma 1.5, as in Wang et al.), the volume treated as 3D."""
    return float(
        structural_similarity(
            reference, test, data_range=data_range, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
    )
