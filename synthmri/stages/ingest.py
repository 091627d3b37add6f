"""The ``ingest`` stage: validate raw volumes and covariates (BIDS, table or demo) into ``data/ingested``;
one quarantine row, with its reason, per item set aside. Raw data is never modified.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd

from synthmri.catalog import INGESTED_DIR
from synthmri.config import Params
from synthmri.data.ingest import QUARANTINE_COLUMNS, discover_bids, discover_table, ingest_one
from synthmri.errors import InvalidInput, StageError
from synthmri.io import display_path, write_csv_atomic
from synthmri.logs import get_logger, progress

log = get_logger(__name__)


def run_ingest(params: Params, out_dir: Path = INGESTED_DIR) -> pd.DataFrame:
    """Validate and copy every usable volume into ``out_dir``; return the manifest."""
    cfg = params.ingest
    root = Path(cfg.root)
    if cfg.source == "demo":
        from synthmri.data.demo import ensure_demo_cohort

        ensure_demo_cohort(params, root)
    if not root.is_dir():
        raise StageError(f"ingest.root '{cfg.root}' is not a folder")
    root_real = os.path.realpath(root)
    root = Path(root_real)  # candidate paths are built from the real root, so escapes are detectable
    if os.path.commonpath([os.path.realpath(out_dir), root_real]) == root_real:
        raise StageError(f"the output folder {out_dir} lies inside ingest.root: raw data is never written to")

    found = discover_table(root, params) if cfg.source == "table" else discover_bids(root, params)
    log.info(
        "Found %d candidate volume(s) under %s (%s layout)",
        len(found.candidates),
        cfg.root,
        "table" if cfg.source == "table" else "BIDS",
    )
    shutil.rmtree(out_dir / "volumes", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    records = []
    for cand in progress(found.candidates, desc="Validating volumes", unit="vol"):
        try:
            records.append(ingest_one(cand, root_real, params, out_dir))
        except InvalidInput as exc:
            found.reject(os.path.relpath(cand.path, root_real), cand.subject_id, str(exc))
        except Exception as exc:  # one bad file must never stop the run
            log.debug("unexpected error on %s", display_path(cand.path), exc_info=True)
            found.reject(
                os.path.relpath(cand.path, root_real),
                cand.subject_id,
                f"unexpected error while reading ({type(exc).__name__}: {exc})",
            )

    manifest = pd.DataFrame.from_records(records)
    quarantine = pd.DataFrame(found.quarantine, columns=QUARANTINE_COLUMNS)
    write_csv_atomic(manifest, out_dir / "manifest.csv")
    write_csv_atomic(quarantine, out_dir / "quarantine.csv")

    n_subjects = manifest["subject_id"].nunique() if len(manifest) else 0
    log.info(
        "Ingested %d volume(s) of %d subject(s); set aside %d item(s) (reasons in %s)",
        len(manifest),
        n_subjects,
        len(quarantine),
        out_dir / "quarantine.csv",
    )
    for row in quarantine.head(10).itertuples():
        log.warning("set aside %s: %s", row.item, row.reason)
    if len(quarantine) > 10:
        log.warning("... and %d more in quarantine.csv", len(quarantine) - 10)
    if n_subjects < cfg.min_subjects:
        raise StageError(
            f"only {n_subjects} valid subject(s) remain, fewer than ingest.min_subjects="
            f"{cfg.min_subjects}; see {out_dir / 'quarantine.csv'} for what was set aside"
        )
    return manifest
