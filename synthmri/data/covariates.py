"""Validation of subject covariates against their declaration in ``params.yaml``.

Covariates are the conditioning variables of the diffusion model, so a wrong value here becomes a
wrong condition later: each row is checked (missing required value, not a number, out of range,
unknown level) and rejected with a one-line reason instead of being coerced.
"""

from __future__ import annotations

import math

import pandas as pd

from synthmri.config import Covariate
from synthmri.errors import InvalidInput, StageError

MISSING = {"", "n/a", "na", "nan", "none", "null"}


def read_table(path, sep: str | None = None) -> pd.DataFrame:
    """Read a CSV/TSV as strings (no type guessing), so every value is checked by us, not coerced."""
    sep = sep or ("\t" if str(path).endswith(".tsv") else ",")
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise StageError(f"cannot read covariate table {path}: {exc}") from None


def require_columns(table: pd.DataFrame, covariates: list[Covariate], where: str, id_column: str) -> None:
    """A required covariate with no column at all is a setup error, not a per-subject problem."""
    if id_column not in table.columns:
        raise StageError(f"{where} has no '{id_column}' column (columns: {', '.join(table.columns)})")
    missing = [c.name for c in covariates if c.required and c.name not in table.columns]
    if missing:
        raise StageError(f"{where} has no column for required covariate(s) {missing}")


def parse_covariates(row: pd.Series, covariates: list[Covariate]) -> dict[str, float | str | None]:
    """Return typed covariate values of one row, or raise InvalidInput with the first problem."""
    values: dict[str, float | str | None] = {}
    for cov in covariates:
        raw = str(row.get(cov.name, "")).strip()
        if raw.lower() in MISSING:
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
                raise InvalidInput(f"covariate '{cov.name}' = {number:g} outside the allowed range "
                                   f"[{cov.range[0]:g}, {cov.range[1]:g}]")
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
