"""The ``normalize`` stage: resample, crop/pad and scale the ingested volumes into ``data/processed``
and assign the subject-level split (checked against what the later stages need).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from synthmri.catalog import INGESTED_DIR, LANDMARKS_NAME, PROCESSED_DIR, SPACE_NAME
from synthmri.config import Params
from synthmri.data.normalize import build_transform, fit_histogram_landmarks, load_subject, reference_affine
from synthmri.data.split import assign_splits, check_split_sizes
from synthmri.errors import StageError
from synthmri.io import save_nifti, write_csv_atomic, write_text_atomic
from synthmri.logs import get_logger, progress

log = get_logger(__name__)


def run_normalize(params: Params, in_dir: Path = INGESTED_DIR, out_dir: Path = PROCESSED_DIR) -> pd.DataFrame:
    cfg = params.normalize
    manifest_path = in_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise StageError(f"{manifest_path} not found: run `synthmri ingest` first")
    manifest = pd.read_csv(manifest_path, dtype={"session": str}, keep_default_na=False)
    if manifest.empty:
        raise StageError(f"{manifest_path} lists no volumes")
    splits = assign_splits(manifest, cfg.split)
    manifest["split"] = manifest["subject_id"].map(splits)
    counts = manifest.drop_duplicates("subject_id")["split"].value_counts().to_dict()
    log.info(
        "Split %d subjects (seed %d): %s",
        len(splits),
        cfg.split.seed,
        ", ".join(f"{counts.get(s, 0)} {s}" for s in ("train", "val", "test")),
    )
    check_split_sizes(splits, params)  # before anything is written or trained

    shutil.rmtree(out_dir / "volumes", ignore_errors=True)
    (out_dir / "volumes").mkdir(parents=True, exist_ok=True)
    landmarks = None
    (out_dir / LANDMARKS_NAME).unlink(missing_ok=True)
    if cfg.histogram_standardization:
        train_paths = [in_dir / p for p in manifest.loc[manifest["split"] == "train", "path"]]
        log.info("Fitting Nyúl histogram landmarks on %d training volumes", len(train_paths))
        landmarks = fit_histogram_landmarks(train_paths, out_dir / LANDMARKS_NAME)
    transform = build_transform(params, landmarks)

    processed, affines = [], []
    for row in progress(list(manifest.itertuples()), desc="Normalizing volumes", unit="vol"):
        subject = transform(load_subject(in_dir / row.path))
        data = subject.t1.data[0].numpy()
        data = np.clip(data, *cfg.out_range)  # guard against interpolation overshoot
        relative = Path("volumes") / f"{row.item_id}.nii.gz"
        save_nifti(data, subject.t1.affine, out_dir / relative, descrip="SynthMRI normalized volume")
        processed.append(relative.as_posix())
        if row.split == "train":
            affines.append(subject.t1.affine)
    manifest["processed_path"] = processed
    write_csv_atomic(manifest, out_dir / "manifest.csv")
    space = {
        "shape": list(cfg.shape),
        "spacing_mm": list(cfg.spacing),
        "orientation": "RAS",
        "affine": reference_affine(affines or [np.diag([*cfg.spacing, 1.0])]).tolist(),
        "intensity_range": list(cfg.out_range),
        "intensity": f"clipped at percentiles {list(cfg.percentiles)} inside the head, scaled to "
        f"{list(cfg.out_range)}" + (", after Nyúl standardization" if landmarks is not None else ""),
    }
    write_text_atomic(out_dir / SPACE_NAME, json.dumps(space, indent=2))
    log.info(
        "Wrote %d normalized volumes of shape %s at %s mm to %s",
        len(manifest),
        tuple(cfg.shape),
        tuple(cfg.spacing),
        out_dir,
    )
    return manifest
