"""The covariates a utility ViT predicts, as one output vector: encoding, loss and per-subject errors.

Continuous covariates are one output each, regressed on their declared range mapped to [-1, 1] (a fixed,
data-independent scaling: no statistic of any split leaks into another); categorical covariates are one logit
per level, trained with cross-entropy. A missing value (an unspecified site, say) is masked out of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from synthmri.config import Covariate
from synthmri.data.covariates import continuous_range, covariate_column


@dataclass(frozen=True)
class Target:
    covariate: Covariate
    start: int  # first output of this target
    width: int  # 1 (continuous) or the number of levels

    @property
    def name(self) -> str:
        return self.covariate.name

    @property
    def continuous(self) -> bool:
        return self.covariate.kind == "continuous"


class TargetCodec:
    """Maps covariate tables to training targets and model outputs back to predictions and errors."""

    def __init__(self, covariates: list[Covariate]) -> None:
        if not covariates:
            raise ValueError("the utility ViT needs at least one target covariate")
        targets, start = [], 0
        for cov in covariates:
            width = 1 if cov.kind == "continuous" else len(cov.levels or [])
            targets.append(Target(cov, start, width))
            start += width
        self.targets: list[Target] = targets
        self.n_outputs = start

    def target(self, name: str) -> Target:
        return next(t for t in self.targets if t.name == name)

    def encode(self, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """``(values, known)`` of shape ``(N, n_targets)``: continuous values scaled to [-1, 1], categorical
        values as level indices; ``known`` is False where the table lacks the value (or the column)."""
        values = np.zeros((len(table), len(self.targets)), np.float32)
        known = np.zeros((len(table), len(self.targets)), bool)
        for j, t in enumerate(self.targets):
            column = covariate_column(table, t.covariate)
            if column is None:
                continue
            raw, ok = column
            if t.continuous:
                low, high = continuous_range(t.covariate)
                values[ok, j] = (2.0 * (raw[ok] - low) / (high - low) - 1.0).astype(np.float32)
            else:
                levels = list(t.covariate.levels or [])
                ok = ok & np.isin(raw, levels)
                values[ok, j] = [levels.index(v) for v in raw[ok]]
            known[:, j] = ok
        return values, known

    def loss(self, outputs: torch.Tensor, values: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Mean over targets of each target's mean loss over the volumes whose value is known."""
        losses = []
        for j, t in enumerate(self.targets):
            mask = known[:, j]
            if not bool(mask.any()):
                continue
            out = outputs[mask, t.start : t.start + t.width]
            if t.continuous:
                losses.append(F.mse_loss(out[:, 0], values[mask, j]))
            else:
                losses.append(F.cross_entropy(out, values[mask, j].long()))
        if not losses:
            return outputs.sum() * 0.0
        return torch.stack(losses).mean()

    def predict(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        """Per target: continuous predictions in the covariate's own units, categorical level names."""
        out = {}
        for t in self.targets:
            block = outputs[:, t.start : t.start + t.width]
            if t.continuous:
                low, high = continuous_range(t.covariate)
                out[t.name] = low + (block[:, 0] + 1.0) * (high - low) / 2.0
            else:
                out[t.name] = np.asarray(t.covariate.levels, dtype=object)[block.argmax(axis=1)]
        return out

    def errors(self, outputs: np.ndarray, table: pd.DataFrame) -> dict[str, np.ndarray]:
        """Per target, one error per volume (NaN where the true value is unknown): absolute error in the
        covariate's units (continuous), 0/1 misclassification (categorical)."""
        predicted = self.predict(outputs)
        out = {}
        for t in self.targets:
            errors = np.full(len(table), np.nan)
            column = covariate_column(table, t.covariate)
            if column is not None:
                raw, ok = column
                if t.continuous:
                    errors[ok] = np.abs(predicted[t.name][ok] - raw[ok])
                else:
                    errors[ok] = (predicted[t.name][ok] != raw[ok]).astype(float)
            out[t.name] = errors
        return out
