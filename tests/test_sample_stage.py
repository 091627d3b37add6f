"""train_diffusion + sample: reproducible seeds, clean headers, resumable shards, Dask fan-out, the consumer dataset."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, make_processed

from synthmri.config import Covariate, QuantizerParams, VQGANModelParams
from synthmri.data.spacing import resample
from synthmri.data.synthetic import SyntheticDataset
from synthmri.errors import StageError
from synthmri.io import sha256_file
from synthmri.models.vqgan import VQGAN
from synthmri.report.inputs import load_report_data
from synthmri.stages.encode import run_encode
from synthmri.stages.sample import SampleJob, decode_on_grid, generate_shard, run_sample
from synthmri.stages.train_diffusion import run_train_diffusion
from synthmri.stages.train_vqgan import run_train_vqgan
from synthmri.synthesis.plan import make_plan
from synthmri.training.runtime import intra_op_threads

TINY_LDM = (
    "diffusion.unet.channels=[16,32]",
    "diffusion.train.steps=12",
    "diffusion.train.batch_size=4",
    "diffusion.train.val_every=6",
    "diffusion.train.checkpoint_every=6",
    "diffusion.train.log_every=2",
    "diffusion.sampler.steps=3",
    "sample.n_samples=5",
    "sample.shard_size=2",
)


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # 30 s by default: too short on a busy 2-core machine
        yield


def _train_chain(work: Path, shape: tuple[int, int, int], *overrides: str):
    """A tiny but complete model chain in ``work`` (processed → vqgan → latents → ldm)."""
    params, processed = make_processed(
        work,
        8,
        shape,
        "vqgan.train.steps=4",
        "vqgan.loss.adversarial=0",
        "vqgan.loss.perceptual=0",
        *TINY_LDM,
        *overrides,
    )
    # without params.yaml's header voxel-size covariate: these tests check volumes in the training space; the
    # voxel-size tests below declare it on a copy of the params
    params = params.model_copy(update={"covariates": [c for c in params.covariates if c.source != "header"]})
    run_train_vqgan(params, processed, work / "vqgan", work / "ckpt-vq", work / "rep-vq", work / "vq.json", track=False)
    run_encode(params, processed, work / "vqgan", work / "latents")
    metrics = run_train_diffusion(
        params,
        work / "latents",
        work / "vqgan",
        work / "ldm",
        work / "ckpt-ldm",
        work / "rep-ldm",
        work / "ldm.json",
        track=False,
    )
    return params, work, metrics


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train_chain(tmp_path_factory.mktemp("sample"), (16, 16, 16))


@pytest.fixture(scope="module")
def trained_8cubed_latents(tmp_path_factory):
    """32³ volumes, 8³ latents and the default decoder widths: large enough that torch splits the
    decoder's kernels across threads, so a volume's last bits would differ between processes if its
    thread count were not fixed (measured: with 4³ latents, or widths 8/16/32, the decoder gives the
    same bytes on 1 and 2 threads; with 8³ latents and widths 16/32/64 it does not)."""
    return _train_chain(
        tmp_path_factory.mktemp("sample32"),
        (32, 32, 32),
        "vqgan.model.channels=[16,32,64]",
        "vqgan.model.downsample_factor=4",
    )


def _sample(params, work: Path, out: Path):
    return _sample_from(params, work, work / "ldm", out)


def _sample_from(params, work: Path, ldm: Path, out: Path):
    return run_sample(params, work / "latents", work / "processed", ldm, work / "vqgan", out, track=False)


def _with_diffusion(params, section: str, **values):
    """``params`` with ``diffusion.<section>``'s ``values`` replaced (params are frozen)."""
    part = getattr(params.diffusion, section).model_copy(update=values)
    return params.model_copy(update={"diffusion": params.diffusion.model_copy(update={section: part})})


def _plan_and_job(params, work: Path, out: Path, **job) -> tuple[list[dict], SampleJob]:
    """The stage's covariate plan and a shard job with the fixture's models and sampler, writing to ``out``."""
    plan = make_plan(params, pd.read_csv(work / "latents" / "manifest.csv").query("split == 'train'"))
    space = json.loads((work / "processed" / "space.json").read_text())
    return plan, SampleJob.from_params(
        params, work / "ldm", work / "vqgan", work / "latents", out, space["affine"], release="dev", **job
    )


