"""``SyntheticDataset``: a PyTorch dataset over a published synthetic data set (for pre-training)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from synthmri.data.shards import TarMembers, nifti_from_bytes
from synthmri.data.spacing import is_voxel_size_of, resample
from synthmri.io import sha256_file

_NOT_COVARIATES = {
    "file",
    "sample_index",
    "seed",
    "sampler",
    "steps",
    "guidance_scale",
    "snap_to_codes",
    "guidance_interval",
    "guided_covariates",
    "rest_guidance_scale",
    "numerics",
    "sha256",
    "vqgan_version",
    "vqgan_sha256",
    "ldm_version",
    "ldm_sha256",
    "synthmri_version",
    "tar",
}


class SyntheticDataset(Dataset):
    """Volumes of a synthetic set as ``(1, D, H, W)`` float32 tensors, with their requested covariates.

    Args:
        root: the data-set folder, e.g. from ``dvc get``: ``manifest.csv`` + ``volumes/`` (loose NIfTI files),
            or ``manifest.csv`` with a ``tar`` column + ``webdataset/`` (tar shards, :mod:`synthmri.data.shards`;
            to stream them instead, :func:`synthmri.data.shards.stream_webdataset`).
        transform: optional torchio transform (or any callable on a ``torchio.Subject``); the volume is
            the subject's ``"image"``.
        covariates: which covariates to return (default: all in the manifest).
        space: optional ``(shape, affine)`` grid, the training space of ``space.json``: a volume written at a
            requested voxel size (same field of view, another grid) is resampled back onto it
            (:func:`synthmri.data.spacing.resample`); a volume on any other grid raises ``ValueError``.
            Default: every volume as written.

    Each item is ``(volume, {covariate: value})``; missing covariates are ``None``.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None = None,
        covariates: list[str] | None = None,
        space: tuple[Sequence[int], np.ndarray] | None = None,
    ) -> None:
        self.root = Path(root)
        self.space = None if space is None else (tuple(int(s) for s in space[0]), np.asarray(space[1], np.float64))
        self.manifest = pd.read_csv(self.root / "manifest.csv")
        self.covariates = covariates or [c for c in self.manifest.columns if c not in _NOT_COVARIATES]
        self.transform = transform
        self._tars = TarMembers(self.root, self.manifest) if "tar" in self.manifest.columns else None

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        row = self.manifest.iloc[index]
        if self._tars is not None:
            image = nifti_from_bytes(self._tars.read_bytes(row["tar"], row["file"]))
        else:
            image = nib.load(self.root / row["file"])
        array, affine = np.asarray(image.dataobj, dtype=np.float32), image.affine
        if self.space is not None:
            shape, space_affine = self.space
            if not is_voxel_size_of(affine, array.shape, space_affine, shape):
                raise ValueError(
                    f"{row['file']}: grid {array.shape} at {np.round(image.header.get_zooms()[:3], 3).tolist()} mm is "
                    f"neither the given space {shape} nor that space's field of view at another voxel size"
                )
            array, affine = resample(array, affine, space_affine, shape, antialias=False), space_affine
        volume = torch.from_numpy(array[None].copy())
        if self.transform is not None:
            import torchio as tio

            subject = self.transform(tio.Subject(image=tio.ScalarImage(tensor=volume, affine=affine)))
            volume = subject["image"].data
        values = {
            c: (None if pd.isna(row[c]) else row[c].item() if hasattr(row[c], "item") else row[c])
            for c in self.covariates
        }
        return volume, values

    def verify(self) -> list[str]:
        """Volumes whose sha256 differs from the manifest, or that are missing (empty list = the set is intact)."""
        if self._tars is None:
            return [
                f
                for f, digest in zip(self.manifest["file"], self.manifest["sha256"])
                if not (self.root / f).is_file() or sha256_file(self.root / f) != digest
            ]
        bad = []
        for tar, f, digest in zip(self.manifest["tar"], self.manifest["file"], self.manifest["sha256"]):
            try:
                if self._tars.sha256(tar, f) != digest:
                    bad.append(f)
            except FileNotFoundError:
                bad.append(f)
        return bad
