"""Where every stage reads and writes: the one map of the pipeline's artifacts (as Kedro's data catalog).

Stage code names artifacts by these constants, never by spelling a path. ``dvc.yaml`` (and
``demo/dvc.yaml``) declare the same paths to DVC; :data:`STAGES` lists, per stage, the artifacts it
declares there, and ``tests/test_catalog.py`` checks that the two agree, so neither can drift. Paths are
relative to the repository root (the working directory of every stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# data
DEMO_DIR = Path("data/raw/demo")  # the built-in cohort (BIDS); ingest.root points here for the demo
INGESTED_DIR = Path("data/ingested")  # valid subjects in RAS + manifest + quarantine table
PROCESSED_DIR = Path("data/processed")  # resampled, cropped, scaled volumes + split manifest
SPACE_NAME = "space.json"  # in the processed folder: the training grid's affine and shape (synthetic NIfTIs carry it)
SPACE_FILE = PROCESSED_DIR / SPACE_NAME
LANDMARKS_NAME = "nyul_landmarks.npy"  # in the processed folder: optional Nyul histogram standardization
LATENT_DIR = Path("data/latents")  # VQ-GAN latents of every processed volume
SYNTHETIC_DIR = Path("data/synthetic")  # the synthetic set: NIfTIs, manifest, data-set card
SOFTWARE_NAME = "software.json"  # in the synthetic set: versions of the packages that made it

# models (weights + config.json + registry.json); checkpoints live outside DVC's outputs so a killed run resumes
VQGAN_DIR = Path("models/vqgan")
VQGAN_CHECKPOINT_DIR = Path("models/checkpoints/vqgan")
LDM_DIR = Path("models/ldm")
LDM_CHECKPOINT_DIR = Path("models/checkpoints/ldm")
MODEL_REGISTRY_FILES = (VQGAN_DIR / "registry.json", LDM_DIR / "registry.json")

# reports
REPORTS_DIR = Path("reports")
VQGAN_REPORT_DIR = REPORTS_DIR / "vqgan"  # losses.csv, validation.csv, reconstruction.png
VQGAN_METRICS_FILE = REPORTS_DIR / "vqgan.json"
LDM_REPORT_DIR = REPORTS_DIR / "ldm"  # losses.csv, validation.csv, samples.png
LDM_METRICS_FILE = REPORTS_DIR / "ldm.json"
REPORT_METRICS_NAME, REPORT_HTML_NAME, REPORT_FIGURES_NAME = "metrics.json", "report.html", "figures"
REPORT_METRICS_FILE = REPORTS_DIR / REPORT_METRICS_NAME  # the quality report, flat; gate_passed decides publishing
REPORT_HTML_FILE = REPORTS_DIR / REPORT_HTML_NAME
REPORT_FIGURES_DIR = REPORTS_DIR / REPORT_FIGURES_NAME
UTILITY_METRICS_FILE = REPORTS_DIR / "utility.json"  # pre-training gains of a ViT on the set (the gate reads it)
UTILITY_REPORT_DIR = REPORTS_DIR / "utility"  # errors.csv (every run's per-subject errors), data_efficiency.png
RELEASE_FILE = REPORTS_DIR / "release.json"  # written by publish: tag, DVC hashes, model versions


@dataclass(frozen=True)
class StageArtifacts:
    """The artifacts one DVC stage declares: data/model dependencies (code and params are DVC's business
    alone), outputs, metrics files and plot files."""

    deps: tuple[Path, ...] = ()
    outs: tuple[Path, ...] = ()
    metrics: tuple[Path, ...] = ()
    plots: tuple[Path, ...] = ()


STAGES: dict[str, StageArtifacts] = {
    "demo": StageArtifacts(outs=(DEMO_DIR,)),
    "ingest": StageArtifacts(outs=(INGESTED_DIR,)),  # its input is ${ingest.root}: the user's data
    "normalize": StageArtifacts(deps=(INGESTED_DIR,), outs=(PROCESSED_DIR,)),
    "train_vqgan": StageArtifacts(
        deps=(PROCESSED_DIR,),
        outs=(VQGAN_DIR,),
        metrics=(VQGAN_METRICS_FILE,),
        plots=tuple(VQGAN_REPORT_DIR / f for f in ("losses.csv", "validation.csv", "reconstruction.png")),
    ),
    "encode": StageArtifacts(deps=(PROCESSED_DIR, VQGAN_DIR), outs=(LATENT_DIR,)),
    "train_diffusion": StageArtifacts(
        deps=(LATENT_DIR, VQGAN_DIR),
        outs=(LDM_DIR,),
        metrics=(LDM_METRICS_FILE,),
        plots=tuple(LDM_REPORT_DIR / f for f in ("losses.csv", "validation.csv", "samples.png")),
    ),
    "sample": StageArtifacts(deps=(LATENT_DIR, SPACE_FILE, LDM_DIR, VQGAN_DIR), outs=(SYNTHETIC_DIR,)),
    "utility": StageArtifacts(
        deps=(PROCESSED_DIR, SYNTHETIC_DIR),
        outs=(UTILITY_REPORT_DIR / "errors.csv",),
        metrics=(UTILITY_METRICS_FILE,),
        plots=(UTILITY_REPORT_DIR / "data_efficiency.png",),
    ),
    "report": StageArtifacts(
        deps=(  # latents + ldm: the protocol sweep; utility: the gate's utility check and figure
            PROCESSED_DIR,
            SYNTHETIC_DIR,
            LATENT_DIR,
            VQGAN_DIR,
            LDM_DIR,
            UTILITY_METRICS_FILE,
            UTILITY_REPORT_DIR / "data_efficiency.png",
        ),
        outs=(REPORT_HTML_FILE, REPORT_FIGURES_DIR),
        metrics=(REPORT_METRICS_FILE,),
    ),
}
