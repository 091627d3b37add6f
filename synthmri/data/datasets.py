"""PyTorch datasets over the pipeline's volumes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from synthmri.errors import StageError


def mirror_left_right(volumes: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror a batch ``(B, C, X, Y, Z)`` along the first spatial axis (left-right in the pipeline's RAS space),
    only the volumes selected by the boolean ``which`` if given: a brain's mirror image is a plausible brain, so it
    is free extra data (the VQ-GAN's ``flip_lr``, the encode stage's ``mirror_training``)."""
    if which is None:
        return volumes.flip(2)
    if not bool(which.any()):
        return volumes
    return torch.where(which.view(-1, *[1] * (volumes.dim() - 1)), volumes.flip(2), volumes)


class ProcessedVolumes(Dataset):
    """Normalized volumes of one split as ``(1, D, H, W)`` float32 tensors, read once into memory.

    Args:
        processed_dir: output folder of the ``normalize`` stage (``manifest.csv`` + ``volumes/``).
        split: ``"train"``, ``"val"``, ``"test"``, a list of them, or ``None`` for every subject.
    """

    def __init__(self, processed_dir: str | Path, split: str | list[str] | None) -> None:
        self.root = Path(processed_dir)
        manifest_path = self.root / "manifest.csv"
        if not manifest_path.is_file():
            raise StageError(f"{manifest_path} not found: run `synthmri normalize` first")
        manifest = pd.read_csv(manifest_path, dtype={"session": str}, keep_default_na=False)
        if split is not None:
            manifest = manifest[manifest["split"].isin([split] if isinstance(split, str) else split)]
        self.manifest = manifest.reset_index(drop=True)
        self.volumes = [
            torch.from_numpy(np.asarray(nib.load(self.root / rel).dataobj, dtype=np.float32)[None].copy())
            for rel in self.manifest["processed_path"]
        ]

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.volumes[index]

    def batch(self, indices: torch.Tensor | list[int]) -> torch.Tensor:
        return torch.stack([self.volumes[int(i)] for i in indices])
