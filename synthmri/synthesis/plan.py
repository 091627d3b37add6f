"""Covariate plans: which synthetic subjects to generate.

``match_training`` draws whole covariate rows from the training split (its joint distribution),
``grid`` makes every combination of listed values ``per_cell`` times (covariates not listed stay
unspecified), ``csv`` reads rows from a file (empty cells are unspecified: partial conditioning).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from synthmri.config import Params
from synthmri.data.covariates import covariate_rows, read_table
from synthmri.diffusion.conditioning import encode_covariates
from synthmri.errors import StageError


def make_plan(params: Params, training_manifest: pd.DataFrame) -> list[dict]:
    """One dict of requested covariates per sample, in sample-index order (validated)."""
    cfg = params.sample
    names = [c.name for c in params.covariates]
    if cfg.plan == "match_training":
        rows = covariate_rows(training_manifest, params.covariates)
        if not rows:
            raise StageError("match_training needs training subjects, and the training split is empty")
        picks = np.random.default_rng(cfg.seed).integers(len(rows), size=cfg.n_samples)
        plan = [dict(rows[i]) for i in picks]
    elif cfg.plan == "grid":
        if not cfg.grid:
            raise StageError("sample.plan is 'grid' but sample.grid lists no covariate values")
        keys = list(cfg.grid)
        combos = [
            {**{n: None for n in names}, **dict(zip(keys, combo))}
            for combo in itertools.product(*(cfg.grid[k] for k in keys))
            for _ in range(cfg.per_cell)
        ]
        plan = covariate_rows(pd.DataFrame(combos, columns=names, dtype=object), params.covariates)
    else:
        if not cfg.csv:
            raise StageError("sample.plan is 'csv' but sample.csv is not set")
        table = read_table(cfg.csv)
        unknown = [c for c in table.columns if c not in names]
        if unknown:
            raise StageError(f"{cfg.csv}: columns {unknown} are not declared covariates ({names})")
        plan = covariate_rows(table, params.covariates)
    for index, row in enumerate(plan):
        try:
            encode_covariates(params.covariates, [row])
        except ValueError as exc:
            raise StageError(f"sample plan row {index}: {exc}") from None
    return plan