def test_diffusion_training_outputs(trained):
    params, work, metrics = trained
    assert metrics["steps"] == 12 and np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["val_loss"])
    config = json.loads((work / "ldm" / "config.json").read_text())
    assert config["latent_shape"] == [4, 4, 4, 4]
    # every declared covariate, acquisition ones (field strength, inversion time) included
    assert [c["name"] for c in config["covariates"]] == [c.name for c in params.covariates]
    assert {"age", "sex", "site", "field_strength", "inversion_time"} <= {c["name"] for c in config["covariates"]}
    assert not (work / "ckpt-ldm").exists()
    assert (work / "rep-ldm" / "samples.png").stat().st_size > 500


def test_sample_set_is_complete_clean_and_verifiable(trained, prefect_server, tmp_path):
    params, work, _ = trained
    manifest = _sample(params, work, tmp_path / "syn")
    assert list(manifest["sample_index"]) == list(range(5))
    assert len(set(manifest["seed"])) == 5
    # what guidance each volume was sampled with: the model's trained group and the second term's scale
    sampler = params.diffusion.sampler
    assert (manifest["guided_covariates"] == ",".join(params.diffusion.train.guided_covariates)).all()
    assert (manifest["rest_guidance_scale"] == sampler.rest_guidance_scale).all() and sampler.rest_guidance_scale != 1
    card = (tmp_path / "syn" / "README.md").read_text()
    assert f"on age, sex (the other covariates at guidance {sampler.rest_guidance_scale:g})" in card
    space = json.loads((work / "processed" / "space.json").read_text())
    for row in manifest.itertuples():
        image = nib.load(tmp_path / "syn" / row.file)
        np.testing.assert_allclose(image.affine, space["affine"], atol=1e-5)
        header = image.header
        assert b"synthetic" in header["descrip"].tobytes() and b"release dev" in header["descrip"].tobytes()
        for field in ("aux_file", "db_name", "intent_name"):
            assert header[field].tobytes().strip(b"\0") == b"", field
        assert len(header.extensions) == 0
        data = image.get_fdata()
        assert data.shape == (16, 16, 16) and data.min() >= 0 and data.max() <= 1
    assert SyntheticDataset(tmp_path / "syn").verify() == []
    assert (
        "not a real subject" in (tmp_path / "syn" / "README.md").read_text().lower()
        or "no volume is a real subject" in (tmp_path / "syn" / "README.md").read_text().lower()
    )
    software = json.loads((tmp_path / "syn" / "software.json").read_text())
    assert (
        software["torch"] == torch.__version__
        and f"torch {torch.__version__}" in (tmp_path / "syn" / "README.md").read_text()
    )
    parquet = pd.read_parquet(tmp_path / "syn" / "manifest.parquet")
    assert list(parquet["sha256"]) == list(manifest["sha256"])
    volume, covariates = SyntheticDataset(tmp_path / "syn")[0]
    assert volume.shape == (1, 16, 16, 16) and set(covariates) == {c.name for c in params.covariates}


def test_the_stage_guides_the_models_trained_group_and_refuses_a_second_term_it_was_not_trained_for(
    trained, prefect_server, tmp_path
):
    """The sampler guides the group the saved model was trained on, whatever params.yaml says now: the card says
    so. A model trained before groups existed (no group in its config) sampled with a second guidance term stops
    at the stage's start with one line naming both fixes, before any volume is written."""
    params, work, _ = trained
    assert params.diffusion.train.guided_covariates == ["age", "sex"]
    # params.yaml edited after training, the model not retrained
    other = _with_diffusion(params, "train", guided_covariates=["age"])
    _sample_from(other, work, work / "ldm", tmp_path / "syn")
    card = (tmp_path / "syn" / "README.md").read_text()
    assert "on age, sex (the other covariates at guidance 1.5)" in card

    old_model = tmp_path / "ldm-old"
    shutil.copytree(work / "ldm", old_model)
    config = json.loads((old_model / "config.json").read_text())
    del config["diffusion"]["train"]["guided_covariates"]
    (old_model / "config.json").write_text(json.dumps(config))
    with pytest.raises(StageError, match=r"rest_guidance_scale = 1\.5 needs .* retrain it .*rest_guidance_scale=1$"):
        _sample_from(params, work, old_model, tmp_path / "syn-old")
    assert not (tmp_path / "syn-old").exists()
    as_asked = _with_diffusion(params, "sampler", rest_guidance_scale=1.0)
    manifest = _sample_from(as_asked, work, old_model, tmp_path / "syn-old")
    assert (manifest["guided_covariates"] == ",".join(c.name for c in params.covariates)).all()
    guidance = f"classifier-free guidance scale {params.diffusion.sampler.guidance_scale} on every covariate"
    assert guidance in (tmp_path / "syn-old" / "README.md").read_text()


