"""One subject under each protocol (synthmri.report.protocol_sweep): its metrics on known answers, the choice of
protocols and subjects, the report stage running it (figure, page, metrics, no gate check) and skipping it."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fake_synthetic_set, make_params, make_processed
from test_report_stage import SHAPE, _tiny_vqgan

from synthmri.config import Covariate
from synthmri.io import sha256_file
from synthmri.models.loading import build_ldm, save_weights
from synthmri.report.gate import evaluate_gate
from synthmri.report.inputs import load_report_data
from synthmri.report.protocol_sweep import (
    acquisition_covariates,
    protocol_label,
    protocol_members,
    protocol_sweep,
    sweep_metrics,
    sweep_subjects,
    training_protocols,
)
from synthmri.stages.encode import run_encode
from synthmri.stages.report import run_report

pytestmark = [
    pytest.mark.filterwarnings("ignore::synthmri.losses.perceptual.RandomBackboneWarning"),
    pytest.mark.usefixtures("seeded_single_thread"),
]

REAL = np.array([0.60, 0.65, 0.70, 0.75])  # real mean GM/WM contrast of four protocols, rising


# ------------------------------------------------------------------------------------------------
# the metrics, on constructed inputs


def test_sweep_metrics_known_answer():
    synthetic = np.array(
        [
            [0.50, 0.52, 0.54, 0.56],  # follows the real order in all 6 pairs
            [0.55, 0.54, 0.56, 0.57],  # protocols 0 and 1 swapped: 5 of 6
        ]
    )
    out = sweep_metrics(synthetic, REAL)
    assert out["n_pairs"] == 12
    assert out["sign_agreement"] == pytest.approx(11 / 12)
    means = synthetic.mean(axis=0)  # 0.525, 0.53, 0.55, 0.565: monotone in the real means
    assert out["spearman"] == pytest.approx(1.0)
    assert out["pearson"] == pytest.approx(np.corrcoef(REAL, means)[0, 1])
    # slope of the means on the real means, by hand: Sxy = 0.0035, Sxx = 0.0125
    assert out["slope_synthetic_on_real"] == pytest.approx(0.28)


def test_sweep_metrics_tell_a_reversed_or_deaf_model_from_a_faithful_one():
    reversed_ = sweep_metrics(np.array([REAL[::-1], REAL[::-1] + 0.01]), REAL)
    assert reversed_["sign_agreement"] == 0 and reversed_["spearman"] == pytest.approx(-1.0)
    assert reversed_["slope_synthetic_on_real"] == pytest.approx(-1.0)
    faithful = sweep_metrics(np.array([REAL + 0.02, REAL - 0.01]), REAL)
    assert faithful["sign_agreement"] == 1 and faithful["slope_synthetic_on_real"] == pytest.approx(1.0)
    # the covariate ignored: every protocol gives the subject's same volume, no difference agrees with the real one
    deaf = sweep_metrics(np.array([[0.7] * 4, [0.68] * 4]), REAL)
    assert deaf["sign_agreement"] == 0 and deaf["slope_synthetic_on_real"] == pytest.approx(0, abs=1e-12)
    assert np.isnan(deaf["pearson"]) and np.isnan(deaf["spearman"])


def test_sweep_metrics_skip_tied_real_means_and_unmeasured_volumes():
    real = np.array([0.6, 0.6, 0.7])  # protocols 0 and 1 tie: their pair has no expected sign
    synthetic = np.array([[0.50, 0.51, 0.55], [np.nan, 0.52, 0.50]])
    out = sweep_metrics(synthetic, real)
    # subject 0: (0,2) and (1,2) agree; subject 1: (1,2) disagrees, (0,2) has no volume under protocol 0
    assert out["n_pairs"] == 3 and out["sign_agreement"] == pytest.approx(2 / 3)
    two = sweep_metrics(np.array([[0.5, 0.6]]), np.array([0.6, 0.7]))  # too few protocols for a correlation
    assert np.isnan(two["pearson"]) and two["sign_agreement"] == 1 and two["n_pairs"] == 1
    with pytest.raises(ValueError, match="protocols"):
        sweep_metrics(np.zeros((2, 3)), REAL)


# ------------------------------------------------------------------------------------------------
# which protocols, which subjects

ACQUISITION = ("field_strength", "inversion_time", "sequence", "voxel_size")  # params.yaml's, in its order


def test_protocols_are_the_distinct_training_combinations_most_frequent_first_kept():
    params = make_params()
    acquisition = acquisition_covariates(params.covariates)
    assert [c.name for c in acquisition] == list(ACQUISITION)
    acquisition = acquisition[:2]  # field strength and inversion time: the manifest below has those two
    voxel = Covariate(name="voxel_volume", kind="continuous", source="header", key="voxel_volume_mm3")
    assert acquisition_covariates([*params.covariates, voxel])[-1] == voxel  # header values are acquisition too
    manifest = pd.DataFrame(
        {
            "field_strength": [3.0, 1.5, 3.0, 3.0, 1.5, None, 3.0, None],
            "inversion_time": [1.1, 0.8, 1.1, 0.9, 0.8, 1.0, "n/a", None],
        }
    )
    protocols = training_protocols(manifest, acquisition, max_protocols=8)
    assert protocols == [
        {"field_strength": 1.5, "inversion_time": 0.8},
        {"field_strength": 3.0, "inversion_time": 0.9},
        {"field_strength": 3.0, "inversion_time": 1.1},
        {"field_strength": 3.0, "inversion_time": None},  # e.g. an SPGR: no inversion time, asked unspecified
        {"field_strength": None, "inversion_time": 1.0},
    ]  # a row with no acquisition value at all makes no protocol
    assert training_protocols(manifest, acquisition, max_protocols=2) == [protocols[0], protocols[2]]  # 2 rows each
    assert protocol_members(manifest, protocols[2], acquisition).tolist() == [1, 0, 1, 0, 0, 0, 0, 0]
    assert protocol_members(manifest, protocols[3], acquisition).tolist() == [0, 0, 0, 0, 0, 0, 1, 0]
    assert protocol_label(protocols[0]) == "field_strength_1p5_inversion_time_0p8"
    assert protocol_label(protocols[3]) == "field_strength_3p0_inversion_time_na"
    assert protocol_label({"field_strength": 3.0, "vendor": "GE Signa"}) == "field_strength_3p0_vendor_GE-Signa"


def test_subjects_are_training_rows_with_the_site_and_the_acquisition_left_open():
    params = make_params()
    train = pd.DataFrame(
        {
            "age": [30.0, 40.0, 50.0, 60.0],
            "sex": ["F", "M", "F", "M"],
            "site": ["site1", "site2", "site3", "site1"],
            "field_strength": [3.0, 1.5, 3.0, 3.0],
            "inversion_time": [0.9, 0.8, 1.0, 1.1],
        }
    )
    subjects = sweep_subjects(train, params.covariates, 2, ["site"], seed=0)
    assert subjects == sweep_subjects(train, params.covariates, 2, ["site"], seed=0)  # reproducible
    assert len(subjects) == 2 and len({s["age"] for s in subjects}) == 2
    for subject in subjects:
        row = train[train["age"] == subject["age"]].iloc[0]
        assert subject["sex"] == row["sex"]
        assert subject["site"] is None and subject["field_strength"] is None and subject["inversion_time"] is None
    assert len(sweep_subjects(train, params.covariates, 10, [], seed=0)) == 4  # at most the training rows
    assert sweep_subjects(train, params.covariates, 1, [], seed=3)[0]["site"] is not None


# ------------------------------------------------------------------------------------------------
# the report stage


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A repository-like folder whose 10 subjects were scanned with two protocols, with a tiny VQ-GAN, its
    latents and a random diffusion model conditioned on the acquisition; the report run once on it."""
    work = tmp_path_factory.mktemp("sweep")
    params, processed = make_processed(work / "build", 10, SHAPE, "diffusion.unet.channels=[16,32]")
    shutil.move(processed, work / "data" / "processed")
    processed = work / "data" / "processed"
    manifest = pd.read_csv(processed / "manifest.csv")
    manifest["field_strength"] = [1.5, 3.0] * 5
    manifest["inversion_time"] = [0.8, 1.1] * 5
    manifest["sequence"] = "MPRAGE"
    manifest["voxel_size"] = 2.0
    manifest.to_csv(processed / "manifest.csv", index=False)
    fake_synthetic_set(work / "data" / "synthetic", processed, copy_of=2)
    _tiny_vqgan(params, work / "models" / "vqgan")
    run_encode(params, processed, work / "models" / "vqgan", work / "data" / "latents")
    latent_shape = list(json.loads((work / "data" / "latents" / "scale.json").read_text())["shape"])
    torch.manual_seed(0)
    ldm = build_ldm(params.diffusion.unet, params.covariates, latent_shape[0])
    with torch.no_grad():  # random non-zero weights: the zero-initialised output layer would ignore everything
        for weight in ldm.parameters():
            weight.add_(torch.randn_like(weight) * 0.05)
    config = {
        "diffusion": params.diffusion.model_dump(mode="json"),
        "covariates": [c.model_dump(mode="json") for c in params.covariates],
        "latent_shape": latent_shape,
        "steps": 0,
        "vqgan_sha256": sha256_file(work / "models" / "vqgan" / "model.safetensors"),
    }
    save_weights(ldm, config, work / "models" / "ldm")
    metrics = run_report(
        params,
        processed_dir=processed,
        synthetic_dir=work / "data" / "synthetic",
        vqgan_dir=work / "models" / "vqgan",
        reports_dir=work / "reports",
        track=False,
        ldm_dir=work / "models" / "ldm",
        latent_dir=work / "data" / "latents",
    )
    return work, params, metrics


