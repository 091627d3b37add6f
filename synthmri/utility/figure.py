"""The data-efficiency figure: held-out error against the number of real fine-tuning subjects, per arm."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synthmri.report.html import _new_figure, _save

ARM_STYLE = {  # arm: (label, colour, marker)
    "scratch": ("from scratch", "#7f7f7f", "o"),
    "synthetic": ("pre-trained on the synthetic set", "#d62728", "s"),
    "real": ("pre-trained on the real training split", "#1f77b4", "^"),
    "control": ("pre-trained on the negative control", "#9467bd", "v"),
}


def data_efficiency_figure(summary: dict, targets: list[tuple[str, bool]], k_labels: list[str], n_all: int,
                           path: Path) -> Path:  # fmt: skip
    """One panel per target (``(name, continuous)``): each arm's mean error on the real held-out subjects
    against k with its 95 % interval, and the TSTR / TRTR errors as horizontal bands."""
    figure = _new_figure(5.2 * len(targets), 3.8)
    x = np.arange(len(k_labels))
    for i, (target, continuous) in enumerate(targets):
        ax = figure.add_subplot(1, len(targets), i + 1)
        for j, (arm, (label, colour, marker)) in enumerate(ARM_STYLE.items()):
            mean = np.array([summary.get(f"error.{arm}.{target}.k{k}", np.nan) for k in k_labels], float)
            low = np.array([summary.get(f"error_ci_low.{arm}.{target}.k{k}", np.nan) for k in k_labels], float)
            high = np.array([summary.get(f"error_ci_high.{arm}.{target}.k{k}", np.nan) for k in k_labels], float)
            shift = (j - 1.5) * 0.07
            ax.errorbar(x + shift, mean, yerr=[mean - low, high - mean], color=colour, marker=marker, capsize=3,
                        label=label, lw=1.5, ms=5)  # fmt: skip
        for arm, colour, text in (("tstr", "#d62728", "TSTR (synthetic only)"), ("trtr", "#1f77b4", "TRTR")):
            value = summary.get(f"error.{arm}.{target}")
            if value is not None and np.isfinite(value):
                ax.axhspan(summary[f"error_ci_low.{arm}.{target}"], summary[f"error_ci_high.{arm}.{target}"],
                           color=colour, alpha=0.08)  # fmt: skip
                ax.axhline(value, color=colour, ls="--", lw=1, label=f"{text}, no fine-tuning")
        ax.set_xticks(x, [f"all ({n_all})" if k == "all" else k for k in k_labels])
        ax.set_xlabel("real subjects in fine-tuning (k)")
        ax.set_ylabel(f"{target}: mean absolute error" if continuous else f"{target}: error rate")
        ax.set_title(f"{target} on the real held-out subjects", fontsize=10)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return _save(figure, path)
