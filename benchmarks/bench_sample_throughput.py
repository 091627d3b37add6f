"""Reproducible sampling throughput: the `sample` stage's shards at several micro-batch sizes, side by side.

    make demo && .venv/bin/python benchmarks/bench_sample_throughput.py [--volumes 32] \\
        [--micro-batches 1 4 8] [--steps 25 10] [--workers 2] [--repeats 2] [-S key=value ...]

Runs the stage's own shard function (``generate_shard``: chains with classifier-free guidance, VQ-GAN
decoding, NIfTI writing and checksums) with the demo models of ``models/`` on the covariate plan of
``--params``: ``--workers`` shards at a time in threads, as the stage's thread task runner runs them (without
Prefect's server start-up, which is the same for every setting), each shard on ``sample.torch_threads``
threads. ``micro_batch`` 1 is the per-volume path; every setting keeps each volume's bytes independent of
its shard and neighbours (``synthmri.diffusion.sampling``). ``--steps`` (default: ``diffusion.sampler.steps``)
adds the number of sampler steps as a second axis, so that an old setting (25 steps, one volume at a time)
and a new one run side by side. Settings are interleaved over ``--repeats`` so that background load falls on
all of them alike.

Each row: volumes/min, seconds, and the largest voxel difference of the setting's volumes from the
micro-batch-1 volumes (the rounding a different micro-batch size costs; compared at equal steps). Appends to
``benchmarks/results/sample_throughput.csv`` and prints each row.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from bench_vqgan_curve import append_rows
from common import add_run_args, run_stamp

from synthmri.catalog import LATENT_DIR, LDM_DIR, PROCESSED_DIR, SPACE_NAME, VQGAN_DIR
from synthmri.config import load_params
from synthmri.data.latents import LatentSet
from synthmri.stages.sample import SampleJob, generate_shard, sample_volume_name
from synthmri.synthesis.plan import make_plan

OUT = Path(__file__).parent / "results" / "sample_throughput.csv"


def shard_size_for(micro_batch: int, configured: int) -> int:
    """The configured shard size rounded up to whole micro-batches."""
    return micro_batch * max(1, math.ceil(configured / micro_batch))


def run_setting(job: SampleJob, plan: list[dict], shard_size: int, workers: int) -> float:
    """Generate every planned volume into ``job.out_dir``; returns the wall seconds."""
    shards = [
        (s, [(i, plan[i]) for i in range(start, min(start + shard_size, len(plan)))])
        for s, start in enumerate(range(0, len(plan), shard_size))
    ]
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda shard: generate_shard(job, *shard), shards))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=32)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--workers", type=int, default=None, help="default: sample.workers")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="default: diffusion.sampler.steps")
    parser.add_argument("--repeats", type=int, default=2)
    add_run_args(parser, OUT)
    args = parser.parse_args()
    params = load_params(args.params, [f"sample.n_samples={args.volumes}", *args.overrides])
    workers = args.workers or params.sample.workers
    plan = make_plan(params, LatentSet(LATENT_DIR, "train").manifest)
    space = json.loads((PROCESSED_DIR / SPACE_NAME).read_text())
    sampler = params.diffusion.sampler
    settings = [(steps, mb) for steps in (args.steps or [sampler.steps]) for mb in args.micro_batches]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for steps, micro_batch in settings:
                out = Path(tmp) / f"s{steps}-mb{micro_batch}-r{repeat}"
                job = SampleJob.from_params(
                    params, LDM_DIR, VQGAN_DIR, LATENT_DIR, out, space["affine"], steps=steps, release="bench",
                    micro_batch=micro_batch, voxel_size_covariate=None,
                )  # fmt: skip
                if repeat == 0 and (steps, micro_batch) == settings[0]:  # load the models outside the clock
                    run_setting(job, plan[:1], 1, 1)
                shard_size = shard_size_for(micro_batch, params.sample.shard_size)
                seconds = run_setting(job, plan, shard_size, workers)
                reference = Path(tmp) / f"s{steps}-mb1-r{repeat}"
                max_diff = (
                    max(
                        float(
                            np.abs(
                                nib.load(out / "volumes" / sample_volume_name(i)).get_fdata()
                                - nib.load(reference / "volumes" / sample_volume_name(i)).get_fdata()
                            ).max()
                        )
                        for i in range(len(plan))
                    )
                    if reference.is_dir()
                    else None
                )
                row = {
                    "micro_batch": micro_batch,
                    "repeat": repeat,
                    "volumes": len(plan),
                    "workers": workers,
                    "torch_threads": params.sample.torch_threads,
                    "shard_size": shard_size,
                    "sampler": sampler.sampler,
                    "steps": steps,
                    "guidance_scale": sampler.guidance_scale,
                    "seconds": round(seconds, 2),
                    "volumes_per_min": round(60 * len(plan) / seconds, 1),
                    "max_voxel_diff_vs_mb1": max_diff,
                    **run_stamp(),
                }
                print(row, flush=True)
                rows.append(row)
    append_rows(args.out, rows)


if __name__ == "__main__":
    main()
