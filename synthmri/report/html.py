"""Figures of the report (PNG in ``reports/figures/``) and the self-contained ``reports/report.html``.

The page carries everything inline: CSS in a ``<style>`` block and every figure as a base64 PNG
``data:`` URI, so it can be mailed, attached to an MLflow run or opened offline. Figures are drawn on
private Agg canvases (no pyplot), as in :mod:`synthmri.viz`.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from synthmri.catalog import UTILITY_REPORT_DIR
from synthmri.data.covariates import covariate_title
from synthmri.io import atomic_path, write_text_atomic
from synthmri.logs import get_logger
from synthmri.report.compute import ReportResult
from synthmri.report.gate import Check
from synthmri.report.inputs import ReportData
from synthmri.report.protocol_sweep import value_text
from synthmri.viz import mid_slices, three_plane_grid

log = get_logger(__name__)

REAL_COLOUR, SYNTHETIC_COLOUR = "#1f77b4", "#d62728"


# ----------------------------------------------------------------------------------------------
# figures


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    figure.set_facecolor("white")
    return figure


def _save(figure: Figure, path: Path, dpi: int = 90) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, facecolor="white", bbox_inches="tight")
    return path


def _covariate_label(row: pd.Series, names: list[str]) -> str:
    """The row's covariate values in ``names`` order, three to a line (a panel is narrow)."""
    return covariate_title({name: row[name] for name in names if name in row.index}, per_line=3, names=False)


def real_vs_synthetic_figure(data: ReportData, covariates: list[str], n: int, path: Path) -> Path:
    """Three-plane grids: ``n`` held-out real volumes above ``n`` synthetic volumes, on one grey scale."""
    ref = data.reference_index[:n]
    syn = np.arange(min(n, len(data.synthetic)))
    volumes = [data.real_volumes[i] for i in ref] + [data.synthetic_volumes[i] for i in syn]
    id_column = "item_id" if "item_id" in data.real.columns else "subject_id"
    titles = [f"real {data.real[id_column].iloc[i]}\n{_covariate_label(data.real.iloc[i], covariates)}" for i in ref]
    titles += [f"synthetic #{i}\n{_covariate_label(data.synthetic.iloc[i], covariates)}" for i in syn]
    return three_plane_grid(
        volumes,
        titles,
        path,
        data.spacing,
        panel_inches=1.5,
        shared_range=True,
        suptitle="held-out real (top) vs synthetic (bottom)",
    )


