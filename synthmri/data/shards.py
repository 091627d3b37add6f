"""A synthetic set as WebDataset tar shards: few large files that DVC moves cheaply and loaders stream.

Why: DVC's cost grows with the number of files (hashing, one transfer and one cache entry per file), and
a pre-training loader reading 10,000+ small files randomly is bound by file opens. A tar shard holds
``volumes_per_tar`` volumes in index order, each as two members that share a key (the WebDataset
convention, so ``webdataset.WebDataset`` streams it as is):

- ``sample-000042.nii.gz``: the volume, byte for byte the file the ``sample`` stage wrote (so the
  manifest's sha256 still checks it);
- ``sample-000042.json``: its manifest row (covariates, seed, sampler, checksum, models).

Tars are written deterministically (sorted members, mtime 0, no owner), so the same volumes give the
same tar bytes and the same DVC hash. ``manifest.csv`` stays beside them with a ``tar`` column: random
access (:class:`TarMembers`, used by :class:`~synthmri.data.synthetic.SyntheticDataset`) and streaming
(:func:`stream_webdataset`) read the same files.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

TAR_DIR = "webdataset"  # inside the set's folder
TAR_PATTERN = "synthetic-{:05d}.tar"
TAR_COLUMN = "tar"  # the manifest column naming the tar shard that holds each volume


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    return info, io.BytesIO(data)


def _json_row(row: pd.Series) -> bytes:
    values = {k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v) for k, v in row.items()}
    return json.dumps(values, sort_keys=True).encode()


def pack_tar_shards(set_dir: str | Path, volumes_per_tar: int) -> pd.DataFrame:
    """Pack the loose volumes listed in ``set_dir/manifest.csv`` into tar shards under ``set_dir/webdataset``.

    Resumable: a tar that is already there is kept (tars are written to a temporary name and renamed),
    so a killed packing run redoes at most one tar. Returns the manifest with its ``tar`` column; the
    caller writes it and removes the loose files once every tar exists.
    """
    set_dir = Path(set_dir)
    manifest = pd.read_csv(set_dir / "manifest.csv").sort_values("sample_index").reset_index(drop=True)
    manifest = manifest.drop(columns=[TAR_COLUMN], errors="ignore")
    (set_dir / TAR_DIR).mkdir(exist_ok=True)
    tars = []
    for number, start in enumerate(range(0, len(manifest), volumes_per_tar)):
        rows = manifest.iloc[start : start + volumes_per_tar]
        name = f"{TAR_DIR}/{TAR_PATTERN.format(number)}"
        tars.extend([name] * len(rows))
        target = set_dir / name
        if target.is_file():
            continue
        partial = target.with_suffix(".tar.partial")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            for _, row in rows.iterrows():
                key = Path(row["file"]).name.removesuffix(".nii.gz")
                tar.addfile(*_member(f"{key}.nii.gz", (set_dir / row["file"]).read_bytes()))
                tar.addfile(*_member(f"{key}.json", _json_row(row)))
        os.replace(partial, target)
    return manifest.assign(**{TAR_COLUMN: tars})


def member_name(file: str) -> str:
    """The tar member of a manifest ``file`` entry (``volumes/sample-000042.nii.gz`` -> ``sample-000042.nii.gz``)."""
    return Path(file).name


class TarMembers:
    """Random access to the volumes of tar shards: one pass over each tar's headers, then a seek per read."""

    def __init__(self, root: Path, manifest: pd.DataFrame) -> None:
        self.root = root
        self.where: dict[str, tuple[str, int, int]] = {}
        for tar_name in manifest[TAR_COLUMN].unique():
            try:
                with tarfile.open(root / tar_name) as tar:
                    for info in tar.getmembers():
                        self.where[f"{tar_name}/{info.name}"] = (tar_name, info.offset_data, info.size)
            except (OSError, tarfile.TarError):  # missing or truncated: its volumes read as missing
                continue

    def read_bytes(self, tar_name: str, file: str) -> bytes:
        try:
            tar, offset, size = self.where[f"{tar_name}/{member_name(file)}"]
        except KeyError:
            raise FileNotFoundError(f"{member_name(file)} is not in {tar_name}") from None
        with open(self.root / tar, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    def sha256(self, tar_name: str, file: str) -> str:
        return hashlib.sha256(self.read_bytes(tar_name, file)).hexdigest()


def nifti_from_bytes(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def stream_webdataset(root_or_urls, shuffle: int = 0, seed: int = 0):
    """An ``IterableDataset`` of ``(volume (1, D, H, W) float32 tensor, manifest row dict)`` streamed from the
    tar shards with ``webdataset`` (works with a ``torch.utils.data.DataLoader``: each worker reads its own
    shards). ``root_or_urls``: the set's folder, or shard paths/URLs (brace notation works).
    ``shuffle``: size of the in-memory shuffle buffer (0 = index order within each shard).
    """
    import torch
    import webdataset as wds

    if isinstance(root_or_urls, (str, Path)) and Path(root_or_urls).is_dir():
        urls = sorted(str(p) for p in (Path(root_or_urls) / TAR_DIR).glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"no tar shards in {Path(root_or_urls) / TAR_DIR}")
    else:
        urls = root_or_urls

    def decode(sample: dict) -> tuple:
        image = nifti_from_bytes(sample["nii.gz"])
        volume = torch.from_numpy(np.asarray(image.dataobj, dtype=np.float32)[None].copy())
        return volume, json.loads(sample["json"])

    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
    if shuffle:
        dataset = dataset.shuffle(shuffle, seed=seed)
    return dataset.map(decode)
