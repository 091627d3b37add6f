"""3D VQ-GAN autoencoder: convolutional encoder → EMA vector quantizer → convolutional decoder.

The same network is the VQ-VAE baseline: only the training losses differ (see ``synthmri.losses``).

Output activation: **none** (identity). Volumes are scaled to [-1, 1] and the background sits exactly
at -1; a ``tanh`` would need an infinite pre-activation to reach it and its vanishing gradient near
±1 slows the L1 fit of background and bright tissue. Consumers that need the range (sampling, NIfTI
writing, metrics) clamp the decoded volume to [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from synthmri.config import QuantizerParams, VQGANModelParams
from synthmri.models.blocks import AttentionBlock, Downsample, ResidualBlock, Upsample, conv_nd, group_norm
from synthmri.models.quantizer import ResidualVectorQuantizer, VectorQuantizer


class _LayerStack(nn.Module):
    """Runs ``self.layers`` in order, optionally with activation checkpointing per layer (trades
    compute for memory, the first wall of 3D training)."""

    layers: nn.ModuleList
    checkpointing: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


def _mid_block(
    spatial_dims: int, channels: int, norm_groups: int, attention: bool, heads: int, dropout: float
) -> list[nn.Module]:
    """Residual → (attention) → residual at the lowest resolution, where attention is affordable."""
    attn = [AttentionBlock(channels, heads, norm_groups)] if attention else []
    return [
        ResidualBlock(spatial_dims, channels, channels, norm_groups, dropout),
        *attn,
        ResidualBlock(spatial_dims, channels, channels, norm_groups, dropout),
    ]


def _out_block(
    spatial_dims: int, in_channels: int, out_channels: int, norm_groups: int, kernel_size: int
) -> nn.Sequential:
    return nn.Sequential(
        group_norm(in_channels, norm_groups), nn.SiLU(), conv_nd(spatial_dims, in_channels, out_channels, kernel_size)
    )


class Encoder(_LayerStack):
    """Conv → per level: ``num_res_blocks`` residual blocks, then a stride-2 downsample (all but the last
    level) → mid block → GroupNorm/SiLU → 1x1 pre-quant conv to ``latent_channels``.

    Downsampling factor per axis: ``2 ** (len(channels) - 1)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1 for a single MRI contrast).
        channels: widths per resolution level.
        num_res_blocks: residual blocks per level.
        latent_channels: channels of the latent (= code dimension).
        attention: self-attention in the mid block.
        norm_groups: GroupNorm groups.
        attention_heads: heads of the mid-block attention.
        dropout: dropout in residual blocks.
        checkpointing: activation checkpointing per layer in training.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int],
        num_res_blocks: int,
        latent_channels: int,
        attention: bool = True,
        norm_groups: int = 8,
        attention_heads: int = 1,
        dropout: float = 0.0,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        layers: list[nn.Module] = [conv_nd(spatial_dims, in_channels, channels[0])]
        prev = channels[0]
        for level, ch in enumerate(channels):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(spatial_dims, prev, ch, norm_groups, dropout))
                prev = ch
            if level < len(channels) - 1:
                layers.append(Downsample(spatial_dims, ch))
        layers += _mid_block(spatial_dims, prev, norm_groups, attention, attention_heads, dropout)
        layers.append(_out_block(spatial_dims, prev, latent_channels, norm_groups, kernel_size=1))
        self.layers = nn.ModuleList(layers)