def test_same_seed_gives_bitwise_identical_volumes_and_one_index_regenerates_alone(trained, prefect_server, tmp_path):
    params, work, _ = trained
    first = _sample(params, work, tmp_path / "a")
    _sample(params, work, tmp_path / "b")
    for f in first["file"]:
        assert np.array_equal(nib.load(tmp_path / "a" / f).get_fdata(), nib.load(tmp_path / "b" / f).get_fdata())
    plan, job = _plan_and_job(params, work, tmp_path / "alone")
    generate_shard(job, 0, [(3, plan[3])])
    alone = nib.load(tmp_path / "alone" / "volumes" / "sample-000003.nii.gz").get_fdata()
    assert np.array_equal(alone, nib.load(tmp_path / "a" / "volumes" / "sample-000003.nii.gz").get_fdata())


def test_micro_batched_volumes_keep_their_bytes_across_shard_sizes_workers_and_alone(
    trained_8cubed_latents, prefect_server, tmp_path
):
    """Batched chains and decoding on the fixed micro-batch grid: volume i's bytes depend on (seed, i), the
    models and micro_batch only, not on the shard size, the number of workers or its neighbours."""
    params, work, _ = trained_8cubed_latents
    digests = {}
    for shard_size, workers in ((2, 1), (4, 2)):
        sample = params.sample.model_copy(update={"micro_batch": 2, "shard_size": shard_size, "workers": workers})
        manifest = _sample(params.model_copy(update={"sample": sample}), work, tmp_path / f"shards-of-{shard_size}")
        assert manifest["numerics"].str.endswith("micro-batch 2").all()
        digests[shard_size] = list(manifest["sha256"])
    # (this fixture's 4-step VQ-GAN decodes most latents to the same volume: the two tests below use
    # distinct outputs to show that neighbours cannot leak into a volume's bits)
    assert digests[2] == digests[4]
    plan, job = _plan_and_job(params, work, tmp_path / "alone", micro_batch=2)
    generate_shard(job, 0, [(3, plan[3])])  # alone: position 1 of micro-batch 1, position 0 is a filler
    alone = json.loads((tmp_path / "alone" / "shards" / "shard-00000.json").read_text())
    assert alone[0]["sha256"] == digests[2][3]


def _tiny_vqgan() -> VQGAN:
    """An untrained, seeded VQ-GAN of 4x4x4x4 latents and 16^3 volumes, for the decoding tests."""
    torch.manual_seed(0)
    return VQGAN.from_params(
        VQGANModelParams(channels=[8, 16, 16], downsample_factor=4, latent_channels=4, norm_groups=4),
        QuantizerParams(codebook_size=32),
    ).eval()


def test_decoding_on_the_grid_gives_each_volume_the_same_bits_alone_or_with_any_neighbours():
    vqgan = _tiny_vqgan()
    z = torch.randn(6, 4, 4, 4, 4)
    together = decode_on_grid(vqgan, z, list(range(6)), micro_batch=4)
    assert together.shape == (6, 1, 16, 16, 16) and (together[0] - together[1]).abs().max() > 1e-3
    for i in range(6):
        assert torch.equal(decode_on_grid(vqgan, z[i : i + 1], [i], micro_batch=4)[0], together[i])
    shuffled = decode_on_grid(vqgan, torch.stack([z[5], torch.randn(4, 4, 4, 4), z[2]]), [5, 4, 2], micro_batch=4)
    assert torch.equal(shuffled[0], together[5]) and torch.equal(shuffled[2], together[2])


