"""Conditioning fidelity: does a synthetic set follow the covariates it was asked for?

Two complementary checks:

* a **covariate predictor** fitted on real training features (:func:`fit_covariate_predictor`) and
  applied to synthetic volumes generated for known covariates: its error on the synthetic set
  (:func:`predictor_error`) should be close to its error on real test volumes;
* a **known effect** measured in the image, e.g. dark-CSF fraction or ventricle size against the
  requested age (:func:`csf_fraction`, :func:`ventricle_volume_ml`, :func:`slope_and_correlation`),
  compared with the same relation in the real cohort.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from skimage.filters import threshold_multiotsu
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import accuracy_score, mean_absolute_error
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from synthmri.data.mni import ventricle_proxy_ml
from synthmri.metrics.features import head_mask_normalized

__all__ = [
    "KINDS",
    "fit_covariate_predictor",
    "predictor_error",
    "slope_and_correlation",
    "csf_fraction",
    "ventricle_volume_ml",
    "gm_wm_contrast",
]

KINDS = ("continuous", "categorical")  # as synthmri.config.Covariate.kind
RIDGE_ALPHAS = np.logspace(-3, 3, 13)


def fit_covariate_predictor(features: np.ndarray, values, kind: str = "continuous") -> Pipeline:
    """A covariate predictor on (standardized) features, fitted with scikit-learn.

    Args:
        features: ``(N, F)`` features of real training volumes (e.g. from an extractor of
            :mod:`synthmri.metrics.features`).
        values: ``(N,)`` covariate values: numbers for ``"continuous"``, labels for ``"categorical"``.
        kind: ``"continuous"``: ridge regression, its penalty chosen by efficient leave-one-out CV
            (``RidgeCV``, alphas 1e-3..1e3); ``"categorical"``: logistic regression (L2, C = 1).

    Returns:
        a fitted ``Pipeline(StandardScaler, model)``; ``pipeline.covariate_kind`` records ``kind``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown covariate kind '{kind}', expected one of {KINDS}")
    features = np.asarray(features, dtype=np.float64)
    values = np.asarray(values)
    if features.ndim != 2 or len(features) != len(values):
        raise ValueError(f"features {features.shape} and values {values.shape} do not match")
    if kind == "continuous":
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
        model.fit(features, values.astype(np.float64))
    else:
        if len(np.unique(values)) < 2:
            raise ValueError("a categorical predictor needs at least two classes in the training values")
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        model.fit(features, values)
    model.covariate_kind = kind
    return model


def predictor_error(model: Pipeline, features: np.ndarray, values) -> float:
    """Error of a fitted predictor: mean absolute error (continuous; lower is better) or accuracy
    (categorical; higher is better), per ``model.covariate_kind``."""
    predicted = model.predict(np.asarray(features, dtype=np.float64))
    if getattr(model, "covariate_kind", "continuous") == "continuous":
        return float(mean_absolute_error(np.asarray(values, dtype=np.float64), predicted))
    return float(accuracy_score(np.asarray(values), predicted))


def slope_and_correlation(x, y) -> dict[str, float]:
    """Least-squares line of ``y`` on ``x`` (``scipy.stats.linregress``).

    Returns ``slope``, ``intercept``, ``r`` (Pearson), ``p_value`` (two-sided, slope = 0),
    ``slope_stderr`` and ``n``; NaN for everything but ``n`` with fewer than 3 points or constant x.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} vs {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3 or np.ptp(x) == 0:
        nan = float("nan")
        return {"slope": nan, "intercept": nan, "r": nan, "p_value": nan, "slope_stderr": nan, "n": int(x.size)}
    fit = stats.linregress(x, y)
    return {
        "slope": float(fit.slope),
        "intercept": float(fit.intercept),
        "r": float(fit.rvalue),
        "p_value": float(fit.pvalue),
        "slope_stderr": float(fit.stderr),
        "n": int(x.size),
    }


def csf_fraction(
    volume: np.ndarray,
    value_range: tuple[float, float] = (-1.0, 1.0),
    threshold: float | None = None,
    mask: np.ndarray | None = None,
) -> float:
    """Fraction of the head occupied by dark (CSF-like) voxels in a T1-weighted volume.

    Default (``threshold=None``): the darkest of three Otsu classes of the in-head intensities
    (``skimage.filters.threshold_multiotsu``; ≈ CSF / GM / WM on T1), the ``class0_fraction`` feature
    of the ``"stats"`` extractor. It needs no affine and no tuned constant, and does not change under
    an affine intensity change, so a synthetic set with a slightly different intensity scale is
    measured like the real one. On the processed demo cohort (40×48×40, 4 mm) it correlates with
    the true CSF fraction at r ≈ 0.79 and with age at r ≈ 0.74.

    ``threshold=t``: the rule of :func:`synthmri.data.mni.ventricle_proxy_ml` over the whole head
    instead: intensities shifted so that the background (``value_range[0]``) is 0, a voxel is dark
    when below ``t`` × the 95th percentile of the head (white matter). This depends on where the
    normalization put the background relative to CSF (on the processed demo, t = 0.3 fits; the raw
    scanner value 0.5 does not).

    Args:
        mask: head mask; default :func:`synthmri.metrics.features.head_mask_normalized`. Dark CSF at
            the edge of the head can fall outside an intensity-based mask; enclosed CSF (ventricles,
            sulci) is kept by its hole filling.
    """
    volume = np.asarray(volume, dtype=np.float32)
    mask = head_mask_normalized(volume, value_range) if mask is None else np.asarray(mask, dtype=bool)
    values = volume[mask] - np.float32(value_range[0])
    if values.size == 0:
        return 0.0
    if threshold is None:
        try:
            cut = float(threshold_multiotsu(values, classes=3)[0])
        except ValueError:  # fewer than 3 distinct intensities: nothing distinguishes CSF
            return 0.0
    else:
        cut = threshold * float(np.percentile(values, 95))
    return float((values < cut).mean())


def gm_wm_contrast(volume: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Grey/white-matter contrast of a T1-weighted volume: the mean intensity of the middle of three Otsu classes
    of the in-head intensities (≈ GM) over that of the brightest (≈ WM), background shifted to 0.

    The acquisition effect the report checks: on an MPRAGE it rises with the inversion time and moves with the
    field strength (:mod:`synthmri.data.physics`). A ratio, so an intensity scale change does not move it."""
    volume = np.asarray(volume, dtype=np.float32)
    values = volume[head_mask_normalized(volume, value_range)] - np.float32(value_range[0])
    try:
        low, high = threshold_multiotsu(values, classes=3)
    except ValueError:  # fewer than 3 distinct intensities
        return float("nan")
    grey, white = values[(values >= low) & (values < high)], values[values >= high]
    if grey.size == 0 or white.size == 0 or white.mean() <= 0:
        return float("nan")
    return float(grey.mean() / white.mean())


def ventricle_volume_ml(
    volume: np.ndarray, affine: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0), threshold: float = 0.5
) -> float:
    """The demo cohort's image-only ventricle size (:func:`synthmri.data.mni.ventricle_proxy_ml`: dark
    voxels in a central MNI box, in ml) for a volume in ``value_range`` with background at its low end.

    Needs the volume's affine in (roughly) MNI world coordinates: the processed space's affine
    (``data/processed/space.json``) for processed demo volumes and samples of a model trained on them.
    """

    shifted = np.asarray(volume, dtype=np.float32) - np.float32(value_range[0])
    return ventricle_proxy_ml(shifted, np.asarray(affine, dtype=np.float64), threshold)
