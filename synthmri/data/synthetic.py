"""``SyntheticDataset``: a PyTorch dataset over a published synthetic data set (for pre-training)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from synthmri.data.shards import TAR_COLUMN, TarMembers, nifti_from_bytes
from synthmri.data.spacing import is_voxel_size_of, resample
from synthmri.io import sha256_file


@dataclass(frozen=True)
class GenerationRecord:
    """How one volume of a synthetic set was generated: the manifest's columns after its covariates. The sample
    stage writes its rows from this class (:func:`manifest_row`) and :class:`SyntheticDataset` leaves these
    columns out of the covariates, so a field added here can never be read as a covariate."""

    sampler: str
    steps: int
    guidance_scale: float
    #: the covariates guidance amplified (the model's trained group, or all of them), comma-separated
    guided_covariates: str
    rest_guidance_scale: float
    snap_to_codes: bool
    guidance_interval: str
    numerics: str


@dataclass(frozen=True)
class ModelProvenance:
    """The models and code that made a set: the manifest's last columns (and the card's and MLflow's record)."""

    vqgan_version: str
    vqgan_sha256: str
    ldm_version: str
    ldm_sha256: str
    synthmri_version: str


#: the provenance columns of every manifest row (:func:`manifest_row`), in order
PROVENANCE_COLUMNS = tuple(f.name for f in fields(ModelProvenance))
#: a volume's identity and digest: the manifest's columns around its covariates and generation record
IDENTITY_COLUMNS = ("file", "sample_index", "seed")
DIGEST_COLUMN = "sha256"


def manifest_row(
    file: str,
    sample_index: int,
    seed: int,
    covariates: dict,
    generation: GenerationRecord,
    sha256: str,
    provenance: ModelProvenance | None,
) -> dict:
    """One row of a set's manifest, in the order every set has: identity, covariates, how it was generated, the
    file's digest, the models that made it (left out for volumes generated outside the sample stage)."""
    return {
        **dict(zip(IDENTITY_COLUMNS, (file, sample_index, seed))),
        **covariates,
        **asdict(generation),
        DIGEST_COLUMN: sha256,
        **(asdict(provenance) if provenance is not None else {}),
    }


_NOT_COVARIATES = frozenset(
    (
        *IDENTITY_COLUMNS,
        *(f.name for f in fields(GenerationRecord)),
        DIGEST_COLUMN,
        *PROVENANCE_COLUMNS,
        TAR_COLUMN,
    )
)


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
        self._tars = TarMembers(self.root, self.manifest) if TAR_COLUMN in self.manifest.columns else None

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        row = self.manifest.iloc[index]
        if self._tars is not None:
            image = nifti_from_bytes(self._tars.read_bytes(row[TAR_COLUMN], row["file"]))
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
        for tar, f, digest in zip(self.manifest[TAR_COLUMN], self.manifest["file"], self.manifest[DIGEST_COLUMN]):
            try:
                if self._tars.sha256(tar, f) != digest:
                    bad.append(f)
            except FileNotFoundError:
                bad.append(f)
        return bad