def _grey_window(volumes: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(np.asarray(volumes, dtype=np.float32), [0.5, 99.5])
    return float(low), float(high if high > low else low + 1.0)


def _panel(ax, image: np.ndarray, vmin: float, vmax: float, aspect: float) -> None:
    ax.imshow(image, cmap="gray", origin="lower", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def synthetic_by_age_figure(data: ReportData, age: np.ndarray, ok: np.ndarray, path: Path, n: int = 6) -> Path | None:
    """A row of synthetic subjects at increasing requested age (axial and coronal middle slices)."""
    candidates = np.flatnonzero(ok)
    if len(candidates) == 0:
        return None
    order = candidates[np.argsort(age[candidates], kind="stable")]
    picks = order[np.unique(np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int))]
    sx, sy, sz = data.spacing
    vmin, vmax = _grey_window(data.synthetic_volumes[picks])
    figure = _new_figure(1.6 * len(picks) + 0.4, 3.6)
    axes = figure.subplots(2, len(picks), squeeze=False, gridspec_kw={"wspace": 0.03, "hspace": 0.05})
    for col, index in enumerate(picks):
        axial, coronal, _ = mid_slices(data.synthetic_volumes[index])
        _panel(axes[0, col], axial, vmin, vmax, sy / sx)
        _panel(axes[1, col], coronal, vmin, vmax, sz / sx)
        axes[0, col].set_title(f"age {age[index]:.0f}\n#{index}", fontsize=8)
    axes[0, 0].set_ylabel("axial", fontsize=8)
    axes[1, 0].set_ylabel("coronal", fontsize=8)
    figure.suptitle("synthetic subjects across requested ages", fontsize=9, y=1.06)
    return _save(figure, path)


def histogram_figure(intensity: dict, path: Path) -> Path:
    edges = np.asarray(intensity["bin_edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    figure = _new_figure(5.5, 3.0)
    ax = figure.subplots()
    ax.plot(centres, intensity["real_hist"], color=REAL_COLOUR, label="real held-out")
    ax.plot(centres, intensity["fake_hist"], color=SYNTHETIC_COLOUR, label="synthetic")
    ax.set_xlabel("intensity inside the head (processed range)")
    ax.set_ylabel("density")
    ax.set_title(
        f"in-head intensities: Wasserstein {intensity['wasserstein']:.4f}, JS distance {intensity['js_distance']:.3f}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    return _save(figure, path)


def nearest_pairs_figure(data: ReportData, privacy: dict, path: Path) -> Path | None:
    """Closest synthetic/training pairs, synthetic above its nearest training volume, one grey scale."""
    pairs = privacy["closest_pairs"]
    if not pairs:
        return None
    train = data.train
    volumes, titles = [], []
    for pair in pairs:
        flag = " LIKELY COPY" if pair["likely_copy"] else ""
        volumes += [data.synthetic_volumes[pair["synthetic"]], train[pair["train"]]]
        titles += [
            f"synthetic #{pair['synthetic']}\n{privacy['metric'].upper()} {pair['score']:.3f}{flag}",
            f"nearest train\n{pair['train_id']}",
        ]
    return three_plane_grid(
        volumes,
        titles,
        path,
        data.spacing,
        panel_inches=1.3,
        shared_range=True,
        suptitle=f"closest pairs; copy if {privacy['metric'].upper()} > {privacy['threshold']:.3f}",
    )


def privacy_scores_figure(privacy: dict, path: Path) -> Path:
    figure = _new_figure(5.5, 3.0)
    ax = figure.subplots()
    holdout, synthetic = np.asarray(privacy["holdout_scores"]), np.asarray(privacy["synthetic_scores"])
    low = float(min(holdout.min(), synthetic.min()))
    bins = np.linspace(low, 1.0, 31)
    ax.hist(holdout, bins=bins, alpha=0.6, color=REAL_COLOUR, label="held-out real vs train", density=True)
    ax.hist(synthetic, bins=bins, alpha=0.6, color=SYNTHETIC_COLOUR, label="synthetic vs train", density=True)
    ax.axvline(privacy["threshold"], color="black", linestyle="--", label="likely-copy threshold")
    ax.axvline(privacy["near_duplicate_threshold"], color="black", linestyle=":", label="near-duplicate")
    ax.set_xlabel(f"similarity to the nearest training volume ({privacy['metric'].upper()})")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    return _save(figure, path)


def conditioning_figure(conditioning: dict, path: Path) -> Path | None:
    """Measures against requested age (synthetic) and recorded age (real), with fitted lines; head size by sex."""
    age = conditioning.get("age")
    sex = conditioning.get("sex")
    panels = (list(age["measures"].items()) if age else []) + ([("head size by sex", None)] if sex else [])
    if not panels:
        return None
    figure = _new_figure(4.0 * len(panels), 3.2)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, values) in zip(axes, panels):
        if values is None:
            levels = sex["levels"]
            positions = np.arange(len(levels))
            for offset, (kind, colour) in zip((-0.15, 0.15), (("real", REAL_COLOUR), ("synthetic", SYNTHETIC_COLOUR))):
                groups = [sex["groups"][(kind, level)] for level in levels]
                for x, group in zip(positions + offset, groups):
                    ax.scatter(np.full(len(group), x), group, s=10, color=colour, alpha=0.6)
                means = [g.mean() if len(g) else np.nan for g in groups]
                ax.plot(positions + offset, means, "_", markersize=20, color=colour, label=kind)
            ax.set_xticks(positions, levels)
            ax.set_ylabel("head volume (ml)")
            ax.set_title("head size by sex", fontsize=9)
            ax.legend(fontsize=7)
            continue
        real_y, syn_y = values
        for kind, x, y, ok, colour in (
            ("real", age["real_age"], real_y, age["real_ok"], REAL_COLOUR),
            ("synthetic", age["synthetic_age"], syn_y, age["synthetic_ok"], SYNTHETIC_COLOUR),
        ):
            x, y = np.asarray(x)[ok], np.asarray(y)[ok]
            ax.scatter(x, y, s=10, color=colour, alpha=0.6, label=kind)
            if len(x) >= 2 and np.ptp(x) > 0:
                slope, intercept = np.polyfit(x, y, 1)
                grid = np.linspace(x.min(), x.max(), 2)
                ax.plot(grid, slope * grid + intercept, color=colour)
        ax.set_xlabel("age (real: recorded, synthetic: requested)")
        ax.set_ylabel(name)
        ax.set_title(f"{name} vs age", fontsize=9)
        ax.legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, path)


def _protocol_text(row: dict, between: str = ", ") -> str:
    """``{name: value}`` as ``name value`` pairs, unspecified (None) values left out."""
    return between.join(f"{name} {value_text(v)}" for name, v in row.items() if v is not None)


def protocol_sweep_figure(sweep: dict, spacing, path: Path) -> Path:
    """One subject under each protocol (:mod:`synthmri.report.protocol_sweep`): rows are subjects, each generated
    with one seed; columns are the training set's acquisition protocols (middle axial slices, one grey scale),
    each volume with its GM/WM contrast. The last panel sets the per-protocol contrasts beside the real cohort's
    means: a model that follows the acquisition draws the real profile."""
    protocols, subjects, volumes = sweep["protocols"], sweep["subjects"], sweep["volumes"]
    contrast, real_means, n_real = sweep["contrast"], sweep["real_means"], sweep["n_real"]
    n_sub, n_prot = len(subjects), len(protocols)
    sx, sy, _ = spacing
    vmin, vmax = _grey_window(volumes)
    title_inches = 0.14 * (len(protocols[0]) + 1) + 0.45  # one line per acquisition covariate, the real mean, suptitle
    height = 1.75 * n_sub + 0.8 + title_inches
    figure = _new_figure(1.45 * n_prot + 4.2, height)
    grid = figure.add_gridspec(
        n_sub,
        n_prot + 1,
        width_ratios=[1.0] * n_prot + [2.6],
        wspace=0.06,
        hspace=0.32,
        top=1.0 - title_inches / height,
    )
    for p, protocol in enumerate(protocols):
        for s in range(n_sub):
            ax = figure.add_subplot(grid[s, p])
            _panel(ax, mid_slices(volumes[s, p])[0], vmin, vmax, sy / sx)
            ax.set_xlabel(f"GM/WM {contrast[s, p]:.3f}", fontsize=8, labelpad=2)
            if s == 0:
                title = _protocol_text(protocol, between="\n")
                ax.set_title(f"{title}\nreal {real_means[p]:.3f} (n={n_real[p]})", fontsize=7.5)
            if p == 0:
                ax.set_ylabel(f"subject {s + 1}\n{_protocol_text(subjects[s]) or 'unspecified'}", fontsize=8)
    ax = figure.add_subplot(grid[:, n_prot])
    x = np.arange(n_prot)
    for s in range(n_sub):
        ax.plot(x, contrast[s], "o-", color=SYNTHETIC_COLOUR, alpha=0.35, linewidth=1, markersize=3)
    ax.plot(x, np.nanmean(contrast, axis=0), "o-", color=SYNTHETIC_COLOUR, linewidth=2, label="synthetic (same seeds)")
    ax.plot(x, real_means, "s-", color=REAL_COLOUR, linewidth=2, label="real cohort mean")
    ax.set_xticks(x, ["/".join(value_text(v) for v in protocol.values()) for protocol in protocols])
    ax.tick_params(axis="x", labelsize=7, rotation=30)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("/".join(protocols[0]), fontsize=8)
    ax.set_ylabel("GM/WM contrast", fontsize=8)
    ax.yaxis.set_label_position("right")
    ax.yaxis.tick_right()
    ax.legend(fontsize=7)
    metrics = sweep["metrics"]
    figure.suptitle(
        "one subject under each protocol (same seed along a row): Spearman "
        f"{_fmt(metrics.get('spearman'))}, sign agreement {_fmt(metrics.get('sign_agreement'))} "
        f"of {metrics.get('n_pairs')} same-seed pairs",
        fontsize=9,
        y=0.995,
    )
    return _save(figure, path)


def training_curves_figure(reports_dir: Path, path: Path) -> Path | None:
    """Loss curves of reports/vqgan/losses.csv and reports/ldm/losses.csv (+ validation.csv), when present."""
    sources = []
    for name, columns in (
        ("vqgan", ["l1", "perceptual", "vq", "g_adv", "feature_matching", "d_loss"]),
        ("ldm", ["loss"]),
    ):
        losses = reports_dir / name / "losses.csv"
        if losses.is_file():
            try:
                frame = pd.read_csv(losses)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError):
                continue
            if "step" in frame.columns and len(frame):
                val = reports_dir / name / "validation.csv"
                val_frame = None
                if val.is_file():
                    try:
                        val_frame = pd.read_csv(val)
                    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError):
                        val_frame = None
                sources.append((name, frame, [c for c in columns if c in frame.columns], val_frame))
    if not sources:
        return None
    figure = _new_figure(5.0 * len(sources), 3.2)
    axes = figure.subplots(1, len(sources), squeeze=False)[0]
    for ax, (name, frame, columns, val_frame) in zip(axes, sources):
        for column in columns:
            ax.plot(frame["step"], frame[column], label=column, linewidth=1)
        if val_frame is not None and "val_loss" in val_frame.columns and "step" in val_frame.columns:
            ax.plot(val_frame["step"], val_frame["val_loss"], "o-", label="val_loss", linewidth=1, markersize=3)
        ax.set_xlabel("step")
        ax.set_title({"vqgan": "VQ-GAN training losses", "ldm": "diffusion training loss"}[name], fontsize=9)
        ax.legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, path)