class Decoder(_LayerStack):
    """3x3 post-quant conv → mid block → per level (lowest first): residual blocks, then nearest-neighbour
    upsample + conv (all but the last level) → GroupNorm/SiLU → 3x3 output conv (no activation).

    Args: as :class:`Encoder`, with ``in_channels`` the channels of the reconstructed image.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int],
        num_res_blocks: int,
        latent_channels: int,
        attention: bool = True,
        norm_groups: int = 8,
        attention_heads: int = 1,
        dropout: float = 0.0,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        prev = channels[-1]
        layers: list[nn.Module] = [conv_nd(spatial_dims, latent_channels, prev)]
        layers += _mid_block(spatial_dims, prev, norm_groups, attention, attention_heads, dropout)
        for level in reversed(range(len(channels))):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(spatial_dims, prev, channels[level], norm_groups, dropout))
                prev = channels[level]
            if level > 0:
                layers.append(Upsample(spatial_dims, prev))
        layers.append(_out_block(spatial_dims, prev, in_channels, norm_groups, kernel_size=3))
        self.layers = nn.ModuleList(layers)

    @property
    def last_layer_weight(self) -> nn.Parameter:
        return self.layers[-1][-1].weight


class VQGAN(nn.Module):
    """Encoder → :class:`VectorQuantizer` (or :class:`ResidualVectorQuantizer`) → decoder.

    Args:
        encoder: maps ``(B, C, *spatial)`` to ``(B, latent_channels, *spatial / factor)``.
        quantizer: EMA vector quantizer with ``dim == latent_channels`` (one codebook, or residual stages).
        decoder: maps latents back to ``(B, C, *spatial)``.
        downsample_factor: spatial reduction per axis, checked against input shapes.
    """

    def __init__(
        self,
        encoder: Encoder,
        quantizer: VectorQuantizer | ResidualVectorQuantizer,
        decoder: Decoder,
        downsample_factor: int,
    ) -> None:
        super().__init__()
        self.encoder, self.quantizer, self.decoder = encoder, quantizer, decoder
        self.downsample_factor = downsample_factor

    @classmethod
    def from_params(
        cls,
        p: VQGANModelParams,
        q: QuantizerParams,
        in_channels: int = 1,
        spatial_dims: int = 3,
        checkpointing: bool = False,
    ) -> VQGAN:
        """Build from the ``vqgan.model`` and ``vqgan.quantizer`` sections of params.yaml."""
        kwargs = dict(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            channels=p.channels,
            num_res_blocks=p.num_res_blocks,
            latent_channels=p.latent_channels,
            attention=p.attention,
            norm_groups=p.norm_groups,
            checkpointing=checkpointing,
        )
        codebook = dict(
            codebook_size=q.codebook_size,
            dim=p.latent_channels,
            decay=q.ema_decay,
            commitment_weight=q.commitment_weight,
            dead_code_threshold=q.dead_code_threshold,
        )
        quantizer = VectorQuantizer(**codebook) if q.levels == 1 else ResidualVectorQuantizer(q.levels, **codebook)
        return cls(Encoder(**kwargs), quantizer, Decoder(**kwargs), downsample_factor=2 ** (len(p.channels) - 1))

    def _check_shape(self, x: torch.Tensor) -> None:
        bad = [s for s in x.shape[2:] if s % self.downsample_factor]
        if bad:
            raise ValueError(
                f"every spatial size must be divisible by the downsampling factor "
                f"{self.downsample_factor}; got shape {tuple(x.shape[2:])}"
            )

    @property
    def last_layer_weight(self) -> nn.Parameter:
        """Weight of the decoder's output conv, where the adaptive GAN weight compares gradient norms."""
        return self.decoder.last_layer_weight

    def encode_pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous encoder output (before quantization)."""
        self._check_shape(x)
        return self.encoder(x)

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Code ids ``(B, *spatial / factor)`` of ``x`` (``(B, levels, ...)`` with residual stages); deterministic,
        never changes the codebook."""
        return self.quantizer.encode_indices(self.encode_pre_quant(x))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decode(self.quantizer.decode_indices(indices))

    def encode(self, x: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Quantized latents ``(B, latent_channels, *spatial / factor)``: the code vectors, never a noisy
        sample, so cached latents are deterministic (the diffusion model learns these); ``quantize=False``
        returns the encoder's continuous output before the codebook (``encode.latents: continuous``)."""
        if not quantize:
            return self.encode_pre_quant(x)
        return self.quantizer.decode_indices(self.encode_indices(x))

    def decode(self, z: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Decode latents; ``quantize=True`` first snaps them to their nearest codes (e.g. diffusion samples)."""
        if quantize:
            z = self.quantizer.decode_indices(self.quantizer.encode_indices(z))
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Returns ``(reconstruction, vq_loss, stats)``; in training mode this updates the codebook."""
        quantized, vq_loss, _, stats = self.quantizer(self.encode_pre_quant(x))
        return self.decoder(quantized), vq_loss, stats
