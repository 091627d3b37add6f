"""Smoke runs of the issue-7 benchmarks at tiny sizes (``--quick``): each script runs end to end in a
subprocess, as ``make bench`` runs it, and writes JSON with a positive throughput for every row.

MONAI is a dependency (the utility stage's ViT), so the MONAI side by side runs everywhere; its sizes are matched
on the denoiser (our covariate encoder has no MONAI counterpart); the FLOP/s benchmark measures our models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path, *extra: str) -> dict:
    # one thread: a smoke run on a shared machine stays fast (2 OpenMP threads stall when a core is busy)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / script),
            "--quick",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--out",
            str(out),
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_bench_monai_quick(tmp_path):
    result = _run("bench_monai.py", tmp_path / "monai.json", "--repeats", "1", "--profile", "never")
    names = {(r["name"], r["variant"]) for r in result["rows"]}
    for kind in ("vqgan", "unet", "sample"):
        assert {(f"{kind}/ours", "eager"), (f"{kind}/monai", "eager")} <= names
    assert ("vqgan/monai_ourwidths", "eager") in names  # the second matched MONAI VQ-GAN
    assert all(r["throughput"] > 0 and r["seconds_median"] > 0 for r in result["rows"])
    assert {q["workload"] for q in result["ratios"]} == {"vqgan", "unet", "sample"}
    assert all(q["ratio"] > 0 for q in result["ratios"])
    # matched sizes: MONAI's free knobs give parameter counts within 10 % of ours
    assert all(0.9 <= q["params_ratio"] <= 1.1 for q in result["ratios"] if q["workload"] != "sample")
    assert result["machine"]["load_average_before"] and result["machine"]["torch_threads"] >= 1


def test_bench_flops_quick(tmp_path):
    result = _run("bench_flops.py", tmp_path / "flops.json", "--repeats", "1")
    assert result["peak_gflops"] > 0
    assert {r["name"] for r in result["rows"]} >= {"vqgan/ours", "unet/ours"}
    for r in result["rows"]:
        assert r["throughput"] > 0 and r["gflop_per_step"] > 0 and r["achieved_gflops"] > 0


def test_monai_ldm_latent_padding_keeps_the_latent_and_fits_two_halvings():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from bench_monai_ldm import pad_to_multiple

    z = torch.randn(2, 3, 10, 12, 10)
    padded, shape = pad_to_multiple(z)
    assert padded.shape == (2, 3, 12, 12, 12) and shape == (10, 12, 10)
    assert torch.equal(padded[..., :10, :12, :10], z)  # cropping back gives the latent unchanged
    assert torch.equal(padded[..., 10:, :12, :10], z[..., 9:10, :, :].expand(-1, -1, 2, -1, -1))  # replicated edge


def test_bench_dvc_layouts_on_a_tiny_set(tmp_path):
    """Both layouts go through add/push/get/load_version, and a crowd of pulls all verify every checksum."""
    from test_shards import N, loose_set

    source = loose_set(tmp_path / "set")
    out = tmp_path / "dvc.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_dvc_layouts.py"), "--set", str(source)]
        + ["--volumes-per-tar", "3", "--pulls", "3", "--work", str(tmp_path / "work"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    files, tars = json.loads(out.read_text())["layouts"]
    assert files["layout"] == "files" and files["files"] == N + 1  # volumes + manifest
    assert tars["layout"] == "webdataset" and tars["files"] == 3 + 1  # ceil(7 / 3) tars + manifest
    for layout in (files, tars):
        assert layout["volumes"] == N and layout["load_version_intact"]
        assert layout["concurrent_pulls"]["all_verified"], layout["concurrent_pulls"]
        steps = ("dvc_add", "dvc_status", "dvc_push", "dvc_status_cloud", "dvc_get")
        assert (
            set(steps) < set(layout["peak_rss_mb"]) and layout["peak_rss_mb"]["load_version (this process so far)"] > 10
        )
        if os.access("/usr/bin/time", os.X_OK):  # the DVC commands' own peaks
            assert all(10 < layout["peak_rss_mb"][step] for step in steps), layout["peak_rss_mb"]
        assert layout["concurrent_pulls"]["peak_rss_mb_per_process_max"] > 10


def test_bench_report_scaling_features_only_shows_the_capped_cost(tmp_path):
    out = tmp_path / "scaling.csv"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_report_scaling.py"), "--features-only"]
        + ["--sizes", "64", "256", "--compare-sizes", "32", "none", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    import pandas as pd

    rows = pd.read_csv(out)
    assert list(rows["volumes"]) == [64, 256, 64, 256] and (rows["metrics_s"] > 0).all()
    # whole-set comparisons: a wider-than-real generator covers every held-out subject once it is large
    assert rows["coverage"].iloc[3] >= rows["coverage"].iloc[1]


def test_bench_sidecars_resolves_inheritance_for_every_image(tmp_path):
    """Half the subjects override the root's field strength at subject level; every image is queried."""
    out = tmp_path / "sidecars.csv"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_sidecars.py"), "--subjects", "6", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = pd.read_csv(out)
    assert list(rows["validate"]) == [False, True] and (rows["images"] == 12).all()
    assert (rows["field_1p5_images"] == 6).all()  # sessions of odd subjects: 3 subjects x 2 sessions