def test_decoding_snaps_a_sampled_latent_to_its_nearest_codes_only_when_asked():
    vqgan = _tiny_vqgan()
    z = torch.randn(2, 4, 4, 4, 4)
    with torch.inference_mode():
        as_sampled, snapped = vqgan.decode(z), vqgan.decode(z, quantize=True)
    assert (as_sampled - snapped).abs().max() > 1e-3  # random latents lie between the codes
    torch.testing.assert_close(decode_on_grid(vqgan, z, [0, 1], micro_batch=2), as_sampled, rtol=0, atol=0)
    snapped_on_grid = decode_on_grid(vqgan, z, [0, 1], micro_batch=2, snap_to_codes=True)
    torch.testing.assert_close(snapped_on_grid, snapped, rtol=0, atol=0)


def test_volume_bytes_do_not_depend_on_the_thread_count_of_the_process_that_runs_them(trained_8cubed_latents, tmp_path):
    """A Dask worker starts with one intra-op thread, the main process with one per core: the job's own
    ``torch_threads`` decides, so the bytes are the same wherever the shard runs."""
    params, work, _ = trained_8cubed_latents
    digests = {}
    for ambient in (1, 2):
        plan, job = _plan_and_job(params, work, tmp_path / f"{ambient}", torch_threads=1)
        with intra_op_threads(ambient):
            generate_shard(job, 0, list(enumerate(plan))[:2])
            assert torch.get_num_threads() == ambient, "the caller's thread count is restored"
        records = json.loads((tmp_path / f"{ambient}" / "shards" / "shard-00000.json").read_text())
        digests[ambient] = [r["sha256"] for r in records]
        assert all(
            r["numerics"].endswith("1 thread(s), micro-batch 1") and torch.__version__ in r["numerics"] for r in records
        )
    assert digests[1] == digests[2]


def test_intra_op_threads_is_per_os_thread():
    """Concurrent shards of the thread-pool runner each keep their own count."""
    barrier = threading.Barrier(2)

    def seen(threads: int) -> int:
        with intra_op_threads(threads):
            barrier.wait()  # both counts are set before either is read
            return torch.get_num_threads()

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(seen, (1, 3))) == [1, 3]


def test_rerun_skips_finished_shards_and_cleans_partial_ones(trained, prefect_server, tmp_path):
    params, work, _ = trained
    out = tmp_path / "syn"
    _sample(params, work, out)
    kept = (out / "volumes" / "sample-000000.nii.gz").stat().st_mtime_ns
    # simulate a kill in the middle of shard 1: its record is missing and one of its files is half-written
    (out / "shards" / "shard-00001.json").unlink()
    (out / "volumes" / "sample-000003.nii.gz").write_bytes(b"\x1f\x8b partial")
    (out / "volumes" / ".sample-000009.tmp.nii.gz").write_bytes(b"junk")
    manifest = _sample(params, work, out)
    assert (out / "volumes" / "sample-000000.nii.gz").stat().st_mtime_ns == kept, "finished shards are skipped"
    assert sorted(p.name for p in (out / "volumes").iterdir()) == [f"sample-{i:06d}.nii.gz" for i in range(5)]
    assert SyntheticDataset(out).verify() == []
    assert len(manifest) == 5 and manifest["file"].is_unique


def test_a_rerun_after_the_generation_code_changed_regenerates_every_shard(
    trained, prefect_server, tmp_path, monkeypatch
):
    """DVC keeps the set between runs (``persist``, for resuming); shards made by other code are not reused."""
    from synthmri.stages import sample

    params, work, _ = trained
    out = tmp_path / "syn"
    _sample(params, work, out)
    first = (out / "volumes" / "sample-000000.nii.gz").stat().st_mtime_ns
    monkeypatch.setattr(sample, "generation_code_digest", lambda: "edited-sampler")
    _sample(params, work, out)
    assert (out / "volumes" / "sample-000000.nii.gz").stat().st_mtime_ns != first
    assert SyntheticDataset(out).verify() == []