def test_report_sweeps_the_training_protocols_and_shows_the_figure_near_the_conditioning_one(swept):
    work, params, metrics = swept
    key = "conditioning.protocol_sweep."
    assert metrics[key + "n_protocols"] == 2 and metrics[key + "n_subjects"] == params.report.protocol_sweep.subjects
    train = pd.read_csv(work / "data" / "processed" / "manifest.csv")
    for label, field, ti in (
        ("field_strength_1p5_inversion_time_0p8_sequence_MPRAGE_voxel_size_2p0", 1.5, 0.8),
        ("field_strength_3p0_inversion_time_1p1_sequence_MPRAGE_voxel_size_2p0", 3.0, 1.1),
    ):
        assert metrics[f"{key}{label}.n_real"] == int(
            ((train["field_strength"] == field) & (train["inversion_time"] == ti)).sum()
        )
        assert 0 < metrics[f"{key}{label}.real_mean"] < 1.5
        assert f"{key}{label}.synthetic_mean" in metrics
    assert metrics[key + "n_pairs"] <= 2 and key + "sign_agreement" in metrics  # 2 subjects x 1 protocol pair
    assert json.loads((work / "reports" / "metrics.json").read_text()) == metrics
    # no gate check reads the sweep
    assert not [c for c in evaluate_gate(metrics, params.report.thresholds) if "protocol_sweep" in c.key]
    assert not any(k.startswith("check.") and "protocol" in k for k in metrics)
    figure = work / "reports" / "figures" / "one_subject_each_protocol.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (work / "reports" / "report.html").read_text()
    order = [
        text.index(f'alt="{name}"') for name in ("conditioning", "one_subject_each_protocol", "intensity_histograms")
    ]
    assert order == sorted(order) and "One subject under each protocol" in text


