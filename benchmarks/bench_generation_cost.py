"""FLOPs per generated volume, and what 1,000 volumes would cost on one GPU: the arithmetic of the 100k plan.

    .venv/bin/python benchmarks/bench_generation_cost.py [--params params.yaml profiles/ukbb-1mm.yaml] \\
        [--gpu-tflops 989] [--efficiency 0.25 0.5] [--gpu-hour-usd 3.0] [--measured-vol-per-min 145]

For each parameters file, the models are built on PyTorch's ``meta`` device (no weights, no memory, no
GPU) and ``torch.utils.flop_counter`` counts one sampler step of the U-Net (a batch of 2: classifier-free
guidance runs the conditional and the unconditional branch) and one VQ-GAN decode at that profile's
resolution. GFLOP per volume = steps x U-Net step + decode.

The GPU figure is an **estimate**, not a measurement: seconds per 1,000 volumes = 1,000 x GFLOP per volume /
(``--gpu-tflops`` x ``--efficiency``). The default peak is an H100 SXM's dense bf16 tensor-core rate
(989 TFLOP/s, NVIDIA's datasheet); the efficiency range is an assumption for 3D convolutions and
attention at these sizes, to be replaced by a measurement on the GPU (the ``device`` path). With
``--measured-vol-per-min`` (this machine's measured rate for the first parameters file), the CPU's
achieved GFLOP/s is printed as a check on the count.

Writes ``benchmarks/results/generation_cost.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import ROOT, run_stamp
from torch.utils.flop_counter import FlopCounterMode

from synthmri.config import load_params
from synthmri.models.loading import build_ldm
from synthmri.models.vqgan import VQGAN

OUT = Path(__file__).parent / "results" / "generation_cost.json"


def count(function) -> float:
    """GFLOP of one call (convolutions, matmuls, attention; elementwise operations are not counted)."""
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops() / 1e9


def volume_cost(params_path: Path) -> dict:
    params = load_params(params_path)
    shape = tuple(params.normalize.shape)
    factor = params.vqgan.model.downsample_factor
    latent = (params.vqgan.model.latent_channels, *(s // factor for s in shape))
    with torch.device("meta"):
        ldm = build_ldm(params.diffusion.unet, list(params.covariates), latent[0]).eval()
        vqgan = VQGAN.from_params(params.vqgan.model, params.vqgan.quantizer).eval()
        x, t, cond = torch.zeros(2, *latent), torch.zeros(2), torch.zeros(2, ldm.unet.emb_dim)
        z = torch.zeros(1, *latent)
        with torch.no_grad():
            unet_step = count(lambda: ldm.unet(x, t, cond))
            decode = count(lambda: vqgan.decode(z))
    steps = params.diffusion.sampler.steps
    return {
        "params": str(params_path),
        "shape": list(shape),
        "spacing_mm": list(params.normalize.spacing),
        "latent": list(latent),
        "unet_parameters_m": round(sum(p.numel() for p in ldm.unet.parameters()) / 1e6, 1),
        "sampler": f"{params.diffusion.sampler.sampler} {steps} steps, guidance {params.diffusion.sampler.guidance_scale}",
        "gflop_unet_step_cfg": round(unet_step, 2),
        "gflop_decode": round(decode, 2),
        "gflop_per_volume": round(steps * unet_step + decode, 1),
        "voxels": int(torch.tensor(shape).prod()),
        "nifti_mb_float32": round(4 * int(torch.tensor(shape).prod()) / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--params", type=Path, nargs="+", default=[ROOT / "params.yaml", ROOT / "profiles/ukbb-1mm.yaml"]
    )
    parser.add_argument("--gpu-tflops", type=float, default=989.0)
    parser.add_argument("--efficiency", type=float, nargs=2, default=[0.25, 0.5])
    parser.add_argument("--gpu-hour-usd", type=float, default=3.0)
    parser.add_argument("--measured-vol-per-min", type=float, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = [volume_cost(p) for p in args.params]
    for row in rows:
        for name, eff in zip(("optimistic", "pessimistic"), sorted(args.efficiency, reverse=True)):
            seconds = 1000 * row["gflop_per_volume"] / (args.gpu_tflops * 1e3 * eff)
            row[f"gpu_hours_per_1000_{name}"] = round(seconds / 3600, 3)
            row[f"usd_per_1000_{name}"] = round(seconds / 3600 * args.gpu_hour_usd, 2)
    if args.measured_vol_per_min:
        rows[0]["cpu_measured_vol_per_min"] = args.measured_vol_per_min
        rows[0]["cpu_achieved_gflops"] = round(rows[0]["gflop_per_volume"] * args.measured_vol_per_min / 60, 1)
    result = {
        **run_stamp(),
        "assumptions": {
            "gpu_peak_tflops_bf16_dense": args.gpu_tflops,
            "efficiency_range": args.efficiency,
            "gpu_hour_usd": args.gpu_hour_usd,
            "note": "estimate from counted FLOPs; not measured on a GPU",
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| profile | shape | U-Net params | GFLOP/volume | GPU-h per 1,000 | USD per 1,000 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {Path(r['params']).name} | {r['shape']} | {r['unet_parameters_m']} M | {r['gflop_per_volume']} | "
            f"{r['gpu_hours_per_1000_optimistic']}–{r['gpu_hours_per_1000_pessimistic']} | "
            f"{r['usd_per_1000_optimistic']}–{r['usd_per_1000_pessimistic']} |"
        )


if __name__ == "__main__":
    main()
