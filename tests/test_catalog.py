"""dvc.yaml and synthmri/catalog.py name the same artifacts: a path changed in one place only fails here."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import REPO

from synthmri import catalog


def _paths(entries) -> set[Path]:
    """DVC lists an artifact as a string or as a one-key mapping with options (cache, push, x...)."""
    return {Path(next(iter(e)) if isinstance(e, dict) else e) for e in entries or []}


def _declared_stages() -> dict[str, dict]:
    stages = {}
    for dvcfile in (REPO / "dvc.yaml", REPO / "demo" / "dvc.yaml"):
        stages.update(yaml.safe_load(dvcfile.read_text())["stages"])
    return stages


def test_every_stage_declares_exactly_the_catalogued_artifacts():
    declared = _declared_stages()
    assert set(declared) == set(catalog.STAGES)
    for name, stage in declared.items():
        expected = catalog.STAGES[name]
        data_deps = {p for p in _paths(stage.get("deps")) if p.parts[0] not in ("synthmri", "${ingest.root}")}
        assert data_deps == set(expected.deps), f"{name}: deps"
        assert _paths(stage.get("outs")) == set(expected.outs), f"{name}: outs"
        assert _paths(stage.get("metrics")) == set(expected.metrics), f"{name}: metrics"
        assert _paths(stage.get("plots")) == set(expected.plots), f"{name}: plots"


def test_top_level_plots_read_catalogued_files():
    plotted = {
        Path(f)
        for plot in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
        for spec in plot.values()
        for f in spec["y"]
    }
    assert plotted <= {p for stage in catalog.STAGES.values() for p in stage.plots}


def test_the_demo_default_points_ingest_at_the_catalogued_demo_folder():
    from synthmri.config import IngestParams

    assert Path(IngestParams().root) == catalog.DEMO_DIR
