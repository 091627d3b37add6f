"""How well an autoencoder reconstructs volumes: the one scoring used in training validation and in the report.

PSNR and 3D SSIM come from scikit-image (:mod:`synthmri.metrics.image`), LPIPS from the 2.5D wrapper
the model was trained with; every volume is encoded, decoded and clamped to the data range one at a
time (the same numbers whatever the batch), and the scores are averaged over volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from synthmri.metrics.image import psnr, ssim3d


@dataclass
class ReconstructionScores:
    """Per-volume scores, their means (:meth:`summary`), one (real, reconstruction) example and, when asked
    for, every reconstruction (e.g. to measure how far the autoencoder alone is from the real set)."""

    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    lpips: list[float] = field(default_factory=list)
    example: tuple[np.ndarray, np.ndarray] | None = None
    reconstructions: list[np.ndarray] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            "psnr": float(np.mean(self.psnr)),
            "ssim": float(np.mean(self.ssim)),
            "lpips": float(np.mean(self.lpips)),
            "psnr_min": float(np.min(self.psnr)),
            "n": len(self.psnr),
        }


@torch.inference_mode()
def score_reconstructions(
    model: torch.nn.Module,
    volumes: Sequence[np.ndarray | torch.Tensor],
    lpips: torch.nn.Module,
    device: torch.device,
    value_range: tuple[float, float],
    keep: bool = False,
    quantize: bool = True,
) -> ReconstructionScores:
    """Reconstruct each volume (``(D, H, W)`` or ``(1, D, H, W)``) with ``model.encode``/``decode`` in eval
    mode (restoring the model's mode afterwards) and score it; ``keep`` also returns the reconstructions.
    ``quantize=False`` decodes the encoder's output before the codebook (``encode.latents: continuous``)."""
    low, high = value_range
    was_training = model.training
    model.eval()
    scores = ReconstructionScores()
    try:
        for volume in volumes:
            x = torch.as_tensor(np.ascontiguousarray(volume) if isinstance(volume, np.ndarray) else volume)
            x = x.reshape(1, 1, *x.shape[-3:]).float().to(device)
            recon = model.decode(model.encode(x, quantize=quantize)).clamp(low, high).float()
            real, fake = x[0, 0].cpu().numpy(), recon[0, 0].cpu().numpy()
            scores.psnr.append(psnr(real, fake, high - low))
            scores.ssim.append(ssim3d(real, fake, high - low))
            scores.lpips.append(float(lpips(x, recon)))
            if scores.example is None:
                scores.example = (real, fake)
            if keep:
                scores.reconstructions.append(fake)
    finally:
        model.train(was_training)
    return scores
