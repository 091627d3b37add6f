"""Diffusion quality against CPU-minutes, the autoencoder fixed: the report's gate metrics along a run.

    .venv/bin/python benchmarks/bench_diffusion_curve.py --label base --cpu-minutes 10 --seeds 0 1 \\
        [--threads 1] [--points 4] [--samples 32] [--raw] [--final-guidance 1 4] \\
        [-S diffusion.train.loss_weighting=min_snr ...]

Trains the latent diffusion model of ``--params`` (plus overrides) on ``data/latents`` with the VQ-GAN of
``models/vqgan`` (run ``dvc repro encode`` first) for ``--cpu-minutes`` of *process CPU time* per repeat,
so runs can share a busy machine and still be compared. The schedule length (``diffusion.train.steps``,
which an lr decay refers to) is set from a timed probe of the step cost, unless ``--steps`` is given.

At ``--points`` times along the run (time not counted) the EMA model (and with ``--raw`` the raw weights
too) generates ``--samples`` volumes for the covariates of the ``sample`` stage's plan, with the configured
sampler, decodes them with the VQ-GAN exactly as the ``sample`` stage does, and scores them with the
``report`` stage's metrics against the real held-out volumes: FD ratio, precision, coverage, effect ratios,
predictor errors, diversity, intensities, privacy, and the number of failing gate checks (the two
reconstruction checks do not apply: the autoencoder is fixed). Each row also has the denoiser's error at
a few timesteps on the validation latents (``x0_mse_t<t>``: mean squared error of the clean latent it implies)
next to the error of the best *linear* denoiser built from the training latents' per-position mean and
variance (``wiener_t<t>``): a network that does not beat it has learned no more than the average brain. ``--final-guidance`` scores the last point's
EMA model again with other guidance scales (same seeds), and the first four volumes of the last point are
drawn to ``diffusion_samples_<label>.png`` next to the table (look at them: numbers can hide blobs).

Appends one row per point to ``benchmarks/results/diffusion_curve.csv`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_vqgan_curve import append_rows
from common import add_run_args, cpu_seconds_per_step, run_stamp

from synthmri.catalog import LATENT_DIR, PROCESSED_DIR, SPACE_FILE, VQGAN_DIR
from synthmri.config import Params, load_params
from synthmri.data.covariates import covariate_rows, covariate_title
from synthmri.data.datasets import ProcessedVolumes
from synthmri.data.latents import LatentSet
from synthmri.diffusion.sampling import sample_latents, sample_seed
from synthmri.diffusion.schedulers import add_noise, make_sampler, noise_levels, predicted_x0
from synthmri.models.loading import load_vqgan
from synthmri.report.compute import compute_set_metrics
from synthmri.report.gate import evaluate_gate
from synthmri.report.inputs import ReportData
from synthmri.stages.train_diffusion import training_latents
from synthmri.synthesis.plan import make_plan
from synthmri.training.train_diffusion import DiffusionTrainer
from synthmri.viz import three_plane_grid

OUT = Path(__file__).parent / "results" / "diffusion_curve.csv"
KEPT = {  # metrics.json key (stats extractor) -> column
    "fidelity.stats.frechet_ratio": "fd_ratio",
    "fidelity.stats.precision": "precision",
    "fidelity.stats.coverage": "coverage",
    "fidelity.stats.recall": "recall",
    "conditioning.age.csf_fraction.effect_ratio": "effect_csf",
    "conditioning.age.ventricle_ml.effect_ratio": "effect_ventricles",
    "conditioning.sex.head_ml.effect_ratio": "effect_head",
    "conditioning.age.predictor.stats.error_ratio": "age_mae_ratio",
    "conditioning.sex.predictor.stats.accuracy_drop": "sex_acc_drop",
    "conditioning.site.predictor.stats.accuracy_drop": "site_acc_drop",
    "conditioning.field_strength.predictor.stats.error_ratio": "field_mae_ratio",
    "conditioning.voxel_size.predictor.stats.error_ratio": "voxel_mae_ratio",
    "conditioning.sequence.predictor.stats.accuracy_drop": "sequence_acc_drop",
    "diversity.ratio": "diversity",
    "intensity.wasserstein": "intensity_w1",
    "privacy.excess_fraction": "copies_over_chance",
}


class Scorer:
    """The real volumes, the fixed VQ-GAN and the sample plan, loaded once; scores one denoiser."""

    def __init__(self, params: Params, n_samples: int, guidance_scale: float | None = None) -> None:
        self.params = params.model_copy(update={"sample": params.sample.model_copy(update={"n_samples": n_samples})})
        self.guidance_scale = params.diffusion.sampler.guidance_scale if guidance_scale is None else guidance_scale
        real = ProcessedVolumes(PROCESSED_DIR, split=None)
        self.real_manifest = real.manifest
        self.real_volumes = np.stack([v[0].numpy() for v in real.volumes])
        self.space = json.loads(SPACE_FILE.read_text())
        self.vqgan = load_vqgan(VQGAN_DIR, "cpu")
        self.latents = LatentSet(LATENT_DIR, split=None, schedule=params.diffusion.schedule)
        self.plan = make_plan(self.params, self.real_manifest[self.real_manifest["split"] == "train"])
        self.seeds = [sample_seed(self.params.sample.seed, i) for i in range(n_samples)]

    @torch.inference_mode()
    def generate(self, denoiser) -> np.ndarray:
        """The ``sample`` stage's volumes (sampler, guidance, seeds, decoding), in [-1, 1]."""
        s = self.params.diffusion.sampler
        z = sample_latents(
            denoiser.unet,
            denoiser.encoder,
            make_sampler(s.sampler, self.params.diffusion.schedule),
            self.plan,
            tuple(self.latents.latents.shape[1:]),
            s.steps,
            self.guidance_scale,
            seeds=self.seeds,
            guidance_interval=s.guidance_interval,
            rest_guidance_scale=s.rest_guidance_scale,
        )
        volumes = [
            self.vqgan.decode(self.latents.unstandardize(latent[None]), quantize=s.snap_to_codes) for latent in z
        ]
        return torch.cat(volumes).clamp(-1, 1)[:, 0].float().numpy()

    def score(self, denoiser) -> dict:
        volumes = self.generate(denoiser)
        self.last_volumes = volumes
        synthetic = pd.DataFrame(self.plan)
        synthetic["file"] = [f"sample-{i:06d}.nii.gz" for i in range(len(synthetic))]
        data = ReportData(
            real=self.real_manifest,
            real_volumes=self.real_volumes,
            synthetic=synthetic,
            synthetic_volumes=volumes,
            space=self.space,
            reference_splits=list(self.params.report.reference_splits),
        )
        metrics = compute_set_metrics(self.params, data, intervals=False).metrics
        checks = evaluate_gate(metrics, self.params.report.thresholds)
        row = {column: metrics.get(key) for key, column in KEPT.items()}
        row["gate_failed"] = ",".join(c.name for c in checks if c.status == "fail")
        row["gate_n_failed"] = sum(c.status == "fail" for c in checks)
        row["gate_n_checked"] = sum(c.status != "skipped" for c in checks)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


