"""The ``encode`` stage: every processed volume into VQ-GAN latents (``data/latents``), with the per-channel
statistics of the training split that standardize them for diffusion, and (``encode.mirror_training``) the
latents of the training volumes' left-right mirror images, which the diffusion model also trains on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from synthmri.catalog import LATENT_DIR, PROCESSED_DIR, VQGAN_DIR
from synthmri.config import Params
from synthmri.data.datasets import ProcessedVolumes
from synthmri.data.latents import MIRRORED_KEY, channel_statistics, encode_volumes
from synthmri.errors import StageError
from synthmri.io import atomic_path, write_csv_atomic, write_text_atomic
from synthmri.logs import get_logger
from synthmri.models.loading import load_vqgan
from synthmri.training.runtime import pick_device

log = get_logger(__name__)


def run_encode(
    params: Params, processed_dir: Path = PROCESSED_DIR, model_dir: Path = VQGAN_DIR, out_dir: Path = LATENT_DIR
) -> pd.DataFrame:
    device = pick_device("auto")
    model = load_vqgan(model_dir, device)
    volumes = ProcessedVolumes(processed_dir, split=None)
    quantize = params.encode.quantized
    latents = encode_volumes(model, volumes, params.encode.batch_size, device, quantize=quantize)
    manifest = volumes.manifest.copy()
    train = torch.tensor((manifest["split"] == "train").to_numpy())
    if not train.any():
        raise StageError("no training subjects to compute the latent scale from")
    stats = channel_statistics(latents[train])
    tensors = {"latents": latents.contiguous()}
    if params.encode.mirror_training:
        rows = [int(i) for i in torch.nonzero(train).flatten()]
        tensors[MIRRORED_KEY] = encode_volumes(
            model,
            volumes,
            params.encode.batch_size,
            device,
            rows,
            mirrored=True,
            desc="Encoding mirror images",
            quantize=quantize,
        ).contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "latents.safetensors") as tmp:
        save_file(tensors, str(tmp))
    manifest["latent_index"] = range(len(manifest))
    write_csv_atomic(manifest, out_dir / "manifest.csv")
    write_text_atomic(out_dir / "scale.json", json.dumps({**stats, "shape": list(latents.shape[1:])}, indent=2))
    log.info(
        "Encoded %d volumes into %s latents of shape %s (train-split channel std %s)%s",
        len(manifest),
        "codebook" if quantize else "continuous (before the codebook)",
        tuple(latents.shape[1:]),
        [round(s, 3) for s in stats["std"]],
        f", and the mirror images of the {int(train.sum())} training volumes" if MIRRORED_KEY in tensors else "",
    )
    return manifest
