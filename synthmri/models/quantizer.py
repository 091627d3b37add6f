"""Vector quantizer with an EMA codebook and dead-code restart (VQ-VAE-2 / SoundStream style).

The codebook is not learned by gradient descent but as an exponential moving average of the encoder
outputs assigned to each code, which trains faster and more stably than the codebook loss of the first
VQ-VAE. Codes that stop being used (EMA cluster size below a threshold) are restarted from random
current encoder outputs, the standard cure for codebook collapse. All codebook state lives in
buffers, so it is saved with ``state_dict`` and a resumed run continues with the same codebook.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class QuantizerOutput(NamedTuple):
    """``quantized``: straight-through codes, shape of the input; ``loss``: weighted commitment loss;
    ``indices``: ``(B, *spatial)`` code ids; ``stats``: detached scalars ``perplexity``, ``usage`` (fraction
    of codes used in this batch) and ``alive`` (fraction whose EMA cluster size is at the dead-code threshold)."""

    quantized: torch.Tensor
    loss: torch.Tensor
    indices: torch.Tensor
    stats: dict[str, torch.Tensor]


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantization of channel vectors ``(B, dim, *spatial)`` against ``codebook_size`` codes.

    In training mode each forward pass (1) on the very first call, initialises the codebook from random
    encoder outputs, (2) updates the EMA cluster sizes and embedding sums (all-reduced across DDP ranks)
    and sets each code to its Laplace-smoothed mean, (3) restarts codes whose EMA cluster size fell
    below ``dead_code_threshold`` from random encoder outputs of the (global) batch (then broadcast from
    rank 0 so every rank keeps the same codebook). In eval mode, and in :meth:`encode_indices`, nothing changes.

    Gradients use the straight-through estimator: ``z + (q - z).detach()`` passes the decoder's gradient
    to the encoder unchanged; the commitment loss ``||z - sg(q)||²`` keeps the encoder close to its codes.

    Args:
        codebook_size: number of codes K.
        dim: code dimension (= latent channels).
        decay: EMA decay of cluster sizes and sums.
        commitment_weight: weight of the commitment loss.
        dead_code_threshold: EMA cluster size (expected assignments per batch) below which a code is
            restarted; 0 disables restarts.
        eps: Laplace smoothing constant (keeps codes with no assignments from dividing by zero).
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        dead_code_threshold: float = 1.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.codebook_size, self.dim, self.decay, self.eps = codebook_size, dim, decay, eps
        self.commitment_weight, self.dead_code_threshold = commitment_weight, dead_code_threshold
        embedding = torch.randn(codebook_size, dim)
        self.register_buffer("embedding", embedding)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", embedding.clone())
        self.register_buffer("initialized", torch.tensor(False))

    # -- lookups (no state change) -------------------------------------------------------------------

    @staticmethod
    def _flatten(z: torch.Tensor) -> torch.Tensor:
        return z.movedim(1, -1).reshape(-1, z.shape[1]).float()

    @torch.no_grad()
    def _nearest(self, flat: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Index of the nearest code for each row of ``flat`` (chunked: N x K distances can be large)."""
        e = self.embedding
        e_sq = e.pow(2).sum(1)
        with torch.autocast(flat.device.type, enabled=False):  # bf16 distances would pick wrong codes
            return torch.cat([(e_sq - 2 * rows @ e.t()).argmin(1) for rows in flat.split(chunk)])

    @torch.no_grad()
    def encode_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Code ids ``(B, *spatial)`` of latents ``(B, dim, *spatial)``; deterministic, never updates the codebook."""
        return self._nearest(self._flatten(z)).view(z.shape[0], *z.shape[2:])

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors ``(B, dim, *spatial)`` of ids ``(B, *spatial)``."""
        return F.embedding(indices, self.embedding).movedim(-1, 1)

    # -- training-time codebook updates ---------------------------------------------------------------

    @staticmethod
    def _sample_rows(flat: torch.Tensor, n: int) -> torch.Tensor:
        idx = (
            torch.randperm(flat.shape[0], device=flat.device)[:n]
            if flat.shape[0] >= n
            else torch.randint(flat.shape[0], (n,), device=flat.device)
        )
        return flat[idx]

    @staticmethod
    def _all_rows(flat: torch.Tensor) -> torch.Tensor:
        """Encoder outputs of every rank, in rank order (= the rows one process would see with the whole
        global batch), so that DDP initialises and restarts codes exactly like a single process."""
        if not _distributed():
            return flat
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, flat.contiguous())
        return torch.cat(parts)

    def _broadcast_codebook(self) -> None:
        if _distributed():
            for buf in (self.embedding, self.cluster_size, self.embed_sum):
                dist.broadcast(buf, src=0)

    @torch.no_grad()
    def _init_from_data(self, flat: torch.Tensor) -> None:
        self.embedding.copy_(self._sample_rows(self._all_rows(flat), self.codebook_size))
        self.embed_sum.copy_(self.embedding * self.cluster_size[:, None])
        self.initialized.fill_(True)
        self._broadcast_codebook()

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)
        if _distributed():
            dist.all_reduce(sums)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.embed_sum.lerp_(sums, 1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embedding.copy_(self.embed_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        dead = self.cluster_size < self.dead_code_threshold
        if not dead.any():  # identical on every rank: cluster sizes are all-reduced
            return
        fresh = self._sample_rows(self._all_rows(flat), int(dead.sum()))
        self.embedding[dead] = fresh
        self.cluster_size[dead] = self.dead_code_threshold
        self.embed_sum[dead] = fresh * self.dead_code_threshold
        self._broadcast_codebook()

    # -- forward ------------------------------------------------------------------------------------

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``(B, dim, *spatial)``; see the class docstring for what training mode updates."""
        if z.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim} latent channels, got {z.shape[1]}")
        flat = self._flatten(z.detach())
        if self.training and not self.initialized:
            self._init_from_data(flat)
        indices = self._nearest(flat).view(z.shape[0], *z.shape[2:])
        quantized = self.decode_indices(indices).to(z.dtype)  # the codebook before this step's update
        loss = self.commitment_weight * F.mse_loss(z, quantized.detach())
        counts = torch.bincount(indices.flatten(), minlength=self.codebook_size).float()
        if self.training:
            if _distributed():
                dist.all_reduce(counts)
            self._ema_update(flat, indices.flatten(), counts)
        probs = counts / counts.sum()
        stats = {
            "perplexity": torch.exp(-(probs * torch.log(probs + 1e-10)).sum()),
            "usage": (counts > 0).float().mean(),
            "alive": (self.cluster_size >= self.dead_code_threshold).float().mean(),
        }
        if self.training and self.dead_code_threshold > 0:
            self._restart_dead_codes(flat)
        return QuantizerOutput(z + (quantized - z).detach(), loss, indices, stats)


class ResidualVectorQuantizer(nn.Module):
    """``levels`` :class:`VectorQuantizer` stages, each quantizing what the ones before it left (residual VQ,
    SoundStream: Zeghidour et al. 2021); the latent is the sum of the chosen codes.

    Why: one codebook of K codes stores log2(K) bits per latent position, and at the autoencoder's compression that
    drops fine texture such as the scanner's (the acquisition predictors fail on decoded volumes; the encoder's
    output before the codebook keeps more of it). Residual stages add log2(K) bits each at the cost of ``levels``
    nearest-code searches, where one larger codebook would leave most of its codes unused.

    Each stage has its own EMA codebook, data initialisation and dead-code restart (on its own residuals) and its
    own commitment loss; residuals are computed in fp32 (under bf16 autocast a small residual would round away).
    Gradients: straight-through from the sum of the codes to the encoder output. Indices are ``(B, levels,
    *spatial)``; ``stats`` are the stages' means, plus ``perplexity_last`` of the finest stage.

    Args:
        levels: number of stages (>= 2; one stage is :class:`VectorQuantizer` itself).
        codebook_size, dim, **kwargs: as :class:`VectorQuantizer`, for every stage.
    """

    def __init__(self, levels: int, codebook_size: int, dim: int, **kwargs) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"a residual quantizer needs at least 2 levels, got {levels}")
        self.stages = nn.ModuleList(VectorQuantizer(codebook_size, dim, **kwargs) for _ in range(levels))

    @torch.no_grad()
    def encode_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Code ids ``(B, levels, *spatial)`` of latents ``(B, dim, *spatial)``; never updates a codebook."""
        residual, indices = z.float(), []
        for stage in self.stages:
            ids = stage.encode_indices(residual)
            residual = residual - stage.decode_indices(ids)
            indices.append(ids)
        return torch.stack(indices, 1)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The sum of the stages' code vectors ``(B, dim, *spatial)`` of ids ``(B, levels, *spatial)``."""
        return sum(stage.decode_indices(indices[:, i]) for i, stage in enumerate(self.stages))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``(B, dim, *spatial)`` stage by stage; in training mode every stage updates its codebook."""
        residual = z.float()
        quantized, loss, indices, stats = torch.zeros_like(residual), 0.0, [], []
        for stage in self.stages:
            out = stage(residual)
            codes = out.quantized.detach()  # its value is the chosen codes (straight-through only adds a gradient)
            quantized, residual = quantized + codes, residual - codes
            loss = loss + out.loss
            indices.append(out.indices)
            stats.append(out.stats)
        merged = {key: torch.stack([s[key] for s in stats]).mean() for key in stats[0]}
        merged["perplexity_last"] = stats[-1]["perplexity"]
        return QuantizerOutput(z + (quantized.to(z.dtype) - z).detach(), loss, torch.stack(indices, 1), merged)
