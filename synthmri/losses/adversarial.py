"""Adversarial terms of the VQ-GAN (taming-transformers recipe): hinge losses, feature matching,
the adaptive generator weight and the discriminator warm-up."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``0.5 * (mean(relu(1 - D(real))) + mean(relu(1 + D(fake))))``.

    Zero once real patches score ≥ 1 and fakes ≤ -1: the discriminator stops pushing confident
    patches, which keeps it from overpowering the generator.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss ``-mean(D(fake))``."""
    return -logits_fake.mean()


def feature_matching_loss(features_real: Sequence[torch.Tensor], features_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over discriminator layers of the L1 distance between real (detached) and reconstructed features.

    A dense, stable training signal for the generator (pix2pixHD): it matches the discriminator's
    intermediate statistics instead of only fooling its final logit.
    """
    if len(features_real) != len(features_fake) or not features_real:
        raise ValueError(f"need equally many (>0) feature maps, got {len(features_real)} and {len(features_fake)}")
    return torch.stack([F.l1_loss(f, r.detach()) for r, f in zip(features_real, features_fake)]).mean()


def adaptive_gan_weight(
    rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer_weight: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """``||∇_w rec_loss|| / (||∇_w gan_loss|| + 1e-4)`` at the decoder's last layer ``w``, clamped to
    ``[0, max_weight]`` and detached.

    Balances the adversarial gradient against the reconstruction gradient where both enter the
    decoder, so the GAN term neither vanishes nor swamps the reconstruction (Esser et al., 2021).
    Both losses must still have their graphs (the graphs are retained for the real backward pass).
    Under DDP the two gradients are averaged over ranks first, so every rank uses the same weight.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)
    if dist.is_available() and dist.is_initialized():  # DDP: the gradients of the global batch's losses
        for grad in (rec_grad, gan_grad):
            dist.all_reduce(grad)
            grad /= dist.get_world_size()
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def disc_factor(step: int, start_step: int, value: float = 1.0) -> float:
    """Warm-up switch of the adversarial terms: ``0`` before ``start_step``, ``value`` from it on.

    The autoencoder first learns to reconstruct; a discriminator facing blurry early reconstructions
    wins trivially and its gradients are noise.
    """
    return value if step >= start_step else 0.0
