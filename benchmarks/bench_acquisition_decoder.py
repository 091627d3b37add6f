"""Can a decoder that is told the acquisition, and judged by a discriminator that sees it, draw the scanner's texture?

    make demo && .venv/bin/python benchmarks/bench_acquisition_decoder.py --variant cgan --steps 800 \
        [--vqgan models/vqgan] [--threads 1]

The site, field-strength and voxel-size predictors fail on decoded real volumes (the autoencoder's ceiling) because
the acquisition's fingerprint is voxel-scale texture that a latent per 2x2x2 voxels does not carry
(``bench_acquisition_texture.py``: real volumes seen at the latent's scale put those predictors at chance). The
acquisition is known when a volume is decoded (the diffusion model is conditioned on it), so a decoder could *draw*
it. An L1 decoder told the acquisition draws only its mean (20th session); drawing a texture takes a source of
randomness and a loss that rewards the right texture. This probe freezes the encoder and codes of a trained
autoencoder and fine-tunes its decoder alone, from the trained weights, in one of these variants:

* ``l1``: L1 only (the control for the extra decoder steps);
* ``gan``: L1 + an unconditional finest-scale patch discriminator (hinge, feature matching, adaptive weight) and
  per-voxel noise injected before the decoder's last level (StyleGAN's noise inputs; learned per-channel strength,
  zero at the start);
* ``cgan``: as ``gan``, plus scale-shift conditioning of every decoder residual block on the acquisition (site and
  the sidecar/header covariates, by the diffusion model's ``CovariateEncoder``; zero-initialised) and a projection
  discriminator (Miyato & Koyama 2018: the patch logit plus the inner product of the patch features with an
  embedding of the acquisition), so that a texture right for one protocol but drawn for another is penalised.

Each variant is scored by the report's own code on the decoded training and held-out volumes (each decoded with its
own acquisition): the gate's checks as the autoencoder's ceiling, and the share of each covariate's predictive
advantage that the decoded volumes keep (``ceiling.kept``), with the held-out reconstruction PSNR. Appends to
``benchmarks/results/acquisition_decoder.csv`` and writes per variant its losses every 50 steps (a discriminator
stuck at a hinge loss of 1 has learned nothing) and a slice grid of real and decoded volumes, next to the table (``--out``).

``--latents continuous`` decodes the encoder's output before the codebook instead of its codes: whether the
quantizer, rather than the decoder, drops the acquisition (24th session: it drops part of it).

``--band``: the discriminator also sees the image's band above the latent's scale, amplified. Judging the image
alone, a patch discriminator could not tell a 32 dB decoder's volumes from real ones in 450 steps (hinge loss 1.00
throughout); with the band it learns within about a hundred (24th session).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_vqgan_curve import append_rows
from common import RESULTS_DIR, add_run_args, run_stamp
from torch import nn

from synthmri.catalog import PROCESSED_DIR, SYNTHETIC_DIR, VQGAN_DIR
from synthmri.config import load_params
from synthmri.diffusion.conditioning import CovariateEncoder, encode_covariates
from synthmri.logs import progress
from synthmri.losses.adversarial import adaptive_gan_weight, feature_matching_loss, hinge_d_loss, hinge_g_loss
from synthmri.models.blocks import ResidualBlock
from synthmri.models.discriminator import PatchDiscriminator
from synthmri.models.loading import load_vqgan
from synthmri.report.compute import ceiling_checks, make_extractor
from synthmri.report.families import covariates_kept, fit_real_predictors
from synthmri.report.inputs import load_report_data
from synthmri.report.protocol_sweep import acquisition_covariates
from synthmri.viz import three_plane_grid

OUT = RESULTS_DIR / "acquisition_decoder.csv"
EMB = 64


class NoiseInjection(nn.Module):
    """``h + strength_c * N(0, 1)`` per voxel (StyleGAN): the randomness a texture needs; strength starts at 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.strength = nn.Parameter(torch.zeros(1, channels, 1, 1, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.strength * torch.randn_like(h)


class TextureDecoder(nn.Module):
    """The trained decoder's layers, optionally told the acquisition (scale-shift in each residual block) and
    with noise injected before the last level's residual blocks."""

    def __init__(self, decoder: nn.Module, encoder: CovariateEncoder | None, noise: bool) -> None:
        super().__init__()
        self.layers = copy.deepcopy(decoder.layers)
        self.encoder = encoder
        blocks = [i for i, layer in enumerate(self.layers) if isinstance(layer, ResidualBlock)]
        self.noise_at = blocks[-1] if noise else None
        self.noise = NoiseInjection(self.layers[blocks[-1]].norm1.num_channels) if noise else None
        if encoder is not None:
            for i in blocks:
                block = self.layers[i]
                block.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(EMB, 2 * block.conv1.out_channels))
                nn.init.zeros_(block.emb_proj[1].weight)
                nn.init.zeros_(block.emb_proj[1].bias)

    @property
    def last_layer_weight(self) -> nn.Parameter:
        return self.layers[-1][-1].weight

    def forward(self, z: torch.Tensor, covariates) -> torch.Tensor:
        emb = self.encoder(covariates)[0] if self.encoder is not None else None
        h = z
        for i, layer in enumerate(self.layers):
            if i == self.noise_at:
                h = self.noise(h)
            h = layer(h, emb) if emb is not None and isinstance(layer, ResidualBlock) else layer(h)
        return h


def above_latent_scale(x: torch.Tensor, factor: int) -> torch.Tensor:
    """What a latent grid ``factor`` times coarser cannot resolve: ``x`` minus its ``factor``-average-pooled,
    trilinearly upsampled copy (``bench_acquisition_texture.at_latent_scale``'s complement)."""
    pooled = nn.functional.avg_pool3d(x, factor, ceil_mode=True)
    return x - nn.functional.interpolate(pooled, size=x.shape[2:], mode="trilinear")


class ProjectionPatchDiscriminator(nn.Module):
    """A :class:`PatchDiscriminator` whose patch logits add ``<features, embed(acquisition)>`` when given an encoder
    (the projection discriminator); without one it is the plain PatchGAN. With ``band_factor`` it judges the image
    and, as a second channel, its band above the latent's scale scaled by ``band_gain`` (the residual of a 32 dB
    decoder is a few per cent of the image's range: unscaled, the discriminator does not see it). Returns
    ``(logits, features)``."""

    def __init__(
        self,
        layers: int,
        channels: int,
        encoder: CovariateEncoder | None,
        band_factor: int = 0,
        band_gain: float = 10.0,
    ) -> None:
        super().__init__()
        self.band_factor, self.band_gain = band_factor, band_gain
        self.patch = PatchDiscriminator(3, 2 if band_factor else 1, channels, layers)
        self.encoder = encoder
        width = self.patch.to_logits.in_channels
        self.project = nn.Linear(EMB, width) if encoder is not None else None

    def forward(self, x: torch.Tensor, covariates) -> tuple[torch.Tensor, list[torch.Tensor]]:
        seen = torch.cat([x, self.band_gain * above_latent_scale(x, self.band_factor)], 1) if self.band_factor else x
        logits, features = self.patch(seen)
        if self.project is not None:  # the last hidden layer's features against the acquisition's embedding
            h, e = features[-1], self.project(self.encoder(covariates)[0])
            logits = logits + (h * e[:, :, None, None, None]).sum(1, keepdim=True) / h.shape[1] ** 0.5
        return logits, features


def decode_all(decoder: TextureDecoder, z: torch.Tensor, covariates, value_range, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    out = []
    with torch.inference_mode():
        for i in range(0, len(z), 8):
            index = torch.arange(i, min(i + 8, len(z)))
            out.append(decoder(z[index], covariates.select(index)).clamp(*value_range))
    return torch.cat(out)[:, 0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=("l1", "gan", "cgan"), required=True)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--vqgan", type=Path, default=VQGAN_DIR)
    parser.add_argument("--adversarial", type=float, default=0.5, help="weight of the adaptive-weighted GAN term")
    parser.add_argument("--disc-warmup", type=int, default=100, help="steps the discriminator trains alone first")
    parser.add_argument("--max-weight", type=float, default=1.0, help="cap of the adaptive GAN weight")
    parser.add_argument("--disc-lr", type=float, default=2e-4)
    parser.add_argument(
        "--band", action="store_true", help="the discriminator also sees the band above the latent's scale"
    )
    parser.add_argument("--disc-layers", type=int, default=2, help="stride-2 layers: 2 = a finest-scale patch")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--latents",
        choices=("codes", "continuous"),
        default="codes",
        help="decode the quantized codes (what the pipeline caches) or the encoder's output before the codebook",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default=None)
    add_run_args(parser, OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    params = load_params(args.params, args.overrides)
    data = load_report_data(params, PROCESSED_DIR, SYNTHETIC_DIR)
    value_range = data.value_range
    vq = load_vqgan(args.vqgan, torch.device("cpu")).eval()

    acquisition = [c for c in params.covariates if c.name == "site" or c in acquisition_covariates(params.covariates)]
    conditioned = args.variant == "cgan"
    dec_encoder = CovariateEncoder(acquisition, EMB) if conditioned else None
    decoder = TextureDecoder(vq.decoder, dec_encoder, noise=args.variant != "l1").train()
    adversarial = args.variant != "l1"
    disc = ProjectionPatchDiscriminator(
        args.disc_layers,
        params.vqgan.discriminator.channels,
        CovariateEncoder(acquisition, EMB) if conditioned else None,
        band_factor=vq.downsample_factor if args.band else 0,
    )

    def codes_and_covariates(volumes: np.ndarray, rows):
        with torch.inference_mode():
            quantize = args.latents == "codes"
            z = torch.cat(
                [vq.encode(torch.from_numpy(volumes[i : i + 8])[:, None], quantize) for i in range(0, len(volumes), 8)]
            )
        return z, encode_covariates(acquisition, rows)

    train_rows = data.real.iloc[data.train_index].to_dict("records")
    ref_rows = data.real.iloc[data.reference_index].to_dict("records")
    z_train, c_train = codes_and_covariates(data.train, train_rows)
    z_ref, c_ref = codes_and_covariates(data.reference, ref_rows)
    x_train = torch.from_numpy(data.train)[:, None]

    opt_g = torch.optim.AdamW(decoder.parameters(), lr=args.lr, betas=(0.5, 0.9), weight_decay=1e-4)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9), weight_decay=1e-4)
    generator = torch.Generator().manual_seed(args.seed)
    started, log = time.process_time(), []
    for step in progress(range(args.steps), f"Fine-tuning the decoder ({args.variant})", "step"):
        index = torch.randint(len(x_train), (params.vqgan.train.batch_size,), generator=generator)
        x, cov = x_train[index], c_train.select(index)
        fake = decoder(z_train[index], cov)
        l1 = (fake - x).abs().mean()
        loss, g_loss, d_loss = l1, torch.zeros(()), torch.zeros(())
        if adversarial and step >= args.disc_warmup:
            logits_fake, feats_fake = disc(fake, cov)
            with torch.no_grad():
                _, feats_real = disc(x, cov)
            g_loss = hinge_g_loss(logits_fake) + feature_matching_loss(feats_real, feats_fake)
            weight = adaptive_gan_weight(l1, g_loss, decoder.last_layer_weight, args.max_weight)
            loss = l1 + args.adversarial * weight * g_loss
        opt_g.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt_g.step()
        if adversarial:
            logits_real, _ = disc(x, cov)
            logits_fake, _ = disc(fake.detach(), cov)
            d_loss = hinge_d_loss(logits_real, logits_fake)
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
        if step % 50 == 0 or step == args.steps - 1:
            noise = float(decoder.noise.strength.detach().abs().mean()) if decoder.noise is not None else 0.0
            log.append((step, l1.item(), g_loss.item(), d_loss.item(), noise))
            print(
                f"step {step} l1 {l1.item():.4f} g {g_loss.item():.3f} d {d_loss.item():.3f} noise {noise:.4f} "
                f"cpu {time.process_time() - started:.0f}s",
                flush=True,
            )
    cpu_minutes = (time.process_time() - started) / 60

    decoder.eval()
    decoded_train = decode_all(decoder, z_train, c_train, value_range, args.seed)
    decoded_ref = decode_all(decoder, z_ref, c_ref, value_range, args.seed + 1)
    extractor = make_extractor(params.report, value_range, "cpu")
    with torch.inference_mode():
        f_train, f_ref = extractor(data.train), extractor(data.reference)
        f_dec_train, f_dec_ref = extractor(decoded_train), extractor(decoded_ref)
    kept = covariates_kept(fit_real_predictors(data, params.covariates, f_train, f_ref), f_dec_train, f_dec_ref)
    checks = {c.name: c for c in ceiling_checks(params, data, decoded_train, extractor)}
    mse = ((decoded_ref - data.reference) ** 2).mean(axis=(1, 2, 3))
    psnr = float(np.mean(10 * np.log10(data.data_range**2 / mse)))
    label = args.label or f"{args.variant}-{args.steps}"
    row = {
        "label": label,
        "variant": args.variant,
        "steps": args.steps,
        "cpu_minutes": round(cpu_minutes, 2),
        "adversarial": args.adversarial if adversarial else 0.0,
        "disc_layers": args.disc_layers,
        "disc_warmup": args.disc_warmup,
        "max_weight": args.max_weight,
        "disc_lr": args.disc_lr,
        "band": args.band,
        "vqgan": str(args.vqgan),
        "latents": args.latents,
        "heldout_psnr": round(psnr, 2),
        "failed": ",".join(n for n, c in checks.items() if c.status == "fail"),
        **{f"check.{n}": round(float(c.value), 4) for n, c in checks.items()},
        **{f"kept.{k}": round(float(v), 4) for k, v in kept.items()},
        **run_stamp(),
    }
    append_rows(args.out, [row])
    losses = pd.DataFrame(log, columns=["step", "l1", "generator", "discriminator", "noise_strength"])
    losses.to_csv(args.out.parent / f"acquisition_decoder_{label}_losses.csv", index=False)
    print("RESULT", label, f"psnr {psnr:.2f}", "failed:", row["failed"])
    print("  checks:", "  ".join(f"{n} {c.value:.3f}" for n, c in checks.items()))
    print("  kept:", "  ".join(f"{k} {v:.3f}" for k, v in kept.items() if k.endswith(".kept")))
    show = [0, 1, 2]
    vols, titles = [], []
    for i in show:
        vols += [data.train[i], decoded_train[i]]
        site = train_rows[i].get("site")
        titles += [f"real {i} ({site})", f"decoded {i}, {label}"]
    three_plane_grid(vols, titles, args.out.parent / f"acquisition_decoder_{label}.png", data.spacing)


if __name__ == "__main__":
    main()
