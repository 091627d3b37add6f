"""VQ-GAN train-step throughput (volumes/s) and peak memory at a params profile.

    .venv/bin/python benchmarks/bench_vqgan.py [--params params.yaml] [--steps 10] [-S key=value ...]

Runs full generator + discriminator steps (adversarial phase on, LPIPS on) on random volumes of the
profile's shape and batch size. Peak memory: process max RSS on CPU, max allocated on CUDA.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from common import cpu_model, peak_memory_now_mb

from synthmri.config import load_params
from synthmri.training.train_vqgan import VQGANTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("-S", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    params = load_params(args.params, [*args.overrides, "vqgan.loss.disc_start_step=0"])
    trainer = VQGANTrainer(params)
    batch = params.vqgan.train.batch_size
    x = torch.rand(batch, 1, *params.normalize.shape, device=trainer.device) * 2 - 1
    trainer.train_step(x)  # warm-up
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(x)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak_mb = peak_memory_now_mb(trainer.device)
    result = {
        "benchmark": "vqgan_train_step",
        "shape": list(params.normalize.shape),
        "batch_size": batch,
        "channels": params.vqgan.model.channels,
        "generator_params_M": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 3),
        "seconds_per_step": round(elapsed / args.steps, 3),
        "volumes_per_s": round(batch * args.steps / elapsed, 3),
        "peak_memory_MB": round(peak_mb, 1),
        "device": str(trainer.device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": cpu_model(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
