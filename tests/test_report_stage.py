"""The report stage on a tiny fake setup (no training): metrics.json, the privacy check, the HTML, the gate."""

from __future__ import annotations

import base64
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, fake_synthetic_set, make_params, make_processed

from synthmri.config import ReportThresholds
from synthmri.io import dvc_directory_hash
from synthmri.models.loading import save_weights
from synthmri.models.vqgan import VQGAN
from synthmri.report.compute import compute_set_metrics
from synthmri.report.gate import Check, evaluate_gate
from synthmri.report.inputs import load_report_data
from synthmri.stages.report import run_report

pytestmark = pytest.mark.filterwarnings("ignore::synthmri.losses.perceptual.RandomBackboneWarning")

SHAPE = (16, 16, 16)
FAMILIES = ("recon.", "fidelity.stats.", "diversity.", "conditioning.", "privacy.", "intensity.")
FORCED = "report.thresholds.min_recon_psnr=1000"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_vqgan(params, directory: Path) -> None:
    """An untrained VQ-GAN saved like train_vqgan's _write_outputs."""
    torch.manual_seed(0)
    model = VQGAN.from_params(params.vqgan.model, params.vqgan.quantizer)
    config = {
        "vqgan": params.vqgan.model_dump(mode="json"),
        "normalize": params.normalize.model_dump(mode="json"),
        "lpips_backbone": "alex: RANDOM backbone",
        "steps": 0,
    }
    save_weights(model, config, directory)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A repository-like folder: data/processed, data/synthetic, models/vqgan, reports/ (with training curves)."""
    work = tmp_path_factory.mktemp("report")
    params, processed = make_processed(work / "build", 10, SHAPE)
    shutil.move(processed, work / "data" / "processed")
    processed = work / "data" / "processed"
    copy_name = fake_synthetic_set(work / "data" / "synthetic", processed, copy_of=2)
    _tiny_vqgan(params, work / "models" / "vqgan")
    (work / "reports" / "vqgan").mkdir(parents=True)
    pd.DataFrame({"step": [1, 2, 3], "l1": [0.3, 0.2, 0.1], "vq": [0.1, 0.05, 0.02]}).to_csv(
        work / "reports" / "vqgan" / "losses.csv", index=False
    )
    (work / "reports" / "vqvae.json").write_text(json.dumps({"val_psnr": 21.0, "val_ssim": 0.7, "model": "vqvae"}))
    manifest = pd.read_csv(processed / "manifest.csv")
    copy_source = manifest[manifest["split"] == "train"]["item_id"].iloc[2]
    return work, params, copy_name, copy_source


def _overrides(work: Path, *extra: str) -> list[str]:
    return [f"report.vqvae_metrics={work / 'reports' / 'vqvae.json'}", *extra]


@pytest.fixture(scope="module")
def report(setup):
    """One run with a threshold that no model can meet: the gate must fail and the stage must not raise."""
    work, params, _, _ = setup
    params = make_params(*_overrides(work, FORCED))
    metrics = run_report(
        params,
        processed_dir=work / "data" / "processed",
        synthetic_dir=work / "data" / "synthetic",
        vqgan_dir=work / "models" / "vqgan",
        reports_dir=work / "reports",
        track=False,
        ldm_dir=work / "models" / "ldm",  # absent: no diffusion model, the protocol sweep is skipped
        latent_dir=work / "data" / "latents",
    )
    return work, metrics


def test_metrics_json_is_flat_and_has_every_family(report):
    work, metrics = report
    on_disk = json.loads((work / "reports" / "metrics.json").read_text())
    assert on_disk == metrics
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in on_disk.values())
    for family in FAMILIES:
        assert any(key.startswith(family) for key in on_disk), family
    assert on_disk["extractor"] == "stats"
    for name in ("frechet_distance", "mmd2", "precision", "recall", "density", "coverage", "baseline_frechet_distance"):
        assert isinstance(on_disk[f"fidelity.stats.{name}"], float), name
    assert on_disk["fidelity.stats.frechet_distance"] >= 0
    assert {
        "conditioning.age.predictor.stats.mae_synthetic",
        "conditioning.sex.predictor.stats.accuracy_synthetic",
    } <= set(on_disk)
    assert "conditioning.age.csf_fraction.slope_synthetic" in on_disk
    assert "conditioning.sex.head_ml.diff_synthetic" in on_disk
    assert on_disk["recon.n"] >= 1 and np.isfinite(on_disk["recon.psnr"]) and 0 <= on_disk["recon.lpips"]
    for who in ("train", "heldout"):  # the autoencoder's ceiling: decoded real volumes, scored like the set
        assert (
            np.isfinite(on_disk[f"ceiling.stats.{who}.frechet_ratio"])
            and 0 <= on_disk[f"ceiling.stats.{who}.coverage"] <= 1
        )
    # ... and the gate's set checks on the decoded training volumes (what a perfect diffusion model would score)
    assert np.isfinite(on_disk["ceiling.check.frechet_ratio"]) and "ceiling.check.precision" in on_disk
    assert not any(k.startswith(("ceiling.check.recon_", "ceiling.check.privacy_")) for k in on_disk)
    assert on_disk["ceiling.gate_n_failed"] == len([n for n in on_disk["ceiling.gate_failed_checks"].split(",") if n])
    # ... and what the decoded volumes keep of each covariate the real features predict (age does, here)
    kept = {k.split(".")[2] for k in on_disk if k.startswith("ceiling.kept.")}
    assert "age" in kept, sorted(k for k in on_disk if k.startswith("ceiling.kept."))
    for name in kept:
        real, refit, chance, share = (
            on_disk[f"ceiling.kept.{name}.{m}"] for m in ("real", "decoded_refit", "chance", "kept")
        )
        advantage = (chance - real, chance - refit) if name == "age" else (real - chance, refit - chance)
        assert share == pytest.approx(advantage[1] / advantage[0]) and advantage[0] > 0, name
    # the bootstrap interval of every set check that has one, low <= high
    for check in ("frechet_ratio", "precision", "coverage", "predictor_age", "predictor_sex"):
        assert on_disk[f"interval.{check}.low"] <= on_disk[f"interval.{check}.high"], check
    assert 0 < on_disk["diversity.ms_ssim_real"] <= 1 and on_disk["diversity.ratio"] > 0
    assert on_disk["intensity.wasserstein"] > 0
    # the measures the gate does not use: each against the real held-out set, for the synthetic set, the real
    # training volumes (chance) and the decoded training volumes (the autoencoder), with intervals around them
    assert on_disk["measures.csf_gm_threshold"] < on_disk["measures.gm_wm_threshold"]
    for name in ("csf_fraction", "gm_fraction", "wm_fraction", "gm_wm_interface", "edge_sharpness"):
        assert on_disk[f"measures.{name}.real_sd"] >= 0, name
        for who in ("synthetic", "train", "decoded_train"):
            low, smd, high = (on_disk[f"measures.{name}.{who}.{k}"] for k in ("low", "smd", "high"))
            assert low <= high and np.isfinite(smd), (name, who)
    assert on_disk["compare.vqvae.val_psnr"] == 21.0  # the optional VQ-VAE metrics are picked up
    # no diffusion model here: "one subject under each protocol" is skipped, the rest of the report is not
    assert not any(k.startswith("conditioning.protocol_sweep.") for k in on_disk)
    assert not (work / "reports" / "figures" / "one_subject_each_protocol.png").exists()


def test_exact_copy_of_a_training_volume_is_flagged(report, setup):
    _, metrics = report
    _, _, copy_name, copy_source = setup
    assert metrics["privacy.metric"] == "ncc"
    assert metrics["privacy.ncc.n_likely_copies"] >= 1 and metrics["privacy.ssim.n_likely_copies"] >= 1
    assert metrics["privacy.ncc.max_score"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["privacy.closest_synthetic"] == copy_name
    assert metrics["privacy.closest_train"] == copy_source
    assert metrics["privacy.n_near_duplicates"] >= 1
    assert metrics["check.privacy_near_duplicates"] is False
    assert "privacy_near_duplicates" in metrics["gate_failed_checks"].split(",")


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [(tag, name, value) for name, value in attrs if name in ("src", "href")]


def test_html_is_self_contained_with_images_and_verdicts(report, setup):
    work, _ = report
    _, _, copy_name, _ = setup
    text = (work / "reports" / "report.html").read_text()
    parser = _Links()
    parser.feed(text)
    assert "link" not in parser.tags and "script" not in parser.tags
    assert parser.refs, "no images"
    prefix = "data:image/png;base64,"
    assert all(tag == "img" and name == "src" and value.startswith(prefix) for tag, name, value in parser.refs)
    assert base64.b64decode(parser.refs[0][2][len(prefix) :])[:8] == b"\x89PNG\r\n\x1a\n"
    pngs = sorted((work / "reports" / "figures").glob("*.png"))
    assert len(parser.refs) == len(pngs) >= 6
    assert "Which model limits fidelity" in text and "decoded training volumes" in text
    assert "<th>ceiling</th>" in text  # the gate table's column of decoded training volumes
    assert "What the autoencoder keeps of each covariate" in text and "<td>share kept</td>" not in text
    assert "95 % bootstrap interval" in text and "] </td>" not in text
    assert "Measures the gate does not use" in text and "grey/white boundary (folding)" in text
    assert {
        "real_vs_synthetic.png",
        "nearest_neighbours.png",
        "intensity_histograms.png",
        "synthetic_by_age.png",
        "training_curves.png",
    } <= {p.name for p in pngs}
    assert "PASS" in text and "FAIL" in text and "Quality gate: <b>FAIL</b>" in text
    assert copy_name in text and "LIKELY COPY" in text
    assert "VQ-VAE" in text


def test_forced_threshold_fails_the_gate_without_raising(report):
    _, metrics = report
    assert metrics["gate"] == "fail" and metrics["gate_passed"] is False
    failed = metrics["gate_failed_checks"].split(",")
    assert "recon_psnr" in failed and metrics["check.recon_psnr"] is False
    assert metrics["gate_n_failed"] == len(failed)


def test_noise_volumes_fail_the_fidelity_checks(setup):
    work, _, _, _ = setup
    params = make_params()
    data = load_report_data(params, work / "data" / "processed", work / "data" / "synthetic")
    rng = np.random.default_rng(0)
    data.synthetic_volumes = rng.uniform(-1, 1, data.synthetic_volumes.shape).astype(np.float32)
    result = compute_set_metrics(params, data)
    failed = {c.name for c in evaluate_gate(result.metrics, params.report.thresholds) if c.status == "fail"}
    assert {"frechet_ratio", "precision", "coverage", "intensity_wasserstein"} <= failed
    assert "recon_psnr" not in failed  # no model given: the check does not apply


def test_gate_rules_skip_fail_and_pass():
    metrics = {
        "extractor": "stats",
        "recon.psnr": 30.0,
        "recon.ssim": None,
        "fidelity.stats.precision": 0.9,
        "fidelity.stats.coverage": 0.2,
        "conditioning.age.predictor.stats.error_ratio": 1.5,
        "privacy.excess_over_chance_bound": 0.0,
        "privacy.n_near_duplicates": 0,
    }
    checks = {c.name: c for c in evaluate_gate(metrics, ReportThresholds())}
    assert checks["recon_psnr"].status == "pass"
    assert checks["recon_ssim"].status == "fail" and checks["recon_ssim"].note == "could not be computed"
    assert checks["coverage"].status == "fail" and checks["precision"].status == "pass"
    assert checks["recall"].status == "skipped"  # threshold null by default
    assert checks["diversity_ratio"].status == "skipped"  # metric absent: not applicable
    assert checks["predictor_age"].status == "pass"
    assert checks["privacy_copies"].status == "pass" and checks["privacy_near_duplicates"].status == "pass"
    relaxed = ReportThresholds(min_coverage=None, min_recon_ssim=None)
    assert all(c.status != "fail" for c in evaluate_gate(metrics, relaxed))
    assert isinstance(checks["recon_psnr"], Check) and checks["recon_psnr"].rule == ">= 24"


def test_cli_runs_the_stage_logs_to_mlflow_and_exits_zero_on_a_failing_gate(setup, monkeypatch):
    import mlflow

    from synthmri.cli import main

    work, _, _, _ = setup
    monkeypatch.chdir(work)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("SYNTHMRI_PARENT_RUN_ID", raising=False)
    overrides = [
        arg
        for o in _overrides(work, "report.max_pairs=5", "report.thresholds.min_recon_psnr=1000")
        for arg in ("-S", o)
    ]
    assert main(["report", "--params", str(REPO / "params.yaml"), *overrides]) == 0
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    assert metrics["gate_passed"] is False
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["synthmri"], output_format="list")
    experiment = mlflow.get_experiment_by_name("synthmri")  # the UI opens it on the model-training view
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    run = next(r for r in runs if r.data.tags.get("synthmri.stage") == "report")
    assert run.data.tags["gate"] == "fail" and run.data.tags["vqgan_version"] == "3"
    assert run.data.metrics["gate_passed"] == 0.0 and "recon.psnr" in run.data.metrics
    inputs = run.inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == ["synthetic"]
    assert (
        inputs[0].dataset.digest == run.data.tags["synthetic_digest"] == dvc_directory_hash(work / "data" / "synthetic")
    )
    assert {i.key: i.value for i in inputs[0].tags}.get("mlflow.data.context") == "evaluation"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"metrics.json", "report.html", "figures"} <= artifacts


def test_ceiling_checks_separate_what_the_autoencoder_limits(setup):
    """A perfect autoencoder's ceiling is the real training set itself: its FD ratio is exactly 1 (it *is* the
    baseline) and the copy checks do not apply; an autoencoder that decodes noise fails the fidelity checks."""
    from synthmri.report.compute import ceiling_checks, make_extractor

    work, _, _, _ = setup
    params = make_params()
    data = load_report_data(params, work / "data" / "processed", work / "data" / "synthetic")
    extractor = make_extractor(params.report, data.value_range)
    perfect = {c.name: c for c in ceiling_checks(params, data, data.train.copy(), extractor)}
    assert perfect["frechet_ratio"].value == pytest.approx(1.0) and perfect["frechet_ratio"].status == "pass"
    assert perfect["intensity_wasserstein"].status == "pass" and perfect["predictor_sex"].value <= 0
    assert not any(name.startswith(("recon_", "privacy_")) for name in perfect)
    noise = np.random.default_rng(0).uniform(-1, 1, data.train.shape).astype(np.float32)
    failed = {c.name for c in ceiling_checks(params, data, noise, extractor) if c.status == "fail"}
    assert {"frechet_ratio", "precision", "coverage", "intensity_wasserstein"} <= failed


def test_figure_labels_keep_acquisition_values_and_wrap():
    """A 1.5 T field strength reads 1.5 (not a rounded 2), and seven covariates wrap three to a line so the
    label does not run into the next row's."""
    from synthmri.report.html import _covariate_label

    row = pd.Series(
        dict(
            age=74.0,
            sex="F",
            site="site3",
            field_strength=1.5,
            inversion_time=float("nan"),
            sequence="SPGR",
            voxel_size=1.2,
        )
    )
    names = ["age", "sex", "site", "field_strength", "inversion_time", "sequence", "voxel_size"]
    assert _covariate_label(row, names) == "74, F, site3\n1.5, SPGR, 1.2"
