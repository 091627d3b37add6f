"""Memorization check: is a synthetic volume a (near) copy of a training patient?

For every synthetic volume, its most similar training volume in the processed space is found, by
normalized cross-correlation (NCC) inside the union of the two head masks, or by 3D SSIM. What counts
as "too similar" is calibrated on real data: the nearest-training-neighbour similarity of *held-out*
real volumes measures how alike two different real patients can be; the threshold is a high quantile
of it (or its maximum). A synthetic volume above the threshold resembles a training patient more than
different patients resemble each other: a likely copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synthmri.logs import progress
from synthmri.metrics.features import as_volumes, head_mask_normalized
from synthmri.metrics.image import ssim3d

__all__ = [
    "Neighbours",
    "Calibration",
    "ncc_matrix",
    "ssim_matrix",
    "nearest_neighbours",
    "calibrate_threshold",
    "memorization_report",
    "chance_copy_fraction",
]

METRICS = ("ncc", "ssim")


@dataclass(frozen=True)
class Neighbours:
    """Nearest training volume of each query volume.

    Attributes:
        index: ``(Q,)`` index into the training set of the most similar training volume.
        score: ``(Q,)`` its similarity (higher = more similar; 1 = identical).
        scores: ``(Q, T)`` similarity of every query/training pair (NaN where not computed, see ``shortlist``).
        metric: ``"ncc"`` or ``"ssim"``.
    """

    index: np.ndarray
    score: np.ndarray
    scores: np.ndarray
    metric: str


@dataclass(frozen=True)
class Calibration:
    """Threshold of "too similar", from real-vs-real nearest-neighbour scores.

    Attributes:
        threshold: ``quantile`` of ``holdout_scores``.
        quantile: 1.0 means the maximum.
        holdout_scores: nearest-training-neighbour score of every held-out real volume.
        metric: similarity used.
    """

    threshold: float
    quantile: float
    holdout_scores: np.ndarray
    metric: str


def _flatten_with_masks(volumes, value_range) -> tuple[np.ndarray, np.ndarray]:
    array = as_volumes(volumes)
    values = array.reshape(len(array), -1).astype(np.float64)
    masks = np.stack([head_mask_normalized(v, value_range).ravel() for v in array]).astype(np.float64)
    return values, masks


def ncc_matrix(queries, train, value_range: tuple[float, float] = (-1.0, 1.0), chunk: int = 32) -> np.ndarray:
    """NCC ``(Q, T)`` of every query/training pair, each pair over the union of its two head masks.

    NCC = Pearson correlation of the voxel values inside the union mask (in [-1, 1]; 1 for identical
    volumes, and for volumes equal up to a positive affine intensity change). All pairs at once: with
    p, q the two masks, every sum over the union (weights ``p + q - p·q``) is a combination of matrix
    products; queries are processed ``chunk`` at a time to bound memory.
    """
    queries = as_volumes(queries)
    b, q = _flatten_with_masks(train, value_range)
    bq, bb = b * q, b * b
    bbq = bb * q
    sum_b_q, sum_bb_q, n_q = bq.sum(1), bbq.sum(1), q.sum(1)
    out = []
    starts = range(0, len(queries), chunk)
    for start in progress(starts, f"NCC with training volumes ({chunk} volumes a step)", "step", min_total=16):
        a, p = _flatten_with_masks(queries[start : start + chunk], value_range)
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"query and training volumes differ in shape ({a.shape[1]} vs {b.shape[1]} voxels)")
        ap, aa = a * p, a * a
        aap = aa * p
        # Σ_union f = Σ f·p + Σ f·q − Σ f·p·q, for f in {1, a, a², b, b², ab}
        n = p.sum(1)[:, None] + n_q[None, :] - p @ q.T
        sum_a = ap.sum(1)[:, None] + a @ q.T - ap @ q.T
        sum_aa = aap.sum(1)[:, None] + aa @ q.T - aap @ q.T
        sum_b = sum_b_q[None, :] + p @ b.T - p @ bq.T
        sum_bb = sum_bb_q[None, :] + p @ bb.T - p @ bbq.T
        sum_ab = ap @ b.T + a @ bq.T - ap @ bq.T
        n = np.maximum(n, 1.0)
        cov = sum_ab - sum_a * sum_b / n
        var_a = np.maximum(sum_aa - sum_a**2 / n, 0.0)
        var_b = np.maximum(sum_bb - sum_b**2 / n, 0.0)
        denominator = np.sqrt(var_a * var_b)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(denominator > 1e-12, cov / denominator, 0.0))
    return np.clip(np.concatenate(out), -1.0, 1.0)


def ssim_matrix(queries, train, data_range: float = 2.0, pairs_mask: np.ndarray | None = None) -> np.ndarray:
    """3D SSIM (:func:`synthmri.metrics.image.ssim3d`, whole volume) ``(Q, T)``; only where
    ``pairs_mask`` is true when given (NaN elsewhere). About 10 ms per pair at 40×48×40."""
    queries, train = as_volumes(queries), as_volumes(train)
    out = np.full((len(queries), len(train)), np.nan)
    rows = progress(queries, "3D SSIM with training volumes", "vol", total=len(queries), min_total=500)
    for i, query in enumerate(rows):
        for j, reference in enumerate(train):
            if pairs_mask is None or pairs_mask[i, j]:
                out[i, j] = ssim3d(reference, query, data_range)
    return out


def nearest_neighbours(
    synthetic,
    train,
    metric: str = "ncc",
    value_range: tuple[float, float] = (-1.0, 1.0),
    shortlist: int | None = None,
    ncc: np.ndarray | None = None,
) -> Neighbours:
    """The most similar training volume of each synthetic (or held-out) volume.

    Args:
        synthetic: query volumes ``(Q, D, H, W)``.
        train: training volumes ``(T, D, H, W)``, same shape.
        metric: ``"ncc"`` (inside the union head mask, fast, all pairs) or ``"ssim"`` (3D SSIM of the
            whole volume, ~10 ms per pair).
        value_range: intensity range (head masks; SSIM data range).
        shortlist: SSIM only: score just the ``shortlist`` training volumes with the highest NCC of
            each query (``None`` = all pairs).
        ncc: :func:`ncc_matrix` of these volumes when already computed (it is the costly part on a large set,
            and both metrics need it).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown similarity '{metric}', expected one of {METRICS}")
    synthetic, train = as_volumes(synthetic), as_volumes(train)
    if len(train) == 0 or len(synthetic) == 0:
        raise ValueError("nearest_neighbours needs at least one query and one training volume")
    if metric == "ncc":
        scores = ncc if ncc is not None else ncc_matrix(synthetic, train, value_range)
    else:
        pairs = None
        if shortlist is not None and shortlist < len(train):
            ncc = ncc if ncc is not None else ncc_matrix(synthetic, train, value_range)
            top = np.argsort(-ncc, axis=1)[:, :shortlist]
            pairs = np.zeros(ncc.shape, dtype=bool)
            np.put_along_axis(pairs, top, True, axis=1)
        scores = ssim_matrix(synthetic, train, float(value_range[1] - value_range[0]), pairs)
    index = np.nanargmax(scores, axis=1)
    return Neighbours(index=index, score=scores[np.arange(len(scores)), index], scores=scores, metric=metric)


