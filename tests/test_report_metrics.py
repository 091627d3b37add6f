"""Metric building blocks of the report: each test fails if a formula is wrong."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from synthmri.metrics import conditioning, distribution, diversity, features, privacy
from synthmri.metrics.image import ssim3d

SHAPE = (20, 24, 20)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brain(seed: int = 0, ventricle: float = 0.25, shape=SHAPE, noise: float = 0.02) -> np.ndarray:
    """A toy T1 head in [-1, 1]: background -1, WM core, GM rim, dark CSF centre of radius ``ventricle``;
    head size, position and texture vary with ``seed``."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    scale = 0.8 * np.exp(rng.normal(0, 0.04, 3))[:, None, None, None]
    offset = rng.normal(0, 0.03, 3)[:, None, None, None]
    r = np.sqrt((((grid - offset) / scale) ** 2).sum(0))
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 1.0)
    texture /= texture.std()
    vol = np.full(shape, -1.0)
    head = r < 1
    vol[head] = 0.7
    vol[head & (r > 0.75)] = 0.2
    vol[r < ventricle] = -0.6
    vol[head] += 0.08 * texture[head] + noise * rng.normal(size=int(head.sum()))
    return np.clip(vol, -1, 1).astype(np.float32)


def exact_gaussian_sample(rng, n, mean, cov) -> np.ndarray:
    """n points whose sample mean and (unbiased) sample covariance are exactly ``mean`` and ``cov``."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample cov = I
    return mean + z @ np.linalg.cholesky(cov).T


# ----------------------------------------------------------------------------------------------
# Fréchet distance, MMD, PRDC


def test_frechet_distance_zero_for_identical_sets():
    feats = np.random.default_rng(0).normal(size=(40, 6))
    assert distribution.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    few = np.random.default_rng(1).normal(size=(8, 35))  # N < F: rank-deficient covariances
    assert distribution.frechet_distance(few, few) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("rotate", [False, True])
def test_frechet_distance_matches_closed_form(rotate):
    rng = np.random.default_rng(0)
    mu_a, mu_b = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, -1.0, 0.0, 0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    rotation = np.linalg.qr(rng.normal(size=(4, 4)))[0] if rotate else np.eye(4)
    cov_a, cov_b = rotation @ np.diag(var_a) @ rotation.T, rotation @ np.diag(var_b) @ rotation.T
    a, b = exact_gaussian_sample(rng, 50, mu_a, cov_a), exact_gaussian_sample(rng, 70, mu_b, cov_b)
    # commuting covariances: Tr(Sa + Sb - 2 (Sa Sb)^1/2) = Σ (sqrt(va) - sqrt(vb))²
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert distribution.frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_grows_with_shift():
    real = np.random.default_rng(0).normal(size=(30, 5))
    fake = np.random.default_rng(1).normal(size=(30, 5))
    values = [distribution.frechet_distance(real, fake + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[-1] > 10 * values[0]


def test_mmd_unbiased_formula_and_median_bandwidth():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 2)), rng.normal(size=(4, 2)) + 1
    sigma = 0.7
    k = lambda x, y: np.exp(-np.sum((x - y) ** 2) / (2 * sigma**2))  # noqa: E731
    aa = sum(k(a[i], a[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    bb = sum(k(b[i], b[j]) for i in range(4) for j in range(4) if i != j) / (4 * 3)
    ab = sum(k(x, y) for x in a for y in b) / (5 * 4)
    assert distribution.mmd_rbf(a, b, bandwidth=sigma) == pytest.approx(aa + bb - 2 * ab, rel=1e-10)
    pooled = np.concatenate([a, b])
    distances = [np.linalg.norm(pooled[i] - pooled[j]) for i in range(9) for j in range(i + 1, 9)]
    assert distribution.median_bandwidth(a, b) == pytest.approx(np.median(distances))
    assert distribution.mmd_rbf(a, b) == pytest.approx(distribution.mmd_rbf(a, b, np.median(distances)))


def test_mmd_near_zero_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(80, 5)), rng.normal(size=(80, 5))
    same = distribution.mmd_rbf(a, b)
    shifted = distribution.mmd_rbf(a, b + 1.0)
    assert abs(same) < 0.02
    assert shifted > 0.1 and shifted > 10 * abs(same)
    assert distribution.mmd_rbf(a, b + 2.0, bandwidth=3.0) > distribution.mmd_rbf(a, b + 1.0, bandwidth=3.0)


def test_prdc_hand_computed_example():
    real = np.arange(5.0)[:, None]  # k=1 radii: 1 for every real point
    fake = np.array([[0.5], [10.0]])  # k=1 radii: 9.5 for both fake points
    result = distribution.prdc(real, fake, k=1)
    assert result["precision"] == pytest.approx(0.5)  # only 0.5 lies in a real ball
    assert result["recall"] == pytest.approx(1.0)  # every real point lies within 9.5 of 0.5
    assert result["density"] == pytest.approx(1.0)  # 0.5 is in 2 real balls: 2 / (k * M) = 1
    assert result["coverage"] == pytest.approx(0.4)  # balls of 0 and 1 contain a fake point
    # k=2: real radii (2, 1, 1, 1, 2); fake radii (19.5, 10, 19.5)
    result = distribution.prdc(real, np.array([[0.5], [10.0], [20.0]]), k=2)
    assert result["precision"] == pytest.approx(1 / 3) and result["recall"] == pytest.approx(1.0)
    assert result["density"] == pytest.approx(2 / (2 * 3))  # 0.5 lies in the balls of 0 and 1
    assert result["coverage"] == pytest.approx(0.4)


def test_prdc_identical_and_far_sets():
    real = np.random.default_rng(0).normal(size=(30, 4))
    same = distribution.prdc(real, real.copy(), k=5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = distribution.prdc(real, real + 100.0, k=5)
    assert far["precision"] == far["coverage"] == far["density"] == far["recall"] == 0.0
    with pytest.warns(UserWarning, match="too large"):
        assert distribution.prdc(real[:4], real[:4], k=5)["k"] == 3


def test_compare_features_standardizes_with_the_real_set():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(30, 3)), rng.normal(size=(25, 3)) + 0.5
    scale = np.array([1.0, 1000.0, 0.001])  # units must not matter
    plain, scaled = distribution.compare_features(real, fake), distribution.compare_features(real * scale, fake * scale)
    for key in ("frechet_distance", "mmd2", "precision", "recall", "density", "coverage"):
        assert scaled[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-9), key
    real_std, fake_std = distribution.standardize_features(real * scale, fake * scale)
    assert np.allclose(real_std.mean(0), 0) and np.allclose(real_std.std(0), 1)
    assert not np.allclose(fake_std.mean(0), 0)  # the fake set keeps its offset


def test_histogram_distance():
    vols = [brain(seed) for seed in range(2)]
    same = distribution.histogram_distance(vols, [v.copy() for v in vols])
    assert same["wasserstein"] == pytest.approx(0.0, abs=1e-9) and same["js_distance"] == pytest.approx(0.0, abs=1e-6)
    widths = np.diff(same["bin_edges"])
    assert (same["real_hist"] * widths).sum() == pytest.approx(1.0)
    shifts = [
        distribution.histogram_distance(vols, [np.clip(v + s * (v > -1), -1, 1) for v in vols]) for s in (0.05, 0.2)
    ]
    assert 0 < shifts[0]["wasserstein"] < shifts[1]["wasserstein"]
    assert 0 < shifts[0]["js_distance"] < shifts[1]["js_distance"] <= 1


def test_histogram_wasserstein_agrees_with_scipy_on_the_voxels():
    """The pooled-histogram W1 is scipy's W1 of the pooled voxels up to one fine bin (2 / 4096)."""
    from scipy.stats import wasserstein_distance

    from synthmri.metrics.features import head_mask_normalized

    real = [brain(seed) for seed in range(3)]
    rng = np.random.default_rng(0)
    for fake in (
        [np.clip(v + 0.07 * (v > -1), -1, 1) for v in real],  # brighter
        [np.clip(v * 0.8 + rng.normal(0, 0.05, v.shape) * (v > -1), -1, 1) for v in real[:2]],  # flatter, noisy
    ):
        pooled = [np.concatenate([v[head_mask_normalized(v)] for v in vols]) for vols in (real, fake)]
        exact = wasserstein_distance(*pooled)
        result = distribution.histogram_distance(real, fake)
        assert exact > 0.01 and result["wasserstein"] == pytest.approx(exact, abs=2 / 4096)
        assert result["n_real_voxels"] == pooled[0].size and result["n_fake_voxels"] == pooled[1].size


