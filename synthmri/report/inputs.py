"""What the report reads: the real volumes (training split and held-out reference splits) and the synthetic
set, on one grid (the training space: a synthetic volume written at a requested voxel size is resampled back),
with their covariates and the demo's ground truth when present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from synthmri.catalog import SPACE_NAME, SYNTHETIC_DIR
from synthmri.config import Params
from synthmri.errors import StageError
from synthmri.logs import get_logger, progress

log = get_logger(__name__)


@dataclass
class ReportData:
    """Every volume the report needs, in memory, in the processed intensity range."""

    real: pd.DataFrame  # processed manifest (one row per real volume, with its split)
    real_volumes: np.ndarray  # (N, D, H, W) float32
    synthetic: pd.DataFrame  # synthetic manifest
    synthetic_volumes: np.ndarray  # (M, D, H, W) float32, mapped from [0, 1] to value_range
    space: dict
    reference_splits: list[str]
    synthetic_dir: Path = SYNTHETIC_DIR

    @property
    def value_range(self) -> tuple[float, float]:
        low, high = self.space.get("intensity_range", (-1.0, 1.0))
        return float(low), float(high)

    @property
    def data_range(self) -> float:
        return self.value_range[1] - self.value_range[0]

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.space["affine"], dtype=np.float64)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.space["spacing_mm"])

    @property
    def voxel_ml(self) -> float:
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def split_index(self, splits) -> np.ndarray:
        return np.flatnonzero(self.real["split"].isin(list(splits)).to_numpy())

    @property
    def train_index(self) -> np.ndarray:
        return self.split_index(["train"])

    @property
    def reference_index(self) -> np.ndarray:
        return self.split_index(self.reference_splits)

    @property
    def train(self) -> np.ndarray:
        return self.real_volumes[self.train_index]

    @property
    def reference(self) -> np.ndarray:
        return self.real_volumes[self.reference_index]


def load_report_data(params: Params, processed_dir: Path, synthetic_dir: Path) -> ReportData:
    """Read the processed real volumes (all splits) and the synthetic set; check that they match."""
    from synthmri.data.datasets import ProcessedVolumes
    from synthmri.data.synthetic import SyntheticDataset

    processed_dir, synthetic_dir = Path(processed_dir), Path(synthetic_dir)
    space_path = processed_dir / SPACE_NAME
    if not space_path.is_file():
        raise StageError(f"{space_path} not found: run `synthmri normalize` first")
    space = json.loads(space_path.read_text())
    real = ProcessedVolumes(processed_dir, split=None)
    real_volumes = np.stack([v[0].numpy() for v in real.volumes]) if len(real) else np.zeros((0, 1, 1, 1), np.float32)

    manifest_path = synthetic_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise StageError(f"{manifest_path} not found: run `synthmri sample` first")
    synthetic = pd.read_csv(manifest_path)
    if "file" not in synthetic.columns:
        raise StageError(f"{manifest_path} has no 'file' column")
    low, high = space.get("intensity_range", (-1.0, 1.0))
    shape = tuple(int(s) for s in space["shape"])
    # filled in place: a list then np.stack would hold every volume twice (2 x 2.9 GB at 10,000 demo volumes)
    volumes = np.empty((len(synthetic), *shape), np.float32)
    # loose files or tar shards (sample.layout); a volume written at a requested voxel size is resampled back
    # onto the training grid, the one every comparison with the real volumes is made on
    reader = SyntheticDataset(synthetic_dir, space=(shape, np.asarray(space["affine"], dtype=np.float64)))
    for i, rel in enumerate(progress(synthetic["file"], "Reading the synthetic set", "vol")):
        try:
            array = reader[i][0][0].numpy()
        except FileNotFoundError:
            raise StageError(f"synthetic volume {rel} listed in {manifest_path} does not exist") from None
        except ValueError as exc:  # another grid than the processed space (or a voxel size of it)
            raise StageError(f"synthetic set {synthetic_dir}: {exc}") from None
        np.multiply(array, np.float32(high - low), out=volumes[i])
        volumes[i] += np.float32(low)  # [0, 1] -> processed range
    data = ReportData(
        real=real.manifest,
        real_volumes=real_volumes,
        synthetic=synthetic,
        synthetic_volumes=volumes,
        space=space,
        reference_splits=list(params.report.reference_splits),
        synthetic_dir=synthetic_dir,
    )
    n_train, n_ref, n_syn = len(data.train_index), len(data.reference_index), len(synthetic)
    if n_train < 1 or n_ref < 2 or n_syn < 2:
        raise StageError(
            f"the report needs at least 1 real training volume, 2 held-out real volumes "
            f"({'+'.join(data.reference_splits)}) and 2 synthetic volumes; got {n_train}, {n_ref} and "
            f"{n_syn}"
        )
    log.info(
        "Report: %d synthetic volumes vs %d held-out real (%s); %d training volumes for predictors and privacy",
        n_syn,
        n_ref,
        "+".join(data.reference_splits),
        n_train,
    )
    return data
