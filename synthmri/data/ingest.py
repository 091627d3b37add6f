"""Ingest, the library (the stage is :mod:`synthmri.stages.ingest`): find raw volumes, validate them and their
covariates, write RAS copies.

Raw data is only read. Every rejected item (bad file, bad covariate row, stray participant) gets
one row in ``quarantine.csv`` with a reason; the run continues and fails with a clear message only
when fewer than ``ingest.min_subjects`` subjects remain.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from synthmri.config import Params
from synthmri.data.acquisition import SidecarReader, header_value, sidecar_value
from synthmri.data.covariates import duplicated_ids, parse_covariates, read_table, require_columns
from synthmri.data.validate import check_path, load_valid_volume
from synthmri.errors import InvalidInput, StageError
from synthmri.io import display_path, save_nifti, sha256_file
from synthmri.logs import get_logger

log = get_logger(__name__)

QUARANTINE_COLUMNS = ["item", "subject_id", "reason"]
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_T1W = re.compile(r"^(?P<stem>sub-[^_]+.*)_T1w\.nii(\.gz)?$")


@dataclass
class Candidate:
    """One volume to ingest, with the covariate row that belongs to it."""

    item_id: str
    subject_id: str
    session: str
    path: str
    row: pd.Series
    extra: dict = field(default_factory=dict)
    sidecars: SidecarReader | None = None  # set when a covariate comes from a sidecar


@dataclass
class Discovery:
    candidates: list[Candidate] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)

    def reject(self, item: str, subject_id: str, reason: str) -> None:
        self.quarantine.append({"item": display_path(item), "subject_id": display_path(subject_id), "reason": reason})


# ----------------------------------------------------------------------------------------------
# sources


def discover_bids(root: Path, params: Params) -> Discovery:
    """``sub-*/[ses-*/]anat/*_T1w.nii[.gz]`` plus ``participants.tsv`` for the covariates."""
    found = Discovery()
    table_path = root / "participants.tsv"
    if not table_path.is_file():
        raise StageError(
            f"{display_path(table_path)} not found: a BIDS data set lists its subjects and covariates there"
        )
    table = read_table(table_path)
    id_col = "participant_id"
    require_columns(table, params.covariates, display_path(table_path), id_col)
    duplicates = {key[0] for key in duplicated_ids(table, [id_col])}
    rows = {r[id_col]: r for _, r in table.iterrows() if r[id_col] not in duplicates}

    files = sorted([*root.glob("sub-*/anat/*_T1w.nii*"), *root.glob("sub-*/ses-*/anat/*_T1w.nii*")])
    seen_subjects = set()
    for path in files:
        match = _T1W.match(path.name)
        if match is None:
            continue
        rel = path.relative_to(root)
        subject = rel.parts[0]
        session = rel.parts[1] if rel.parts[1].startswith("ses-") else ""
        seen_subjects.add(subject)
        if display_path(rel) != str(rel):
            found.reject(str(rel), subject, "file name is not valid UTF-8")
        elif subject in duplicates:
            found.reject(
                str(rel),
                subject,
                f"participant_id '{display_path(subject)}' appears more than once in participants.tsv",
            )
        elif subject not in rows:
            found.reject(str(rel), subject, f"no row for '{display_path(subject)}' in participants.tsv")
        else:
            found.candidates.append(Candidate(match["stem"], subject, session, str(path), rows[subject]))
    sidecar_covariates = [c for c in params.covariates if c.source == "sidecar"]
    if sidecar_covariates and not (root / "dataset_description.json").is_file():
        names = ", ".join(c.name for c in sidecar_covariates)
        if any(c.required for c in sidecar_covariates):
            raise StageError(
                f"{display_path(root)} has no dataset_description.json: it is not a BIDS data set, so its sidecars "
                f"(covariates {names}) cannot be resolved; add the file (BIDS requires it)"
            )
        log.warning(
            "No dataset_description.json in %s: not a BIDS data set, so the optional sidecar covariates (%s) are "
            "left unspecified for every volume",
            display_path(root),
            names,
        )
    elif sidecar_covariates:
        sidecars = _bids_sidecars(root)
        for cand in found.candidates:
            cand.sidecars = sidecars
    for subject in sorted(set(rows) - seen_subjects):
        found.reject("participants.tsv", subject, "listed in participants.tsv but has no *_T1w.nii[.gz] image")
    return found


def discover_table(root: Path, params: Params) -> Discovery:
    """A CSV/TSV with one row per volume: id, path (relative to ``ingest.root``), covariates."""
    cfg = params.ingest
    if not cfg.table:
        raise StageError("ingest.source is 'table' but ingest.table is not set")
    table_path = Path(cfg.table)
    if not table_path.is_file() and (root / cfg.table).is_file():
        table_path = root / cfg.table
    if not table_path.is_file():
        raise StageError(f"ingest.table '{cfg.table}' not found")
    table = read_table(table_path)
    require_columns(table, params.covariates, cfg.table, cfg.id_column)
    if cfg.path_column not in table.columns:
        raise StageError(f"{cfg.table} has no path column '{cfg.path_column}'")
    has_session = bool(cfg.session_column) and cfg.session_column in table.columns
    keys = [cfg.id_column] + ([cfg.session_column] if has_session else [])
    duplicates = duplicated_ids(table, keys)
    found = Discovery()
    for _, row in table.iterrows():
        subject = row[cfg.id_column].strip()
        session = row[cfg.session_column].strip() if has_session else ""
        item = row[cfg.path_column].strip() or f"(row of {subject})"
        if tuple(row[k] for k in keys) in duplicates:
            found.reject(
                item, subject, f"id '{subject}'{' ' + session if session else ''} appears more than once in {cfg.table}"
            )
            continue
        if not row[cfg.path_column].strip():
            found.reject(item, subject, f"empty '{cfg.path_column}'")
            continue
        item_id = subject + (f"_{session}" if session else "")
        found.candidates.append(Candidate(item_id, subject, session, str(root / row[cfg.path_column].strip()), row))
    if any(c.source == "sidecar" for c in params.covariates):
        sidecars = SidecarReader(root, bids=False)
        for cand in found.candidates:
            cand.sidecars = sidecars
    return found


def _bids_sidecars(root: Path) -> SidecarReader:
    """pybids' index of the data set's sidecars; a data set it cannot index is a setup error, said in one line."""
    import time

    started = time.perf_counter()
    try:
        sidecars = SidecarReader(root, bids=True)
    except StageError:
        raise
    except Exception as exc:
        raise StageError(f"pybids cannot index the sidecars under {display_path(root)}: {exc}") from None
    log.info("Indexed the BIDS sidecars with pybids in %.1f s", time.perf_counter() - started)
    return sidecars


def _acquisition_row(cand: Candidate, params: Params) -> pd.Series:
    """The candidate's covariate row with each sidecar covariate's value put in (units checked)."""
    sidecar = [c for c in params.covariates if c.source == "sidecar"]
    if not sidecar:
        return cand.row
    row = cand.row.copy()
    metadata = cand.sidecars.metadata(cand.path) if cand.sidecars is not None else {}
    for cov in sidecar:
        row[cov.name] = sidecar_value(cov, metadata)
    return row


# ----------------------------------------------------------------------------------------------
# the stage


def ingest_one(cand: Candidate, root_real: str, params: Params, out_dir: Path) -> dict:
    for name, value in (("subject id", cand.subject_id), ("item", cand.item_id)):
        if not _SAFE_ID.match(value):
            raise InvalidInput(f"{name} '{value}' has characters that are not allowed in a file name")
    from_header = [c for c in params.covariates if c.source == "header"]
    covariates = parse_covariates(
        _acquisition_row(cand, params), [c for c in params.covariates if c.source != "header"]
    )
    if os.path.commonpath([os.path.abspath(cand.path), root_real]) != root_real:
        raise InvalidInput("path escapes the data root")
    check_path(cand.path, root_real)
    volume = load_valid_volume(cand.path, params.ingest)
    if from_header:  # geometry of the raw image, before any resampling
        header = pd.Series({c.name: header_value(c, volume.voxel_size) for c in from_header})
        covariates.update(parse_covariates(header, from_header))
    relative_out = Path("volumes") / f"{cand.item_id}_T1w.nii.gz"
    save_nifti(volume.data, volume.affine, out_dir / relative_out, descrip="SynthMRI ingested volume (RAS)")
    declared = {c.name for c in params.covariates}
    extras = {
        k: v
        for k, v in cand.row.items()
        if k not in declared
        and k
        not in {params.ingest.id_column, params.ingest.path_column, params.ingest.session_column, "participant_id"}
    }
    record = {
        "item_id": cand.item_id,
        "subject_id": cand.subject_id,
        "session": cand.session,
        "path": relative_out.as_posix(),
        "source_path": display_path(os.path.relpath(cand.path, root_real)),
        "source_sha256": sha256_file(cand.path),
        "shape": "x".join(str(s) for s in volume.original_shape),
        "voxel_size_mm": "x".join(f"{v:.3f}" for v in volume.voxel_size),
        "orientation": volume.original_orientation,
        **covariates,
    }
    # other participant columns (e.g. the demo's ground-truth volumes) travel along for the report
    record.update({k: v for k, v in extras.items() if k not in record})
    return record
