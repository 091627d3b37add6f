"""WebDataset tar shards of a synthetic set: deterministic packing, random access, verification, streaming."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from synthmri.data.shards import pack_tar_shards, stream_webdataset
from synthmri.data.synthetic import GenerationRecord, ModelProvenance, SyntheticDataset, manifest_row
from synthmri.io import save_nifti

N = 7
GENERATION = GenerationRecord("dpm_solver", 10, 3.0, "age,sex", 1.5, False, "all steps", "cpu fp32, 1 thread(s)")
PROVENANCE = ModelProvenance("3", "a" * 64, "2", "b" * 64, "0.1")


def loose_set(root: Path) -> Path:
    """A small set in the ``sample`` stage's loose layout: distinct volumes, a manifest with checksums."""
    rng = np.random.default_rng(0)
    (root / "volumes").mkdir(parents=True)
    rows = []
    for i in range(N):
        path = root / "volumes" / f"sample-{i:06d}.nii.gz"
        save_nifti(rng.random((6, 5, 4)).astype(np.float32), np.eye(4), path)
        sex = "F" if i % 2 else "M"
        site = None if i == 3 else f"site{i % 3 + 1}"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        covariates = {"age": 30.0 + i, "sex": sex, "site": site}
        rows.append(manifest_row(f"volumes/{path.name}", i, 100 + i, covariates, GENERATION, digest, PROVENANCE))
    # written in shuffled order: packing follows sample_index, not the file's row order
    pd.DataFrame(rows).sample(frac=1, random_state=1).to_csv(root / "manifest.csv", index=False)
    return root


def packed(root: Path, per_tar: int = 3) -> Path:
    manifest = pack_tar_shards(loose_set(root), per_tar)
    manifest.to_csv(root / "manifest.csv", index=False)
    return root


def test_packing_is_deterministic_ordered_and_resumable(tmp_path):
    a, b = packed(tmp_path / "a"), packed(tmp_path / "b")
    tars = sorted(p.name for p in (a / "webdataset").glob("*.tar"))
    assert tars == ["synthetic-00000.tar", "synthetic-00001.tar", "synthetic-00002.tar"]  # 3 + 3 + 1
    for name in tars:  # same volumes, same tar bytes (so the same DVC hash)
        assert (a / "webdataset" / name).read_bytes() == (b / "webdataset" / name).read_bytes()
    with tarfile.open(a / "webdataset" / tars[0]) as tar:
        names = tar.getnames()
        assert names == [f"sample-{i:06d}.{ext}" for i in range(3) for ext in ("nii.gz", "json")]
        row = json.loads(tar.extractfile("sample-000001.json").read())
        assert row["age"] == 31.0 and row["sex"] == "F" and row["sample_index"] == 1
    # a killed packing run: the missing tar is written again, the finished ones are kept as they are
    kept = (a / "webdataset" / tars[0]).stat().st_mtime_ns
    (a / "webdataset" / tars[1]).unlink()
    pack_tar_shards(a, 3)
    assert (a / "webdataset" / tars[1]).read_bytes() == (b / "webdataset" / tars[1]).read_bytes()
    assert (a / "webdataset" / tars[0]).stat().st_mtime_ns == kept


def test_the_dataset_reads_tar_shards_like_loose_files(tmp_path):
    loose = SyntheticDataset(loose_set(tmp_path / "loose"))
    tars = SyntheticDataset(packed(tmp_path / "tars"))
    assert len(tars) == len(loose) == N
    # what the sample stage records about each volume (generation, digest, models, its tar) is not a covariate
    assert tars.covariates == loose.covariates == ["age", "sex", "site"]
    order = {row.sample_index: k for k, row in enumerate(loose.manifest.itertuples())}
    for k, row in enumerate(tars.manifest.itertuples()):
        volume, covariates = tars[k]
        expected_volume, expected = loose[order[row.sample_index]]
        assert torch.equal(volume, expected_volume) and covariates == expected
    assert tars.verify() == []


def test_verification_names_a_damaged_volume_and_a_missing_tar(tmp_path):
    root = packed(tmp_path / "set")
    dataset = SyntheticDataset(root)
    tar, offset, _ = dataset._tars.where["webdataset/synthetic-00001.tar/sample-000004.nii.gz"]
    with open(root / tar, "r+b") as handle:  # one flipped byte inside one volume's member
        handle.seek(offset + 40)
        byte = handle.read(1)
        handle.seek(offset + 40)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert SyntheticDataset(root).verify() == ["volumes/sample-000004.nii.gz"]
    (root / "webdataset" / "synthetic-00002.tar").unlink()
    assert SyntheticDataset(root).verify() == ["volumes/sample-000004.nii.gz", "volumes/sample-000006.nii.gz"]


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_gives_every_volume_once_with_its_row(tmp_path, workers):
    root = packed(tmp_path / "set")
    loose = {int(r.sample_index): r for r in pd.read_csv(root / "manifest.csv").itertuples()}
    reference = SyntheticDataset(root)
    by_index = {int(row.sample_index): reference[k][0] for k, row in enumerate(reference.manifest.itertuples())}
    loader = torch.utils.data.DataLoader(stream_webdataset(root), batch_size=None, num_workers=workers)
    seen = []
    for volume, row in loader:
        seen.append(row["sample_index"])
        assert torch.equal(volume, by_index[row["sample_index"]])
        assert row["sha256"] == loose[row["sample_index"]].sha256 and row["age"] == 30.0 + row["sample_index"]
    assert sorted(seen) == list(range(N))  # each worker streams its own tars: nothing twice, nothing lost
    shuffled = [row["sample_index"] for _, row in stream_webdataset(root, shuffle=5, seed=1)]
    assert sorted(shuffled) == list(range(N)) and shuffled != sorted(shuffled)
