"""The ``demo`` stage: build the simulated demo cohort (BIDS) into the catalog's demo folder."""

from __future__ import annotations

from pathlib import Path

from synthmri.catalog import DEMO_DIR
from synthmri.config import Params
from synthmri.data.demo import generate_demo_cohort


def run_demo(params: Params) -> Path:
    """The ``demo`` stage: (re)generate the cohort in ``data/raw/demo``."""
    return generate_demo_cohort(params, DEMO_DIR)
