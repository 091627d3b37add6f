"""The quality gate: the thresholds of ``report.thresholds`` applied to the flat metrics, one :class:`Check` per
rule, and the summary that publishing reads (``gate``, ``gate_passed``, ``gate_failed_checks``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from synthmri.config import ReportThresholds
from synthmri.report.families import feature_key


@dataclass(frozen=True)
class Check:
    """One gate check: ``value <op> threshold``; status ``pass``, ``fail`` or ``skipped``."""

    name: str
    key: str
    op: str
    threshold: float | None
    value: Any
    status: str
    note: str = ""

    @property
    def rule(self) -> str:
        return f"{self.op} {self.threshold:g}" if self.threshold is not None else "off"


def gate_rules(metrics: dict, t: ReportThresholds) -> list[tuple[str, str, str, float | None]]:
    """``(check name, metric key, op, threshold)`` for every check that can apply to ``metrics``."""
    ext = feature_key(str(metrics.get("extractor", "stats")))
    rules = [
        ("recon_psnr", "recon.psnr", ">=", t.min_recon_psnr),
        ("recon_ssim", "recon.ssim", ">=", t.min_recon_ssim),
        ("frechet_distance", f"fidelity.{ext}.frechet_distance", "<=", t.max_frechet_distance),
        ("frechet_ratio", f"fidelity.{ext}.frechet_ratio", "<=", t.max_frechet_ratio),
        ("precision", f"fidelity.{ext}.precision", ">=", t.min_precision),
        ("recall", f"fidelity.{ext}.recall", ">=", t.min_recall),
        ("coverage", f"fidelity.{ext}.coverage", ">=", t.min_coverage),
        ("diversity_ratio", "diversity.ratio", ">=", t.min_diversity_ratio),
        ("intensity_wasserstein", "intensity.wasserstein", "<=", t.max_intensity_wasserstein),
        ("age_effect_csf", "conditioning.age.csf_fraction.effect_ratio", ">=", t.min_effect_ratio),
        ("age_effect_ventricles", "conditioning.age.ventricle_ml.effect_ratio", ">=", t.min_effect_ratio),
        ("sex_effect_head_size", "conditioning.sex.head_ml.effect_ratio", ">=", t.min_effect_ratio),
    ]
    acquisition = re.compile(r"^conditioning\.(.+)\.gm_wm_contrast\.effect_ratio$")
    rules += [
        (f"acquisition_effect_{m[1]}", key, ">=", t.min_effect_ratio)
        for key in sorted(metrics)
        if (m := acquisition.match(key)) and m[1] in t.acquisition_effects
    ]
    pattern = re.compile(rf"^conditioning\.(.+)\.predictor\.{re.escape(ext)}\.(error_ratio|accuracy_drop)$")
    for key in sorted(metrics):
        match = pattern.match(key)
        if match:
            threshold = t.max_predictor_error_ratio if match[2] == "error_ratio" else t.max_predictor_accuracy_drop
            rules.append((f"predictor_{match[1]}", key, "<=", threshold))
    rules.append(("utility_pretrain_gain", "utility.primary_gain_ci_low", ">=", t.min_utility_gain_ci_low))
    rules += [
        ("privacy_copies", "privacy.excess_over_chance_bound", "<=", t.max_copy_fraction_over_chance),
        ("privacy_near_duplicates", "privacy.n_near_duplicates", "<=", t.max_near_duplicates),
    ]
    return rules


def evaluate_gate(metrics: dict, thresholds: ReportThresholds) -> list[Check]:
    """Apply the thresholds: a check is skipped when its threshold is null or its metric does not apply
    (absent key); it fails when its metric is present but not a finite number (could not be computed)."""
    checks = []
    for name, key, op, threshold in gate_rules(metrics, thresholds):
        if threshold is None:
            checks.append(Check(name, key, op, None, metrics.get(key), "skipped", "threshold off"))
            continue
        if key not in metrics:
            checks.append(Check(name, key, op, threshold, None, "skipped", "not applicable"))
            continue
        value = metrics[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            checks.append(Check(name, key, op, threshold, value, "fail", "could not be computed"))
            continue
        ok = value >= threshold if op == ">=" else value <= threshold
        checks.append(Check(name, key, op, threshold, value, "pass" if ok else "fail"))
    return checks


def gate_summary(checks: list[Check]) -> dict[str, Any]:
    """Flat gate keys for metrics.json: ``gate`` (pass|fail), ``gate_passed``, ``gate_failed_checks``
    (comma-separated), ``gate_n_failed``, ``gate_n_checked`` and ``check.<name>`` (true/false)."""
    failed = [c.name for c in checks if c.status == "fail"]
    out: dict[str, Any] = {
        "gate": "fail" if failed else "pass",
        "gate_passed": not failed,
        "gate_failed_checks": ",".join(failed),
        "gate_n_failed": len(failed),
        "gate_n_checked": sum(c.status != "skipped" for c in checks),
    }
    out.update({f"check.{c.name}": c.status == "pass" for c in checks if c.status != "skipped"})
    return out
