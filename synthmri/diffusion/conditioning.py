"""Covariate conditioning: encoding of covariate values, their embedding, and condition dropout.

Every covariate, continuous or categorical, has a learned **null state** ("unspecified"). That one
design choice gives three features at once:

- partial conditioning: a row may leave any covariate unspecified (``None``); the model then
  marginalises over it, as it learned to when that covariate was dropped in training;
- classifier-free guidance: the reference prediction is the one with every covariate null, or, for a
  model trained with a guided group, the one with only that group null (:meth:`CovariateEncoder.guidance_reference`);
- data with missing optional covariates (e.g. no ``site``) trains without imputation.

Values travel as a :class:`CovariateBatch` of three tensors (a ``NamedTuple``, so DataLoader collation,
``.to(device)`` and DDP's input handling work on it unchanged). Encoding a row is independent of the
learned weights, so a DataLoader can call :func:`encode_covariates` in its workers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from synthmri.config import Covariate
from synthmri.data.covariates import continuous_range, is_missing, level_text, scale_continuous


class CovariateBatch(NamedTuple):
    """Encoded covariates of a batch; columns follow the order of the declared covariates per kind.

    Attributes:
        continuous: ``(B, n_continuous)`` float, values mapped from the declared range to [-1, 1];
            0 where absent.
        present: ``(B, n_continuous)`` bool, False where the value is unspecified (null state).
        categorical: ``(B, n_categorical)`` long, ``0`` = unspecified (NULL), level ``i`` → ``i + 1``.
    """

    continuous: torch.Tensor
    present: torch.Tensor
    categorical: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.continuous.shape[0]

    def to(self, device: torch.device | str) -> CovariateBatch:
        return CovariateBatch(*(t.to(device) for t in self))

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> CovariateBatch:
        """Rows ``index`` of every tensor (e.g. one sample of a batch)."""
        return CovariateBatch(*(t[index] for t in self))

    @staticmethod
    def cat(batches: Sequence[CovariateBatch]) -> CovariateBatch:
        return CovariateBatch(*(torch.cat(parts) for parts in zip(*batches, strict=True)))


def encode_covariates(
    covariates: Sequence[Covariate],
    rows: Sequence[Mapping[str, object]],
    ranges: Mapping[str, tuple[float, float]] | None = None,
) -> CovariateBatch:
    """Turn rows of covariate values into a :class:`CovariateBatch`.

    A key that is absent, ``None``, NaN, or a missing-value marker (``""``, ``"n/a"``...) means
    "unspecified". Values are checked, never coerced silently: a number outside the range, or an
    unknown level, raises ``ValueError`` naming the covariate (a wrong condition would otherwise
    produce a plausible-looking but wrong volume). Keys that are not declared covariates are ignored,
    so a manifest row with extra columns can be passed as is.

    Args:
        covariates: the declared covariates (``Params.covariates``).
        rows: one mapping per sample.
        ranges: optional ``{name: (low, high)}`` overriding the declared range of continuous covariates.
    """
    continuous = [c for c in covariates if c.kind == "continuous"]
    categorical = [c for c in covariates if c.kind == "categorical"]
    values = torch.zeros(len(rows), len(continuous))
    present = torch.zeros(len(rows), len(continuous), dtype=torch.bool)
    indices = torch.zeros(len(rows), len(categorical), dtype=torch.long)
    for r, row in enumerate(rows):
        for j, cov in enumerate(continuous):
            raw = row.get(cov.name)
            if is_missing(raw):
                continue
            values[r, j] = scale_continuous(cov, raw, ranges)
            present[r, j] = True
        for j, cov in enumerate(categorical):
            raw = row.get(cov.name)
            if is_missing(raw):
                continue
            levels = cov.levels or []
            if level_text(raw) not in levels:
                raise ValueError(f"covariate '{cov.name}' = {raw!r} is not one of {levels}")
            indices[r, j] = levels.index(level_text(raw)) + 1
    return CovariateBatch(values, present, indices)


class _ContinuousEmbedding(nn.Module):
    """Scalar in [-1, 1] → Fourier features ``[x, sin(2^k πx), cos(2^k πx)]`` → MLP; a learned null vector.

    Fourier features let a small MLP represent sharp effects of age (e.g. fast change after 60)
    that a linear map of the raw number could not.
    """

    def __init__(self, emb_dim: int, n_frequencies: int = 4) -> None:
        super().__init__()
        self.register_buffer(
            "freqs", math.pi * 2.0 ** torch.arange(n_frequencies, dtype=torch.float32), persistent=False
        )
        self.mlp = nn.Sequential(nn.Linear(1 + 2 * n_frequencies, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.null = nn.Parameter(torch.randn(emb_dim) * 0.5)

    def forward(self, value: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``value``, ``present``: ``(B,)`` → ``(B, emb_dim)``."""
        args = value[:, None] * self.freqs
        emb = self.mlp(torch.cat([value[:, None], torch.sin(args), torch.cos(args)], dim=1))
        return torch.where(present[:, None], emb, self.null.to(emb.dtype))


