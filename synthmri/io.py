"""File helpers shared by every stage: atomic writes, checksums, NIfTI output with a clean header.

Atomic means: write to a temporary file in the same folder, fsync, then ``os.replace``. A killed
process or a full disk therefore never leaves a truncated file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def dvc_directory_hash(path: str | Path) -> str:
    """The hash DVC gives the folder ``path`` as a stage output (``<md5>.dir``, as in ``dvc.lock``), computed
    by DVC's own hashing library: the one digest of a data set that sample, report, publish, the MLflow
    runs, ``release.json`` and ``dvc get`` all know it by."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db.local import LocalHashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="synthmri-hash-") as scratch:
        _, _, tree = build(LocalHashFileDB(fs, scratch), os.path.abspath(path), fs, "md5", dry_run=True)
    return str(tree.hash_info.value)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; it becomes ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)  # keep .nii.gz so writers pick the right format
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; honour the umask instead
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv_atomic(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def clean_nifti_header(descrip: str = "") -> nib.Nifti1Header:
    """A fresh header: nothing is carried over from any input file (no names, dates, notes)."""
    header = nib.Nifti1Header()
    header.set_xyzt_units(xyz="mm")
    if descrip:
        header["descrip"] = descrip.encode("ascii", "replace")[:79]
    return header


def save_nifti(data: np.ndarray, affine: np.ndarray, path: str | Path, descrip: str = "") -> None:
    """Write float32 NIfTI with ``affine`` as both sform and qform, atomically, with a clean header."""
    image = nib.Nifti1Image(
        np.asarray(data, dtype=np.float32), np.asarray(affine, dtype=np.float64), header=clean_nifti_header(descrip)
    )
    image.set_sform(affine, code="scanner")
    image.set_qform(affine, code="scanner")
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


def display_path(path: str | Path | bytes) -> str:
    """A printable form of any path, including names that are not valid UTF-8."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")
