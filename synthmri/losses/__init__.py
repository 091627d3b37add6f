"""VQ-GAN losses: 2.5D LPIPS perceptual loss and the adversarial / feature-matching terms."""

from synthmri.losses.adversarial import (
    adaptive_gan_weight,
    disc_factor,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
)
from synthmri.losses.perceptual import LPIPS25D, RandomBackboneWarning, build_lpips

__all__ = [
    "LPIPS25D",
    "RandomBackboneWarning",
    "adaptive_gan_weight",
    "build_lpips",
    "disc_factor",
    "feature_matching_loss",
    "hinge_d_loss",
    "hinge_g_loss",
]