def test_sweep_is_skipped_with_a_reason_without_acquisition_covariates_or_diffusion_model(swept, caplog):
    work, params, _ = swept
    data = load_report_data(params, work / "data" / "processed", work / "data" / "synthetic")
    models = (work / "models" / "ldm", work / "models" / "vqgan", work / "data" / "latents")
    participants_only = params.model_copy(
        update={"covariates": [c for c in params.covariates if c.source == "participants"]}
    )
    off = make_params("report.protocol_sweep.subjects=0")
    other_vqgan = work / "other-vqgan"
    _tiny_vqgan(make_params(), other_vqgan)  # params.yaml's VQ-GAN, not the fixture's tiny one
    cases = {
        "no acquisition covariate": (participants_only, models),
        "no diffusion model": (params, (work / "models" / "absent", *models[1:])),
        "report.protocol_sweep.subjects is 0": (off, models),
        "another VQ-GAN": (params, (models[0], other_vqgan, models[2])),
    }
    for reason, (p, dirs) in cases.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="synthmri.report.protocol_sweep"):
            assert protocol_sweep(p, data, *dirs) is None, reason
        assert any("skipped" in r.message and reason in r.message for r in caplog.records), (reason, caplog.text)
    # one protocol only in the training set: nothing to compare
    single = data.real.assign(field_strength=3.0, inversion_time=1.0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="synthmri.report.protocol_sweep"):
        assert protocol_sweep(params, dataclasses.replace(data, real=single), *models) is None
    assert "1 complete acquisition combination" in caplog.text


def test_undeclared_unspecified_names_are_reported_not_fatal(caplog):
    params = make_params("report.protocol_sweep.unspecified=[site, scanner]")
    train = pd.DataFrame({"age": [30.0, 40.0], "sex": ["F", "M"], "site": ["site1", "site2"]})
    with caplog.at_level(logging.INFO, logger="synthmri.report.protocol_sweep"):
        subjects = sweep_subjects(train, params.covariates, 2, params.report.protocol_sweep.unspecified, 0)
    assert [s["site"] for s in subjects] == [None, None] and "['scanner']" in caplog.text
