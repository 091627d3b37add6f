"""The ``encode`` stage, and the latent data set the diffusion model trains on.

Every subject is encoded to its quantized code vectors (deterministic, never a noisy sample).
The diffusion model works on standardized latents ``(z - mean) / std`` with per-channel statistics
of the training split only, stored in ``scale.json`` so sampling can undo the scaling.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from synthmri.config import Params
from synthmri.data.datasets import ProcessedVolumes
from synthmri.errors import StageError
from synthmri.io import atomic_path, write_csv_atomic, write_text_atomic
from synthmri.logs import get_logger, progress
from synthmri.models.loading import load_vqgan
from synthmri.training.runtime import pick_device
from synthmri.catalog import LATENT_DIR, PROCESSED_DIR, VQGAN_DIR

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


def run_encode(params: Params, processed_dir: Path = PROCESSED_DIR, model_dir: Path = VQGAN_DIR,
               out_dir: Path = LATENT_DIR) -> pd.DataFrame:
    device = pick_device("auto")
    model = load_vqgan(model_dir, device)
    volumes = ProcessedVolumes(processed_dir, split=None)
    latents = encode_volumes(model, volumes, params.encode.batch_size, device)
    manifest = volumes.manifest.copy()
    train = torch.tensor((manifest["split"] == "train").to_numpy())
    if not train.any():
        raise StageError("no training subjects to compute the latent scale from")
    stats = channel_statistics(latents[train])
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "latents.safetensors") as tmp:
        save_file({"latents": latents.contiguous()}, str(tmp))
    manifest["latent_index"] = range(len(manifest))
    write_csv_atomic(manifest, out_dir / "manifest.csv")
    write_text_atomic(out_dir / "scale.json", json.dumps({**stats, "shape": list(latents.shape[1:])}, indent=2))
    log.info("Encoded %d volumes into latents of shape %s (train-split channel std %s)", len(manifest),
             tuple(latents.shape[1:]), [round(s, 3) for s in stats["std"]])
    return manifest


class LatentSet:
    """Standardized latents and covariates of one split, as the diffusion model sees them."""

    def __init__(self, latent_dir: str | Path = LATENT_DIR, split: str | None = "train") -> None:
        latent_dir = Path(latent_dir)
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
        return (z - self.mean) / self.std

    def unstandardize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z.device) + self.mean.to(z.device)

    def __len__(self) -> int:
        return len(self.latents)
