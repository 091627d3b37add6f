"""Subject covariates: the one owner of what a value means, from ingest to the report.

The covariates are declared in ``params.yaml`` (``synthmri.config.Covariate``). This module decides
what a *missing* value is (:func:`is_missing`, the same at ingest, in training, in sample plans and in
the report), parses raw table values (:func:`parse_covariates`: a wrong value becomes a one-line
quarantine reason, never a coerced condition), reads typed rows back from any manifest
(:func:`covariate_rows`, :func:`covariate_column`) and maps continuous values to the [-1, 1] scale the
diffusion model is conditioned on (:func:`scale_continuous`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from synthmri.config import Covariate
from synthmri.errors import InvalidInput, StageError

MISSING = frozenset({"", "n/a", "na", "nan", "none", "null"})  # compared lower-cased and stripped
BIDS_MISSING = "n/a"  # how BIDS (and our demo's participants.tsv) writes a missing value


def is_missing(value: object) -> bool:
    """None, NaN (float, numpy or pandas) or one of the :data:`MISSING` markers."""
    if value is None or value is pd.NA:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in MISSING


def level_text(value: object) -> str:
    """A categorical value as its level string: a level "2" read back by pandas as 2.0 is "2" again."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def covariate_rows(table: pd.DataFrame, covariates: Sequence[Covariate]) -> list[dict[str, float | str | None]]:
    """The declared covariates of each row of a manifest or plan table, typed (continuous: float,
    categorical: level string), missing values as None (unspecified: partial conditioning)."""
    rows = []
    for record in table.to_dict("records"):
        row: dict[str, float | str | None] = {}
        for cov in covariates:
            value = record.get(cov.name)
            if is_missing(value):
                row[cov.name] = None
            else:
                row[cov.name] = float(value) if cov.kind == "continuous" else level_text(value)
        rows.append(row)
    return rows


def covariate_title(row: Mapping[str, object], per_line: int | None = None, names: bool = True) -> str:
    """A covariate row in a figure label: ``age=63.2, sex=F`` (numbers to 3 significant digits, so 1.5 T stays 1.5;
    ``names=False``: ``63.2, F``), missing covariates left out, ``unconditional`` when none is given; ``per_line``
    values to a line, so that a long acquisition list does not run into the neighbouring panel's label."""
    values = {k: v for k, v in row.items() if not is_missing(v)}
    shown = [f"{v:.3g}" if isinstance(v, (int, float, np.number)) else str(v) for v in values.values()]
    parts = [f"{k}={text}" for k, text in zip(values, shown)] if names else shown
    if not parts:
        return "unconditional"
    size = per_line or len(parts)
    return "\n".join(", ".join(parts[i : i + size]) for i in range(0, len(parts), size))


def covariate_column(table: pd.DataFrame, cov: Covariate) -> tuple[np.ndarray, np.ndarray] | None:
    """``(values, valid)`` of one covariate column (floats, or level strings), or None if absent."""
    if cov.name not in table.columns:
        return None
    column = table[cov.name]
    if cov.kind == "continuous":
        values = pd.to_numeric(column.map(lambda v: None if is_missing(v) else v), errors="coerce")
        values = values.to_numpy(dtype=np.float64)
        return values, np.isfinite(values)
    valid = np.array([not is_missing(v) for v in column], dtype=bool)
    values = np.array([level_text(v) if ok else "" for v, ok in zip(column, valid)], dtype=object)
    return values, valid


def continuous_range(cov: Covariate, ranges: Mapping[str, tuple[float, float]] | None = None) -> tuple[float, float]:
    """The declared ``range`` of a continuous covariate (or its override in ``ranges``), checked."""
    low_high = (ranges or {}).get(cov.name, cov.range)
    if low_high is None:
        raise ValueError(
            f"continuous covariate '{cov.name}' needs a 'range' in params.yaml (or in `ranges`) "
            "to be normalised for the diffusion model"
        )
    low, high = float(low_high[0]), float(low_high[1])
    if not high > low:
        raise ValueError(f"continuous covariate '{cov.name}': range [{low:g}, {high:g}] is empty")
    return low, high


def scale_continuous(cov: Covariate, raw: Any, ranges: Mapping[str, tuple[float, float]] | None = None) -> float:
    """A continuous value mapped from its range to [-1, 1]; ``ValueError`` naming the covariate if it is
    not a number or lies outside the range (a wrong condition would give a plausible but wrong volume)."""
    low, high = continuous_range(cov, ranges)
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"covariate '{cov.name}' = {raw!r} is not a number") from None
    if not low <= number <= high:
        raise ValueError(f"covariate '{cov.name}' = {number:g} is outside its range [{low:g}, {high:g}]")
    return 2.0 * (number - low) / (high - low) - 1.0


def read_table(path, sep: str | None = None) -> pd.DataFrame:
    """Read a CSV/TSV as strings (no type guessing), so every value is checked by us, not coerced."""
    sep = sep or ("\t" if str(path).endswith(".tsv") else ",")
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise StageError(f"cannot read covariate table {path}: {exc}") from None


def require_columns(table: pd.DataFrame, covariates: list[Covariate], where: str, id_column: str) -> None:
    """A required covariate with no column at all is a setup error, not a per-subject problem (covariates
    from sidecars or the header are checked per volume)."""
    if id_column not in table.columns:
        raise StageError(f"{where} has no '{id_column}' column (columns: {', '.join(table.columns)})")
    missing = [c.name for c in covariates if c.required and c.source == "participants" and c.name not in table.columns]
    if missing:
        raise StageError(f"{where} has no column for required covariate(s) {missing}")


def parse_covariates(row: pd.Series, covariates: list[Covariate]) -> dict[str, float | str | None]:
    """Return typed covariate values of one row, or raise InvalidInput with the first problem."""
    values: dict[str, float | str | None] = {}
    for cov in covariates:
        raw = str(row.get(cov.name, "")).strip()
        if is_missing(raw):
            if cov.required:
                raise InvalidInput(f"missing required covariate '{cov.name}'")
            values[cov.name] = None
            continue
        if cov.kind == "continuous":
            try:
                number = float(raw)
            except ValueError:
                raise InvalidInput(f"covariate '{cov.name}' = '{raw}' is not a number") from None
            if not math.isfinite(number):
                raise InvalidInput(f"covariate '{cov.name}' = '{raw}' is not finite")
            if cov.range is not None and not cov.range[0] <= number <= cov.range[1]:
                raise InvalidInput(
                    f"covariate '{cov.name}' = {number:g} outside the allowed range "
                    f"[{cov.range[0]:g}, {cov.range[1]:g}]"
                )
            values[cov.name] = number
        else:
            if raw not in (cov.levels or []):
                raise InvalidInput(f"covariate '{cov.name}' = '{raw}' is not one of {', '.join(cov.levels or [])}")
            values[cov.name] = raw
    return values


def duplicated_ids(table: pd.DataFrame, key_columns: list[str]) -> set[tuple]:
    """Keys that occur more than once: all their rows are ambiguous and are set aside."""
    keys = table[key_columns].apply(tuple, axis=1)
    counts = keys.value_counts()
    return set(counts[counts > 1].index)
