"""Checks that decide whether a NIfTI file can be trusted, header first, then voxels.

The header is checked before any voxel is read, so a file that claims an absurd array size is
refused without allocating it. Each failure raises :class:`InvalidInput` with a one-line reason
that ends up in ``quarantine.csv``.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from synthmri.config import IngestParams
from synthmri.errors import InvalidInput

_READ_ERRORS = (
    nib.filebasedimages.ImageFileError,
    OSError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    ValueError,
    TypeError,
    MemoryError,
)


@dataclass(frozen=True)
class ValidVolume:
    """A volume that passed every check, already reoriented to RAS (world coordinates unchanged)."""

    data: np.ndarray
    affine: np.ndarray
    original_orientation: str
    original_shape: tuple[int, ...]
    voxel_size: tuple[float, float, float]


def check_path(path: str, root_real: str) -> None:
    """Refuse names that are not UTF-8, symlink loops, broken links and paths outside the root."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("file name is not valid UTF-8") from None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            raise InvalidInput("symbolic link loop") from None
        raise InvalidInput(f"cannot open file ({exc.strerror})") from None
    real = os.path.realpath(path)
    if os.path.commonpath([real, root_real]) != root_real:
        raise InvalidInput("path escapes the data root")
    if not os.path.isfile(real):
        raise InvalidInput("not a regular file")


def _load_header(path: str) -> nib.Nifti1Image:
    try:
        image = nib.load(path)
    except _READ_ERRORS as exc:
        raise InvalidInput(f"not a readable NIfTI file ({_short(exc)})") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise InvalidInput(f"not a NIfTI file (nibabel read it as {type(image).__name__})")
    _check_raw_pixdim(path, type(image.header))
    return image


def _check_raw_pixdim(path: str, header_class: type) -> None:
    """nibabel silently replaces negative voxel sizes by their absolute value; we refuse them."""
    try:
        with nib.openers.ImageOpener(path) as handle:
            raw = header_class.from_fileobj(handle, check=False)
    except _READ_ERRORS as exc:
        raise InvalidInput(f"not a readable NIfTI header ({_short(exc)})") from None
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=float)
    if np.any(pixdim <= 0) or not np.all(np.isfinite(pixdim)):
        raise InvalidInput(
            f"voxel size {tuple(round(float(z), 4) for z in pixdim)} mm in the header is zero, negative or not finite"
        )


def check_header(image: nib.Nifti1Image, limits: IngestParams) -> tuple[int, int, int]:
    """Validate dimensions, voxel sizes and affine from the header alone; return the 3D shape."""
    shape = tuple(int(s) for s in image.header.get_data_shape())
    if len(shape) == 4 and shape[3] != 1:
        raise InvalidInput(f"4D image with {shape[3]} volumes (expected one 3D volume)")
    if len(shape) not in (3, 4):
        raise InvalidInput(f"{len(shape)}D image of shape {shape} (expected 3D)")
    shape3 = shape[:3]
    if min(shape3) < limits.min_dim or max(shape3) > limits.max_dim:
        raise InvalidInput(f"dimensions {shape3} outside [{limits.min_dim}, {limits.max_dim}] per axis")
    n_voxels = int(np.prod(shape3, dtype=np.int64))
    if n_voxels > limits.max_voxels:
        raise InvalidInput(f"header claims {n_voxels:,} voxels, above ingest.max_voxels={limits.max_voxels:,}")
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=float)
    low, high = limits.voxel_size_mm
    if not np.all(np.isfinite(zooms)) or zooms.min() < low or zooms.max() > high:
        raise InvalidInput(f"voxel size {tuple(round(float(z), 4) for z in zooms)} mm outside [{low}, {high}] mm")
    check_affine(image.affine, limits.max_shear)
    return shape3


def check_affine(affine: np.ndarray, max_shear: float) -> None:
    """An affine must be finite, invertible and free of shear (rotations and flips are fine)."""
    if not np.all(np.isfinite(affine)):
        raise InvalidInput("affine contains NaN or infinite values")
    rzs = affine[:3, :3]
    norms = np.linalg.norm(rzs, axis=0)
    if norms.min() <= 1e-8 or abs(np.linalg.det(rzs)) <= 1e-8 * np.prod(norms):
        raise InvalidInput("affine is singular (axes are degenerate)")
    unit = rzs / norms
    cosines = np.abs(unit.T @ unit - np.eye(3))
    if cosines.max() > max_shear:
        raise InvalidInput(f"affine is sheared (axes deviate from orthogonal by cos={cosines.max():.3g})")


def check_intensities(data: np.ndarray) -> None:
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise InvalidInput(f"{bad:,} voxels are NaN or infinite")
    low, high = float(data.min()), float(data.max())
    if low == high:
        raise InvalidInput(f"every voxel has the same value ({low:g}): empty or constant image")


def load_valid_volume(path: str, limits: IngestParams) -> ValidVolume:
    """Run every check and return the volume reoriented to RAS with its world geometry intact."""
    image = _load_header(path)
    shape3 = check_header(image, limits)
    try:
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(shape3)
    except _READ_ERRORS as exc:
        raise InvalidInput(f"voxel data unreadable: truncated or corrupt file ({_short(exc)})") from None
    check_intensities(data)
    orientation = "".join(nib.aff2axcodes(image.affine))
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, image.affine))
    return ValidVolume(
        data=np.asarray(canonical.dataobj, dtype=np.float32),
        affine=canonical.affine,
        original_orientation=orientation,
        original_shape=shape3,
        voxel_size=tuple(float(z) for z in np.linalg.norm(image.affine[:3, :3], axis=0)),
    )


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = text if len(text) < 120 else text[:117] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
