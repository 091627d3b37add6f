"""The ``sample`` stage: generate the synthetic data set in shards, resumably, fanned out by Prefect.

Each shard of ``sample.shard_size`` volumes is generated, its NIfTI files written atomically, and
only then recorded (``shards/shard-XXXXX.json``, also atomic). A rerun skips recorded shards, so a
kill loses at most the shards that were running. Sample ``i`` uses the seed derived from
``(sample.seed, i)`` and every shard runs on ``sample.torch_threads`` CPU threads, so any single volume
can be regenerated alone, bit for bit (README, "What bit for bit covers").
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from synthmri import __version__
from synthmri.catalog import LATENT_DIR, LDM_DIR, PROCESSED_DIR, SOFTWARE_NAME, SPACE_NAME, SYNTHETIC_DIR, VQGAN_DIR
from synthmri.config import Params
from synthmri.data.acquisition import voxel_size_covariate
from synthmri.data.covariates import is_missing
from synthmri.data.latents import LatentSet
from synthmri.data.shards import TAR_DIR, pack_tar_shards
from synthmri.data.spacing import isotropic_grid, resample
from synthmri.data.synthetic import GenerationRecord, ModelProvenance, manifest_row
from synthmri.diffusion.sampling import micro_batch_grid, sample_latents, sample_seed
from synthmri.diffusion.schedulers import make_sampler
from synthmri.environment import software_versions
from synthmri.errors import StageError
from synthmri.io import dvc_directory_hash, save_nifti, sha256_file, write_csv_atomic, write_text_atomic
from synthmri.logs import get_logger
from synthmri.models.loading import load_ldm, load_vqgan, read_config
from synthmri.synthesis.plan import make_plan
from synthmri.synthesis.prefect_api import prefect_api
from synthmri.training.runtime import cpu_numerics, intra_op_threads, pick_device

log = get_logger(__name__)

INTENSITY_NOTE = (
    "float32 in [0, 1]: 0 is background, values are the training space's intensities "
    "(clipped at percentiles inside the head and scaled), mapped linearly from [-1, 1]"
)


@dataclass(frozen=True)
class SampleJob:
    """Everything a shard needs, as plain values, so it can travel to a Dask worker."""

    ldm_dir: str
    vqgan_dir: str
    latent_dir: str
    out_dir: str
    affine: list
    sampler: str
    steps: int
    guidance_scale: float
    seed: int
    release: str
    #: the models' versions and digests, the manifest's last columns (None outside the stage: a sweep, a benchmark)
    provenance: ModelProvenance | None
    torch_threads: int = 1
    micro_batch: int = 1
    #: The covariate that is the raw voxel size (:func:`synthmri.data.acquisition.voxel_size_covariate`): a
    #: row that gives it a value is written at that isotropic voxel size, not in the training space.
    voxel_size_covariate: str | None = None
    #: ``diffusion.sampler.snap_to_codes``: decode the nearest codes of each sampled latent, or the latent itself.
    snap_to_codes: bool = False
    #: ``diffusion.sampler.guidance_interval``: the noise levels where guidance applies (None: every step).
    guidance_interval: tuple[float, float] | None = None
    #: ``diffusion.sampler.rest_guidance_scale``: guidance of the covariates outside the model's guided group.
    rest_guidance_scale: float = 1.0

    @classmethod
    def from_params(
        cls, params: Params, ldm_dir, vqgan_dir, latent_dir, out_dir, affine: list, **overrides
    ) -> SampleJob:
        """The job the ``sample`` stage runs with these params (sampler, guidance, seeds, threads, decoding), so
        every other caller (the report's protocol sweep, benchmarks, tests) samples as the stage does;
        ``overrides`` replace single fields (e.g. ``steps``, ``seed``, ``release``)."""
        sampler = params.diffusion.sampler
        job = cls(
            ldm_dir=str(ldm_dir),
            vqgan_dir=str(vqgan_dir),
            latent_dir=str(latent_dir),
            out_dir=str(out_dir),
            affine=affine,
            sampler=sampler.sampler,
            steps=sampler.steps,
            guidance_scale=sampler.guidance_scale,
            seed=params.sample.seed,
            release=params.sample.release,
            provenance=None,
            torch_threads=params.sample.torch_threads,
            micro_batch=params.sample.micro_batch,
            voxel_size_covariate=voxel_size_covariate(params.covariates),
            snap_to_codes=sampler.snap_to_codes,
            guidance_interval=sampler.guidance_interval,
            rest_guidance_scale=sampler.rest_guidance_scale,
        )
        return replace(job, **overrides)


@functools.lru_cache(maxsize=2)
def _models(ldm_dir: str, vqgan_dir: str, latent_dir: str):
    """Models are loaded once per process (threads share them; each Dask worker loads its own)."""
    device = pick_device("auto")
    config = read_config(Path(ldm_dir))
    return (
        load_ldm(ldm_dir, device),
        config,
        load_vqgan(vqgan_dir, device),
        LatentSet(latent_dir, split=None, schedule=ldm_schedule(config)),
        device,
    )


def sample_volume_name(index: int) -> str:
    return f"sample-{index:06d}.nii.gz"


def recorded_manifest(out_dir: Path, shards: list[int] | None = None) -> pd.DataFrame:
    """The rows of the recorded shards (the given ones, or every one present) in sample-index order: the
    set's manifest once every shard is recorded, or what a running or killed stage has finished so far."""
    shard_dir = Path(out_dir) / "shards"
    paths = (
        sorted(shard_dir.glob("shard-*.json"))
        if shards is None
        else [shard_dir / f"shard-{s:05d}.json" for s in shards]
    )
    records = [record for path in paths for record in json.loads(path.read_text())]
    return pd.DataFrame(records).sort_values("sample_index").reset_index(drop=True)


def trained_guided_group(ldm_dir: Path) -> list[str] | None:
    """The covariate group the saved diffusion model was trained to be guided on (None: every covariate together;
    also for models written before groups existed). The sampler guides the model's group, not params.yaml's."""
    return read_config(Path(ldm_dir))["diffusion"]["train"].get("guided_covariates") or None


def check_guidance_fits_model(ldm_dir: Path, rest_guidance_scale: float) -> list[str] | None:
    """The model's guided group, after a one-line StageError where the sampler's second guidance term needs a
    group the model was not trained with (a model trained before the group, sampled with today's params.yaml)."""
    group = trained_guided_group(ldm_dir)
    if rest_guidance_scale != 1 and group is None:
        raise StageError(
            f"diffusion.sampler.rest_guidance_scale = {rest_guidance_scale:g} needs a diffusion model trained with a "
            f"guided covariate group, but the one in {ldm_dir} guides every covariate together: retrain it "
            "(dvc repro train_diffusion) or sample with -S diffusion.sampler.rest_guidance_scale=1"
        )
    return group


def guided_text(group: list[str] | None, rest_guidance_scale: float) -> str:
    """Which covariates classifier-free guidance amplifies, in words: the model's trained group, or all."""
    if not group:
        return "every covariate"
    rest = rest_guidance_scale
    return f"{', '.join(group)} (the other covariates " + (f"at guidance {rest:g})" if rest != 1 else "as asked)")


def generate_shard(job: SampleJob, shard: int, items: list[tuple[int, dict]]) -> dict:
    """Generate, decode and write the volumes of one shard; record it only when all are on disk."""
    with intra_op_threads(job.torch_threads):  # the bytes must not depend on the process it runs in
        return _generate_shard(job, shard, items)


def _generate_shard(job: SampleJob, shard: int, items: list[tuple[int, dict]]) -> dict:
    ldm, config, vqgan, latents, device = _models(job.ldm_dir, job.vqgan_dir, job.latent_dir)
    indices = [index for index, _ in items]
    seeds = [sample_seed(job.seed, index) for index in indices]
    rows = [row for _, row in items]
    z = sample_latents(
        ldm.unet,
        ldm.encoder,
        make_sampler(job.sampler, ldm_schedule(config)),
        rows,
        tuple(config["latent_shape"]),
        job.steps,
        job.guidance_scale,
        seeds=seeds,
        device=device,
        micro_batch=job.micro_batch,
        slots=indices,
        guidance_interval=job.guidance_interval,
        rest_guidance_scale=job.rest_guidance_scale,
    )
    volumes = decode_on_grid(
        vqgan, latents.unstandardize(z.cpu()).to(device), indices, job.micro_batch, job.snap_to_codes
    )
    out_dir = Path(job.out_dir)
    numerics = "cuda" if device.type == "cuda" else f"{cpu_numerics()}, {job.torch_threads} thread(s)"
    numerics += f", micro-batch {job.micro_batch}"
    records = []
    for (index, row), seed, volume in zip(items, seeds, volumes):
        data = ((volume.clamp(-1, 1)[0].float().cpu().numpy() + 1.0) / 2.0).astype(np.float32)
        data, affine = written_grid(job, row, data)
        name = Path("volumes") / sample_volume_name(index)
        save_nifti(
            data,
            affine,
            out_dir / name,
            descrip=f"SynthMRI synthetic T1w, not a real subject; release {job.release}",
        )
        records.append(
            manifest_row(
                name.as_posix(),
                index,
                seed,
                row,
                GenerationRecord(
                    sampler=job.sampler,
                    steps=job.steps,
                    guidance_scale=job.guidance_scale,
                    guided_covariates=",".join(ldm.encoder.guided or ldm.encoder.names),
                    rest_guidance_scale=job.rest_guidance_scale,
                    snap_to_codes=job.snap_to_codes,
                    guidance_interval="all steps"
                    if job.guidance_interval is None
                    else str(list(job.guidance_interval)),
                    numerics=numerics,
                ),
                sha256_file(out_dir / name),
                job.provenance,
            )
        )
    write_text_atomic(out_dir / "shards" / f"shard-{shard:05d}.json", json.dumps(records, indent=1))
    return {"shard": shard, "n": len(records)}


def requested_voxel_size(job: SampleJob, row: dict) -> float | None:
    """The voxel size (mm) a plan row asks for, None when no voxel-size covariate is declared or the row leaves
    it unspecified."""
    value = row.get(job.voxel_size_covariate) if job.voxel_size_covariate else None
    return None if is_missing(value) else float(value)


def written_grid(job: SampleJob, row: dict, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` as the file holds them: the training space, or, when the row asks for a voxel size, the
    volume resampled to that isotropic grid over the same field of view (the model generates at the training
    resolution: a finer grid gets more voxels, not more detail). Clipped to [0, 1] again: the anti-aliasing
    filter and the B-spline overshoot a little at edges."""
    affine = np.asarray(job.affine, dtype=np.float64)
    spacing = requested_voxel_size(job, row)
    if spacing is None:
        return data, affine
    target, shape = isotropic_grid(affine, data.shape, spacing)
    return np.clip(resample(data, affine, target, shape, antialias=True), 0.0, 1.0), target


@torch.inference_mode()
def decode_on_grid(
    vqgan, z: torch.Tensor, slots: list[int], micro_batch: int, snap_to_codes: bool = False
) -> torch.Tensor:
    """Decode latents in the same fixed micro-batches as their chains (zero latents pad a batch), so a
    volume's bytes do not depend on which other volumes were decoded with it; ``snap_to_codes`` decodes each
    latent's nearest codes instead of the latent itself."""
    out: list[torch.Tensor | None] = [None] * len(slots)
    for batch in micro_batch_grid(slots, micro_batch):
        filler = torch.zeros_like(z[0])
        decoded = vqgan.decode(torch.stack([z[i] if i is not None else filler for i in batch]), quantize=snap_to_codes)
        for position, i in enumerate(batch):
            if i is not None:
                out[i] = decoded[position]
    return torch.stack(out)


def ldm_schedule(config: dict):
    from synthmri.config import ScheduleParams

    return ScheduleParams(**config["diffusion"]["schedule"])


def _task_runner(params: Params, api_url: str):
    if params.sample.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if params.sample.dask_address:
            return DaskTaskRunner(address=params.sample.dask_address)
        # The worker processes must report to this stage's Prefect API: without its address each one
        # starts a temporary server of its own, which outlives the worker when the cluster closes.
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": params.sample.workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
                "env": {"PREFECT_API_URL": api_url},
            }
        )
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=params.sample.workers)


def run_shards(
    params: Params,
    job: SampleJob,
    pending: list[tuple[int, list[tuple[int, dict]]]],
    total_volumes: int,
    done_volumes: int,
) -> None:
    """Fan the pending shards out as Prefect tasks on the configured task runner."""
    with prefect_api() as api_url:
        _run_shard_flow(params, job, pending, total_volumes, done_volumes, api_url)


def _run_shard_flow(
    params: Params,
    job: SampleJob,
    pending: list[tuple[int, list[tuple[int, dict]]]],
    total_volumes: int,
    done_volumes: int,
    api_url: str,
) -> None:
    from prefect import flow, task

    shard_task = task(generate_shard, name="generate-shard", retries=1, retry_delay_seconds=2)

    @flow(name="sample-shards", task_runner=_task_runner(params, api_url))
    def sample_shards() -> None:
        bar = tqdm(total=total_volumes, initial=done_volumes, unit="vol", desc="Sampling volumes", dynamic_ncols=True)
        started = time.perf_counter()
        futures = [shard_task.submit(job, shard, items) for shard, items in pending]
        for future in futures:
            result = future.result()
            bar.update(result["n"])
            rate = (bar.n - done_volumes) / max(time.perf_counter() - started, 1e-9) * 60
            bar.set_postfix_str(f"{rate:.1f} vol/min")
        bar.close()

    sample_shards()


# The code that decides a volume's bytes, relative to the folder that holds the package: the sample stage's
# code deps in dvc.yaml (a test keeps the two equal). A rerun after it changed regenerates every shard.
GENERATION_CODE = (
    "synthmri/synthesis",
    "synthmri/diffusion",
    "synthmri/models",
    "synthmri/data",
    "synthmri/stages/sample.py",
    "synthmri/training/runtime.py",
)
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def generation_code_digest(root: Path = PACKAGE_PARENT) -> str:
    """Checksum of the Python files of :data:`GENERATION_CODE` under ``root`` (paths and contents)."""
    digest = hashlib.sha256()
    for entry in GENERATION_CODE:
        path = root / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def _fingerprint(params: Params, provenance: ModelProvenance) -> str:
    """Identity of a set's finished shards: settings, models and code; a rerun with another one starts over
    (DVC keeps the folder between runs, ``persist``, so that a killed run resumes)."""
    voxel_size = voxel_size_covariate(params.covariates)
    blob = json.dumps(
        {
            "code": generation_code_digest(),
            "sample": params.sample.model_dump(mode="json", exclude={"task_runner", "workers", "dask_address"}),
            "sampler": params.diffusion.sampler.model_dump(mode="json"),
            **asdict(provenance),
            # the grid a volume is written on (only when declared: the fingerprints of other sets are unchanged)
            **({"voxel_size_covariate": voxel_size} if voxel_size else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _provenance(ldm_dir: Path, vqgan_dir: Path) -> ModelProvenance:
    def version(directory: Path) -> str:
        registry = directory / "registry.json"
        return json.loads(registry.read_text())["version"] if registry.is_file() else "unregistered"

    return ModelProvenance(
        vqgan_version=version(vqgan_dir),
        vqgan_sha256=sha256_file(vqgan_dir / "model.safetensors"),
        ldm_version=version(ldm_dir),
        ldm_sha256=sha256_file(ldm_dir / "model.safetensors"),
        synthmri_version=__version__,
    )


def voxel_size_lines(params: Params, manifest: pd.DataFrame) -> list[str]:
    """The card's voxel-size bullet when a voxel-size covariate is declared: which voxel sizes the set holds."""
    name = voxel_size_covariate(params.covariates)
    if name is None:
        return []
    values = manifest[name] if name in manifest.columns else pd.Series([], dtype=float)
    requested = pd.to_numeric(values[~values.map(is_missing)], errors="coerce")
    counts = requested.value_counts().sort_index()
    present = ", ".join(f"{v:g} mm ({n} volume{'s' if n != 1 else ''})" for v, n in counts.items()) or "none"
    return [
        f"- voxel size: a volume whose `{name}` was requested is written at it, isotropic, over the training "
        "space's field of view (generated at the training resolution, then resampled: a finer voxel size adds "
        f"voxels, not detail); voxel sizes present: {present}; {len(manifest) - int(counts.sum())} volume(s) "
        "without one are in the training space"
    ]


def write_card(
    out_dir: Path,
    params: Params,
    manifest: pd.DataFrame,
    provenance: ModelProvenance,
    space: dict,
    group: list[str] | None,
) -> None:
    """The data-set card (README.md) and the software versions (software.json) beside the volumes; ``group``: the
    covariates the model was trained to be guided on (:func:`trained_guided_group`)."""
    sampler = params.diffusion.sampler
    software = software_versions()
    asks_voxel_size = voxel_size_covariate(params.covariates) is not None
    write_text_atomic(out_dir / SOFTWARE_NAME, json.dumps(software, indent=2))
    lines = [
        f"# SynthMRI synthetic data set (release `{params.sample.release}`)",
        "",
        "**Synthetic data: no volume is a real subject.** Generated by a conditional latent diffusion model "
        "(3D U-Net) in the latent space of a 3D VQ-GAN, both trained with SynthMRI.",
        "",
        f"- volumes: {len(manifest)} NIfTI files "
        + (
            f"in WebDataset tar shards (`{TAR_DIR}/`, {params.sample.volumes_per_tar} volumes each; "
            "`<key>.nii.gz` + `<key>.json` per volume)"
            if params.sample.layout == "webdataset"
            else "in `volumes/`"
        )
        + f", shape {space['shape']} at {space['spacing_mm']} mm, orientation RAS, affine of the training space"
        + (" unless a voxel size was requested (below)" if asks_voxel_size else ""),
        *voxel_size_lines(params, manifest),
        f"- intensities: {INTENSITY_NOTE}",
        f"- covariate plan: `{params.sample.plan}`; covariates: "
        + ", ".join(f"{c.name} ({c.kind})" for c in params.covariates),
        f"- sampler: {sampler.sampler}, {sampler.steps} steps, classifier-free guidance scale {sampler.guidance_scale} "
        f"on {guided_text(group, sampler.rest_guidance_scale)}",
        f"- seeds: sample i uses the seed derived from (global seed {params.sample.seed}, i); see `manifest.csv`",
        f"- models: synthmri-vqgan version {provenance.vqgan_version} (sha256 {provenance.vqgan_sha256[:12]}…), "
        f"synthmri-ldm version {provenance.ldm_version} (sha256 {provenance.ldm_sha256[:12]}…)",
        f"- software (`{SOFTWARE_NAME}`): " + ", ".join(f"{k} {v}" for k, v in software.items()),
        "- verify: every row of `manifest.csv` has the sha256 of its file",
        "- headers: written from scratch; nothing is copied from any input file",
        "",
        "## Use",
        "",
        "```python",
        "from synthmri.data.synthetic import SyntheticDataset",
        "dataset = SyntheticDataset('path/to/this/folder')   # (volume tensor, covariates) pairs",
        "```",
        *(
            [
                "",
                "Volumes asked for at different voxel sizes have different shapes; to batch them, bring them onto one "
                "grid with a torchio transform, e.g. "
                f"`SyntheticDataset(path, transform=tio.Compose([tio.Resample({space['spacing_mm'][0]:g}), "
                f"tio.CropOrPad({tuple(space['shape'])})]))`.",
            ]
            if asks_voxel_size
            else []
        ),
        *(
            [
                "",
                "or stream the tar shards (any number of DataLoader workers):",
                "",
                "```python",
                "from synthmri.data.shards import stream_webdataset",
                "stream = stream_webdataset('path/to/this/folder', shuffle=256)   # (volume, manifest row) pairs",
                "```",
            ]
            if params.sample.layout == "webdataset"
            else []
        ),
        "",
        "Quality and privacy scores are in the report of the release that published this set.",
    ]
    write_text_atomic(out_dir / "README.md", "\n".join(lines) + "\n")


def run_sample(
    params: Params,
    latent_dir: Path = LATENT_DIR,
    processed_dir: Path = PROCESSED_DIR,
    ldm_dir: Path = LDM_DIR,
    vqgan_dir: Path = VQGAN_DIR,
    out_dir: Path = SYNTHETIC_DIR,
    track: bool = True,
) -> pd.DataFrame:
    """Generate the set (as an MLflow ``sample`` run whose generated data set is logged with its digest)."""
    if not track:
        return _generate(params, latent_dir, processed_dir, ldm_dir, vqgan_dir, out_dir)
    import mlflow

    from synthmri import tracking

    with tracking.stage_run("sample", params.model_dump(mode="json")) as run:
        started = time.perf_counter()
        manifest = _generate(params, latent_dir, processed_dir, ldm_dir, vqgan_dir, out_dir)
        digest = dvc_directory_hash(out_dir)
        mlflow.set_tags(
            {
                "synthetic_digest": digest,
                **{k: str(v) for k, v in manifest.iloc[0].items() if k.endswith(("_version", "_sha256"))},
            }
        )
        mlflow.log_metrics(
            {
                "volumes": len(manifest),
                "volumes_per_min_incl_resume": 60 * len(manifest) / (time.perf_counter() - started),
            }
        )
        tracking.log_dataset(
            run.info.run_id,
            out_dir / "manifest.csv",
            name="synthetic",
            digest=digest,
            source=out_dir.resolve().as_uri(),
            context="generated",
        )
        mlflow.log_artifact(str(out_dir / "README.md"), artifact_path="card")
    return manifest


def _pack(out_dir: Path, volumes_per_tar: int) -> pd.DataFrame:
    """Loose volumes -> tar shards; the loose files go only once every tar and the new manifest are on disk."""
    log.info("Packing the volumes into WebDataset tar shards of %d volumes", volumes_per_tar)
    manifest = pack_tar_shards(out_dir, volumes_per_tar)
    write_csv_atomic(manifest, out_dir / "manifest.csv")
    shutil.rmtree(out_dir / "volumes", ignore_errors=True)
    return manifest


def _generate(
    params: Params, latent_dir: Path, processed_dir: Path, ldm_dir: Path, vqgan_dir: Path, out_dir: Path
) -> pd.DataFrame:
    """Generate every planned sample that is not on disk yet, then write the manifest and card."""
    sampler = params.diffusion.sampler
    group = check_guidance_fits_model(ldm_dir, sampler.rest_guidance_scale)
    space = json.loads((processed_dir / SPACE_NAME).read_text())
    training = LatentSet(latent_dir, "train").manifest
    plan = make_plan(params, training)
    provenance = _provenance(ldm_dir, vqgan_dir)
    fingerprint = _fingerprint(params, provenance)
    stamp = out_dir / "shards" / "fingerprint.json"
    if out_dir.exists() and (not stamp.is_file() or json.loads(stamp.read_text()).get("fingerprint") != fingerprint):
        log.info("Clearing %s: it was made with other settings, models or code", out_dir)
        shutil.rmtree(out_dir)
    write_text_atomic(stamp, json.dumps({"fingerprint": fingerprint}))

    size = params.sample.shard_size
    shards = [
        (s, [(i, plan[i]) for i in range(s * size, min((s + 1) * size, len(plan)))])
        for s in range((len(plan) + size - 1) // size)
    ]
    pending = [(s, items) for s, items in shards if not (out_dir / "shards" / f"shard-{s:05d}.json").is_file()]
    done = sum(len(items) for s, items in shards) - sum(len(items) for _, items in pending)
    job = SampleJob.from_params(params, ldm_dir, vqgan_dir, latent_dir, out_dir, space["affine"], provenance=provenance)
    log.info(
        "Sampling %d volumes in %d shards (%d already done) with %s, %d steps, guidance %.1f on %s, %s, on %s x%d",
        len(plan),
        len(shards),
        done,
        sampler.sampler,
        sampler.steps,
        sampler.guidance_scale,
        guided_text(group, sampler.rest_guidance_scale),
        "latents snapped to their nearest codes" if sampler.snap_to_codes else "latents decoded as sampled",
        params.sample.task_runner,
        params.sample.workers,
    )
    if pending:
        run_shards(params, job, pending, len(plan), done)

    manifest = recorded_manifest(out_dir, [shard for shard, _ in shards])
    listed = set(manifest["file"])
    for stray in (out_dir / "volumes").glob("*"):
        if f"volumes/{stray.name}" not in listed:  # leftovers of a shard that was killed half-way
            stray.unlink()
    write_csv_atomic(manifest, out_dir / "manifest.csv")
    if params.sample.layout == "webdataset":
        manifest = _pack(out_dir, params.sample.volumes_per_tar)
    manifest.to_parquet(out_dir / "manifest.parquet", index=False)
    write_card(out_dir, params, manifest, provenance, space, group)
    log.info("Wrote %d synthetic volumes to %s", len(manifest), out_dir)
    return manifest
