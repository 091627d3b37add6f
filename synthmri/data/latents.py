"""Encoding volumes to latents (the stage is :mod:`synthmri.stages.encode`), and the latent data set the
diffusion model trains on.

Every subject is encoded to its quantized code vectors (deterministic, never a noisy sample).
The diffusion model works on standardized latents ``(z - mean) / std`` (``diffusion.schedule.standardize``),
statistics of the training split only:

* ``channel``: per-channel mean and std, stored in ``scale.json`` by the encode stage;
* ``position``: per-position (channel and voxel) mean and std of the training latents, the "average
  brain" in latent space. Most of a latent's variance is where each structure is (here ~88 %), not how
  subjects differ: with this standardization the forward process noises the deviations from the average
  brain, a denoiser that outputs zero already is the best linear (Wiener) denoiser of that prior, and the
  network only has to learn what is not linear. Computed from ``latents.safetensors``' training rows at load
  time (deterministic), so training and sampling always agree.

times the noise schedule's ``input_scale`` (``diffusion.schedule.input_scale``; Chen 2023, "On the
importance of noise scheduling for diffusion models"): a factor below 1 lowers the signal-to-noise ratio at
every timestep.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from synthmri.catalog import LATENT_DIR
from synthmri.config import ScheduleParams
from synthmri.data.datasets import ProcessedVolumes, mirror_left_right
from synthmri.errors import StageError
from synthmri.logs import get_logger, progress

log = get_logger(__name__)


@torch.inference_mode()
def encode_volumes(
    model,
    volumes: ProcessedVolumes,
    batch_size: int,
    device: torch.device,
    rows: list[int] | None = None,
    mirrored: bool = False,
    desc: str = "Encoding volumes",
    quantize: bool = True,
) -> torch.Tensor:
    """Latents of ``volumes`` (or of its ``rows``), or of their left-right mirror images with ``mirrored``: the
    encoder is not mirror-symmetric, so a mirror image's latent is encoded, never the flipped latent. The
    latents are the codes, or without ``quantize`` the encoder's output before the codebook."""
    rows = list(range(len(volumes))) if rows is None else list(rows)
    chunks = []
    for start in progress(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        batch = volumes.batch(rows[start : start + batch_size])
        if mirrored:
            batch = mirror_left_right(batch)
        chunks.append(model.encode(batch.to(device), quantize=quantize).float().cpu())
    return torch.cat(chunks)


def channel_statistics(latents: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel mean and std over subjects and positions (the latent scale factor)."""
    dims = [0, *range(2, latents.ndim)]
    return {"mean": latents.mean(dim=dims).tolist(), "std": latents.std(dim=dims).clamp_min(1e-6).tolist()}


# per-position std floor, as a fraction of the channel's std: where every training subject has the same code
# the std is 0, and a sampled deviation there must not be blown up (nor a held-out one divided by zero)
POSITION_STD_FLOOR = 0.1


# latents.safetensors key of the training volumes' mirror images (encode.mirror_training), in training-row order
MIRRORED_KEY = "mirrored_training"


class LatentSet:
    """Standardized latents and covariates of one split, as the diffusion model sees them.

    ``schedule`` (``diffusion.schedule``) decides the standardization and ``input_scale``; the default is
    per-channel standardization at scale 1. When the encode stage stored the training volumes' mirror images,
    they are part of the training data: the per-position statistics include them (so training and sampling agree
    whatever set is loaded), and ``mirrored=True`` appends them to the training split's rows, with their subjects'
    covariates and ``mirrored`` True in the manifest (the diffusion trainer asks for them; a sampling plan does not).
    """

    def __init__(
        self,
        latent_dir: str | Path = LATENT_DIR,
        split: str | None = "train",
        schedule: ScheduleParams | None = None,
        mirrored: bool = False,
    ) -> None:
        latent_dir = Path(latent_dir)
        schedule = schedule or ScheduleParams()
        self.input_scale, self.standardization = schedule.input_scale, schedule.standardize
        if not (latent_dir / "latents.safetensors").is_file():
            raise StageError(f"{latent_dir}/latents.safetensors not found: run `synthmri encode` first")
        manifest = pd.read_csv(latent_dir / "manifest.csv", dtype={"session": str}, keep_default_na=False)
        scale = json.loads((latent_dir / "scale.json").read_text())  # {"mean", "std", "shape"}
        self.mean = torch.tensor(scale["mean"]).view(-1, *[1] * (len(scale["shape"]) - 1))
        self.std = torch.tensor(scale["std"]).view_as(self.mean)
        tensors = load_file(str(latent_dir / "latents.safetensors"))
        latents, mirror_images = tensors["latents"], tensors.get(MIRRORED_KEY)
        is_train = torch.tensor((manifest["split"] == "train").to_numpy())
        n_train = int(is_train.sum())
        if mirror_images is not None and len(mirror_images) != n_train:
            raise StageError(
                f"{latent_dir}/latents.safetensors has {len(mirror_images)} mirror images for {n_train} training "
                "subjects: run `synthmri encode` again"
            )
        if self.standardization == "position":
            training = latents[is_train]
            if mirror_images is not None:
                training = torch.cat([training, mirror_images])
            if len(training) < 2:
                raise StageError(
                    f"diffusion.schedule.standardize=position needs at least 2 training latents in {latent_dir}, "
                    f"found {len(training)}"
                )
            self.mean = training.mean(dim=0)
            self.std = torch.maximum(training.std(dim=0), POSITION_STD_FLOOR * self.std)
        keep = manifest["split"] == split if split else pd.Series(True, index=manifest.index)
        self.manifest = manifest[keep].reset_index(drop=True)
        self.latents = self.standardize(latents[torch.tensor(keep.to_numpy())])
        if mirrored and split == "train" and mirror_images is not None:
            self.manifest = pd.concat(
                [self.manifest.assign(mirrored=False), self.manifest.assign(mirrored=True)], ignore_index=True
            )
            self.latents = torch.cat([self.latents, self.standardize(mirror_images)])

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std * self.input_scale

    def unstandardize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.input_scale * self.std.to(z.device) + self.mean.to(z.device)

    def __len__(self) -> int:
        return len(self.latents)
