"""``reports/utility.json``: the protocol's per-subject errors reduced to flat keys with 95 % intervals.

Keys (``<target>`` a covariate, ``k<k>`` the fine-tuning subjects; errors are mean absolute errors in the
covariate's units for continuous targets, error rates for categorical ones):

* ``error.<arm>.<target>.k<k>`` and ``error_ci_low/high...``: each arm's mean error;
* ``pretrain_gain.<target>.k<k>`` (+ ``_ci_low``/``_ci_high``): relative error reduction of synthetic
  pre-training against scratch; ``real_pretrain_gain...`` for real pre-training, ``negative_control_gain...``
  for the control;
* ``error.tstr.<target>``, ``error.trtr.<target>``, ``tstr_ratio.<target>`` (+ interval);
* ``primary_gain``, ``primary_gain_ci_low``/``_high``: the gain the gate reads (``utility.primary`` at
  ``utility.gate_k``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from synthmri.config import UtilityParams
from synthmri.utility.gains import error_ratio, mean_error, paired_bootstrap, relative_gain

GAIN_KEYS = {"synthetic": "pretrain_gain", "real": "real_pretrain_gain", "control": "negative_control_gain"}


def error_matrix(results: pd.DataFrame, arm: str, target: str, k: str) -> np.ndarray:
    """``(repeats, test volumes)`` errors of one arm, target and k (rows and columns in a fixed order)."""
    rows = results[(results["arm"] == arm) & (results["target"] == target) & (results["k"] == k)]
    return rows.pivot(index="repeat", columns="item", values="error").sort_index().sort_index(axis=1).to_numpy()


def summarize(results: pd.DataFrame, up: UtilityParams, draws: int | None = None) -> dict[str, Any]:
    draws = draws or up.bootstrap
    out: dict[str, Any] = {}

    def put(key: str, value: float, interval: tuple[float, float] | None = None) -> None:
        out[key] = value
        if interval is not None:
            out[f"{key.split('.')[0]}_ci_low.{'.'.join(key.split('.')[1:])}"] = interval[0]
            out[f"{key.split('.')[0]}_ci_high.{'.'.join(key.split('.')[1:])}"] = interval[1]

    seed = up.seed
    known = results.groupby("target")["error"].apply(lambda e: bool(np.isfinite(e).any()))
    for target in sorted(t for t in known.index if known[t]):  # a target no test volume has is not scored
        for k in [str(k) for k in up.k]:
            scratch = error_matrix(results, "scratch", target, k)
            for arm in ("scratch", *GAIN_KEYS):
                errors = error_matrix(results, arm, target, k)
                put(
                    f"error.{arm}.{target}.k{k}",
                    mean_error(errors),
                    paired_bootstrap(mean_error, [errors], draws, seed),
                )
                if arm in GAIN_KEYS:
                    interval = paired_bootstrap(relative_gain, [errors, scratch], draws, seed)
                    put(f"{GAIN_KEYS[arm]}.{target}.k{k}", relative_gain(errors, scratch), interval)
        tstr, trtr = error_matrix(results, "tstr", target, "-"), error_matrix(results, "trtr", target, "-")
        put(f"error.tstr.{target}", mean_error(tstr), paired_bootstrap(mean_error, [tstr], draws, seed))
        put(f"error.trtr.{target}", mean_error(trtr), paired_bootstrap(mean_error, [trtr], draws, seed))
        put(f"tstr_ratio.{target}", error_ratio(tstr, trtr), paired_bootstrap(error_ratio, [tstr, trtr], draws, seed))
    gate = f"{up.primary}.k{up.gate_k}"
    out.update(
        {
            "primary": up.primary,
            "gate_k": up.gate_k,
            "primary_gain": out.get(f"pretrain_gain.{gate}"),
            "primary_gain_ci_low": out.get(f"pretrain_gain_ci_low.{gate}"),
            "primary_gain_ci_high": out.get(f"pretrain_gain_ci_high.{gate}"),
            "repeats": up.repeats,
        }
    )
    return out
