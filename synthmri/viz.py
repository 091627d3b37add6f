"""Figures shared by the stages: slice grids of 3D volumes (demo cohort, real vs reconstruction, samples).

Everything here draws on a private Agg canvas (no pyplot, no global backend switch), so it works
headless and from worker threads, and every file is written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from synthmri.io import atomic_path

PLANES = ("axial", "coronal", "sagittal")


def _as_volume(volume) -> np.ndarray:
    """A 3D float array from a numpy array or tensor, dropping singleton channel axes."""
    if hasattr(volume, "detach"):  # torch tensor, without importing torch here
        volume = volume.detach().cpu().numpy()
    array = np.asarray(volume, dtype=np.float32)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {np.shape(volume)}")
    return array


def mid_slices(volume: np.ndarray, positions: Sequence[float] = (0.5, 0.5, 0.5)) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices of a RAS-ordered (x, y, z) volume, ready for imshow with
    ``origin='lower'``: superior/anterior up, subject's right on the right of the panel.
    ``positions`` are the fractions along x (sagittal), y (coronal) and z (axial); 0.5 = middle."""
    x, y, z = (min(max(int(round(f * (n - 1))), 0), n - 1) for f, n in zip(positions, volume.shape))
    return [volume[:, :, z].T, volume[:, y, :].T, volume[x, :, :].T]


def _display_range(volume: np.ndarray) -> tuple[float, float]:
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [0.5, 99.5])
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def three_plane_grid(
    volumes: list[np.ndarray],
    titles: list[str],
    path: Path,
    affine_spacing: Sequence[float] | Sequence[Sequence[float]] | None = None,
    *,
    dpi: int = 80,
    panel_inches: float = 2.2,
    suptitle: str | None = None,
    shared_range: bool = False,
    positions: Sequence[float] = (0.5, 0.5, 0.5),
) -> Path:
    """Write a grid figure: one row per volume, columns = axial / coronal / sagittal middle slices.

    Volumes are assumed to be in RAS voxel order (as after ingest). ``affine_spacing`` is the voxel
    size (one triplet for all rows, or one per row) used for the aspect ratio; isotropic if None.
    Each row gets its own grey-level window (0.5-99.5 percentiles) unless ``shared_range`` is set
    (use it to compare a volume with its reconstruction on the same scale). ``positions`` moves the
    slices off the middle (fractions along x, y, z; see :func:`mid_slices`).
    """
    path = Path(path)
    if len(volumes) == 0:
        raise ValueError("three_plane_grid needs at least one volume")
    if len(titles) != len(volumes):
        raise ValueError(f"got {len(volumes)} volumes but {len(titles)} titles")
    arrays = [_as_volume(v) for v in volumes]
    spacings = _per_row_spacing(affine_spacing, len(arrays))

    ranges = [_display_range(a) for a in arrays]
    if shared_range:
        shared = (min(r[0] for r in ranges), max(r[1] for r in ranges))
        ranges = [shared] * len(arrays)

    # physical extent (mm) of each panel, to size the columns and rows without empty margins
    extents = []
    for array, (sx, sy, sz) in zip(arrays, spacings):
        nx, ny, nz = array.shape
        extents.append([(nx * sx, ny * sy), (nx * sx, nz * sz), (ny * sy, nz * sz)])
    col_widths = [max(row[col][0] for row in extents) for col in range(3)]
    row_heights = [max(panel[1] for panel in row) for row in extents]
    scale = panel_inches / max(row_heights)
    lines = max(title.count("\n") + 1 for title in titles)  # rotated row labels: one text line is ~0.15 in
    label_inches, title_inches = 0.05 + 0.15 * lines, 0.25 + (0.3 if suptitle else 0.0)
    figure = Figure(figsize=(sum(col_widths) * scale + label_inches, sum(row_heights) * scale + title_inches))
    FigureCanvasAgg(figure)
    axes = figure.subplots(
        len(arrays),
        3,
        squeeze=False,
        gridspec_kw={"width_ratios": col_widths, "height_ratios": row_heights, "wspace": 0.02, "hspace": 0.04},
    )
    for row, (array, spacing, (vmin, vmax), title) in enumerate(zip(arrays, spacings, ranges, titles)):
        sx, sy, sz = spacing
        aspects = (sy / sx, sz / sx, sz / sy)
        for col, (plane, aspect) in enumerate(zip(mid_slices(array, positions), aspects)):
            ax = axes[row, col]
            ax.imshow(plane, cmap="gray", origin="lower", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("black")
            for spine in ax.spines.values():
                spine.set_visible(False)
            if row == 0:
                ax.set_title(PLANES[col], fontsize=9)
        axes[row, 0].set_ylabel(title, fontsize=8)
    figure.subplots_adjust(
        left=label_inches / figure.get_figwidth(),
        right=0.995,
        bottom=0.005,
        top=1.0 - title_inches / figure.get_figheight(),
    )
    if suptitle:
        figure.suptitle(suptitle, fontsize=9, y=0.995, va="top")
    figure.set_facecolor("white")

    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        if fmt == "png":
            _save_compact_png(figure, tmp, dpi)
        else:
            figure.savefig(tmp, format=fmt, dpi=dpi, facecolor="white")
    return path


def _save_compact_png(figure: Figure, path: Path, dpi: int) -> None:
    """PNG written as 8-bit greyscale when the figure has no colour (3-4x smaller than RGBA)."""
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    buffer.seek(0)
    with Image.open(buffer) as image:
        rgb = np.asarray(image.convert("RGB"))
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
            Image.fromarray(np.ascontiguousarray(rgb[..., 0])).save(path, format="png", optimize=True)
        else:
            Image.fromarray(rgb).save(path, format="png", optimize=True)


def _per_row_spacing(spacing, n_rows: int) -> list[tuple[float, float, float]]:
    if spacing is None:
        return [(1.0, 1.0, 1.0)] * n_rows
    array = np.asarray(spacing, dtype=float)
    if array.shape == (3,):
        return [tuple(array)] * n_rows
    if array.shape == (n_rows, 3):
        return [tuple(row) for row in array]
    raise ValueError(f"affine_spacing must be 3 numbers or one triplet per volume, got shape {array.shape}")