def test_the_generation_code_digest_covers_the_sample_stages_code_deps_and_only_them(tmp_path):

    import yaml

    from synthmri.stages.sample import GENERATION_CODE, generation_code_digest

    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["sample"]["deps"]
    assert {d for d in deps if d.startswith("synthmri/")} == set(GENERATION_CODE)

    root = tmp_path / "copy"
    shutil.copytree(REPO / "synthmri", root / "synthmri", ignore=shutil.ignore_patterns("__pycache__"))
    assert generation_code_digest(root) == generation_code_digest()
    (root / "synthmri" / "report" / "html.py").write_text("# not generation code\n")
    assert generation_code_digest(root) == generation_code_digest()
    with (root / "synthmri" / "diffusion" / "schedulers.py").open("a") as f:
        f.write("# a sampler edit\n")
    assert generation_code_digest(root) != generation_code_digest()


VOXEL_SIZE = Covariate(
    name="voxel_size", kind="continuous", range=(0.5, 8.0), required=False, source="header", key="voxel_size_mm"
)


def _fov(affine: np.ndarray, shape) -> np.ndarray:
    """World coordinates of the field of view's 8 outer corners (voxel edges) and of its centre."""
    points = [*itertools.product(*[(-0.5, n - 0.5) for n in shape]), [(n - 1) / 2 for n in shape]]
    return nib.affines.apply_affine(np.asarray(affine, dtype=np.float64), np.array(points, dtype=np.float64))


def test_a_requested_voxel_size_is_written_at_it_over_the_training_field_of_view(trained, tmp_path):
    """Sample 0 asking for 2 mm or 4.5 mm (the fixture's training space: 16^3 at 3 mm) is written with exactly
    those zooms over the same field of view and, resampled back, is the training-space sample 0; a row without a
    value keeps the training space bit for bit, and the same seed gives the same bytes. (The fixture's model is
    not conditioned on voxel_size, so the generated content is the same for every value: only the grid differs.)"""
    params, work, _ = trained
    space = json.loads((work / "processed" / "space.json").read_text())
    plan, plain = _plan_and_job(params, work, tmp_path / "plain")
    generate_shard(plain, 0, [(0, plan[0])])
    training = nib.load(tmp_path / "plain" / "volumes" / "sample-000000.nii.gz")
    reference = np.asarray(training.dataobj, dtype=np.float32)
    digests = {}
    for run, value in enumerate((None, 2.0, 4.5, 2.0)):
        out = tmp_path / f"run{run}"
        _, job = _plan_and_job(params, work, out, voxel_size_covariate="voxel_size")
        generate_shard(job, 0, [(0, {**plan[0], "voxel_size": value})])
        (record,) = json.loads((out / "shards" / "shard-00000.json").read_text())
        assert record["voxel_size"] == value, "the manifest records the request like any covariate"
        digests.setdefault(value, set()).add(record["sha256"])
        image = nib.load(out / record["file"])
        if value is None:
            assert record["sha256"] == sha256_file(tmp_path / "plain" / "volumes" / "sample-000000.nii.gz")
            continue
        assert image.header.get_zooms()[:3] == (value, value, value)
        assert image.shape == (round(48 / value),) * 3  # 16 x 3 mm = 48 mm: 24 voxels at 2 mm, 11 at 4.5 mm
        assert np.abs(_fov(image.affine, image.shape) - _fov(space["affine"], (16, 16, 16))).max() <= value / 2
        np.testing.assert_allclose(
            _fov(image.affine, image.shape)[-1], _fov(space["affine"], (16, 16, 16))[-1], atol=1e-3
        )
        data = np.asarray(image.dataobj, dtype=np.float32)
        assert data.min() >= 0 and data.max() <= 1
        back = resample(data, image.affine, np.asarray(space["affine"]), (16, 16, 16), antialias=False)
        # back on the training grid it is the training-space volume; a grid coarser than the training one is a
        # low-pass of this fixture's noisy volumes, so 4.5 mm keeps less of it (a flipped or misplaced field of
        # view would correlate near 0)
        error, correlation = np.abs(back - reference).mean(), np.corrcoef(back.ravel(), reference.ravel())[0, 1]
        assert back.shape == (16, 16, 16) and correlation > (0.95 if value < 3 else 0.85), correlation
        assert error < (0.25 if value < 3 else 0.4) * reference.std(), error
    assert all(len(d) == 1 for d in digests.values()), "same seed, same voxel size: same bytes"