def recon_figure(example: tuple[np.ndarray, np.ndarray], subject: str, spacing, path: Path) -> Path:
    return three_plane_grid(
        [example[0], example[1]],
        [f"real {subject}", "VQ-GAN reconstruction"],
        path,
        spacing,
        panel_inches=1.6,
        shared_range=True,
    )


def render_figures(
    data: ReportData, result: ReportResult, covariates: list[str], n_examples: int, figures_dir: Path, reports_dir: Path
) -> dict[str, Path]:
    """Every figure of the report, as PNG files in ``figures_dir``; returns ``{name: path}`` in page order."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    for stale in figures_dir.glob("*.png"):  # a figure that no longer applies must not linger
        stale.unlink()
    details = result.details
    privacy = details["privacy"][result.metrics.get("privacy.metric", "ncc")]
    out: dict[str, Path | None] = {
        "real_vs_synthetic": real_vs_synthetic_figure(
            data, covariates, n_examples, figures_dir / "real_vs_synthetic.png"
        ),
    }
    age = details.get("conditioning", {}).get("age")
    if age:
        out["synthetic_by_age"] = synthetic_by_age_figure(
            data,
            np.asarray(age["synthetic_age"]),
            np.asarray(age["synthetic_ok"]),
            figures_dir / "synthetic_by_age.png",
        )
    out["conditioning"] = conditioning_figure(details.get("conditioning", {}), figures_dir / "conditioning.png")
    if details.get("protocol_sweep"):
        out["one_subject_each_protocol"] = protocol_sweep_figure(
            details["protocol_sweep"], data.spacing, figures_dir / "one_subject_each_protocol.png"
        )
    out["intensity_histograms"] = histogram_figure(details["intensity"], figures_dir / "intensity_histograms.png")
    out["nearest_neighbours"] = nearest_pairs_figure(data, privacy, figures_dir / "nearest_neighbours.png")
    out["privacy_scores"] = privacy_scores_figure(privacy, figures_dir / "privacy_scores.png")
    if details.get("recon_example") is not None:
        out["reconstruction"] = recon_figure(
            details["recon_example"], details.get("recon_id", ""), data.spacing, figures_dir / "reconstruction.png"
        )
    out["training_curves"] = training_curves_figure(reports_dir, figures_dir / "training_curves.png")
    utility = reports_dir / UTILITY_REPORT_DIR.name / "data_efficiency.png"  # drawn by the utility stage
    if result.metrics.get("utility.primary_gain") is not None and utility.is_file():
        out["utility"] = utility
    return {name: path for name, path in out.items() if path is not None}


# ----------------------------------------------------------------------------------------------
# the page

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #11713a; font-weight: bold; } .fail { color: #b00020; font-weight: bold; }
.skipped { color: #888; }
.banner { padding: 0.8em 1em; border-radius: 6px; font-size: 1.15em; margin: 1em 0; }
.banner.pass { background: #e3f6e9; border: 1px solid #11713a; }
.banner.fail { background: #fde7ea; border: 1px solid #b00020; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.note { font-size: 0.85em; color: #555; }
"""

