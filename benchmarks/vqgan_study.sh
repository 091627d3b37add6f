#!/usr/bin/env bash
# The autoencoder lever study of issue 15: each recipe trained for the same CPU budget, two seeds at once
# (one thread each), appended to benchmarks/results/vqgan_curve.csv. Usage: benchmarks/vqgan_study.sh [minutes]
set -u
cd "$(dirname "$0")/.."
MIN=${1:-10}
REC="-S vqgan.loss.adversarial=0 -S vqgan.loss.perceptual=0 -S vqgan.train.betas=[0.9,0.99]"
FAST="$REC -S vqgan.train.lr=0.001 -S vqgan.train.warmup_steps=20 -S vqgan.train.lr_schedule=cosine"
run() {  # label, overrides...
  local label=$1; shift
  for seed in 0 1; do
    PYTHONPATH=benchmarks .venv/bin/python benchmarks/bench_vqgan_curve.py --label "$label" --cpu-minutes "$MIN" \
      --seeds $seed --points 5 "$@" &
  done
  wait
}
run l1-only $REC
run l1-fast $FAST
run l1-fast-c8k1024 $FAST -S vqgan.model.latent_channels=8 -S vqgan.quantizer.codebook_size=1024
run l1-fast-x2 $FAST -S vqgan.model.channels=[16,32] -S vqgan.model.downsample_factor=2
run base
run l1-fast-lpips $FAST -S vqgan.loss.perceptual=0.1
run l1-fast-flip $FAST -S vqgan.train.flip_lr=0.5