def test_sample_stage_writes_requested_voxel_sizes_and_the_report_reads_them_on_the_training_grid(
    trained, prefect_server, tmp_path
):
    """A declared voxel-size covariate end to end: the stage writes each volume at its requested voxel size (the
    one without stays in the training space), the manifest and the card record them, and the report's inputs
    bring the mixed set back onto the training grid."""
    params, work, _ = trained
    plan_csv = tmp_path / "plan.csv"
    pd.DataFrame({"age": [30, 50, 70], "sex": ["F", "M", "F"], "voxel_size": [2.0, None, 4.5]}).to_csv(
        plan_csv, index=False
    )
    sample = params.sample.model_copy(update={"plan": "csv", "csv": str(plan_csv)})
    declared = params.model_copy(update={"covariates": [*params.covariates, VOXEL_SIZE], "sample": sample})
    out = tmp_path / "syn"
    manifest = _sample(declared, work, out)
    images = [nib.load(out / f) for f in manifest["file"]]
    assert [i.header.get_zooms()[:3] for i in images][::2] == [(2.0, 2.0, 2.0), (4.5, 4.5, 4.5)]
    space = json.loads((work / "processed" / "space.json").read_text())
    np.testing.assert_allclose(images[1].affine, space["affine"], atol=1e-5)
    assert images[1].shape == (16, 16, 16)
    saved = pd.read_csv(out / "manifest.csv")
    assert saved["voxel_size"].tolist()[::2] == [2.0, 4.5] and pd.isna(saved["voxel_size"][1])
    card = (out / "README.md").read_text()
    assert "unless a voxel size was requested" in card
    assert "voxel sizes present: 2 mm (1 volume), 4.5 mm (1 volume); 1 volume(s) without one" in card
    assert SyntheticDataset(out).verify() == []
    data = load_report_data(declared, work / "processed", out)
    assert data.synthetic_volumes.shape == (3, 16, 16, 16) and np.isfinite(data.synthetic_volumes).all()
    low, high = data.value_range
    unit = np.asarray(images[1].dataobj, dtype=np.float32)
    assert np.array_equal(data.synthetic_volumes[1], unit * np.float32(high - low) + np.float32(low))


def test_protocol_sweep_reads_a_voxel_size_protocol_back_on_the_training_grid(trained, tmp_path):
    """The report's same-seed sweep writes a voxel-size protocol at it (the sample stage's shard function) and
    reads it back onto the training grid: 3 mm (the fixture's training spacing) is the training space itself."""
    from synthmri.report.protocol_sweep import generate_sweep

    params, work, _ = trained
    declared = params.model_copy(update={"covariates": [*params.covariates, VOXEL_SIZE]})
    space = json.loads((work / "processed" / "space.json").read_text())
    protocols = [{"voxel_size": 3.0}, {"voxel_size": 2.0}]
    volumes = generate_sweep(
        declared,
        work / "ldm",
        work / "vqgan",
        work / "latents",
        space["affine"],
        space["shape"],
        [{"age": 40.0, "sex": "F"}],
        protocols,
        (-1.0, 1.0),
    )
    assert volumes.shape == (1, 2, 16, 16, 16)
    assert np.corrcoef(volumes[0, 0].ravel(), volumes[0, 1].ravel())[0, 1] > 0.95


def test_webdataset_layout_holds_the_same_volumes_in_tar_shards(trained_8cubed_latents, prefect_server, tmp_path):
    """sample.layout=webdataset: the same volumes (same checksums) end up in tar shards, the loose files are
    gone, the set verifies and reads like the loose one, and a rerun changes nothing."""
    params, work, _ = trained_8cubed_latents
    loose = _sample(params, work, tmp_path / "files")
    sample = params.sample.model_copy(update={"layout": "webdataset", "volumes_per_tar": 2})
    out = tmp_path / "tars"
    manifest = _sample(params.model_copy(update={"sample": sample}), work, out)
    assert list(manifest["sha256"]) == list(loose["sha256"])
    assert not (out / "volumes").exists() and len(list((out / "webdataset").glob("*.tar"))) == 3
    assert pd.read_csv(out / "manifest.csv")["tar"].nunique() == 3
    assert "WebDataset tar shards" in (out / "README.md").read_text()
    tars, files = SyntheticDataset(out), SyntheticDataset(tmp_path / "files")
    assert tars.verify() == [] and all(torch.equal(tars[i][0], files[i][0]) for i in range(len(files)))
    before = {p.name: p.read_bytes() for p in (out / "webdataset").glob("*.tar")}
    _sample(params.model_copy(update={"sample": sample}), work, out)
    assert {p.name: p.read_bytes() for p in (out / "webdataset").glob("*.tar")} == before