CAPTIONS = {
    "real_vs_synthetic": "Held-out real volumes (top rows) and synthetic volumes (bottom rows), middle slices, "
    "one grey scale for all rows; each label lists the covariates in the order of params.yaml.",
    "synthetic_by_age": "Synthetic subjects sorted by the age they were generated for: ventricles and sulci "
    "should widen with age.",
    "conditioning": "Known covariate effects: the measure against age (real: recorded age; synthetic: requested "
    "age) with least-squares lines, and head volume by sex.",
    "one_subject_each_protocol": "One subject under each protocol: a few subjects (covariates of training rows, "
    "those in report.protocol_sweep.unspecified, the site by default, left unspecified), each generated with one "
    "seed under every acquisition protocol of the training set, so the protocol is the only difference along a "
    "row (middle axial slices, one grey scale). Under each volume its GM/WM contrast; above each column the real "
    "cohort's mean contrast under that protocol (all splits). Right: the same numbers as profiles across the "
    "protocols; a model that follows the acquisition draws the real profile (conditioning.protocol_sweep.*).",
    "intensity_histograms": "Pooled intensity histograms inside the head masks.",
    "nearest_neighbours": "The synthetic volumes most similar to a training volume, each above its nearest "
    "training volume.",
    "privacy_scores": "Similarity to the nearest training volume: held-out real subjects (what different people "
    "look like) vs synthetic volumes. Synthetic volumes right of the threshold are likely copies.",
    "reconstruction": "A test volume and its VQ-GAN reconstruction.",
    "training_curves": "Training curves from reports/vqgan/losses.csv and reports/ldm/losses.csv.",
    "utility": "Utility (the utility stage): error of a 3D ViT on the real held-out subjects against the number of "
    "real subjects it was fine-tuned on, from scratch and pre-trained on the synthetic set, on the real training "
    "split and on a negative control; dashed: trained on synthetic only (TSTR) or on all real training subjects "
    "(TRTR) without fine-tuning. Bars and bands: 95 % bootstrap intervals over test subjects and repeats.",
}

