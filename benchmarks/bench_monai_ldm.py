"""MONAI Generative's 3D latent-diffusion recipe end to end at our demo's CPU-minutes, scored by our gate (issue 16).

    .venv/bin/python benchmarks/bench_monai_ldm.py --ae-cpu-minutes 10 --diffusion-cpu-minutes 8.7 --samples 32

The anchor is MONAI GenerativeModels' ``tutorials/generative/3d_ldm`` (now in MONAI 1.6.1, the ``bench`` extra):

- **autoencoder**: ``AutoencoderKL(channels=(32, 64, 64), latent_channels=3, num_res_blocks=1,
  norm_num_groups=16, attention_levels=(False, False, True))`` (×4 down), L1 + KL (weight 1e-6) +
  perceptual (0.001) + least-squares patch adversarial (0.01, after a warm-up: the tutorial's 5 of 100
  epochs, here the first 5 % of the budget), ``PatchDiscriminator(num_layers_d=3, channels=32)``, Adam
  lr 1e-4 for both, batch 2. The tutorial's perceptual network (SqueezeNet LPIPS, ImageNet weights) cannot
  be downloaded here: our 2.5D LPIPS with the backbone ``vqgan.loss`` configures stands in (printed);
- **diffusion**: ``DiffusionModelUNet(channels=(32, 64, 64), attention_levels=(False, True, True),
  num_res_blocks=1, num_head_channels=(0, 64, 64))``, ``DDPMScheduler(1000, scaled_linear_beta, 0.0015,
  0.0195)``, ε-prediction MSE, Adam lr 1e-4, batch 2, latents scaled by ``1 / std(z)``, **unconditional**
  (the tutorial is; it cannot follow age, sex or site, so its conditioning checks measure nothing it
  tried to do). The U-Net halves the latent twice; our 10×12×10 latent is replicate-padded to 12×12×12
  for it and cropped back after sampling. Sampling: the tutorial's DDPM, 1000 steps.

Each stage trains for a budget of *process CPU time*, the same as our demo's stage (``train_vqgan`` ≈ 10,
``train_diffusion`` ≈ 8.7 CPU-min on this machine), so it can share a busy machine and still be compared.
The generated volumes are scored exactly as the ``report`` stage scores a set (same real volumes, held-out
split, extractor, gate), with the test split's reconstruction PSNR/SSIM for the two autoencoder checks.
The training latents' per-subject encoding uses the posterior mean plus the tutorial's reparameterized
noise at each step (what its on-the-fly ``encode_stage_2_inputs`` does, without re-running the encoder).

Writes ``benchmarks/results/monai_ldm.json`` (metrics, gate, times) and ``monai_ldm_samples.png``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from common import add_run_args, run_stamp

from synthmri.catalog import PROCESSED_DIR, SPACE_FILE
from synthmri.config import load_params
from synthmri.data.datasets import ProcessedVolumes
from synthmri.losses.perceptual import LPIPS25D
from synthmri.metrics.reconstruction import score_reconstructions
from synthmri.report.compute import compute_set_metrics
from synthmri.report.gate import evaluate_gate
from synthmri.report.inputs import ReportData
from synthmri.synthesis.plan import make_plan
from synthmri.training.runtime import batch_indices
from synthmri.viz import three_plane_grid

OUT = Path(__file__).parent / "results" / "monai_ldm.json"
BATCH = 2  # the tutorial's data loader
LR = 1e-4
KL_WEIGHT, PERCEPTUAL_WEIGHT, ADV_WEIGHT, WARMUP_FRACTION = 1e-6, 1e-3, 1e-2, 0.05


class PosteriorMean(torch.nn.Module):
    """MONAI's ``AutoencoderKL`` behind our ``encode``/``decode`` names (posterior mean, as at test time)."""

    def __init__(self, autoencoder: torch.nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def encode(self, x: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """The posterior mean; ``quantize`` is ours (a KL autoencoder has no codebook: its latents are continuous)."""
        return self.autoencoder.encode(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z)


def train_autoencoder(train_set: ProcessedVolumes, lpips: LPIPS25D, budget_s: float, seed: int):
    from monai.losses import PatchAdversarialLoss
    from monai.networks.nets import AutoencoderKL, PatchDiscriminator

    autoencoder = AutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=(32, 64, 64),
        latent_channels=3,
        num_res_blocks=1,
        norm_num_groups=16,
        attention_levels=(False, False, True),
    )
    discriminator = PatchDiscriminator(spatial_dims=3, num_layers_d=3, channels=32, in_channels=1, out_channels=1)
    adversarial = PatchAdversarialLoss(criterion="least_squares")
    opt_g = torch.optim.Adam(autoencoder.parameters(), lr=LR)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=LR)
    cpu_s, step, log = 0.0, 0, {}
    while cpu_s < budget_s:
        began = time.process_time()
        x = train_set.batch(batch_indices(len(train_set), BATCH, seed, step))
        recon, z_mu, z_sigma = autoencoder(x)
        kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1, dim=[1, 2, 3, 4]).mean()
        l1 = F.l1_loss(recon.float(), x.float())
        loss_g = l1 + KL_WEIGHT * kl + PERCEPTUAL_WEIGHT * lpips(recon.float(), x.float())
        adversarial_on = cpu_s >= WARMUP_FRACTION * budget_s
        if adversarial_on:
            logits_fake = discriminator(recon.contiguous().float())[-1]
            loss_g = loss_g + ADV_WEIGHT * adversarial(logits_fake, target_is_real=True, for_discriminator=False)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if adversarial_on:
            logits_fake = discriminator(recon.contiguous().detach())[-1]
            logits_real = discriminator(x.contiguous().detach())[-1]
            loss_d = 0.5 * (
                adversarial(logits_fake, target_is_real=False, for_discriminator=True)
                + adversarial(logits_real, target_is_real=True, for_discriminator=True)
            )
            opt_d.zero_grad(set_to_none=True)
            (ADV_WEIGHT * loss_d).backward()
            opt_d.step()
        step += 1
        cpu_s += time.process_time() - began
        log = {"ae_steps": step, "ae_cpu_minutes": round(cpu_s / 60, 2), "ae_l1": round(float(l1), 4)}
        if step % 20 == 0:
            print(json.dumps(log), flush=True)
    return autoencoder.eval(), log