def test_dask_runner_with_two_local_workers_gives_the_same_set(trained_8cubed_latents, prefect_server, tmp_path):
    params, work, _ = trained_8cubed_latents
    threads = _sample(params, work, tmp_path / "threads")
    dask_params = params.model_copy(
        update={"sample": params.sample.model_copy(update={"task_runner": "dask", "workers": 2})}
    )
    servers_before = _prefect_servers()
    dask = run_sample(
        dask_params, work / "latents", work / "processed", work / "ldm", work / "vqgan", tmp_path / "dask", track=False
    )
    assert list(dask["sha256"]) == list(threads["sha256"])
    # the workers reported to this process's Prefect API: none started a server that outlives it
    assert _prefect_servers() <= servers_before


def _wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _prefect_servers(prefect_home: Path | None = None) -> set[int]:
    """Temporary Prefect servers on this machine; with ``prefect_home``, only those started under that
    ``PREFECT_HOME`` (another pipeline running on the same machine starts its own)."""
    import psutil

    servers = set()
    for proc in psutil.process_iter(["cmdline"]):
        if "prefect.server.api.server:create_app" not in " ".join(proc.info["cmdline"] or []):
            continue
        if prefect_home is not None:
            try:
                if proc.environ().get("PREFECT_HOME") != str(prefect_home):
                    continue
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        servers.add(proc.pid)
    return servers


@pytest.mark.slow
def test_sigkill_during_sample_then_rerun_finishes_consistently(trained, tmp_path):
    _, work, _ = trained
    (tmp_path / "data").mkdir()
    for name in ("latents", "processed"):
        os.symlink(work / name, tmp_path / "data" / name)
    (tmp_path / "models").mkdir()
    for name in ("ldm", "vqgan"):
        os.symlink(work / name, tmp_path / "models" / name)
    cmd = [
        sys.executable,
        "-m",
        "synthmri.cli",
        "sample",
        "--params",
        str(REPO / "params.yaml"),
        "-S",
        "sample.n_samples=12",
        "-S",
        "sample.shard_size=2",
        "-S",
        "diffusion.sampler.steps=3",
        "-S",
        "normalize.shape=[16,16,16]",
    ]
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    env.pop("PREFECT_API_URL", None)
    shards = tmp_path / "data" / "synthetic" / "shards"
    home = tmp_path / "prefect"
    servers_before = _prefect_servers(home)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(shards.glob("shard-*.json"))) < 2:
        time.sleep(0.05)
    assert _prefect_servers(home) - servers_before, "the stage runs its flow on a temporary Prefect server"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # its temporary Prefect server dies with it (parent-death signal), SIGKILL included
    assert _wait_until(lambda: not _prefect_servers(home) - servers_before), _prefect_servers(home) - servers_before
    finished = len(list(shards.glob("shard-*.json")))
    assert 1 <= finished < 6, f"kill came too late to test resume ({finished} shards done)"
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"({2 * finished} already done)" in done.stderr, done.stderr[-2000:]
    assert not _prefect_servers(home) - servers_before, "a stage that ends normally stops its server too"
    out = tmp_path / "data" / "synthetic"
    manifest = pd.read_csv(out / "manifest.csv")
    assert list(manifest["sample_index"]) == list(range(12))
    assert sorted(p.name for p in (out / "volumes").iterdir()) == sorted(Path(f).name for f in manifest["file"])
    assert SyntheticDataset(out).verify() == []
    for f in manifest["file"]:
        nib.load(out / f).get_fdata()  # every file is readable
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("synthmri").experiment_id], filter_string="tags.`synthmri.stage` = 'sample'"
    )
    assert runs and any(d.dataset.name == "synthetic" for r in runs for d in r.inputs.dataset_inputs)