FAMILIES = [
    ("recon.", "VQ-GAN reconstruction"),
    ("ceiling.", "Autoencoder ceiling (decoded real volumes)"),
    ("fidelity.", "Fidelity and coverage"),
    ("diversity.", "Diversity"),
    ("conditioning.", "Conditioning fidelity"),
    ("privacy.", "Memorization / privacy"),
    ("intensity.", "Intensity"),
    ("measures.", "Measures the gate does not use (standardized mean differences)"),
    ("compare.", "VQ-GAN vs VQ-VAE (validation)"),
    ("utility.", "Utility: pre-training a 3D ViT on the set (reports/utility.json)"),
]


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


BADGES = {
    "pass": '<td class="pass">PASS</td>',
    "fail": '<td class="fail">FAIL</td>',
    "skipped": '<td class="skipped">skipped</td>',
}


def _table(header: list[str], rows: list[list[str]], raw_columns: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            if i in raw_columns:
                cells.append(cell)
            else:
                cls = ' class="num"' if i > 0 and _looks_numeric(cell) else ""
                cells.append(f"<td{cls}>{html.escape(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


#: parts of the ``ceiling.*`` keys that are not an extractor's name
CEILING_NOT_FEATURES = ("check", "gate_failed_checks", "gate_n_failed", "kept")
CEILING_ROWS = (("frechet_ratio", "FD ratio (lower is better)"), ("precision", "precision"), ("coverage", "coverage"))


def _ceiling_section(metrics: dict) -> list[str]:
    """Synthetic set beside decoded real volumes: if decoded training volumes already score badly, the
    autoencoder limits fidelity; if they score well and the synthetic set does not, the diffusion model does."""
    key = next(
        (k.split(".")[1] for k in metrics if k.startswith("ceiling.") and k.split(".")[1] not in CEILING_NOT_FEATURES),
        None,
    )
    if key is None:
        return []
    rows = [
        [
            label,
            _fmt(metrics.get(f"fidelity.{key}.{name}")),
            _fmt(metrics.get(f"ceiling.{key}.train.{name}")),
            _fmt(metrics.get(f"ceiling.{key}.heldout.{name}")),
        ]
        for name, label in CEILING_ROWS
    ]
    return [
        "<h2>Which model limits fidelity</h2>",
        _table(["", "synthetic set", "decoded training volumes", "decoded held-out volumes"], rows),
        '<p class="note">Decoded volumes went through the VQ-GAN only: they are what the synthetic set would '
        "score if the diffusion model reproduced real subjects' latents perfectly. Decoded training volumes "
        "are compared with the held-out set like the synthetic set is (the ceiling); the held-out volumes' own "
        "reconstructions are paired with the reference (optimistic).</p>",
        *_kept_section(metrics),
    ]


def _kept_section(metrics: dict) -> list[str]:
    """Per covariate: is it still in the decoded volumes (a predictor refitted on them), or lost?"""
    names = sorted({k.split(".")[2] for k in metrics if k.startswith("ceiling.kept.")})
    if not names:
        return []
    rows = [
        [
            name,
            _fmt(metrics.get(f"ceiling.kept.{name}.real")),
            _fmt(metrics.get(f"ceiling.kept.{name}.decoded_refit")),
            _fmt(metrics.get(f"ceiling.kept.{name}.chance")),
            _fmt(metrics.get(f"ceiling.kept.{name}.kept")),
        ]
        for name in names
    ]
    return [
        "<h3>What the autoencoder keeps of each covariate</h3>",
        _table(["covariate", "real volumes", "decoded volumes (refitted)", "chance", "share kept"], rows),
        '<p class="note">The gate\'s predictor (accuracy for a level, mean absolute error for a number) fitted and '
        "scored on real volumes, then refitted on the decoded training volumes and scored on the decoded held-out "
        "ones, beside chance (the training split's majority level or mean). Share kept: the part of the real "
        "predictor's advantage over chance that survives decoding. Near 1, the covariate is still there and a "
        "failing predictor check means the autoencoder moved the features it reads; near 0, the autoencoder lost "
        "it, and the decoder would have to draw what its latent does not carry.</p>",
    ]


MEASURE_LABELS = {
    "csf_fraction": "CSF fraction of the head",
    "gm_fraction": "grey-matter fraction",
    "wm_fraction": "white-matter fraction",
    "gm_wm_interface": "grey/white boundary (folding)",
    "edge_sharpness": "edge sharpness",
    "intensity_spread": "intensity spread (in-head SD)",
}


def _measures_section(metrics: dict) -> list[str]:
    """The image measures the gate does not use, as standardized mean differences against the real held-out
    set: the synthetic set, the decoded training volumes (what the autoencoder allows) and the real training
    volumes (what chance between two sets of real subjects gives)."""
    if not any(k.startswith("measures.") for k in metrics):
        return []

    def cell(name: str, who: str) -> str:
        smd = metrics.get(f"measures.{name}.{who}.smd")
        if smd is None:
            return "n/a"
        low, high = metrics.get(f"measures.{name}.{who}.low"), metrics.get(f"measures.{name}.{who}.high")
        return f"{smd:+.2f} [{low:+.2f}, {high:+.2f}]"

    rows = [
        [
            label,
            f"{_fmt(metrics.get(f'measures.{name}.real_mean'))} ± {_fmt(metrics.get(f'measures.{name}.real_sd'))}",
            cell(name, "synthetic"),
            cell(name, "decoded_train"),
            cell(name, "train"),
        ]
        for name, label in MEASURE_LABELS.items()
        if f"measures.{name}.real_mean" in metrics
    ]
    return [
        "<h2>Measures the gate does not use</h2>",
        _table(
            [
                "measure",
                "real held-out (mean ± SD)",
                "synthetic set",
                "decoded training volumes",
                "real training volumes",
            ],
            rows,
        ),
        '<p class="note">Standardized mean differences (Cohen\'s d: difference of means over the pooled SD) against '
        "the real held-out volumes, with 95 % bootstrap intervals; |d| ≈ 0.2 is small, ≈ 0.8 large. The real "
        "training volumes show what two sets of real subjects differ by; the decoded training volumes, what the "
        "autoencoder allows. Tissue classes use one pair of thresholds for every volume (a 3-class Otsu of the "
        "pooled real held-out head intensities, "
        f"{_fmt(metrics.get('measures.csf_gm_threshold'))} and {_fmt(metrics.get('measures.gm_wm_threshold'))}); "
        "the grey/white boundary is the fraction of head voxels that are white matter next to grey matter, which "
        "cortical folding makes large (<code>synthmri.metrics.image_measures</code>).</p>",
    ]


def _comparisons(metrics: dict) -> str:
    """How the synthetic set met the held-out set in the feature-space metrics, in words."""
    key = next((k for k in metrics if k.startswith("fidelity.") and k.endswith(".n_subsets")), None)
    if key is None:
        return "whole set"
    subsets, size = metrics[key], metrics.get(key.replace("n_subsets", "n_compared"))
    if subsets == 1:
        return f"whole set ({_fmt(size)} volumes)"
    return f"median of {_fmt(subsets)} disjoint seeded subsets of {_fmt(size)} volumes (the gate's calibrated size)"


def build_html(
    metrics: dict,
    checks: list[Check],
    result: ReportResult,
    figures: dict[str, Path],
    provenance: dict[str, str],
    comparison: pd.DataFrame | None = None,
) -> str:
    """The report page as one self-contained HTML string."""
    passed = bool(metrics.get("gate_passed"))
    status = "PASS" if passed else "FAIL"
    failed = [c.name for c in checks if c.status == "fail"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>SynthMRI quality and privacy report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>SynthMRI quality and privacy report</h1>",
    ]
    # no wall-clock "generated" time: the page depends on its inputs only (reproducible dvc.lock hash);
    # when it was made is in git, dvc.lock and the MLflow report run
    info = [
        ("synthetic volumes", _fmt(metrics.get("n_synthetic"))),
        ("real held-out volumes", f"{_fmt(metrics.get('n_reference'))} ({metrics.get('reference_splits', '')})"),
        ("real training volumes", _fmt(metrics.get("n_train"))),
        ("feature extractor", str(metrics.get("extractor", ""))),
        ("set comparisons (FD, MMD, PRDC)", _comparisons(metrics)),
        *[(k, v) for k, v in provenance.items()],
    ]
    parts.append(_table(["", ""], [[k, str(v)] for k, v in info]))
    banner = f"Quality gate: <b>{status}</b>"
    if failed:
        banner += " &mdash; failing checks: " + ", ".join(f"<code>{html.escape(n)}</code>" for n in failed)
    parts.append(f'<div class="banner {"pass" if passed else "fail"}">{banner}</div>')

    parts.append("<h2>Quality gate</h2>")
    ceiling = result.details.get("ceiling_checks")
    intervals = result.details.get("intervals", {})
    rows = []
    for check in checks:
        interval = intervals.get(check.name)
        row = [
            check.name,
            f"<td><code>{html.escape(check.key)}</code></td>",
            _fmt(check.value) + (f" [{_fmt(interval[0])}, {_fmt(interval[1])}]" if interval else ""),
            check.rule,
            BADGES[check.status],
            check.note,
        ]
        if ceiling is not None:
            decoded = ceiling.get(check.name)
            row[5:5] = [_fmt(decoded.value), BADGES[decoded.status]] if decoded else ["", "<td></td>"]
        rows.append(row)
    header = ["check", "metric", "value", "threshold", "result", "note"]
    if ceiling is None:
        parts.append(_table(header, rows, raw_columns={1, 4}))
    else:
        header[5:5] = ["decoded training volumes", "ceiling"]
        parts.append(_table(header, rows, raw_columns={1, 4, 6}))
        parts.append(
            '<p class="note">Decoded training volumes: the same checks on the VQ-GAN\'s reconstructions of the '
            "real training volumes, each with its own covariates, as if they were the synthetic set: what a "
            "perfect diffusion model would score through this autoencoder. A check that fails there cannot be "
            "passed by the diffusion model; the autoencoder limits it (predictor errors there are optimistic: "
            "the predictors were fitted on those subjects).</p>"
        )
    parts.append(
        '<p class="note">Thresholds come from <code>report.thresholds</code> in params.yaml; '
        "<code>null</code> switches a check off. In brackets: the 95 % bootstrap interval over subjects "
        "(held-out and synthetic volumes resampled; <code>synthmri.report.intervals</code>): a threshold inside "
        "it is a decision that other subjects could flip. Feature-space numbers are only comparable within one "
        f"extractor (here <b>{html.escape(str(metrics.get('extractor', '')))}</b>).</p>"
    )

    parts.extend(_ceiling_section(metrics))
    parts.extend(_measures_section(metrics))
    parts.append("<h2>All metrics</h2>")
    for prefix, title in FAMILIES:
        rows = [[key, _fmt(value)] for key, value in metrics.items() if key.startswith(prefix)]
        if rows:
            parts.append(f"<h3>{html.escape(title)}</h3>")
            parts.append(_table(["metric", "value"], rows))
    if comparison is not None and len(comparison):
        parts.append("<h3>VQ-GAN vs VQ-VAE</h3>")
        header = ["metric", *[str(c) for c in comparison.columns]]
        parts.append(_table(header, [[str(i), *[_fmt(v) for v in row]] for i, row in comparison.iterrows()]))

    privacy = result.details.get("privacy", {}).get(metrics.get("privacy.metric", "ncc"))
    if privacy:
        parts.append("<h2>Closest synthetic / training pairs</h2>")
        rows = [
            [
                p["synthetic_file"],
                p["train_id"],
                _fmt(p["score"]),
                "LIKELY COPY" if p["likely_copy"] else "no",
                "yes" if p["near_duplicate"] else "no",
            ]
            for p in privacy["closest_pairs"]
        ]
        parts.append(
            _table(
                [
                    "synthetic file",
                    "nearest training subject",
                    privacy["metric"].upper(),
                    "likely copy",
                    "near duplicate",
                ],
                rows,
            )
        )
        parts.append(
            f'<p class="note">Likely copy: similarity above {privacy["threshold"]:.4f}, the '
            f"{privacy['quantile']:g} quantile of held-out real vs training similarity; near duplicate: "
            f"above {privacy['near_duplicate_threshold']:.4f}. Fraction of likely copies "
            f"{privacy['fraction']:.3f}; new real subjects would give {privacy['chance_fraction']:.3f} on average "
            f"and at most {privacy['chance_fraction_bound']:.3f} in 95 draws of 100 (the gate's bound: the "
            f"threshold is a quantile of only {len(privacy['holdout_scores'])} held-out volumes, so the chance "
            "fraction itself varies from draw to draw).</p>"
        )

    parts.append("<h2>Figures</h2>")
    for name, path in figures.items():
        parts.append(
            f'<figure><img alt="{html.escape(name)}" src="{_png_data_uri(path)}">'
            f"<figcaption>{html.escape(CAPTIONS.get(name, name))}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(text: str, path: Path) -> Path:
    write_text_atomic(path, text)
    return path