def pad_to_multiple(z: torch.Tensor, multiple: int = 4) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Replicate-pad the spatial dims of ``z`` up to a multiple (the U-Net halves them twice)."""
    shape = z.shape[2:]
    pads = [(-s) % multiple for s in shape]
    flat = [p for pad in reversed(pads) for p in (0, pad)]
    return F.pad(z, flat, mode="replicate"), tuple(shape)


def train_diffusion(z_mu: torch.Tensor, z_sigma: torch.Tensor, scale: float, budget_s: float, seed: int):
    from monai.networks.nets import DiffusionModelUNet
    from monai.networks.schedulers import DDPMScheduler

    unet = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=3,
        out_channels=3,
        num_res_blocks=1,
        channels=(32, 64, 64),
        attention_levels=(False, True, True),
        num_head_channels=(0, 64, 64),
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195
    )
    optimizer = torch.optim.Adam(unet.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(seed)
    cpu_s, step, log = 0.0, 0, {}
    while cpu_s < budget_s:
        began = time.process_time()
        index = batch_indices(len(z_mu), BATCH, seed, step)
        eps_z = torch.randn(z_mu[index].shape, generator=generator)
        z, _ = pad_to_multiple((z_mu[index] + z_sigma[index] * eps_z) * scale)
        noise = torch.randn(z.shape, generator=generator)
        t = torch.randint(0, scheduler.num_train_timesteps, (len(z),), generator=generator)
        loss = F.mse_loss(unet(scheduler.add_noise(z, noise, t), timesteps=t), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        cpu_s += time.process_time() - began
        log = {"diffusion_steps": step, "diffusion_cpu_minutes": round(cpu_s / 60, 2), "diffusion_loss": float(loss)}
        if step % 100 == 0:
            print(json.dumps(log), flush=True)
    return unet.eval(), scheduler, log


@torch.inference_mode()
def sample(autoencoder, unet, scheduler, latent_shape, scale: float, n: int, seed: int, chunk: int = 16):
    """The tutorial's DDPM sampling (1000 steps), decoded; volumes in the data's range, ``(n, D, H, W)``."""
    generator = torch.Generator().manual_seed(seed)
    volumes = []
    for first in range(0, n, chunk):
        count = min(chunk, n - first)
        padded = [s + (-s) % 4 for s in latent_shape[1:]]
        z = torch.randn((count, latent_shape[0], *padded), generator=generator)
        scheduler.set_timesteps(num_inference_steps=1000)
        for t in scheduler.timesteps:
            eps = unet(z, timesteps=torch.full((count,), int(t)))
            z, _ = scheduler.step(eps, int(t), z, generator=generator)
        z = z[..., : latent_shape[1], : latent_shape[2], : latent_shape[3]] / scale
        volumes.append(autoencoder.decode(z).clamp(-1, 1)[:, 0].numpy())
        print(json.dumps({"sampled": first + count}), flush=True)
    return np.concatenate(volumes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ae-cpu-minutes", type=float, default=10.0)
    parser.add_argument("--diffusion-cpu-minutes", type=float, default=8.7)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    add_run_args(parser, OUT)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    params = load_params(args.params, args.overrides)
    params = params.model_copy(update={"sample": params.sample.model_copy(update={"n_samples": args.samples})})
    value_range = tuple(params.normalize.out_range)
    lpips, backbone = LPIPS25D.from_params(params.vqgan.loss)
    print(f"perceptual loss: our 2.5D LPIPS, backbone {backbone} (the tutorial's SqueezeNet weights are not offline)")

    train_set = ProcessedVolumes(PROCESSED_DIR, "train")
    wall0 = time.perf_counter()
    autoencoder, ae_log = train_autoencoder(train_set, lpips, args.ae_cpu_minutes * 60, args.seed)
    with torch.inference_mode():
        posterior = [autoencoder.encode(v[None].float()) for v in train_set.volumes]
    z_mu, z_sigma = torch.cat([p[0] for p in posterior]), torch.cat([p[1] for p in posterior])
    scale = float(1 / z_mu.std())
    unet, scheduler, diffusion_log = train_diffusion(z_mu, z_sigma, scale, args.diffusion_cpu_minutes * 60, args.seed)
    sample_began = time.perf_counter()
    volumes = sample(autoencoder, unet, scheduler, tuple(z_mu.shape[1:]), scale, args.samples, args.seed)
    sample_minutes = (time.perf_counter() - sample_began) / 60

    real = ProcessedVolumes(PROCESSED_DIR, split=None)
    space = json.loads(SPACE_FILE.read_text())
    manifest = real.manifest
    plan = make_plan(params, manifest[manifest["split"] == "train"])  # what the set is asked for (ignored here)
    synthetic = pd.DataFrame(plan)
    synthetic["file"] = [f"sample-{i:06d}.nii.gz" for i in range(len(synthetic))]
    data = ReportData(
        real=manifest,
        real_volumes=np.stack([v[0].numpy() for v in real.volumes]),
        synthetic=synthetic,
        synthetic_volumes=volumes,
        space=space,
        reference_splits=list(params.report.reference_splits),
    )
    metrics = compute_set_metrics(params, data, intervals=True).metrics
    test = ProcessedVolumes(PROCESSED_DIR, params.report.recon_split)
    recon = score_reconstructions(PosteriorMean(autoencoder), test.volumes, lpips, torch.device("cpu"), value_range)
    metrics.update({f"recon.{k}": v for k, v in recon.summary().items()})
    checks = evaluate_gate(metrics, params.report.thresholds)
    result = {
        "recipe": "MONAI GenerativeModels 3d_ldm tutorial (AutoencoderKL + DiffusionModelUNet, DDPM 1000)",
        **ae_log,
        **diffusion_log,
        "sample_minutes": round(sample_minutes, 2),
        "wall_minutes": round((time.perf_counter() - wall0) / 60, 2),
        "scale_factor": scale,
        "gate": {c.name: {"value": c.value, "threshold": c.threshold, "status": c.status} for c in checks},
        "gate_n_failed": sum(c.status == "fail" for c in checks),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
        **run_stamp(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float))
    for c in checks:
        print(f"{c.name:28s} {c.value!s:>24s} {c.status}")
    three_plane_grid(
        [volumes[i] for i in range(min(4, len(volumes)))],
        [f"#{i} (unconditional)" for i in range(min(4, len(volumes)))],
        args.out.parent / "monai_ldm_samples.png",
        space["spacing_mm"],
        suptitle=f"MONAI 3D LDM tutorial recipe after {args.ae_cpu_minutes:g} + {args.diffusion_cpu_minutes:g} CPU-min",
    )


if __name__ == "__main__":
    main()
