"""Sampling speed (volumes/min) per sampler and step count, with the trained demo models.

    make demo && .venv/bin/python benchmarks/bench_sampling.py [--volumes 2]

Each volume = the full sampler chain with classifier-free guidance + VQ-GAN decoding, one volume
at a time (the sample stage's batch-invariant mode). Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from synthmri.config import load_params
from synthmri.data.latents import LatentSet
from synthmri.diffusion.sampling import sample_latents, sample_seed
from synthmri.diffusion.schedulers import make_sampler
from synthmri.models.loading import load_ldm, load_vqgan, read_config
from synthmri.stages.sample import ldm_schedule

CONFIGS = [("ddpm", 1000), ("ddim", 50), ("dpm_solver", 25), ("dpm_solver", 10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=2)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    ldm, vqgan = load_ldm("models/ldm"), load_vqgan("models/vqgan")
    config = read_config("models/ldm")
    latents = LatentSet("data/latents", split=None, schedule=ldm_schedule(config))
    rows = [{"age": 60.0, "sex": "F", "site": None}] * args.volumes
    for name, steps in CONFIGS:
        start = time.perf_counter()
        z = sample_latents(
            ldm.unet,
            ldm.encoder,
            make_sampler(name, ldm_schedule(config)),
            rows,
            tuple(config["latent_shape"]),
            steps,
            params.diffusion.sampler.guidance_scale,
            seeds=[sample_seed(0, i) for i in range(args.volumes)],
        )
        with torch.inference_mode():
            for i in range(args.volumes):
                vqgan.decode(latents.unstandardize(z[i : i + 1]), quantize=params.diffusion.sampler.snap_to_codes)
        elapsed = time.perf_counter() - start
        print(
            json.dumps(
                {
                    "benchmark": "sampling",
                    "sampler": name,
                    "steps": steps,
                    "volumes": args.volumes,
                    "seconds": round(elapsed, 2),
                    "volumes_per_min": round(60 * args.volumes / elapsed, 2),
                    "latent_shape": config["latent_shape"],
                    "torch_threads": torch.get_num_threads(),
                    "machine": platform.machine(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
