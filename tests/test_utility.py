"""The utility protocol (issue 19): targets, paired bootstrap gains, the leakage guard, and the claim itself —
pre-training on a set that carries the age signal beats scratch on a tiny cohort, a negative control does not."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from synthmri.config import Covariate, FitParams, UtilityParams, ViTParams
from synthmri.errors import StageError
from synthmri.utility.gains import mean_error, paired_bootstrap, relative_gain
from synthmri.utility.protocol import (
    Protocol,
    UtilitySets,
    check_no_leakage,
    derived_seed,
    draw_subjects,
    negative_control,
)
from synthmri.utility.summary import summarize
from synthmri.utility.targets import TargetCodec
from synthmri.utility.vit import ViTRegressor

AGE = Covariate(name="age", kind="continuous", range=(20.0, 90.0))
SEX = Covariate(name="sex", kind="categorical", levels=["F", "M"])
SITE = Covariate(name="site", kind="categorical", levels=["a", "b"], required=False)
SHAPE = (16, 16, 16)


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ targets


def test_targets_encode_scale_and_mask_unknown_values():
    codec = TargetCodec([AGE, SEX, SITE])
    assert codec.n_outputs == 1 + 2 + 2
    table = pd.DataFrame({"age": [20.0, 55.0, 90.0], "sex": ["M", "F", "M"], "site": ["b", None, "zzz"]})
    values, known = codec.encode(table)
    np.testing.assert_allclose(values[:, 0], [-1.0, 0.0, 1.0])
    np.testing.assert_array_equal(values[:, 1], [1, 0, 1])
    np.testing.assert_array_equal(known[:, 2], [True, False, False])  # missing and unknown level: masked
    assert codec.encode(pd.DataFrame({"age": [30.0]}))[1][:, 1:].sum() == 0  # absent column: unknown


def test_targets_errors_in_the_covariates_units_and_loss_ignores_masked_rows():
    codec = TargetCodec([AGE, SEX])
    table = pd.DataFrame({"age": [20.0, 55.0], "sex": ["M", "F"]})
    outputs = np.array([[0.0, 0.0, 5.0], [0.0, 5.0, 0.0]], np.float32)  # age 55 both; sex M then F
    errors = codec.errors(outputs, table)
    np.testing.assert_allclose(errors["age"], [35.0, 0.0])
    np.testing.assert_array_equal(errors["sex"], [0.0, 0.0])
    values, known = map(torch.as_tensor, codec.encode(table))
    wrong = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    known_age_of_second_only = known.clone()
    known_age_of_second_only[0, 0] = False
    # the first volume's huge age error is masked: only the second row's (exact) age counts
    loss = codec.loss(wrong, values, known_age_of_second_only)
    assert loss.item() == pytest.approx(
        (0.0 + torch.nn.functional.cross_entropy(wrong[:, 1:], values[:, 1].long()).item()) / 2
    )


def test_vit_is_monais_without_the_tanh_head():
    vit = ViTRegressor(ViTParams(patch_size=4, hidden_size=16, mlp_dim=32, num_layers=1, num_heads=2), SHAPE, 3)
    assert type(vit.vit).__module__.startswith("monai.networks.nets")
    with torch.no_grad():
        vit.vit.classification_head.weight.zero_()
        vit.vit.classification_head.bias.fill_(5.0)  # a Tanh would cap every output below 1
        out = vit(torch.zeros(2, 1, *SHAPE))
    assert out.shape == (2, 3) and float(out.min()) > 1.0
    with pytest.raises(ValueError, match="does not divide"):
        ViTRegressor(ViTParams(patch_size=5, hidden_size=16, mlp_dim=32, num_layers=1, num_heads=2), SHAPE, 1)


# ------------------------------------------------------------------------------------------ gains


def test_relative_gain_and_a_collapsed_interval_when_the_ratio_is_exact():
    rng = np.random.default_rng(0)
    scratch = rng.uniform(5, 15, size=(3, 20))
    pre = 0.6 * scratch  # 40 % lower for every subject in every repeat
    assert relative_gain(pre, scratch) == pytest.approx(0.4)
    low, high = paired_bootstrap(relative_gain, [pre, scratch], draws=300, seed=1)
    assert low == pytest.approx(0.4) and high == pytest.approx(0.4)  # paired: every resample gives 0.4


def test_paired_bootstrap_covers_the_true_mean_at_about_its_level():
    """Simulated errors with a known mean: the 95 % interval of the mean covers it in ~95 % of data sets."""
    rng = np.random.default_rng(3)
    covered = 0
    for _ in range(80):
        errors = rng.exponential(10.0, size=(4, 30))  # independent repeats and subjects, true mean 10
        low, high = paired_bootstrap(mean_error, [errors], draws=300, seed=int(rng.integers(1 << 31)))
        covered += low <= 10.0 <= high
    assert 0.82 <= covered / 80 <= 1.0  # the percentile bootstrap runs a little narrow on 4 x 30


def test_paired_bootstrap_rejects_misaligned_arrays():
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap(relative_gain, [np.ones((2, 3)), np.ones((3, 2))])


# ------------------------------------------------------------------------------------------ protocol


def _sphere_cohort(n: int, seed: int, prefix: str) -> tuple[pd.DataFrame, torch.Tensor]:
    """Volumes whose age is readable from the anatomy: a bright ball whose radius grows with age, jittered in
    position and intensity, in noise; sex is random (no signal)."""
    rng = np.random.default_rng(seed)
    ages = rng.uniform(20, 90, n)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).astype(np.float32)
    volumes = np.empty((n, 1, *SHAPE), np.float32)
    for i, age in enumerate(ages):
        centre = np.array(SHAPE) / 2 - 0.5 + rng.uniform(-1.5, 1.5, 3)
        radius = 2.0 + 5.0 * (age - 20) / 70
        inside = np.linalg.norm(grid - centre, axis=-1) < radius
        volumes[i, 0] = rng.uniform(0.7, 1.0) * inside + rng.normal(0, 0.15, SHAPE)
    table = pd.DataFrame(
        {
            "item_id": [f"{prefix}-{i:03d}" for i in range(n)],
            "subject_id": [f"{prefix}-{i:03d}" for i in range(n)],
            "age": ages.round(1),
            "sex": rng.choice(["F", "M"], n),
        }
    )
    return table, torch.from_numpy(volumes)


def _sets(synthetic_seed: int = 3) -> UtilitySets:
    train, train_volumes = _sphere_cohort(24, 1, "train")
    test, test_volumes = _sphere_cohort(24, 2, "test")
    synthetic, synthetic_volumes = _sphere_cohort(160, synthetic_seed, "syn")
    return UtilitySets(
        train, train_volumes, test, test_volumes, synthetic.drop(columns=["subject_id"]), synthetic_volumes
    )


TINY = UtilityParams(
    targets=["age"],
    k=[4],
    gate_k=4,
    repeats=2,
    vit=ViTParams(patch_size=4, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2),
    pretrain=FitParams(steps=200, batch_size=16, lr=1e-3),
    finetune=FitParams(steps=15, batch_size=4, lr=3e-4),
    scratch=FitParams(steps=15, batch_size=4, lr=3e-4),
    bootstrap=300,
)


@pytest.fixture(scope="module")
def tiny_protocol():
    codec = TargetCodec([AGE])
    results = Protocol(TINY, codec, _sets(), torch.device("cpu")).run()
    return results, summarize(results, TINY)


def test_pretraining_on_a_set_with_the_age_signal_beats_scratch_and_the_control_does_not(tiny_protocol):
    results, summary = tiny_protocol
    assert set(results["arm"]) == {"scratch", "synthetic", "real", "control", "tstr", "trtr"}
    gain, low = summary["pretrain_gain.age.k4"], summary["pretrain_gain_ci_low.age.k4"]
    assert gain >= 0.25 and low > 0, summary
    control = summary["negative_control_gain.age.k4"]
    assert control < gain / 4, summary
    # trained on 160 synthetic volumes vs 24 real ones of the same kind, with the same budget: TSTR is no worse
    assert summary["tstr_ratio.age"] < 1.5
    assert summary["primary_gain"] == gain and summary["primary_gain_ci_low"] == low


def test_every_arm_is_scored_on_the_same_held_out_subjects(tiny_protocol):
    results, _ = tiny_protocol
    items = results.groupby(["arm", "k", "repeat"])["item"].apply(lambda s: tuple(sorted(s)))
    assert items.nunique() == 1 and len(items.iloc[0]) == 24


def test_parallel_repeats_give_the_rows_of_one_after_the_other_and_log_curves_from_the_caller(tiny_protocol):
    results, _ = tiny_protocol  # TINY runs its 2 repeats in 2 worker threads
    curves = []

    def on_curve(name: str, step: int, loss: float) -> None:
        curves.append((threading.current_thread() is threading.main_thread(), name, step))

    serial = Protocol(TINY.model_copy(update={"workers": 1}), TargetCodec([AGE]), _sets(), torch.device("cpu"),
                      on_curve).run()  # fmt: skip
    pd.testing.assert_frame_equal(serial, results)
    assert curves and all(main for main, _, _ in curves)  # MLflow's active run belongs to the calling thread
    names = [name for _, name, _ in curves]
    assert names[0] == "pretrain.synthetic.r0" and "finetune.control.k4.r1" in names
    assert [step for _, name, step in curves if name == "pretrain.real.r1"] == list(range(0, 200, 10))


def test_a_failing_repeat_raises_its_error_instead_of_hanging():
    sets = _sets()
    sets.synthetic["age"] = np.nan  # nothing to pre-train on
    with pytest.raises(StageError, match="no target covariate"):
        Protocol(TINY, TargetCodec([AGE]), sets, torch.device("cpu")).run()


def test_dropout_with_parallel_repeats_is_refused():
    with pytest.raises(ValidationError, match="workers: 1"):
        UtilityParams(vit=ViTParams(dropout=0.1), workers=2)


def test_a_held_out_subject_never_enters_pre_training_or_fine_tuning():
    with pytest.raises(StageError, match="test-003"):
        check_no_leakage(["test-001", "test-003"], fine_tuning=["train-1", "test-003"])
    sets = _sets()
    leaky = UtilitySets(
        pd.concat([sets.train, sets.test.iloc[[3]]], ignore_index=True),
        torch.cat([sets.train_volumes, sets.test_volumes[[3]]]),
        sets.test,
        sets.test_volumes,
        sets.synthetic,
        sets.synthetic_volumes,
    )
    with pytest.raises(StageError, match="held-out subject"):
        Protocol(TINY, TargetCodec([AGE]), leaky, torch.device("cpu"))


def test_draw_subjects_takes_every_session_of_k_subjects():
    train = pd.DataFrame({"subject_id": ["a", "a", "b", "c", "c", "d"]})
    rows = draw_subjects(train, 2, seed=0)
    chosen = set(train["subject_id"].iloc[rows])
    assert len(chosen) == 2 and len(rows) == int(train["subject_id"].isin(chosen).sum())
    assert len(draw_subjects(train, "all", seed=0)) == 6
    np.testing.assert_array_equal(draw_subjects(train, 2, seed=5), draw_subjects(train, 2, seed=5))
    with pytest.raises(StageError, match="more subjects"):
        draw_subjects(train, 9, seed=0)


def test_negative_controls_keep_size_and_labels_but_break_the_link():
    sets = _sets()
    volumes, table = negative_control(sets, "shuffled", seed=0)
    assert volumes is sets.synthetic_volumes and len(table) == len(sets.synthetic)
    assert sorted(table["age"]) == sorted(sets.synthetic["age"]) and not table["age"].equals(sets.synthetic["age"])
    volumes, table = negative_control(sets, "mean_noise", seed=0)
    assert volumes.shape == sets.synthetic_volumes.shape and table["age"].equals(sets.synthetic["age"])
    # no anatomy: the control's volumes do not vary with the age they are labelled with
    size = (volumes[:, 0] > 0.5).flatten(1).float().sum(1).numpy()
    assert abs(np.corrcoef(size, table["age"])[0, 1]) < 0.3


def test_derived_seeds_are_stable_and_distinct():
    assert derived_seed(0, 1, "draw", "8") == derived_seed(0, 1, "draw", "8")
    assert len({derived_seed(0, r, "init", a) for r in range(3) for a in ("scratch", "real")}) == 6


# ------------------------------------------------------------------------------------------ the stage


def test_stage_writes_utility_json_and_the_report_gates_on_it(tmp_path):
    """``synthmri utility`` on a tiny processed cohort and a fake synthetic set: utility.json (flat keys for
    ``dvc metrics``), the per-subject errors and the figure; then the report stage reads it into its gate."""
    import json

    from conftest import fake_synthetic_set, make_processed

    from synthmri.stages.report import run_report
    from synthmri.stages.utility import run_utility

    tiny = [
        "utility.k=[2, all]",
        "utility.gate_k=2",
        "utility.repeats=1",
        "utility.bootstrap=100",
        "utility.vit={patch_size: 8, hidden_size: 16, mlp_dim: 32, num_layers: 1, num_heads: 2, dropout: 0.0}",
        "utility.pretrain={steps: 4, batch_size: 2, lr: 0.001}",
        "utility.finetune={steps: 2, batch_size: 2, lr: 0.001}",
        "utility.scratch={steps: 2, batch_size: 2, lr: 0.001}",
    ]
    params, processed = make_processed(tmp_path / "build", 10, SHAPE, *tiny)
    fake_synthetic_set(tmp_path / "synthetic", processed, copy_of=0, n_novel=7)
    reports = tmp_path / "reports"
    summary = run_utility(params, processed, tmp_path / "synthetic", reports / "utility.json", reports / "utility",
                          track=False)  # fmt: skip
    on_disk = json.loads((reports / "utility.json").read_text())
    assert on_disk == summary
    for key in ("pretrain_gain.age.k2", "pretrain_gain_ci_low.age.k2", "negative_control_gain.age.kall",
                "real_pretrain_gain.sex.k2", "tstr_ratio.age", "error.trtr.age", "primary_gain_ci_low"):  # fmt: skip
        assert key in on_disk, key
    assert on_disk["n_synthetic"] == 8 and on_disk["backbone"].startswith("monai.networks.nets.ViT")
    errors = pd.read_csv(reports / "utility" / "errors.csv")
    assert set(errors["arm"]) == {"scratch", "synthetic", "real", "control", "tstr", "trtr"}
    assert (reports / "utility" / "data_efficiency.png").read_bytes()[:4] == b"\x89PNG"

    metrics = run_report(params, processed, tmp_path / "synthetic", None, reports, track=False)
    assert metrics["utility.primary_gain_ci_low"] == summary["primary_gain_ci_low"]
    passed = summary["primary_gain_ci_low"] >= 0.0
    assert metrics["check.utility_pretrain_gain"] is passed
    assert ("utility_pretrain_gain" in metrics["gate_failed_checks"].split(",")) is not passed
    page = (reports / "report.html").read_text()
    assert "Utility (the utility stage)" in page and "real pre-training" in page  # the check's note
