"""Bootstrap intervals of the gate's set metrics: how far each number would move with other subjects.

Why: the gate judges a set on a few real held-out volumes (13 on the demo) and a few synthetic ones. On a
real-vs-real baseline (``benchmarks/bench_gate_baseline.py``) the CSF effect and the sex and site predictor
checks flip in about one draw in seven, so a number without its spread invites decisions made by chance.

Each interval is a percentile bootstrap over subjects: in every replicate the held-out volumes (the whole real
cohort for the effect slopes, each sex separately for the head-size difference) and the synthetic volumes
are resampled with replacement and the metric is recomputed from per-subject quantities the report already
has (features, CSF fractions, ventricle and head volumes, each subject's predictor error); the covariate
predictors stay the ones fitted on the training split. The FD ratio's baseline is one random training
subset of the synthetic set's size per replicate. k-NN metrics (precision, coverage): a resampled subject
is its own neighbour at distance 0, which shrinks the k-NN balls, so their intervals lean low.
"""

from __future__ import annotations

import warnings

import numpy as np

from synthmri.metrics.distribution import compare_features

__all__ = ["BOOTSTRAP_DRAWS", "LEVEL", "gate_intervals"]

BOOTSTRAP_DRAWS = 200
LEVEL = 0.95


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of each row of ``y`` on the same row of ``x`` (``(B, n)`` arrays)."""
    xc = x - x.mean(axis=1, keepdims=True)
    var = (xc * xc).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 0, (xc * (y - y.mean(axis=1, keepdims=True))).sum(axis=1) / var, np.nan)


def _interval(values: np.ndarray) -> tuple[float, float] | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 0.9 * BOOTSTRAP_DRAWS:  # too many replicates where the metric is undefined
        return None
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _resample(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, n, size=(BOOTSTRAP_DRAWS, n))


def _feature_intervals(
    rng: np.random.Generator,
    f_train: np.ndarray,
    f_ref: np.ndarray,
    f_syn: np.ndarray,
    k: int,
    compare_size: int | None = None,
) -> dict[str, tuple[float, float] | None]:
    m = len(f_syn) if compare_size is None else min(len(f_syn), compare_size)
    n = min(m, len(f_train))
    rows: list[dict[str, float]] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PRDC: k=")
        ref_draws = _resample(rng, len(f_ref))
        syn_draws = rng.integers(0, len(f_syn), size=(BOOTSTRAP_DRAWS, m))
        for ref_i, syn_i in zip(ref_draws, syn_draws, strict=True):
            ref, syn = f_ref[ref_i], f_syn[syn_i]
            baseline = f_train[np.sort(rng.choice(len(f_train), n, replace=False))]
            scores = compare_features(ref, syn, k)
            base_fd = compare_features(ref, baseline, k)["frechet_distance"]
            rows.append(
                {
                    "frechet_ratio": scores["frechet_distance"] / base_fd if base_fd > 0 else np.nan,
                    "precision": scores["precision"],
                    "coverage": scores["coverage"],
                }
            )
    return {name: _interval(np.array([r[name] for r in rows])) for name in ("frechet_ratio", "precision", "coverage")}


def _effect_ratio(
    rng: np.random.Generator, x_real: np.ndarray, y_real: np.ndarray, x_syn: np.ndarray, y_syn: np.ndarray
) -> tuple[float, float] | None:
    real_i, syn_i = _resample(rng, len(x_real)), _resample(rng, len(x_syn))
    with np.errstate(invalid="ignore", divide="ignore"):
        return _interval(_slopes(x_syn[syn_i], y_syn[syn_i]) / _slopes(x_real[real_i], y_real[real_i]))


def _difference_ratio(rng: np.random.Generator, groups: dict, levels: list[str]) -> tuple[float, float] | None:
    """(last − first level mean) synthetic / real, each group resampled on its own."""
    first, last = levels[0], levels[-1]

    def diff(name: str) -> np.ndarray:
        a, b = np.asarray(groups[(name, last)]), np.asarray(groups[(name, first)])
        if len(a) == 0 or len(b) == 0:
            return np.full(BOOTSTRAP_DRAWS, np.nan)
        return a[_resample(rng, len(a))].mean(axis=1) - b[_resample(rng, len(b))].mean(axis=1)

    with np.errstate(invalid="ignore", divide="ignore"):
        return _interval(diff("synthetic") / diff("real"))


def _predictor(rng: np.random.Generator, block: dict) -> tuple[float, float] | None:
    ref, syn = (np.asarray(block["per_subject"][name]) for name in ("reference", "synthetic"))
    if len(ref) == 0 or len(syn) == 0:
        return None
    ref_mean = ref[_resample(rng, len(ref))].mean(axis=1)
    syn_mean = syn[_resample(rng, len(syn))].mean(axis=1)
    if block["kind"] == "continuous":  # MAE ratio
        with np.errstate(invalid="ignore", divide="ignore"):
            return _interval(syn_mean / ref_mean)
    return _interval(ref_mean - syn_mean)  # accuracy drop


def gate_intervals(
    conditioning: dict,
    f_train: np.ndarray,
    f_ref: np.ndarray,
    f_syn: np.ndarray,
    k: int,
    seed: int = 0,
    compare_size: int | None = None,
) -> dict[str, tuple[float, float]]:
    """``{gate check name: (low, high)}``: the :data:`LEVEL` bootstrap interval of every set check that
    these inputs determine (FD ratio, precision, coverage, the effect ratios, the predictor checks).

    Args:
        conditioning: the ``details`` of :func:`synthmri.report.families.conditioning_metrics`.
        f_train, f_ref, f_syn: features of the real training, real held-out and synthetic volumes.
        k: the PRDC ``k``.
        compare_size: synthetic volumes per set comparison (``report.compare_size``): the feature checks'
            replicates draw this many from the whole set, so their interval is that of one comparison (the
            report's number, a median over several, moves less) and their cost does not grow with the set.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[float, float] | None] = dict(_feature_intervals(rng, f_train, f_ref, f_syn, k, compare_size))
    age = conditioning.get("age")
    if age is not None:
        names = {"csf_fraction": "age_effect_csf", "ventricle_ml": "age_effect_ventricles"}
        real_ok, syn_ok = np.asarray(age["real_ok"]), np.asarray(age["synthetic_ok"])
        for measure, (real, syn) in age["measures"].items():
            out[names[measure]] = _effect_ratio(
                rng,
                np.asarray(age["real_age"])[real_ok],
                np.asarray(real)[real_ok],
                np.asarray(age["synthetic_age"])[syn_ok],
                np.asarray(syn)[syn_ok],
            )
    sex = conditioning.get("sex")
    if sex is not None:
        out["sex_effect_head_size"] = _difference_ratio(rng, sex["groups"], sex["levels"])
    for name, effect in conditioning.get("acquisition", {}).items():
        if "groups" in effect:  # categorical: GM/WM contrast difference between levels
            out[f"acquisition_effect_{name}"] = _difference_ratio(rng, effect["groups"], effect["levels"])
        else:
            (x_real, y_real), (x_syn, y_syn) = effect["real"], effect["synthetic"]
            out[f"acquisition_effect_{name}"] = _effect_ratio(
                rng, *(np.asarray(a, dtype=np.float64) for a in (x_real, y_real, x_syn, y_syn))
            )
    for name, block in conditioning.get("predictors", {}).items():
        out[f"predictor_{name}"] = _predictor(rng, block)
    return {name: interval for name, interval in out.items() if interval is not None}
