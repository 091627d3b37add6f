"""2.5D LPIPS perceptual loss for 3D volumes, and the policy that picks its backbone weights.

LPIPS is a 2D metric, so a volume is judged on 2D slices along all three axes ("2.5D"), the usual
practice of 3D medical VQ-GANs. The LPIPS backbone (AlexNet / VGG16 / SqueezeNet) wants ImageNet
weights, which cannot be downloaded on offline clusters. Policy of :func:`build_lpips`, never silent:

1. an explicit file (``vqgan.loss.lpips_weights``) is loaded, or a clear error is raised;
2. else torchvision's cached ImageNet file in the torch hub cache is loaded if present;
3. else the backbone is random (seeded, so values are reproducible) and a loud warning says that the
   values are not comparable to published LPIPS. The returned description records the choice.

The linear calibration layers always come from the weights shipped inside the ``lpips`` package.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from urllib.parse import urlparse

import lpips
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from synthmri.config import VQGANLossParams
from synthmri.models.slicing import slice_indices, take_slices

log = logging.getLogger(__name__)

_TORCHVISION_WEIGHTS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


class RandomBackboneWarning(UserWarning):
    """LPIPS runs with a random backbone: its values are not comparable to published LPIPS."""


def hub_weights_path(net: str) -> Path:
    """Where torchvision caches the ImageNet weights of ``net``'s backbone (``<torch hub dir>/checkpoints/``)."""
    url = getattr(torchvision.models, _TORCHVISION_WEIGHTS[net]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_backbone_weights(backbone: nn.Module, path: Path, net: str) -> None:
    """Load ImageNet weights into an ``lpips.pretrained_networks`` backbone (keys ``sliceK.<i>.…``).

    Accepts the torchvision model file (``features.<i>.…``, as in the hub cache), a ``features``-only
    state dict (``<i>.…``) or an lpips backbone state dict (``sliceK.<i>.…``); ``.safetensors`` too.
    """
    state = _read_state_dict(path)
    mapped, missing = {}, []
    for key, ref in backbone.state_dict().items():
        feature_key = key.split(".", 1)[1]  # lpips splits torchvision's `features` into slices, same indices
        found = next((state[k] for k in (key, feature_key, f"features.{feature_key}") if k in state), None)
        if found is None or found.shape != ref.shape:
            missing.append(key)
        else:
            mapped[key] = found
    if missing:
        raise ValueError(
            f"{path} does not hold torchvision ImageNet weights of the LPIPS '{net}' backbone: "
            f"{len(missing)} tensors missing or of the wrong shape (first: {missing[0]})"
        )
    backbone.load_state_dict(mapped)


def build_lpips(net: str = "alex", weights_path: str | Path | None = None, seed: int = 0) -> tuple[lpips.LPIPS, str]:
    """A frozen, eval-mode ``lpips.LPIPS`` and a one-line description of its backbone weights.

    Args:
        net: ``"alex"``, ``"vgg"`` or ``"squeeze"``.
        weights_path: file with the backbone's ImageNet weights (see :func:`load_backbone_weights`);
            ``None`` looks in the torch hub cache, then falls back to a random backbone with a warning.
        seed: seed of the random backbone (used under a forked RNG; the global RNG is untouched).

    Returns:
        ``(module, description)``, e.g. ``"alex: ImageNet weights from /path"`` or
        ``"alex: RANDOM backbone (...)"``; record the description next to every LPIPS number.

    Raises:
        FileNotFoundError: ``weights_path`` is given but does not exist.
        ValueError: the file does not hold weights of this backbone.
    """
    if net not in _TORCHVISION_WEIGHTS:
        raise ValueError(f"unknown LPIPS net '{net}', expected one of {sorted(_TORCHVISION_WEIGHTS)}")
    hub_path = hub_weights_path(net)
    if weights_path is not None:
        source: Path | None = Path(weights_path).expanduser()
        if not source.is_file():
            raise FileNotFoundError(
                f"LPIPS backbone weights file '{source}' (vqgan.loss.lpips_weights) does not "
                f"exist; give the torchvision ImageNet weights of '{net}', e.g. {hub_path.name}"
            )
    else:
        source = hub_path if hub_path.is_file() else None

    # pnet_rand=True: never let torchvision try to download; ImageNet weights are loaded below.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if source is not None:
        load_backbone_weights(model.net, source, net)
        description = f"{net}: ImageNet weights from {source}"
        log.info("LPIPS backbone %s", description)
    else:
        description = (
            f"{net}: RANDOM backbone (no ImageNet weights found: vqgan.loss.lpips_weights is unset and "
            f"{hub_path} does not exist); LPIPS values are NOT comparable to published LPIPS"
        )
        warnings.warn(description, RandomBackboneWarning, stacklevel=2)
        log.warning("LPIPS backbone %s", description)
    return model.eval().requires_grad_(False), description


class LPIPS25D(nn.Module):
    """Mean LPIPS over 2D slices along the three axes of volumes ``(B, C, D, H, W)`` in [-1, 1].

    Each channel is judged as a grayscale image repeated to RGB. Slices whose short side is below
    ``min_size`` are bilinearly enlarged first (LPIPS' AlexNet needs ≥ 31 pixels). The network stays
    frozen and in eval mode (its dropout off) even when a parent module is put in training mode;
    gradients flow to the inputs, so it serves as a loss.

    Args:
        net: a frozen ``lpips.LPIPS`` (see :func:`build_lpips`).
        slices_per_axis: slices per axis.
        random_slices: ``False``: evenly spaced central slices (validation metric, deterministic);
            ``True``: random slices per call (training loss), from the ``generator`` given to ``forward``.
        min_size: smallest short side of a slice fed to the network.
    """

    def __init__(
        self, net: lpips.LPIPS, slices_per_axis: int = 4, random_slices: bool = False, min_size: int = 32
    ) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.slices_per_axis, self.random_slices, self.min_size = slices_per_axis, random_slices, min_size

    @classmethod
    def from_params(cls, p: VQGANLossParams, random_slices: bool = False) -> tuple[LPIPS25D, str]:
        """Build from the ``vqgan.loss`` section; returns ``(module, backbone description)``."""
        net, description = build_lpips(p.lpips_net, p.lpips_weights)
        return cls(net, p.lpips_slices_per_axis, random_slices), description

    def train(self, mode: bool = True) -> LPIPS25D:
        super().train(mode)
        self.net.eval()
        return self

    def _lpips_2d(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = (t.reshape(-1, 1, *t.shape[2:]).expand(-1, 3, -1, -1) for t in (a, b))
        short = min(a.shape[2:])
        if short < self.min_size:
            size = [math.ceil(s * self.min_size / short) for s in a.shape[2:]]
            a, b = (F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in (a, b))
        return self.net(a, b).mean()

    def per_axis(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """LPIPS of the slices of each axis, shape ``(3,)``."""
        if x.shape != y.shape:
            raise ValueError(f"volumes differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        idx = slice_indices(x.shape[2:], self.slices_per_axis, self.random_slices, generator)
        return torch.stack([self._lpips_2d(a, b) for a, b in zip(take_slices(x, idx), take_slices(y, idx))])

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scalar 2.5D LPIPS between ``x`` and ``y``."""
        return self.per_axis(x, y, generator).mean()
