"""Autoencoder quality against CPU-minutes: validation PSNR/SSIM along a time-budgeted training run.

    .venv/bin/python benchmarks/bench_vqgan_curve.py --label base --cpu-minutes 8 --seeds 0 1 \\
        [--threads 1] [--points 8] [-S vqgan.train.lr_schedule=cosine ...]

Trains the VQ-GAN of ``--params`` (plus overrides) on ``data/processed`` (run ``dvc repro normalize``
first) for ``--cpu-minutes`` of *process CPU time* per repeat, so runs can share a busy machine and still
be compared. The schedule length (``vqgan.train.steps``, which a cosine decay and the GAN start refer to)
is set from a timed probe of the step cost, unless ``--steps`` is given. ``--points`` times along the run
the model is scored on the validation split (time not counted); the last point also scores the split's
edge sharpness (mean in-head gradient magnitude of the reconstructions over that of the originals) and
the report's autoencoder ceiling in its ``stats`` feature space (texture, tissue classes, intensities):
the FD ratio of decoded training volumes (``ceiling_fd_ratio_train``) and of the held-out volumes' own
reconstructions (``ceiling_fd_ratio_heldout``) against the real held-out volumes (val + test), every
gate check on the decoded training volumes (``ceiling.<check>``, ``ceiling_n_failed``) and the share of each
covariate's predictability the decoded volumes keep (``kept.<covariate>``, 1 = all), by the ``report`` stage's
own code.

Appends one row per point to ``benchmarks/results/vqgan_curve.csv`` (label, seed, step, CPU minutes,
PSNR, SSIM, LPIPS, losses, overrides, machine) and prints them.
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
from common import add_run_args, cpu_seconds_per_step, run_stamp

from synthmri.catalog import PROCESSED_DIR, SPACE_NAME
from synthmri.config import load_params
from synthmri.data.datasets import ProcessedVolumes
from synthmri.report.compute import ceiling_checks, make_extractor
from synthmri.report.families import autoencoder_ceiling, covariates_kept, fit_real_predictors
from synthmri.report.inputs import ReportData
from synthmri.training.train_vqgan import VQGANTrainer, validate

OUT = Path(__file__).parent / "results" / "vqgan_curve.csv"


def step_cost(params, train_set) -> dict[str, float]:
    """CPU seconds of one reconstruction-phase and one adversarial-phase step."""
    costs = {}
    for phase, start in (("rec", 10**9), ("gan", 0)):
        trainer = VQGANTrainer(load_params(params[0], [*params[1], f"vqgan.loss.disc_start_step={start}"]), train_set)

        def step(trainer=trainer) -> None:
            trainer.next_step()
            trainer.step += 1

        costs[phase] = cpu_seconds_per_step(step, steps=8, warmup=2)
    return costs


def steps_for_budget(costs: dict[str, float], budget_s: float, disc_start: int, gan_on: bool) -> int:
    if not gan_on or budget_s <= disc_start * costs["rec"]:
        return max(1, int(budget_s / costs["rec"]))
    return disc_start + int((budget_s - disc_start * costs["rec"]) / costs["gan"])


def decoded(model, volumes: np.ndarray, device) -> np.ndarray:
    """Each volume ``(N, D, H, W)`` through the autoencoder, as the report decodes them (clamped to the range)."""
    out = []
    with torch.inference_mode():
        for volume in volumes:
            x = torch.from_numpy(volume)[None, None].to(device)
            out.append(model.decode(model.encode(x)).clamp(-1, 1)[0, 0].cpu().numpy())
    return np.stack(out)


def sharpness_ratio(model, volumes: ProcessedVolumes, device) -> float:
    """Mean in-head gradient magnitude of the reconstructions over that of the originals: < 1 is blur."""
    reals = np.stack([v[0].numpy() for v in volumes.volumes])
    ratios = []
    for real, recon in zip(reals, decoded(model, reals, device)):
        head = real > -0.95
        grad = [np.linalg.norm(np.stack(np.gradient(v)), axis=0)[head].mean() for v in (real, recon)]
        ratios.append(grad[1] / grad[0])
    return float(np.mean(ratios))


def ceiling_scores(model, params, device) -> dict:
    """The report's autoencoder ceiling, computed by the report's own code on the processed cohort: the FD
    ratios of decoded real volumes (``stats`` features) and every gate check on the decoded training volumes
    (``ceiling.<check>``, ``ceiling_n_failed``): what a perfect diffusion model would score through this model."""
    everyone = ProcessedVolumes(PROCESSED_DIR, None)
    space = json.loads((PROCESSED_DIR / SPACE_NAME).read_text())
    data = ReportData(
        real=everyone.manifest,
        real_volumes=np.stack([v[0].numpy() for v in everyone.volumes]),
        synthetic=everyone.manifest.iloc[:0],
        synthetic_volumes=np.zeros((0, *space["shape"]), np.float32),
        space=space,
        reference_splits=list(params.report.reference_splits),
    )
    decoded_train, decoded_heldout = decoded(model, data.train, device), decoded(model, data.reference, device)
    extractor = make_extractor(params.report, data.value_range)
    rp = params.report
    f_ref, f_dec_ref, f_dec_train, f_train = (
        extractor(v) for v in (data.reference, decoded_heldout, decoded_train, data.train)
    )
    ceiling = autoencoder_ceiling(
        f_ref, f_dec_ref, f_dec_train, f_train, rp.prdc_k, rp.seed, rp.compare_size, rp.max_comparisons
    )
    row = {f"ceiling_fd_ratio_{name}": round(ceiling[f"{name}.frechet_ratio"], 3) for name in ("train", "heldout")}
    kept = covariates_kept(fit_real_predictors(data, params.covariates, f_train, f_ref), f_dec_train, f_dec_ref)
    row.update(
        {f"kept.{key[: -len('.kept')]}": round(value, 3) for key, value in kept.items() if key.endswith(".kept")}
    )
    checks = ceiling_checks(params, data, decoded_train, extractor)
    row.update({f"ceiling.{c.name}": round(float(c.value), 4) for c in checks})
    row["ceiling_n_failed"] = sum(c.status == "fail" for c in checks)
    row["ceiling_failed"] = " ".join(c.name for c in checks if c.status == "fail")
    return row


def run(
    label: str, seed: int, params_file: str, overrides: list[str], budget_s: float, points: int, fixed_steps: int | None
) -> list[dict]:
    train_set, val_set = ProcessedVolumes(PROCESSED_DIR, "train"), ProcessedVolumes(PROCESSED_DIR, "val")
    overrides = [*overrides, f"seed={seed}"]
    base = load_params(params_file, overrides)
    loss = base.vqgan.loss
    gan_on = loss.adversarial > 0
    if fixed_steps is None:
        costs = step_cost((params_file, overrides), train_set)
        steps = steps_for_budget(costs, budget_s, loss.disc_start_step, gan_on)
        print(f"[{label} seed {seed}] step cost {costs}, schedule: {steps} steps", flush=True)
    else:
        steps = fixed_steps
    params = load_params(params_file, [*overrides, f"vqgan.train.steps={steps}"])
    trainer = VQGANTrainer(params, train_set, val_set)
    trainer.model.train()
    marks = sorted({max(1, round(steps * (k + 1) / points)) for k in range(points)})
    rows, cpu_s, wall_s = [], 0.0, 0.0
    while trainer.step < steps:
        c0, w0 = time.process_time(), time.perf_counter()
        losses = trainer.next_step()
        trainer.step += 1
        cpu_s += time.process_time() - c0
        wall_s += time.perf_counter() - w0
        if trainer.step in marks:
            scores, _ = validate(trainer.model, val_set, trainer.lpips_metric, trainer.device, trainer.value_range)
            row = {
                "label": label,
                "seed": seed,
                "step": trainer.step,
                "steps": steps,
                "cpu_minutes": round(cpu_s / 60, 3),
                "wall_minutes": round(wall_s / 60, 3),
                "val_psnr": round(scores["psnr"], 3),
                "val_ssim": round(scores["ssim"], 4),
                "val_lpips": round(scores["lpips"], 4),
                "l1": round(losses["l1"], 4),
                "codebook_usage": round(losses["codebook_usage"], 3),
                "lr": losses.get("lr"),
            }
            if trainer.step == steps:
                trainer.model.eval()
                row["val_sharpness_ratio"] = round(sharpness_ratio(trainer.model, val_set, trainer.device), 4)
                row.update(ceiling_scores(trainer.model, base, trainer.device))
                trainer.model.train()
            row.update(
                overrides=" ".join(overrides),
                **run_stamp(),
            )
            rows.append(row)
            print(
                json.dumps({k: row[k] for k in row if k not in ("overrides", "machine", "torch", "date")}), flush=True
            )
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """Add rows to the results table, aligning columns by name (recipes record different columns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    if path.exists():
        frame = pd.concat([pd.read_csv(path), frame], ignore_index=True)
    frame.to_csv(path, index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True)
    parser.add_argument("--cpu-minutes", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=None, help="fixed schedule length instead of a CPU budget")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--points", type=int, default=8)
    add_run_args(parser, OUT)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        rows = run(args.label, seed, args.params, args.overrides, args.cpu_minutes * 60, args.points, args.steps)
        append_rows(args.out, rows)


if __name__ == "__main__":
    main()
