"""Encoding volumes to latents (the stage is :mod:`synthmri.stages.encode`), and the latent data set the
diffusion model trains on.

Every subject is encoded to its quantized code vectors (deterministic, never a noisy sample).
The diffusion model works on standardized latents ``(z - mean) / std`` with per-channel statistics
of the training split only, stored in ``scale.json`` so sampling can undo the scaling, times the noise
schedule's ``input_scale`` (``diffusion.schedule.input_scale``; Chen 2023, "On the importance of noise
scheduling for diffusion models"): a factor below 1 lowers the signal-to-noise ratio at every timestep,
which a latent with more (and more correlated) positions needs for the same schedule to stay hard enough.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from synthmri.catalog import LATENT_DIR
from synthmri.data.datasets import ProcessedVolumes
from synthmri.errors import StageError
from synthmri.logs import get_logger, progress

log = get_logger(__name__)


@torch.inference_mode()
def encode_volumes(model, volumes: ProcessedVolumes, batch_size: int, device: torch.device) -> torch.Tensor:
    chunks = []
    starts = range(0, len(volumes), batch_size)
    for start in progress(starts, desc="Encoding volumes", unit="batch"):
        batch = volumes.batch(range(start, min(start + batch_size, len(volumes)))).to(device)
        chunks.append(model.encode(batch).float().cpu())
    return torch.cat(chunks)


def channel_statistics(latents: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel mean and std over subjects and positions (the latent scale factor)."""
    dims = [0, *range(2, latents.ndim)]
    return {"mean": latents.mean(dim=dims).tolist(), "std": latents.std(dim=dims).clamp_min(1e-6).tolist()}


class LatentSet:
    """Standardized latents and covariates of one split, as the diffusion model sees them."""

    def __init__(
        self, latent_dir: str | Path = LATENT_DIR, split: str | None = "train", input_scale: float = 1.0
    ) -> None:
        latent_dir = Path(latent_dir)
        self.input_scale = input_scale
        if not (latent_dir / "latents.safetensors").is_file():
            raise StageError(f"{latent_dir}/latents.safetensors not found: run `synthmri encode` first")
        manifest = pd.read_csv(latent_dir / "manifest.csv", dtype={"session": str}, keep_default_na=False)
        scale = json.loads((latent_dir / "scale.json").read_text())  # {"mean", "std", "shape"}
        self.mean = torch.tensor(scale["mean"]).view(-1, *[1] * (len(scale["shape"]) - 1))
        self.std = torch.tensor(scale["std"]).view_as(self.mean)
        latents = load_file(str(latent_dir / "latents.safetensors"))["latents"]
        keep = manifest["split"] == split if split else pd.Series(True, index=manifest.index)
        self.manifest = manifest[keep].reset_index(drop=True)
        self.latents = self.standardize(latents[torch.tensor(keep.to_numpy())])

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std * self.input_scale

    def unstandardize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.input_scale * self.std.to(z.device) + self.mean.to(z.device)

    def __len__(self) -> int:
        return len(self.latents)
