"""Normalization, the library (the stage is :mod:`synthmri.stages.normalize`): one training space with torchio.

Resample to ``normalize.spacing``, crop/pad to ``normalize.shape`` around the head, optionally
apply Nyúl histogram standardization (fitted on the training split only, so no information leaks
from val/test), then clip at percentiles inside the head and scale to ``normalize.out_range``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchio as tio

from synthmri.config import Params
from synthmri.data.masks import head_mask
from synthmri.logs import get_logger

log = get_logger(__name__)


def load_subject(path: Path) -> tio.Subject:
    image = tio.ScalarImage(path)
    mask = head_mask(image.data[0].numpy())
    return tio.Subject(
        t1=image, head=tio.LabelMap(tensor=torch.from_numpy(mask[None].astype(np.uint8)), affine=image.affine)
    )


def build_transform(params: Params, landmarks: np.ndarray | None) -> tio.Compose:
    cfg = params.normalize
    steps: list[tio.Transform] = [
        tio.ToCanonical(),
        # antialias: a Gaussian low-pass before downsampling (torchio's default is plain interpolation,
        # which aliases every tissue edge and the noise into a speckled label map at the coarse grid)
        tio.Resample(tuple(cfg.spacing), antialias=True),
        tio.CropOrPad(tuple(cfg.shape), mask_name="head"),
    ]
    if landmarks is not None:
        steps.append(tio.HistogramStandardization({"t1": landmarks}, masking_method="head"))
    steps.append(
        tio.RescaleIntensity(
            out_min_max=tuple(cfg.out_range), percentiles=tuple(cfg.percentiles), masking_method="head"
        )
    )
    return tio.Compose(steps)


def fit_histogram_landmarks(paths: list[Path], out_file: Path) -> np.ndarray:
    """Nyúl landmarks from the training split only (torchio's implementation)."""

    def mask_fn(tensor: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(head_mask(tensor[0].numpy()))[None]

    landmarks = tio.HistogramStandardization.train([str(p) for p in paths], masking_function=mask_fn, progress=False)
    np.save(out_file, landmarks)
    return landmarks


def reference_affine(affines: list[np.ndarray]) -> np.ndarray:
    """The training space's affine: shared orientation and spacing, origin averaged over subjects."""
    return np.mean(np.stack(affines), axis=0)