# ----------------------------------------------------------------------------------------------
# MS-SSIM diversity


def test_ms_ssim_identity_noise_and_single_scale_equals_ssim():
    a = brain(0, shape=(24, 24, 24))
    assert diversity.n_scales(a.shape) == 2 and diversity.n_scales((16, 16, 16)) == 1
    assert diversity.n_scales((176, 208, 176)) == 5
    assert diversity.ms_ssim_3d(a, a, 2.0) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    values = [diversity.ms_ssim_3d(a, a + s * rng.normal(size=a.shape), 2.0) for s in (0.05, 0.2, 0.5)]
    assert 1 > values[0] > values[1] > values[2] > 0
    b = a + 0.2 * rng.normal(size=a.shape)
    assert diversity.ms_ssim_3d(a, b, 2.0, max_scales=1) == pytest.approx(ssim3d(a, b, 2.0), rel=1e-7)
    # two scales: cs at full resolution ^ w1 · SSIM at half resolution ^ w2, weights renormalized
    w = np.array(diversity.MS_SSIM_WEIGHTS[:2]) / sum(diversity.MS_SSIM_WEIGHTS[:2])
    half = lambda x: x.reshape(12, 2, 12, 2, 12, 2).mean(axis=(1, 3, 5))  # noqa: E731
    expected = diversity.ssim_components(a, b, 2.0)[1] ** w[0] * ssim3d(half(a), half(b), 2.0) ** w[1]
    assert diversity.ms_ssim_3d(a, b, 2.0) == pytest.approx(expected, rel=1e-7)