class CovariateEncoder(nn.Module):
    """Embeds declared covariates into one vector (added to the timestep embedding) and per-covariate tokens.

    ``forward`` returns ``(cond_emb, cond_tokens)``: ``cond_tokens`` is ``(B, n_covariates, emb_dim)``, one
    token per covariate in declaration order (each from its own embedding network, so tokens are
    distinguishable for cross-attention), and ``cond_emb = cond_tokens.sum(1)``. Unspecified covariates
    contribute their learned null vector (not zero), so "age unspecified" is a state the model learns.

    Args:
        covariates: the declared covariates (``Params.covariates``); an empty list gives an all-zero embedding.
        emb_dim: embedding width; must equal the U-Net's ``emb_dim``.
        ranges: optional overrides of the continuous covariates' ranges (see :func:`encode_covariates`).
            The covariate list and ranges are part of the model: store them with the checkpoint.
        guided: the covariates classifier-free guidance amplifies; ``None`` = all of them. A group (e.g. age
            and sex) makes guidance's reference branch "that group unspecified, the others as asked", so
            guidance strengthens the group's effects without exaggerating the others (the acquisition's
            contrast). The model must be trained with that group dropped (:meth:`drop_guided`).
    """

    def __init__(
        self,
        covariates: Sequence[Covariate],
        emb_dim: int,
        ranges: Mapping[str, tuple[float, float]] | None = None,
        guided: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.covariates = list(covariates)
        self.emb_dim = emb_dim
        unknown = sorted(set(guided or []) - {c.name for c in self.covariates})
        if unknown or (guided is not None and not guided):
            declared = [c.name for c in self.covariates]
            raise ValueError(f"guided covariates must be a non-empty subset of {declared}, got {list(guided)}")
        self.guided = list(guided) if guided is not None else None
        self.ranges = {c.name: continuous_range(c, ranges) for c in self.covariates if c.kind == "continuous"}
        self.continuous = nn.ModuleList(
            _ContinuousEmbedding(emb_dim) for c in self.covariates if c.kind == "continuous"
        )
        self.categorical = nn.ModuleList(
            nn.Embedding(len(c.levels or []) + 1, emb_dim) for c in self.covariates if c.kind == "categorical"
        )
        # follows .to(device) even when there are no covariates (and hence no parameters)
        self.register_buffer("_anchor", torch.empty(0), persistent=False)
        # token order = declaration order, whatever the kinds
        order, n_cont = [], 0
        for c in self.covariates:
            order.append(n_cont if c.kind == "continuous" else None)
            n_cont += c.kind == "continuous"
        n_cat = iter(range(len(self.categorical)))
        self._order = [("cont", i) if i is not None else ("cat", next(n_cat)) for i in order]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.covariates]

    def encode_values(self, rows: Sequence[Mapping[str, object]]) -> CovariateBatch:
        """Rows of ``{name: value | None}`` → :class:`CovariateBatch` (CPU tensors)."""
        return encode_covariates(self.covariates, rows, self.ranges)

    def forward(self, batch: CovariateBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` → ``(cond_emb (B, emb_dim), cond_tokens (B, n_covariates, emb_dim))``."""
        device = self._anchor.device
        batch = batch.to(device)
        tokens = []
        for kind, j in self._order:
            if kind == "cont":
                tokens.append(self.continuous[j](batch.continuous[:, j], batch.present[:, j]))
            else:
                tokens.append(self.categorical[j](batch.categorical[:, j]))
        if not tokens:
            empty = torch.zeros(batch.batch_size, 0, self.emb_dim, device=device)
            return empty.sum(1), empty
        stacked = torch.stack(tokens, dim=1)
        return stacked.sum(1), stacked

    # -- condition dropout / classifier-free guidance -------------------------------------------------

    @staticmethod
    def null_like(batch: CovariateBatch) -> CovariateBatch:
        """The same batch with every covariate unspecified: the unconditional input of guidance."""
        return CovariateBatch(
            torch.zeros_like(batch.continuous), torch.zeros_like(batch.present), torch.zeros_like(batch.categorical)
        )

    def _group_masks(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Which continuous and which categorical columns hold the covariates ``names``."""
        cont = [c.name in names for c in self.covariates if c.kind == "continuous"]
        cat = [c.name in names for c in self.covariates if c.kind == "categorical"]
        return torch.tensor(cont, dtype=torch.bool), torch.tensor(cat, dtype=torch.bool)

    def _null_where(self, batch: CovariateBatch, rows: torch.Tensor) -> CovariateBatch:
        """``batch`` with the guided group unspecified in the samples where ``rows`` (B, 1) is True."""
        cont, cat = self._group_masks(self.guided or self.names)
        device = batch.continuous.device
        keep_cont = ~(rows & cont[None]).to(device)
        keep_cat = ~(rows & cat[None]).to(device)
        return CovariateBatch(batch.continuous * keep_cont, batch.present & keep_cont, batch.categorical * keep_cat)

    def guidance_reference(self, batch: CovariateBatch) -> CovariateBatch:
        """The input of guidance's reference branch: every covariate unspecified, or only the guided group."""
        if self.guided is None:
            return self.null_like(batch)
        return self._null_where(batch, torch.ones(batch.batch_size, 1, dtype=torch.bool))

    def drop_guided(self, batch: CovariateBatch, p: float, generator: torch.Generator | None = None) -> CovariateBatch:
        """Make the guided group unspecified (the others kept) in each sample with probability ``p``: the
        training input of :meth:`guidance_reference`. Without a guided group the batch is returned as it is
        and ``generator`` is not drawn from (a run without a group trains exactly as before)."""
        if self.guided is None or p <= 0:
            return batch
        return self._null_where(batch, torch.rand(batch.batch_size, 1, generator=generator) < p)

    @staticmethod
    def drop(
        batch: CovariateBatch, p: float, generator: torch.Generator | None = None, p_each: float = 0.0
    ) -> CovariateBatch:
        """Replace each sample's whole condition by the null state with probability ``p`` (CFG training).

        Whole-condition dropout is what classifier-free guidance needs: the unconditional model is
        trained on exactly the input that sampling uses for it. ``p_each`` additionally nulls each
        covariate of each sample independently, so combinations such as "age given, sex unspecified"
        are seen in training too (partial conditioning then does not rely on the embedding's
        additivity alone). The draws use ``generator`` on the CPU: reproducible on any device.
        """
        n_cont, n_cat = batch.continuous.shape[1], batch.categorical.shape[1]
        keep_cont = torch.ones(batch.batch_size, n_cont, dtype=torch.bool)
        keep_cat = torch.ones(batch.batch_size, n_cat, dtype=torch.bool)
        if p > 0:
            whole = torch.rand(batch.batch_size, 1, generator=generator) >= p
            keep_cont, keep_cat = keep_cont & whole, keep_cat & whole
        if p_each > 0:
            each = torch.rand(batch.batch_size, n_cont + n_cat, generator=generator) >= p_each
            keep_cont, keep_cat = keep_cont & each[:, :n_cont], keep_cat & each[:, n_cont:]
        device = batch.continuous.device
        keep_cont, keep_cat = keep_cont.to(device), keep_cat.to(device)
        return CovariateBatch(batch.continuous * keep_cont, batch.present & keep_cont, batch.categorical * keep_cat)


class ConditionedUNet(nn.Module):
    """The U-Net and its covariate encoder as ONE module, so training wraps one DDP model, keeps one EMA
    and saves one ``state_dict`` (the encoder's weights are learned with the U-Net and must be averaged
    and restored with it). Sampling takes the two parts: ``sample_latents(m.unet, m.encoder, ...)``.
    """

    def __init__(self, unet: nn.Module, encoder: CovariateEncoder) -> None:
        super().__init__()
        self.unet = unet
        self.encoder = encoder

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, covariates: CovariateBatch) -> torch.Tensor:
        """Prediction for noisy latents ``x`` at ``timesteps`` under (possibly dropped) ``covariates``."""
        cond_emb, cond_tokens = self.encoder(covariates)
        return self.unet(x, timesteps, cond_emb, cond_tokens)
