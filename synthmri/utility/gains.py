"""Gains from pre-training and their 95 % intervals, from paired per-subject errors.

Every arm of the protocol is scored on the same real held-out subjects in the same repeats (seed and draw of
the k fine-tuning subjects), so errors form ``(repeats, subjects)`` arrays that line up across arms. An interval
is a percentile bootstrap that resamples repeats and test subjects independently, with the same indices for
both arms of a comparison (paired): it carries both the training noise (repeats) and which subjects happen to
be held out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

LEVEL = 0.95


def _mean(values: np.ndarray) -> float:
    """Mean over the known (finite) entries; NaN, without a warning, when there is none (a resample may draw
    only subjects whose value is unknown)."""
    known = values[np.isfinite(values)]
    return float(known.mean()) if known.size else float("nan")


def relative_gain(errors: np.ndarray, baseline: np.ndarray) -> float:
    """``1 - mean(errors) / mean(baseline)``: the fraction of the baseline's error that pre-training removes
    (0.25 = a quarter lower; negative = worse). NaN entries (unknown truth) are ignored."""
    base = _mean(baseline)
    return 1.0 - _mean(errors) / base if base > 0 else float("nan")


def error_ratio(errors: np.ndarray, baseline: np.ndarray) -> float:
    """``mean(errors) / mean(baseline)`` (e.g. the TSTR error over the TRTR error)."""
    base = _mean(baseline)
    return _mean(errors) / base if base > 0 else float("nan")


def mean_error(errors: np.ndarray) -> float:
    return _mean(np.asarray(errors, dtype=np.float64))


def paired_bootstrap(
    statistic: Callable[..., float], arrays: Sequence[np.ndarray], draws: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile interval of ``statistic(*arrays)`` over resamples of rows (repeats) and columns (test
    subjects) of the ``(R, J)`` arrays, the same resample for every array. NaN when the statistic is undefined
    in more than a tenth of the resamples."""
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays) or len(shape) != 2:
        raise ValueError(f"paired arrays must share one (repeats, subjects) shape, got {[a.shape for a in arrays]}")
    rng = np.random.default_rng(seed)
    values = np.empty(draws)
    for b in range(draws):
        rows = rng.integers(0, shape[0], shape[0])
        cols = rng.integers(0, shape[1], shape[1])
        values[b] = statistic(*[a[np.ix_(rows, cols)] for a in arrays])
    values = values[np.isfinite(values)]
    if len(values) < 0.9 * draws:
        return float("nan"), float("nan")
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
