"""One meaning of a covariate value from ingest to the report (synthmri/data/covariates.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from synthmri.config import Covariate
from synthmri.data.covariates import (
    MISSING,
    covariate_column,
    covariate_rows,
    covariate_title,
    is_missing,
    parse_covariates,
    scale_continuous,
)
from synthmri.diffusion.conditioning import encode_covariates

AGE = Covariate(name="age", kind="continuous", range=(18.0, 100.0))
SITE = Covariate(name="site", kind="categorical", levels=["1", "2"], required=False)


@pytest.mark.parametrize(
    "value", [None, float("nan"), np.float32("nan"), pd.NA, "", " n/a ", "NA", "na", "None", "null", "NaN"]
)
def test_every_spelling_of_missing_is_missing_at_every_step(value):
    assert is_missing(value)
    frame = pd.DataFrame({"age": [value], "site": [value]}, dtype=object)
    assert covariate_rows(frame, [AGE, SITE]) == [{"age": None, "site": None}]
    assert not covariate_column(frame, AGE)[1][0] and not covariate_column(frame, SITE)[1][0]
    batch = encode_covariates([AGE, SITE], [{"age": value, "site": value}])
    assert not batch.present.any() and batch.categorical.tolist() == [[0]]
    if isinstance(value, str):  # what ingest reads from a table
        assert parse_covariates(pd.Series({"site": value}), [SITE]) == {"site": None}


def test_values_are_not_missing_and_levels_survive_a_numeric_round_trip():
    assert not any(is_missing(v) for v in (0, 0.0, "0", "F", "site1"))
    assert all(m == m.strip().lower() for m in MISSING)
    frame = pd.DataFrame({"age": [30.0], "site": [2.0]})  # a manifest whose numeric levels pandas read as floats
    assert covariate_rows(frame, [AGE, SITE]) == [{"age": 30.0, "site": "2"}]
    assert covariate_column(frame, SITE)[0].tolist() == ["2"]
    assert encode_covariates([AGE, SITE], covariate_rows(frame, [AGE, SITE])).categorical.tolist() == [[2]]


def test_continuous_scaling_and_its_errors_name_the_covariate():
    assert scale_continuous(AGE, 18) == -1.0 and scale_continuous(AGE, "100") == 1.0
    assert math.isclose(scale_continuous(AGE, 59), 0.0)
    with pytest.raises(ValueError, match="'age' = 101 is outside"):
        scale_continuous(AGE, 101)
    with pytest.raises(ValueError, match="'age' = 'old' is not a number"):
        scale_continuous(AGE, "old")


def test_a_covariate_title_leaves_unspecified_covariates_out():
    assert covariate_title({"age": 63.25, "sex": "F", "site": None, "field_strength": 1.5}) == (
        "age=63.2, sex=F, field_strength=1.5"
    )
    assert covariate_title({"age": None, "site": float("nan")}) == "unconditional"
    row = {"age": 63.25, "sex": "F", "site": "", "field_strength": 1.5, "sequence": "SPGR"}
    assert covariate_title(row, per_line=2) == "age=63.2, sex=F\nfield_strength=1.5, sequence=SPGR"
    assert covariate_title(row, per_line=3, names=False) == "63.2, F, 1.5\nSPGR"
