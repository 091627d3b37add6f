"""``synthmri <stage>``: one subcommand per DVC stage, each reading params.yaml plus ``-S`` overrides."""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from synthmri import __version__
from synthmri.config import ConfigError, Params, load_params
from synthmri.errors import StageError
from synthmri.logs import get_logger, setup_logging

log = get_logger("synthmri")


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    details: str
    target: str  # "module:function" taking Params; imported only when the stage runs (fast --help)
    train_section: str | None = None  # "vqgan" / "diffusion": the stage trains, <section>.train.processes applies

    def processes(self, params: Params) -> int:
        return getattr(params, self.train_section).train.processes if self.train_section else 1

    def run(self, params: Params) -> object:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)(params)


STAGES = [
    Stage(
        "demo",
        "generate the simulated demo cohort (BIDS) into data/raw/demo",
        "Builds the built-in demo cohort from nilearn's MNI152 template: covariate-driven anatomy "
        "(age, sex), a contrast model per site, ground-truth volumes in participants.tsv. Params: demo.*",
        "synthmri.stages.demo:run_demo",
    ),
    Stage(
        "ingest",
        "validate raw volumes and covariates into data/ingested",
        "Reads ingest.root (source bids, table or demo), checks every file and covariate row, writes RAS "
        "volumes, manifest.csv and quarantine.csv (one row per item set aside, with the reason). "
        "Raw data is never modified. Params: ingest.*, covariates",
        "synthmri.stages.ingest:run_ingest",
    ),
    Stage(
        "normalize",
        "resample, crop and scale into data/processed; split subjects",
        "Resamples to normalize.spacing, crops/pads to normalize.shape around the head, clips intensities "
        "at percentiles and scales them to normalize.out_range (optional Nyul standardization fitted on "
        "the training split), and assigns a stratified subject-level train/val/test split. Params: normalize.*",
        "synthmri.stages.normalize:run_normalize",
    ),
    Stage(
        "train_vqgan",
        "train the 3D VQ-GAN (or VQ-VAE baseline) into models/vqgan",
        "Trains the VQ-GAN on the training split: L1 + 2.5D LPIPS + commitment, hinge adversarial loss with "
        "adaptive weight and GAN feature matching after vqgan.loss.disc_start_step. Resumes from the newest "
        "checkpoint in models/checkpoints/vqgan. Validation PSNR/SSIM/LPIPS go to reports/vqgan.json and "
        "MLflow; the model is registered as synthmri-vqgan. With vqgan.train.processes > 1 it relaunches "
        "itself under torchrun (DistributedDataParallel). Params: vqgan.*, seed",
        "synthmri.stages.train_vqgan:run_train_vqgan",
        train_section="vqgan",
    ),
    Stage(
        "encode",
        "encode every subject into quantized latents in data/latents",
        "Encodes every split with the trained VQ-GAN (deterministic quantized codes, never a noisy sample), "
        "writes latents with subject ids and covariates, and the per-channel latent scale factor computed "
        "on the training split. Params: encode.*",
        "synthmri.stages.encode:run_encode",
    ),
    Stage(
        "train_diffusion",
        "train the conditional latent diffusion model into models/ldm",
        "Trains the 3D diffusion U-Net on the standardized latents, conditioned on the declared covariates "
        "(condition dropout for classifier-free guidance), with EMA weights for sampling. Resumes from "
        "models/checkpoints/ldm; decoded sample slices go to MLflow every diffusion.train.sample_every steps; "
        "the EMA model is registered as synthmri-ldm. With diffusion.train.processes > 1 it relaunches itself "
        "under torchrun (DistributedDataParallel). Params: diffusion.*, covariates, seed",
        "synthmri.stages.train_diffusion:run_train_diffusion",
        train_section="diffusion",
    ),
    Stage(
        "sample",
        "generate the synthetic data set into data/synthetic",
        "Generates one volume per row of the covariate plan (sample.plan: match_training, grid or csv) with "
        "the diffusion sampler of diffusion.sampler, decodes it with the VQ-GAN and writes NIfTI with the "
        "training space's affine and a clean header, plus manifest.csv/parquet and a data-set card. Works in "
        "shards fanned out by a Prefect task runner (threads or Dask); a rerun skips finished shards. "
        "Params: sample.*, diffusion.sampler",
        "synthmri.stages.sample:run_sample",
    ),
    Stage(
        "utility",
        "pre-train a 3D ViT on data/synthetic: does it help on real data?",
        "Pre-trains MONAI's 3D ViT on the synthetic set (targets: the covariates each volume was generated for), "
        "fine-tunes it on k real training-split subjects (utility.k) and tests it on the real held-out splits, next "
        "to the same ViT from scratch, pre-trained on the real training split, and pre-trained on a negative "
        "control; repeats with 95 % bootstrap intervals. Writes reports/utility.json (read by the report's gate), "
        "reports/utility/errors.csv and data_efficiency.png, and an MLflow 'utility' run. Params: utility.*",
        "synthmri.stages.utility:run_utility",
    ),
    Stage(
        "report",
        "quality and privacy report of data/synthetic, with the quality gate",
        "Compares the synthetic set with the real held-out volumes (report.reference_splits): VQ-GAN "
        "reconstruction on the test split (PSNR, SSIM, 2.5D LPIPS); Frechet distance, MMD and precision/recall/"
        "density/coverage on features of report.extractor; pairwise MS-SSIM diversity; conditioning fidelity "
        "(known covariate effects, covariate predictors fitted on the training split); memorization (nearest "
        "training volume by NCC and SSIM, threshold calibrated on held-out real data); intensity histograms. "
        "Writes reports/metrics.json, reports/report.html and reports/figures/, logs an MLflow 'report' run, and "
        "records gate: pass|fail against report.thresholds (a failing gate does not fail the stage). "
        "Params: report.*",
        "synthmri.stages.report:run_report",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthmri",
        description="SynthMRI: learn from brain MRI volumes and publish versioned synthetic data sets. "
        "Each subcommand is one DVC stage; `dvc repro` runs them in order.",
    )
    parser.add_argument("--version", action="version", version=f"synthmri {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage.name, help=stage.summary, description=stage.details)
        p.add_argument("--params", default=None, metavar="FILE", help="parameters file (default: params.yaml)")
        p.add_argument(
            "-S",
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a parameter, e.g. -S ingest.root=/data/bids (repeatable, like dvc exp run -S)",
        )
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        p.set_defaults(handler=stage)
    plan = sub.add_parser(
        "plan-memory",
        help="estimate the GPU memory of a training config and whether it fits",
        description="Traces one training step of train_vqgan and train_diffusion on the meta device (no GPU "
        "needed) and prints the estimated peak memory by component (weights, gradients, AdamW, EMA, "
        "activations), whether it fits a GPU of --gpu-memory GiB, and the largest batch that does. "
        "Exit status 0 when every planned stage fits, 3 otherwise. Accuracy about +-25 %.",
    )
    plan.add_argument("--params", default=None, metavar="FILE", help="parameters file (default: params.yaml)")
    plan.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter (repeatable)",
    )
    plan.add_argument("--stage", choices=["train_vqgan", "train_diffusion", "all"], default="all")
    plan.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (default: the config's)")
    plan.add_argument("--gpu-memory", type=float, default=80.0, metavar="GiB", help="GPU memory (default 80)")
    plan.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    plan.set_defaults(handler=None)
    return parser


def plan_memory(params: Params, args: argparse.Namespace) -> int:
    """``synthmri plan-memory``: print the plan of each training stage; 3 if one does not fit."""
    from synthmri.training.memory import GiB, format_plan, plan_diffusion, plan_vqgan

    planners = {"train_vqgan": plan_vqgan, "train_diffusion": plan_diffusion}
    fits = True
    for name, planner in planners.items():
        if args.stage in (name, "all"):
            plan = planner(params, batch_size=args.batch_size)
            print(format_plan(plan, args.gpu_memory))
            fits &= plan.fits(args.gpu_memory * GiB)
    return 0 if fits else 3


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        params = load_params(args.params, args.overrides)
        if args.handler is None:
            return plan_memory(params, args)
        processes = args.handler.processes(params)
        if processes > 1:
            from synthmri.training import distributed  # imports torch: only for the stages that train

            if not distributed.under_launcher():
                return distributed.relaunch(processes, sys.argv[1:] if argv is None else argv)
        args.handler.run(params)
    except ConfigError as exc:
        print(f"synthmri {args.stage}: configuration error:\n{exc}", file=sys.stderr)
        return 2
    except StageError as exc:
        print(f"synthmri {args.stage}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a read-only or vanished folder: finished outputs are intact (atomic writes)
        print(
            f"synthmri {args.stage}: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"synthmri {args.stage}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