def test_pairwise_ms_ssim_and_diversity_ratio():
    rng = np.random.default_rng(0)
    base = brain(0)
    copies = [base + 0.02 * rng.normal(size=SHAPE) for _ in range(4)]
    noise = [rng.uniform(-1, 1, SHAPE) for _ in range(4)]
    subjects = [brain(seed) for seed in range(1, 5)]
    copies_value = diversity.mean_pairwise_ms_ssim(copies)
    assert copies_value > diversity.mean_pairwise_ms_ssim(subjects) > diversity.mean_pairwise_ms_ssim(noise)
    assert diversity.mean_pairwise_ms_ssim(copies, max_pairs=2, seed=1) == pytest.approx(copies_value, abs=0.02)
    collapsed = diversity.diversity_ratio(copies, subjects)
    assert collapsed["ms_ssim_synthetic"] == pytest.approx(copies_value)
    assert collapsed["ratio"] < 0.5
    assert diversity.diversity_ratio(subjects, subjects)["ratio"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# memorization


@pytest.mark.parametrize("metric", ["ncc", "ssim"])
def test_memorization_flags_copies_only(metric):
    train = np.stack([brain(seed) for seed in range(6)])
    holdout = np.stack([brain(seed) for seed in range(10, 16)])
    rng = np.random.default_rng(0)
    synthetic = np.stack(
        [train[2].copy(), np.clip(train[4] + 0.03 * rng.normal(size=SHAPE), -1, 1), brain(20), brain(21), brain(22)]
    )
    report = privacy.memorization_report(synthetic, train, holdout, metric=metric, quantile=0.99, n_pairs=3)
    assert report["likely_copies"] == [0, 1]
    assert report["n_likely_copies"] == 2 and report["fraction"] == pytest.approx(0.4)
    assert [(p["synthetic"], p["train"]) for p in report["closest_pairs"][:2]] == [(0, 2), (1, 4)]
    assert report["closest_pairs"][0]["score"] == pytest.approx(1.0)
    assert max(report["holdout_scores"]) < report["synthetic_scores"][1]
    assert report["threshold"] <= max(report["holdout_scores"])
    calibration = privacy.calibrate_threshold(train, holdout, quantile=1.0, metric=metric)
    assert calibration.threshold == pytest.approx(max(report["holdout_scores"]))


def test_new_real_subjects_flagged_only_at_chance_rate():
    train = np.stack([brain(seed) for seed in range(6)])
    holdout = np.stack([brain(seed) for seed in range(10, 16)])
    calibration = privacy.calibrate_threshold(train, holdout, quantile=1.0)
    copy = privacy.nearest_neighbours(
        train[4:5] + np.float32(0.03) * np.random.default_rng(0).normal(size=SHAPE), train
    ).score[0]
    fresh = privacy.memorization_report(
        np.stack([brain(seed) for seed in range(30, 40)]), train, calibration=calibration
    )
    # a new subject beats the max of n real-vs-real scores with probability 1/(n+1): few, none near a copy
    assert fresh["chance_fraction"] == pytest.approx(1 / 7)
    assert fresh["fraction"] <= fresh["chance_fraction_bound"]
    assert fresh["max_score"] < copy - 0.1


@pytest.mark.parametrize("n_synthetic, n_holdout", [(16, 13), (64, 13), (64, 40)])
def test_chance_copy_fraction_is_the_beta_binomial_of_new_subjects(n_synthetic, n_holdout):
    """Threshold = max of n held-out scores: the count of new subjects above it is beta-binomial(N, 1, n)."""
    from scipy.stats import betabinom

    mean, bound = privacy.chance_copy_fraction(n_synthetic, n_holdout, quantile=1.0)
    assert mean == pytest.approx(1 / (n_holdout + 1))
    count = betabinom(n_synthetic, 1, n_holdout)
    assert bound * n_synthetic == count.ppf(0.95)
    # an interpolated quantile sits below the max, so more new subjects pass it than 1/(n+1); simulated directly
    rng = np.random.default_rng(1)
    held, new = rng.normal(size=(20000, n_holdout)), rng.normal(size=(20000, n_synthetic))
    fractions = (new > np.quantile(held, 0.9, axis=1)[:, None]).mean(1)
    mean, bound = privacy.chance_copy_fraction(n_synthetic, n_holdout, quantile=0.9)
    assert mean == pytest.approx(fractions.mean(), abs=0.003)
    assert bound == pytest.approx(np.quantile(fractions, 0.95, method="higher"), abs=1.01 / n_synthetic)
    assert (fractions <= bound).mean() >= 0.95


def test_ncc_is_pearson_inside_union_mask_and_shortlist():
    vols = np.stack([brain(seed) for seed in range(4)])
    matrix = privacy.ncc_matrix(vols[:2], vols)
    for i in range(2):
        for j in range(4):
            union = features.head_mask_normalized(vols[i]) | features.head_mask_normalized(vols[j])
            assert matrix[i, j] == pytest.approx(np.corrcoef(vols[i][union], vols[j][union])[0, 1], abs=1e-9)
    # invariant to a positive affine change of intensities inside the head
    assert privacy.ncc_matrix(vols[:1], np.where(vols[:1] > -1, 0.5 * vols[:1] + 0.1, -1.0))[0, 0] > 0.999
    short = privacy.nearest_neighbours(vols[:2], vols, metric="ssim", shortlist=2)
    assert np.isnan(short.scores).sum() == 2 * 2 and list(short.index) == [0, 1]
    # a precomputed NCC matrix is used as given: the shortlist follows it, not a recomputation
    reversed_ncc = -matrix
    other = privacy.nearest_neighbours(vols[:2], vols, metric="ssim", shortlist=2, ncc=reversed_ncc)
    assert not np.isnan(other.scores[:, np.argsort(matrix[0])[:2]][0]).any() and list(other.index) != [0, 1]
    assert np.array_equal(privacy.nearest_neighbours(vols[:2], vols, ncc=matrix).scores, matrix)


# ----------------------------------------------------------------------------------------------
# feature extractors


def test_stats_extractor():
    extractor = features.get_extractor("stats")
    assert extractor.name == "stats"
    small, large = brain(0, ventricle=0.2), brain(0, ventricle=0.45)
    feats = extractor(np.stack([small, small.copy(), large]))
    assert feats.shape == (3, len(extractor.feature_names))
    assert np.array_equal(feats[0], feats[1])
    assert not np.allclose(feats[0], feats[2])
    csf = extractor.feature_names.index("class0_fraction")
    assert feats[2, csf] > feats[0, csf] + 0.05  # bigger dark centre -> bigger darkest-class fraction
    true_fraction = np.mean(large[features.head_mask_normalized(large)] < -0.3)
    assert feats[2, csf] == pytest.approx(true_fraction, abs=0.03)


def test_get_extractor_unknown_name():
    with pytest.raises(ValueError, match="unknown feature extractor"):
        features.get_extractor("inception")
    assert set(features.available_extractors()) >= {"stats", "medicalnet", "lpips"}


def test_medicalnet_random_weights_shape_and_determinism(tmp_path):
    with pytest.raises(FileNotFoundError, match="MedicalNet weights"):
        features.get_extractor("medicalnet", weights_path=tmp_path / "missing.pth")
    with pytest.warns(features.RandomWeightsWarning):
        extractor = features.get_extractor("medicalnet", allow_random=True)
    assert extractor.name == "medicalnet-resnet10(random weights)"
    vols = np.stack([brain(seed, shape=(16, 16, 16)) for seed in range(3)])
    feats = extractor(vols)
    assert feats.shape == (3, 512)
    assert np.array_equal(feats, extractor(vols))
    with pytest.warns(features.RandomWeightsWarning):
        again = features.get_extractor("medicalnet", allow_random=True)
    assert np.array_equal(feats, again(vols))
    assert not np.allclose(feats[0], feats[1])
    # inputs are z-scored inside the head, as MedicalNet's training data: intensity scale does not matter
    rescaled = np.where(vols > -1, 0.5 * vols + 0.1, -1.0)
    assert np.allclose(extractor(rescaled), feats, rtol=1e-4, atol=1e-5 * np.abs(feats).max())


@pytest.mark.parametrize("depth", [10, 18])
def test_medicalnet_checkpoint_round_trip(tmp_path, depth):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        model = features.MedicalNetResNet(depth)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(512, 32, 2, 2, 2)  # segmentation head: ignored
    path = tmp_path / f"resnet_{depth}.pth"
    torch.save({"state_dict": state}, path)

    loaded = features.get_extractor("medicalnet", weights_path=path)  # depth and shortcut from the file
    assert loaded.name == f"medicalnet-resnet{depth}"
    assert loaded.model.shortcut_type == ("B" if depth == 10 else "A")
    vols = np.stack([brain(seed, shape=(16, 16, 16)) for seed in range(2)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", features.RandomWeightsWarning)
        same_seed = features.MedicalNetExtractor(depth=depth, allow_random=True, seed=123)
        other_seed = features.MedicalNetExtractor(depth=depth, allow_random=True, seed=0)
    assert np.array_equal(loaded(vols), same_seed(vols))
    assert not np.allclose(loaded(vols), other_seed(vols))

    torch.save({"state_dict": {k: v for k, v in state.items() if "layer4" not in k}}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="does not fit|matches no MedicalNet"):
        features.get_extractor("medicalnet", weights_path=tmp_path / "broken.pth")


def test_lpips_extractor_shape_and_determinism():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        extractor = features.get_extractor("lpips", slices_per_axis=2)
    assert extractor.name.startswith("lpips-alex")
    vols = np.stack([brain(seed, shape=(16, 16, 16)) for seed in range(2)])
    feats = extractor(vols)
    assert feats.shape == (2, 3 * (64 + 192 + 384 + 256 + 256))
    assert np.array_equal(feats, extractor(vols[::-1])[::-1])  # per-volume, order-independent
    assert not np.allclose(feats[0], feats[1])


# ----------------------------------------------------------------------------------------------
# conditioning fidelity


def test_covariate_predictors_recover_linear_encodings():
    rng = np.random.default_rng(0)
    age = rng.uniform(20, 90, 60)
    sex = rng.choice(["F", "M"], 60)
    feats = np.column_stack(
        [0.03 * age + 0.01 * rng.normal(size=60), 5.0 * (sex == "M") + rng.normal(size=60), rng.normal(size=(60, 4))]
    )
    age_model = conditioning.fit_covariate_predictor(feats[:40], age[:40], "continuous")
    assert conditioning.predictor_error(age_model, feats[40:], age[40:]) < 2.0
    assert conditioning.predictor_error(age_model, feats[40:], age[40:] + 20) > 15  # wrong ages: large error
    sex_model = conditioning.fit_covariate_predictor(feats[:40], sex[:40], "categorical")
    assert conditioning.predictor_error(sex_model, feats[40:], sex[40:]) >= 0.95
    with pytest.raises(ValueError, match="kind"):
        conditioning.fit_covariate_predictor(feats, age, "ordinal")


def test_slope_and_correlation():
    x = np.linspace(20, 90, 15)
    exact = conditioning.slope_and_correlation(x, 3 * x + 2)
    assert exact["slope"] == pytest.approx(3) and exact["intercept"] == pytest.approx(2)
    assert exact["r"] == pytest.approx(1) and exact["n"] == 15
    noisy = conditioning.slope_and_correlation(x, -0.5 * x + np.random.default_rng(0).normal(0, 5, 15))
    assert -0.9 < noisy["slope"] < -0.1 and -1 < noisy["r"] < -0.5
    assert np.isnan(conditioning.slope_and_correlation([1, 1, 1], [1, 2, 3])["slope"])


def test_csf_fraction_follows_ventricle_size():
    vols = [brain(0, ventricle=v) for v in (0.15, 0.3, 0.45)]
    fractions = [conditioning.csf_fraction(v) for v in vols]
    assert fractions[0] < fractions[1] < fractions[2]
    head = features.head_mask_normalized(vols[2])
    assert fractions[2] == pytest.approx(np.mean(vols[2][head] < -0.3), abs=0.01)
    # the same quantity as the stats extractor's darkest-class fraction; unchanged by an affine intensity change
    stats = features.StatsExtractor()
    assert fractions[2] == pytest.approx(stats(vols[2:])[0, stats.feature_names.index("class0_fraction")])
    rescaled = np.where(vols[2] > -1, 0.8 * vols[2] + 0.1, -1.0)
    assert conditioning.csf_fraction(rescaled) == pytest.approx(fractions[2], abs=0.005)
    ratio_rule = [conditioning.csf_fraction(v, threshold=0.5) for v in vols]
    assert ratio_rule[0] < ratio_rule[1] < ratio_rule[2]


def test_ventricle_volume_uses_the_demo_proxy_on_shifted_intensities():
    from synthmri.data.mni import ventricle_proxy_ml

    small, large = brain(0, ventricle=0.2), brain(0, ventricle=0.4)
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:3, 3] = -4.0 * (np.array(SHAPE) - 1)  # centre of the grid at the world origin (inside the MNI box)
    assert conditioning.ventricle_volume_ml(small, affine) == pytest.approx(ventricle_proxy_ml(small + 1, affine))
    assert conditioning.ventricle_volume_ml(large, affine) > conditioning.ventricle_volume_ml(small, affine) > 0


def test_reconstruction_scores_are_the_scikit_image_ones_per_volume_and_restore_the_mode():
    """The one reconstruction scorer (training validation and report): a model that adds a known offset
    has PSNR 20*log10(range/offset) on every volume, and the model's train/eval mode is left as it was."""
    import torch

    from synthmri.metrics.reconstruction import score_reconstructions

    class Offset(torch.nn.Module):
        def encode(self, x, quantize=True):
            assert not self.training
            return x if quantize else x + 0.03

        def decode(self, z):
            return z + 0.02

    model = Offset().train()
    volumes = [np.zeros((12, 12, 12), np.float32), torch.full((1, 12, 12, 12), 0.5)]
    scores = score_reconstructions(
        model, volumes, lambda a, b: (a - b).abs().mean(), torch.device("cpu"), (-1.0, 1.0), keep=True
    )
    assert model.training
    assert np.allclose(scores.psnr, 20 * np.log10(2.0 / 0.02), atol=1e-3)
    assert np.allclose(scores.lpips, 0.02, atol=1e-6) and scores.summary()["n"] == 2
    assert np.allclose(scores.reconstructions[1], 0.52) and scores.example[0].shape == (12, 12, 12)
    # encode.latents: continuous decodes the encoder's output before the codebook
    scores = score_reconstructions(
        model, volumes, lambda a, b: (a - b).abs().mean(), torch.device("cpu"), (-1.0, 1.0), quantize=False
    )
    assert np.allclose(scores.psnr, 20 * np.log10(2.0 / 0.05), atol=1e-3)


def test_autoencoder_ceiling_of_a_perfect_autoencoder_is_the_real_data():
    """Decoded = real: the decoded training set is exactly the FD baseline (ratio 1) and the held-out
    volumes' own reconstructions sit on the reference (FD 0, full coverage); a lossy one is worse."""
    from synthmri.report.families import autoencoder_ceiling

    rng = np.random.default_rng(0)
    f_train, f_ref = rng.normal(size=(30, 4)), rng.normal(size=(12, 4))
    perfect = autoencoder_ceiling(f_ref, f_ref, f_train, f_train, k=3)
    assert perfect["train.frechet_ratio"] == pytest.approx(1.0)
    assert perfect["heldout.frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["heldout.coverage"] == 1.0
    blurred = autoencoder_ceiling(f_ref, 0.3 * f_ref + 1.0, 0.3 * f_train + 1.0, f_train, k=3)
    assert blurred["train.frechet_ratio"] > 2 and blurred["heldout.coverage"] < 0.5


def test_covariate_kept_tells_a_shifted_covariate_from_a_lost_one():
    """Decoded features that are the real ones moved and rescaled still hold the covariate: the real-fitted
    predictor fails on them, a refitted one does not (kept near 1). Decoded features unrelated to the covariate
    lost it (kept near 0). Both for a number (MAE) and a level (accuracy); unknown values are left out."""
    from synthmri.metrics.conditioning import predictor_error
    from synthmri.report.families import RealPredictor, covariate_kept

    rng = np.random.default_rng(0)
    n_train, n_ref = 200, 100
    y = rng.uniform(0, 10, n_train + n_ref)
    f = np.column_stack([y + rng.normal(0, 0.5, y.size), rng.normal(size=(y.size, 3))])
    shifted = 0.5 * f + np.array([4.0, -2.0, 1.0, 0.0])
    lost = rng.normal(size=f.shape)
    known = rng.random(y.size) > 0.1
    tr, rf = slice(0, n_train), slice(n_train, None)

    def real_fit(kind, values, features=f):
        return RealPredictor.fit(kind, features[tr], (values[tr], known[tr]), features[rf], (values[rf], known[rf]))

    real = real_fit("continuous", y)
    moved = covariate_kept(real, shifted[tr], shifted[rf])
    assert moved["real"] == real.error < 0.6 and moved["chance"] > 2
    assert moved["kept"] == pytest.approx(1.0, abs=0.05)
    assert predictor_error(real.model, shifted[rf][known[rf]], y[rf][known[rf]]) > 3 * moved["real"]  # the gate fails
    gone = covariate_kept(real, lost[tr], lost[rf])
    assert gone["decoded_refit"] > 0.9 * gone["chance"] and gone["kept"] < 0.1

    level = np.where(y > 5, "B", "A")
    real = real_fit("categorical", level)
    moved = covariate_kept(real, shifted[tr], shifted[rf])
    assert moved["real"] > 0.9 and moved["kept"] > 0.9
    assert covariate_kept(real, lost[tr], lost[rf])["kept"] < 0.3
    # a covariate the real features do not predict has nothing to keep
    assert covariate_kept(real_fit("continuous", y, lost), f[tr], f[rf]) is None


# ----------------------------------------------------------------------------------------------
# bootstrap intervals of the gate's set metrics


def test_effect_ratio_interval_covers_the_true_ratio_at_its_level():
    """Real and synthetic cohorts with the same age slope (true ratio 1): the 95 % interval contains 1 in
    about 95 of 100 experiments, and it narrows like 1/sqrt(n) with more subjects."""
    from synthmri.report import intervals

    rng = np.random.default_rng(0)

    def cohort(n):
        age = rng.uniform(20, 90, n)
        return age, 0.004 * age + rng.normal(0, 0.05, n)

    hits, widths = [], {}
    for n in (16, 64):
        for _ in range(60 if n == 16 else 10):
            low, high = intervals._effect_ratio(rng, *cohort(64), *cohort(n))
            hits.append(low <= 1.0 <= high) if n == 16 else None
            widths.setdefault(n, []).append(high - low)
    assert 0.85 <= np.mean(hits) <= 1.0
    assert np.median(widths[64]) < 0.7 * np.median(widths[16])


def test_predictor_and_feature_intervals_bracket_their_metric():
    from synthmri.metrics.distribution import compare_features
    from synthmri.report import intervals

    rng = np.random.default_rng(1)
    # a synthetic set with twice the real age error: the MAE-ratio interval is around 2, away from 1
    block = {
        "kind": "continuous",
        "per_subject": {"reference": rng.exponential(5, 200), "synthetic": rng.exponential(10, 200)},
    }
    low, high = intervals._predictor(rng, block)
    ratio = block["per_subject"]["synthetic"].mean() / block["per_subject"]["reference"].mean()
    assert 1.2 < low < ratio < high < 3.0
    # sex predicted right for 90 % of real, 60 % of synthetic subjects: the accuracy drop is ~0.3
    block = {
        "kind": "categorical",
        "per_subject": {"reference": np.r_[np.ones(18), np.zeros(2)], "synthetic": np.r_[np.ones(12), np.zeros(8)]},
    }
    low, high = intervals._predictor(rng, block)
    assert 0.0 < low < 0.3 < high
    train, ref, syn = rng.normal(size=(60, 4)), rng.normal(size=(30, 4)), rng.normal(0.8, 1, size=(30, 4))
    found = intervals.gate_intervals({}, train, ref, syn, k=5)
    assert set(found) == {"frechet_ratio", "precision", "coverage"}
    coverage = compare_features(ref, syn, 5)["coverage"]
    assert found["coverage"][0] <= coverage + 0.05 and found["coverage"][0] < found["coverage"][1] <= 1
    assert found["frechet_ratio"][0] > 1  # a shifted set is farther from the held-out set than real subsets are


# ----------------------------------------------------------------------------------------------
# large sets: comparisons at the gate's calibrated size


def test_comparison_subsets_are_disjoint_seeded_and_capped():
    from synthmri.report.families import comparison_subsets

    whole = comparison_subsets(20, 32, 8)
    assert len(whole) == 1 and whole[0].tolist() == list(range(20))  # a small set is compared whole, in order
    assert comparison_subsets(50, None, 8)[0].tolist() == list(range(50))
    subsets = comparison_subsets(1000, 32, 8, seed=3)
    assert len(subsets) == 8 and all(len(s) == 32 for s in subsets)
    flat = np.concatenate(subsets)
    assert len(set(flat.tolist())) == len(flat)  # disjoint
    assert len(comparison_subsets(100, 32, 8)) == 3  # no partial subset: every comparison has the calibrated size
    again = comparison_subsets(1000, 32, 8, seed=3)
    assert all((a == b).all() for a, b in zip(subsets, again))
    assert not all((a == b).all() for a, b in zip(subsets, comparison_subsets(1000, 32, 8, seed=4)))


def test_a_large_set_is_judged_at_the_compared_size_not_its_own():
    """Coverage of a too-wide generator grows with the set's size: compared whole, 2,000 volumes cover every
    held-out subject; in subsets of 32 they score what 32 of them would, which is what the gate's threshold
    was derived for. A set of exactly the compared size scores the same either way."""
    from synthmri.report.families import fidelity_metrics

    rng = np.random.default_rng(0)
    ref, train = rng.normal(size=(26, 6)), rng.normal(size=(100, 6))
    wide = rng.normal(0, 3.0, size=(2000, 6))
    whole = fidelity_metrics(ref, wide, train, 5, seed=0)
    split = fidelity_metrics(ref, wide, train, 5, seed=0, compare_size=32, max_comparisons=16)
    assert whole["coverage"] > 0.95 and split["coverage"] < 0.6
    assert split["n_compared"] == 32 and split["n_subsets"] == 16 and split["baseline_n"] == 32
    assert split["coverage_subset_min"] <= split["coverage"] <= split["coverage_subset_max"]
    small = wide[:32]
    assert fidelity_metrics(ref, small, train, 5, 0, 32, 16) == fidelity_metrics(ref, small, train, 5, 0)
    # the feature intervals draw the compared size too: a whole-set bootstrap would claim coverage ~1
    from synthmri.report import intervals

    low, high = intervals.gate_intervals({}, train, ref, wide, k=5, compare_size=32)["coverage"]
    assert high < 0.95 and low <= split["coverage"] <= high
