"""MONAI's 3D VQ-VAE recipe against ours at equal CPU-minutes, scored exactly like ours (issue 15).

    .venv/bin/python benchmarks/bench_monai_curve.py --variant tutorial --cpu-minutes 10 --seed 0

Trains MONAI 1.6.1's ``VQVAE`` on ``data/processed`` (the ``bench`` extra) with the losses and optimizer of
MONAI Generative's 3D VQ-VAE tutorial — L1 + quantization loss, Adam lr 1e-4 — on the same batches
(``batch_indices``) and batch size as our VQ-GAN, for a budget of process CPU time, and scores the
validation split with our scorer (:func:`synthmri.metrics.reconstruction.score_reconstructions`) at
``--points`` times. Variants: ``tutorial`` = the tutorial's network (channels 256, 256; 2 residual
layers of 256; ×4 down; 256 codes of 32 dims); ``matched`` = the MONAI VQVAE with our widths and about
our parameter count (``benchmarks/common.py``), same losses. Appends rows to
``benchmarks/results/vqgan_curve.csv`` next to ours (label ``monai-<variant>``).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
from bench_vqgan_curve import OUT, append_rows, sharpness_ratio
from common import cpu_model, monai_vqvae_kwargs

from synthmri.catalog import PROCESSED_DIR
from synthmri.config import load_params
from synthmri.data.datasets import ProcessedVolumes
from synthmri.losses.perceptual import LPIPS25D
from synthmri.metrics.reconstruction import score_reconstructions
from synthmri.training.runtime import batch_indices


class MonaiAutoencoder(torch.nn.Module):
    """MONAI's VQVAE behind our ``encode``/``decode`` names (quantized latents in, volume out)."""

    def __init__(self, vqvae: torch.nn.Module) -> None:
        super().__init__()
        self.vqvae = vqvae

    def encode(self, x: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        return self.vqvae.encode_stage_2_inputs(x) if quantize else self.vqvae.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vqvae.decode_stage_2_outputs(z)


def build(variant: str, params) -> torch.nn.Module:
    from monai.networks.nets import VQVAE

    if variant == "tutorial":  # MONAI GenerativeModels, tutorials/generative/3d_vqvae
        return VQVAE(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=(256, 256),
            num_res_channels=256,
            num_res_layers=2,
            downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
            upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
            num_embeddings=256,
            embedding_dim=32,
        )
    return VQVAE(**monai_vqvae_kwargs(params, our_widths=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["tutorial", "matched"], default="tutorial")
    parser.add_argument("--cpu-minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--points", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    params = load_params("params.yaml")
    train_set, val_set = ProcessedVolumes(PROCESSED_DIR, "train"), ProcessedVolumes(PROCESSED_DIR, "val")
    model = MonaiAutoencoder(build(args.variant, params))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    lpips, _ = LPIPS25D.from_params(params.vqgan.loss)
    value_range = tuple(params.normalize.out_range)
    budget = args.cpu_minutes * 60
    marks = [budget * (k + 1) / args.points for k in range(args.points)]
    label, cpu_s, wall_s, step, rows = f"monai-{args.variant}", 0.0, 0.0, 0, []
    model.train()
    while marks:
        c0, w0 = time.process_time(), time.perf_counter()
        x = train_set.batch(batch_indices(len(train_set), params.vqgan.train.batch_size, args.seed, step))
        recon, quantization_loss = model.vqvae(x)
        loss = torch.nn.functional.l1_loss(recon, x) + quantization_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        cpu_s += time.process_time() - c0
        wall_s += time.perf_counter() - w0
        if cpu_s >= marks[0]:
            marks.pop(0)
            scores = score_reconstructions(model, val_set.volumes, lpips, torch.device("cpu"), value_range)
            summary = scores.summary()
            row = {
                "label": label,
                "seed": args.seed,
                "step": step,
                "steps": step if not marks else None,
                "cpu_minutes": round(cpu_s / 60, 3),
                "wall_minutes": round(wall_s / 60, 3),
                "val_psnr": round(summary["psnr"], 3),
                "val_ssim": round(summary["ssim"], 4),
                "val_lpips": round(summary["lpips"], 4),
                "l1": round(float(loss), 4),
            }
            if not marks:
                model.eval()
                row["val_sharpness_ratio"] = round(sharpness_ratio(model, val_set, torch.device("cpu")), 4)
            row.update(
                overrides=f"variant={args.variant} lr=1e-4 adam l1+quantization",
                threads=torch.get_num_threads(),
                machine=cpu_model(),
                torch=torch.__version__,
                date=time.strftime("%Y-%m-%d %H:%M"),
                parameters_M=round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            )
            rows.append(row)
            print(row, flush=True)
    append_rows(args.out, rows)


if __name__ == "__main__":
    main()
