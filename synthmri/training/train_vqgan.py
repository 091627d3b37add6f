"""The ``train_vqgan`` stage: train the 3D VQ-GAN (or, with perceptual = adversarial = 0, the VQ-VAE).

Generator loss: L1 + perceptual (2.5D LPIPS) + commitment, and once the discriminator is switched
on (``disc_start_step``) hinge adversarial loss scaled by the adaptive weight plus GAN feature
matching. Checkpoints every ``checkpoint_every`` steps; a restarted stage resumes from the newest
checkpoint of the same configuration (models, optimizers, codebook, step, history).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from synthmri.config import Params
from synthmri.data.datasets import ProcessedVolumes
from synthmri.data.normalize import PROCESSED_DIR
from synthmri.io import sha256_file, write_csv_atomic, write_text_atomic
from synthmri.logs import get_logger
from synthmri.losses.adversarial import adaptive_gan_weight, feature_matching_loss, hinge_d_loss, hinge_g_loss
from synthmri.losses.perceptual import LPIPS25D
from synthmri.metrics.image import psnr, ssim3d
from synthmri.models.loading import save_weights
from synthmri.models.discriminator import PatchDiscriminator, SliceDiscriminator
from synthmri.models.vqgan import VQGAN
from synthmri.training.checkpoint import latest_checkpoint, save_checkpoint
from synthmri.training.runtime import autocast, pick_device, rng_state, seed_everything, set_rng_state
from synthmri.viz import three_plane_grid

log = get_logger(__name__)

MODEL_DIR = Path("models/vqgan")
CHECKPOINT_DIR = Path("models/checkpoints/vqgan")
REPORT_DIR = Path("reports/vqgan")
METRICS_FILE = Path("reports/vqgan.json")


def config_fingerprint(params: Params, data_manifest: Path) -> str:
    """Checkpoints resume only into the same configuration and the same training data; the step
    budget and logging cadence may change (extending a run resumes it)."""
    schedule_only = {"steps", "checkpoint_every", "val_every", "log_every", "num_workers", "device"}
    config = params.vqgan.model_dump(mode="json")
    config["train"] = {k: v for k, v in config["train"].items() if k not in schedule_only}
    blob = json.dumps({"vqgan": config, "seed": params.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode() + sha256_file(data_manifest).encode()).hexdigest()[:16]


def build_models(params: Params, device: torch.device) -> tuple[VQGAN, torch.nn.ModuleList]:
    cfg = params.vqgan
    model = VQGAN.from_params(cfg.model, cfg.quantizer).to(device)
    discriminators = torch.nn.ModuleList()
    if cfg.loss.adversarial > 0:
        discriminators.append(PatchDiscriminator.from_params(cfg.discriminator))
        if cfg.discriminator.slice_discriminator:
            discriminators.append(SliceDiscriminator.from_params(cfg.discriminator))
    return model, discriminators.to(device)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The batch of a step depends only on (seed, step): a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(n, (batch_size,), generator=generator)


@torch.inference_mode()
def validate(model: VQGAN, volumes: ProcessedVolumes, lpips: LPIPS25D, device: torch.device,
             data_range: float) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """PSNR, SSIM (3D, scikit-image) and 2.5D LPIPS of the reconstructions of ``volumes``."""
    model.eval()
    scores = {"psnr": [], "ssim": [], "lpips": []}
    example = None
    for index in range(len(volumes)):
        x = volumes.batch([index]).to(device)
        recon = model.decode(model.encode(x)).clamp(-1, 1)
        real, fake = x[0, 0].float().cpu().numpy(), recon[0, 0].float().cpu().numpy()
        scores["psnr"].append(psnr(real, fake, data_range))
        scores["ssim"].append(ssim3d(real, fake, data_range))
        scores["lpips"].append(float(lpips(x.float(), recon.float())))
        example = example or (real, fake)
    model.train()
    return {k: float(np.mean(v)) for k, v in scores.items()}, example


class VQGANTrainer:
    """One training run: holds the models, optimizers and history so that resume is one load."""

    def __init__(self, params: Params, processed_dir: Path = PROCESSED_DIR, checkpoint_dir: Path = CHECKPOINT_DIR):
        self.params, self.cfg = params, params.vqgan
        self.device = pick_device(self.cfg.train.device)
        seed_everything(params.seed)
        self.train_set = ProcessedVolumes(processed_dir, "train")
        self.val_set = ProcessedVolumes(processed_dir, "val")
        if len(self.train_set) == 0:
            from synthmri.errors import StageError
            raise StageError("the training split is empty: check normalize.split")
        self.data_range = float(np.diff(params.normalize.out_range)[0])
        self.model, self.discriminators = build_models(params, self.device)
        t = self.cfg.train
        self.opt_g = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.opt_d = (torch.optim.AdamW(self.discriminators.parameters(), lr=t.lr_discriminator, betas=t.betas,
                                        weight_decay=t.weight_decay) if len(self.discriminators) else None)
        self.lpips_metric, self.backbone = LPIPS25D.from_params(self.cfg.loss, random_slices=False)
        self.lpips_loss = LPIPS25D(self.lpips_metric.net, self.cfg.loss.lpips_slices_per_axis, random_slices=True)
        self.lpips_metric.to(self.device), self.lpips_loss.to(self.device)
        self.checkpoint_dir = checkpoint_dir
        self.fingerprint = config_fingerprint(params, Path(processed_dir) / "manifest.csv")
        self.step, self.history, self.val_history = 0, [], []

    # -- state -----------------------------------------------------------------------------------

    def state(self) -> dict:
        return {"fingerprint": self.fingerprint, "model": self.model.state_dict(),
                "discriminators": self.discriminators.state_dict(), "opt_g": self.opt_g.state_dict(),
                "opt_d": self.opt_d.state_dict() if self.opt_d else {}, "history": self.history,
                "val_history": self.val_history, "rng": rng_state()}

    def resume(self) -> bool:
        state = latest_checkpoint(self.checkpoint_dir)
        if state is None:
            return False
        if state.get("fingerprint") != self.fingerprint:
            log.warning("Ignoring checkpoints in %s: they belong to another configuration or data set",
                        self.checkpoint_dir)
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            return False
        self.model.load_state_dict(state["model"])
        self.discriminators.load_state_dict(state["discriminators"])
        self.opt_g.load_state_dict(state["opt_g"])
        if self.opt_d:
            self.opt_d.load_state_dict(state["opt_d"])
        self.step, self.history, self.val_history = state["step"], state["history"], state["val_history"]
        set_rng_state(state["rng"])
        log.info("Resuming VQ-GAN training from the checkpoint at step %d", self.step)
        return True

    # -- one step --------------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        loss_cfg, t = self.cfg.loss, self.cfg.train
        gan_on = self.opt_d is not None and self.step >= loss_cfg.disc_start_step
        generator = torch.Generator().manual_seed(self.params.seed + self.step)
        with autocast(self.device):
            recon, vq_loss, stats = self.model(x)
            l1 = (recon - x).abs().mean()
            perceptual = self.lpips_loss(x, recon, generator) if loss_cfg.perceptual > 0 else torch.zeros(())
            rec_loss = loss_cfg.l1 * l1 + loss_cfg.perceptual * perceptual
            g_adv = fm = gan_weight = torch.zeros((), device=x.device)
            if gan_on:
                outputs_fake = [d(recon) for d in self.discriminators]
                with torch.no_grad():
                    outputs_real = [d(x) for d in self.discriminators]
                g_adv = sum(hinge_g_loss(logits) for logits, _ in outputs_fake)
                fm = sum(feature_matching_loss(real_f, fake_f)
                         for (_, real_f), (_, fake_f) in zip(outputs_real, outputs_fake))
                gan_weight = adaptive_gan_weight(rec_loss, g_adv, self.model.last_layer_weight) * loss_cfg.adversarial
            loss = rec_loss + vq_loss + gan_weight * g_adv + loss_cfg.feature_matching * fm
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.opt_g.step()

        d_loss = torch.zeros(())
        if gan_on:
            with autocast(self.device):
                d_loss = sum(hinge_d_loss(d(x)[0], d(recon.detach())[0]) for d in self.discriminators)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.discriminators.parameters(), t.grad_clip)
            self.opt_d.step()
        values = {"loss": loss, "l1": l1, "perceptual": perceptual, "vq": vq_loss, "g_adv": g_adv,
                  "feature_matching": fm, "gan_weight": gan_weight, "d_loss": d_loss,
                  "perplexity": stats["perplexity"], "codebook_usage": stats["usage"]}
        return {name: float(value.detach()) for name, value in values.items()}


def _write_outputs(trainer: VQGANTrainer, model_dir: Path, report_dir: Path, metrics_file: Path,
                   val_scores: dict[str, float], example, throughput: float) -> dict:
    config = {"vqgan": trainer.params.vqgan.model_dump(mode="json"),
              "normalize": trainer.params.normalize.model_dump(mode="json"),
              "lpips_backbone": trainer.backbone, "steps": trainer.step}
    save_weights(trainer.model, config, model_dir)
    write_csv_atomic(pd.DataFrame(trainer.history), report_dir / "losses.csv")
    write_csv_atomic(pd.DataFrame(trainer.val_history), report_dir / "validation.csv")
    if example is not None:
        three_plane_grid([example[0], example[1]], ["real (val)", "reconstruction"], report_dir / "reconstruction.png")
    last = trainer.history[-1] if trainer.history else {}
    metrics = {"val_psnr": val_scores["psnr"], "val_ssim": val_scores["ssim"], "val_lpips": val_scores["lpips"],
               "codebook_usage": last.get("codebook_usage", 0.0), "perplexity": last.get("perplexity", 0.0),
               "steps": trainer.step, "train_volumes_per_s": throughput,
               "model": "vqvae" if trainer.opt_d is None and trainer.cfg.loss.perceptual == 0 else "vqgan",
               "lpips_backbone": trainer.backbone}
    write_text_atomic(metrics_file, json.dumps(metrics, indent=2))
    return metrics


def run_train_vqgan(params: Params, processed_dir: Path = PROCESSED_DIR, model_dir: Path = MODEL_DIR,
                    checkpoint_dir: Path = CHECKPOINT_DIR, report_dir: Path = REPORT_DIR,
                    metrics_file: Path = METRICS_FILE, track: bool = True) -> dict:
    """Train (or resume), validate, write ``model_dir`` and the metrics; log everything to MLflow."""
    import contextlib

    from synthmri import tracking

    trainer = VQGANTrainer(params, processed_dir, checkpoint_dir)
    t = trainer.cfg.train
    run_ctx = tracking.stage_run("train_vqgan", params.model_dump(mode="json")) if track else contextlib.nullcontext()
    with run_ctx as run:
        if track:
            import mlflow
            mlflow.set_tag("lpips_backbone", trainer.backbone)
        trainer.resume()
        log.info("Training the %s on %d volumes (%d validation) for %d steps on %s; LPIPS backbone: %s",
                 "VQ-GAN" if trainer.opt_d else "VQ-VAE", len(trainer.train_set), len(trainer.val_set), t.steps,
                 trainer.device, trainer.backbone)
        bar = tqdm(total=t.steps * t.batch_size, initial=trainer.step * t.batch_size, unit="vol",
                   desc="Training VQ-GAN", dynamic_ncols=True, mininterval=1.0)
        trainer.model.train()
        started, done_volumes = time.perf_counter(), 0
        while trainer.step < t.steps:
            indices = batch_indices(len(trainer.train_set), t.batch_size, params.seed, trainer.step)
            losses = trainer.train_step(trainer.train_set.batch(indices).to(trainer.device))
            trainer.step += 1
            done_volumes += t.batch_size
            bar.update(t.batch_size)
            bar.set_postfix(l1=f"{losses['l1']:.4f}", vq=f"{losses['vq']:.4f}", use=f"{losses['codebook_usage']:.2f}")
            if trainer.step % t.log_every == 0 or trainer.step == t.steps:
                trainer.history.append({"step": trainer.step, **losses})
                if track:
                    import mlflow
                    mlflow.log_metrics(losses, step=trainer.step)
            if trainer.step % t.val_every == 0 and trainer.step < t.steps and len(trainer.val_set):
                scores, _ = validate(trainer.model, trainer.val_set, trainer.lpips_metric, trainer.device,
                                     trainer.data_range)
                trainer.val_history.append({"step": trainer.step, **scores})
                if track:
                    import mlflow
                    mlflow.log_metrics({f"val_{k}": v for k, v in scores.items()}, step=trainer.step)
            if trainer.step % t.checkpoint_every == 0 and trainer.step < t.steps:
                save_checkpoint(checkpoint_dir, trainer.step, trainer.state())
        bar.close()
        throughput = done_volumes / max(time.perf_counter() - started, 1e-9)
        val_set = trainer.val_set if len(trainer.val_set) else trainer.train_set
        scores, example = validate(trainer.model, val_set, trainer.lpips_metric, trainer.device, trainer.data_range)
        trainer.val_history.append({"step": trainer.step, **scores})
        metrics = _write_outputs(trainer, model_dir, report_dir, metrics_file, scores, example, throughput)
        log.info("Validation after %d steps: PSNR %.2f dB, SSIM %.3f, LPIPS %.3f; codebook usage %.0f%%",
                 trainer.step, scores["psnr"], scores["ssim"], scores["lpips"], 100 * metrics["codebook_usage"])
        if track:
            import mlflow
            mlflow.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=trainer.step)
            mlflow.log_artifact(str(report_dir / "reconstruction.png"), artifact_path="figures")
            version = tracking.register_model("synthmri-vqgan", model_dir, run,
                                              {"sha256": sha256_file(model_dir / "model.safetensors")})
            metrics["registry_version"] = version
            write_text_atomic(model_dir / "registry.json",
                              json.dumps({"name": "synthmri-vqgan", "version": version}, indent=2))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # finished: checkpoints only serve interrupted runs
    return metrics
