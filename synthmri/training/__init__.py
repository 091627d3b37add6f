"""Training utilities shared by both training stages (VQ-GAN and diffusion): reuse, don't copy."""