def _acquisition_decoder_parts():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_acquisition_decoder as bench

    from synthmri.config import Covariate

    covariates = [
        Covariate(name="site", kind="categorical", levels=["a", "b"]),
        Covariate(name="field_strength", kind="continuous", range=[0.5, 7.5], source="sidecar", key="Mag"),
    ]
    return bench, covariates


def test_texture_decoder_starts_as_the_trained_decoder_and_then_draws_what_it_is_told():
    """Zero-initialised conditioning and noise: fine-tuning starts from the trained decoder exactly; once the
    conditioning is non-zero, two acquisitions decode the same code differently, and the noise makes two decodings
    of one code differ."""
    import torch

    from synthmri.diffusion.conditioning import CovariateEncoder
    from synthmri.models.vqgan import Decoder

    bench, covariates = _acquisition_decoder_parts()
    torch.manual_seed(0)
    trained = Decoder(3, 1, [8, 16], 1, latent_channels=4, attention=False, norm_groups=4).eval()
    decoder = bench.TextureDecoder(trained, CovariateEncoder(covariates, bench.EMB), noise=True).eval()
    z = torch.randn(2, 4, 4, 4, 4)
    batch = decoder.encoder.encode_values([{"site": "a", "field_strength": 1.5}, {"site": "b", "field_strength": 3.0}])
    with torch.no_grad():
        assert torch.allclose(decoder(z, batch), trained(z), atol=1e-6)
        for p in decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
        same_code = decoder(z[:1].expand(2, -1, -1, -1, -1), batch)
        assert (same_code[0] - same_code[1]).abs().mean() > 1e-3  # the acquisition changes the drawing
        once, twice = decoder(z, batch), decoder(z, batch)
        assert (once - twice).abs().mean() > 1e-4  # the noise input is random


def test_band_discriminator_sees_only_what_the_latent_grid_cannot_hold_and_projects_the_acquisition():
    import torch

    from synthmri.diffusion.conditioning import CovariateEncoder

    bench, covariates = _acquisition_decoder_parts()
    coarse = torch.randn(1, 1, 4, 4, 4)
    smooth = torch.nn.functional.interpolate(coarse, size=(8, 8, 8), mode="trilinear")
    fine = torch.randn(1, 1, 8, 8, 8)
    assert bench.above_latent_scale(fine, 2).std() > 3 * bench.above_latent_scale(smooth, 2).std()
    torch.manual_seed(0)
    encoder = CovariateEncoder(covariates, bench.EMB)
    disc = bench.ProjectionPatchDiscriminator(2, 8, encoder, band_factor=2)
    x = torch.randn(2, 1, 16, 16, 16)
    batch = encoder.encode_values([{"site": "a", "field_strength": 1.5}, {"site": "b", "field_strength": 3.0}])
    swapped = encoder.encode_values([{"site": "b", "field_strength": 3.0}, {"site": "a", "field_strength": 1.5}])
    logits, features = disc(x, batch)
    assert features[0].shape[1] == 8 and logits.shape[:2] == (2, 1)
    assert not torch.allclose(logits, disc(x, swapped)[0])  # the same image judged against another acquisition


def test_step_cost_probe_is_the_median_step_after_the_warm_up():
    """The curve benchmarks size their schedules from this probe; a slow step or a cold start must not move it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import cpu_seconds_per_step

    # a fake CPU clock: each step advances it by the next duration; three cold steps, then one slow step among ten
    durations = iter([9.0, 9.0, 9.0, 0.30, 0.31, 5.0, 0.29, 0.30, 0.32, 0.30, 0.31, 0.29, 0.30])
    now = [0.0]
    calls = []

    def step() -> None:
        calls.append(1)
        now[0] += next(durations)

    assert cpu_seconds_per_step(step, steps=10, warmup=3, clock=lambda: now[0]) == pytest.approx(0.30)
    assert len(calls) == 13