DIAGNOSTIC_TIMESTEPS = (50, 200, 400, 700)


@torch.inference_mode()
def denoising_errors(denoiser, trainer: DiffusionTrainer, train: LatentSet, val: LatentSet) -> dict[str, float]:
    """x0 error of the denoiser at :data:`DIAGNOSTIC_TIMESTEPS` on the validation latents (fixed noise),
    and of the per-position linear (Wiener) denoiser ``mu + a·var / (a²·var + s²) · (x_t - a·mu)``."""
    mu, var = train.latents.mean(0, keepdim=True), train.latents.var(0, keepdim=True)
    x0 = val.latents
    rows = denoiser.encoder.encode_values(covariate_rows(val.manifest, trainer.params.covariates))
    generator = torch.Generator().manual_seed(0)
    out = {}
    for t in DIAGNOSTIC_TIMESTEPS:
        noise, steps = torch.randn(x0.shape, generator=generator), torch.full((len(x0),), t)
        x_t = add_noise(trainer.scheduler, x0, noise, steps)
        implied = predicted_x0(trainer.scheduler, x_t, denoiser.eval()(x_t, steps, rows), steps)
        a, s = (level[0] for level in noise_levels(trainer.scheduler, steps))  # x_t = a·x0 + s·noise
        a2, s2 = a.square(), s.square()
        wiener = mu + a * var / (a2 * var + s2) * (x_t - a * mu)
        out[f"x0_mse_t{t}"] = round(float((implied - x0).square().mean()), 4)
        out[f"wiener_t{t}"] = round(float((wiener - x0).square().mean()), 4)
    return out