def calibrate_threshold(
    train,
    holdout,
    quantile: float = 0.99,
    metric: str = "ncc",
    value_range: tuple[float, float] = (-1.0, 1.0),
    shortlist: int | None = None,
) -> Calibration:
    """Threshold of "likely copy": ``quantile`` (1.0 = max) of the nearest-training-neighbour scores of
    held-out real volumes, i.e. of how similar a *different* real patient gets to the training set.

    With few held-out volumes a high quantile is close to their maximum (linear interpolation,
    ``numpy.quantile``). The held-out volumes must be subjects absent from ``train``.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    nn = nearest_neighbours(holdout, train, metric, value_range, shortlist)
    return Calibration(
        threshold=float(np.quantile(nn.score, quantile)), quantile=quantile, holdout_scores=nn.score, metric=metric
    )


CHANCE_LEVEL = 0.95  # the copy check's bound: what sets of new real subjects stay under in 95 draws of 100
CHANCE_DRAWS = 20_000


def chance_copy_fraction(
    n_synthetic: int, n_holdout: int, quantile: float, level: float = CHANCE_LEVEL, draws: int = CHANCE_DRAWS
) -> tuple[float, float]:
    """The likely-copy fraction of a set of *new real subjects*: its mean, and the ``level`` quantile.

    Why: the threshold is itself a quantile of only ``n_holdout`` real-vs-real scores, so the fraction of
    a set of new subjects above it is random: with 13 held-out volumes and 64 new subjects it is above
    its mean in ~45 % of draws (measured real-vs-real on the demo cohort, ``benchmarks/bench_gate_baseline.py``),
    so a check "fraction ≤ mean" refuses honest sets half of the time. The bound a generator must stay
    under is the ``level`` quantile of that fraction.

    Exchangeability makes the null distribution-free: the nearest-training scores of held-out subjects
    and of new subjects are i.i.d., so they can be taken uniform. The calibration's threshold is then
    ``numpy.quantile`` of ``n_holdout`` uniforms, a new subject exceeds it with probability
    ``p = 1 − threshold``, and the count of flagged subjects is ``Binomial(n_synthetic, p)``. The mean is
    exact (order statistics: ``E[U(k)] = k / (n + 1)``); the quantile is from ``draws`` simulated
    calibrations (seeded, so the report is reproducible). With ``quantile = 1`` the count is
    beta-binomial(n_synthetic, 1, n_holdout), which the tests check this against.
    """
    if n_synthetic < 1 or n_holdout < 1:
        raise ValueError(f"need at least one synthetic and one held-out volume, got {n_synthetic} and {n_holdout}")
    position = quantile * (n_holdout - 1)  # numpy's linear interpolation between order statistics
    below, weight = int(np.floor(position)), position - np.floor(position)
    above = min(below + 1, n_holdout - 1)
    mean_threshold = ((1 - weight) * (below + 1) + weight * (above + 1)) / (n_holdout + 1)
    rng = np.random.default_rng(0)
    thresholds = np.quantile(rng.random((draws, n_holdout)), quantile, axis=1)
    fractions = rng.binomial(n_synthetic, 1.0 - thresholds) / n_synthetic
    return float(1.0 - mean_threshold), float(np.quantile(fractions, level, method="higher"))


def memorization_report(
    synthetic,
    train,
    holdout=None,
    calibration: Calibration | None = None,
    metric: str = "ncc",
    quantile: float = 0.99,
    n_pairs: int = 5,
    value_range: tuple[float, float] = (-1.0, 1.0),
    shortlist: int | None = None,
    ncc: np.ndarray | None = None,
) -> dict:
    """Memorization summary of a synthetic set against the training set.

    Args:
        synthetic, train: volumes ``(N, D, H, W)``.
        holdout: held-out real volumes to calibrate the threshold (:func:`calibrate_threshold`);
            or pass ``calibration`` computed before (its metric wins).
        n_pairs: how many closest synthetic/training pairs to return for the side-by-side figure.
        ncc: :func:`ncc_matrix` of ``synthetic`` against ``train``, when already computed.

    Returns:
        dict with ``metric``, ``threshold``, ``quantile``, ``n_synthetic``, ``n_likely_copies``
        (synthetic volumes with score > threshold), ``fraction``, ``likely_copies`` (their synthetic
        indices), ``closest_pairs`` (``n_pairs`` dicts ``{"synthetic", "train", "score", "likely_copy"}``,
        most similar first), ``max_score``, ``median_score``, ``synthetic_scores`` (nearest-neighbour
        score of every synthetic volume), ``nearest_train`` (their training indices), ``holdout_scores``
        (real-vs-real scores behind the threshold; for a histogram next to ``synthetic_scores``),
        ``chance_fraction`` and ``chance_fraction_bound`` (:func:`chance_copy_fraction`: the mean and the
        95 % quantile of ``fraction`` for a set of new real subjects).
    """
    if calibration is None:
        if holdout is None:
            raise ValueError("memorization_report needs held-out real volumes or a calibration")
        calibration = calibrate_threshold(train, holdout, quantile, metric, value_range, shortlist)
    metric = calibration.metric
    nn = nearest_neighbours(synthetic, train, metric, value_range, shortlist, ncc)
    copies = np.flatnonzero(nn.score > calibration.threshold)
    chance, chance_bound = chance_copy_fraction(len(nn.score), len(calibration.holdout_scores), calibration.quantile)
    order = np.argsort(-nn.score, kind="stable")[:n_pairs]
    return {
        "metric": metric,
        "threshold": calibration.threshold,
        "quantile": calibration.quantile,
        "n_synthetic": int(len(nn.score)),
        "n_likely_copies": int(len(copies)),
        "fraction": float(len(copies) / len(nn.score)),
        "chance_fraction": chance,
        "chance_fraction_bound": chance_bound,
        "likely_copies": [int(i) for i in copies],
        "closest_pairs": [
            {
                "synthetic": int(i),
                "train": int(nn.index[i]),
                "score": float(nn.score[i]),
                "likely_copy": bool(nn.score[i] > calibration.threshold),
            }
            for i in order
        ],
        "max_score": float(nn.score.max()),
        "median_score": float(np.median(nn.score)),
        "synthetic_scores": [float(s) for s in nn.score],
        "nearest_train": [int(i) for i in nn.index],
        "holdout_scores": [float(s) for s in calibration.holdout_scores],
    }
