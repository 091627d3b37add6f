"""The head (foreground) mask of a volume: light (numpy, scipy, scikit-image), shared by normalization and
the report's feature extractor."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu


def head_mask(volume: np.ndarray) -> np.ndarray:
    """Foreground (head) mask: Otsu threshold, largest connected component, holes filled."""
    volume = np.asarray(volume, dtype=np.float32)
    threshold = 0.5 * threshold_otsu(volume)
    mask = volume > threshold
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    mask = ndimage.binary_closing(mask, iterations=2)
    return ndimage.binary_fill_holes(mask)