def step_cost(params: Params, train: LatentSet) -> float:
    """CPU seconds of one training step of this recipe."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = DiffusionTrainer(params, train, None, Path(tmp), "probe")

        def step() -> None:
            trainer.next_step()
            trainer.step += 1

        return cpu_seconds_per_step(step)


def run(
    label: str,
    seed: int,
    params_file: str,
    overrides: list[str],
    budget_s: float,
    points: int,
    n_samples: int,
    fixed_steps: int | None,
    raw: bool,
    final_guidance: list[float],
    figure_dir: Path = OUT.parent,
) -> list[dict]:
    overrides = [*overrides, f"seed={seed}"]
    base = load_params(params_file, overrides)
    schedule = base.diffusion.schedule
    train, val = training_latents(LATENT_DIR, schedule)
    if fixed_steps is None:
        cost = step_cost(base, train)
        steps = max(1, int(budget_s / cost))
        print(f"[{label} seed {seed}] step cost {cost:.3f} CPU-s, schedule: {steps} steps", flush=True)
    else:
        steps = fixed_steps
    params = load_params(params_file, [*overrides, f"diffusion.train.steps={steps}"])
    scorer = Scorer(params, n_samples)
    rows, cpu_s, wall_s = [], 0.0, 0.0
    marks = sorted({max(1, round(steps * (k + 1) / points)) for k in range(points)})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = DiffusionTrainer(params, train, val, Path(tmp), "bench")
        while trainer.step < steps:
            c0, w0 = time.process_time(), time.perf_counter()
            losses = trainer.next_step()
            trainer.step += 1
            cpu_s += time.process_time() - c0
            wall_s += time.perf_counter() - w0
            if trainer.step not in marks:
                continue
            default = params.diffusion.sampler.guidance_scale
            variants = [("ema", trainer.ema.module, default)]
            if trainer.step == steps:
                variants += [("raw", trainer.model, default)] if raw else []
                variants += [("ema", trainer.ema.module, g) for g in final_guidance if g != default]
            for name, denoiser, guidance in variants:
                e0 = time.perf_counter()
                scorer.guidance_scale = guidance
                row = {
                    "label": label,
                    "seed": seed,
                    "weights": name,
                    "guidance": guidance,
                    "step": trainer.step,
                    "steps": steps,
                    "cpu_minutes": round(cpu_s / 60, 3),
                    "wall_minutes": round(wall_s / 60, 3),
                    "loss": round(losses["loss"], 5),
                    "val_loss": round(trainer.validation_loss(), 5),
                    "n_samples": n_samples,
                    **denoising_errors(denoiser, trainer, train, val),
                    **scorer.score(denoiser),
                    "eval_minutes": round((time.perf_counter() - e0) / 60, 2),
                    "overrides": " ".join(overrides),
                    **run_stamp(),
                }
                rows.append(row)
                print(json.dumps({k: row[k] for k in row if k not in ("overrides", "machine", "torch")}), flush=True)
            trainer.model.train()
    scorer.guidance_scale = params.diffusion.sampler.guidance_scale
    scorer.score(trainer.ema.module)
    shown = range(min(4, n_samples))
    three_plane_grid(
        [scorer.last_volumes[i] for i in shown],
        [f"#{i}\n{covariate_title(scorer.plan[i], per_line=1)}" for i in shown],
        figure_dir / f"diffusion_samples_{label}.png",
        scorer.space["spacing_mm"],
        suptitle=f"{label}: EMA samples after {cpu_s / 60:.1f} CPU-min",
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True)
    parser.add_argument("--cpu-minutes", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=None, help="fixed schedule length instead of a CPU budget")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32, help="volumes generated per point")
    parser.add_argument("--raw", action="store_true", help="also score the raw (non-EMA) weights at the end")
    parser.add_argument("--final-guidance", type=float, nargs="*", default=[], help="extra guidance scales, last point")
    add_run_args(parser, OUT)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        rows = run(
            args.label,
            seed,
            args.params,
            args.overrides,
            args.cpu_minutes * 60,
            args.points,
            args.samples,
            args.steps,
            args.raw,
            args.final_guidance,
            args.out.parent,
        )
        append_rows(args.out, rows)


if __name__ == "__main__":
    main()
