"""Saving and loading trained models as safetensors weights + a JSON config (never a pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from synthmri.config import QuantizerParams, UNetParams, VQGANModelParams
from synthmri.errors import StageError
from synthmri.io import atomic_path, write_text_atomic
from synthmri.models.vqgan import VQGAN

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_weights(module: torch.nn.Module, config: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(tmp))
    write_text_atomic(directory / CONFIG, json.dumps(config, indent=2))
    return directory / WEIGHTS


def read_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise StageError(f"{path} not found: train the model first (dvc repro)")
    return json.loads(path.read_text())


def load_vqgan(directory: str | Path, device: torch.device | str = "cpu") -> VQGAN:
    """The trained VQ-GAN of ``directory`` (as written by train_vqgan), in eval mode."""
    directory = Path(directory)
    config = read_config(directory)["vqgan"]
    model = VQGAN.from_params(VQGANModelParams(**config["model"]), QuantizerParams(**config["quantizer"]))
    model.load_state_dict(load_file(str(directory / WEIGHTS)))
    return model.to(device).eval()


def build_ldm(
    unet: UNetParams,
    covariates: list,
    latent_channels: int,
    checkpointing: bool = False,
    guided_covariates: list[str] | None = None,
):
    """U-Net + covariate encoder; the encoder's embedding width is the U-Net's time-embedding width.
    ``checkpointing``: activation checkpointing of the U-Net's blocks in training; ``guided_covariates``: the
    group classifier-free guidance amplifies (``diffusion.train.guided_covariates``; None = all)."""
    from synthmri.diffusion.conditioning import ConditionedUNet, CovariateEncoder
    from synthmri.models.unet import DiffusionUNet

    net = DiffusionUNet.from_params(unet, in_channels=latent_channels, checkpointing=checkpointing)
    return ConditionedUNet(net, CovariateEncoder(covariates, net.emb_dim, guided=guided_covariates))


def load_ldm(directory: str | Path, device: torch.device | str = "cpu"):
    """The trained conditional diffusion model (EMA weights) of ``directory``, in eval mode."""
    from synthmri.config import Covariate, UNetParams

    config = read_config(Path(directory))
    model = build_ldm(
        UNetParams(**config["diffusion"]["unet"]),
        [Covariate(**c) for c in config["covariates"]],
        config["latent_shape"][0],
        # the group the model was trained to be guided on; models written before it existed guide on all
        guided_covariates=config["diffusion"]["train"].get("guided_covariates"),
    )
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS)))
    return model.to(device).eval()
