"""How long pybids takes to resolve sidecar metadata (BIDS inheritance) for a cohort, with and without its validator.

    .venv/bin/python benchmarks/bench_sidecars.py [--subjects 128 1024] [--sessions 2]

Builds a BIDS tree in a temporary folder: ``--subjects`` subjects × ``--sessions`` sessions of tiny T1w images,
a root ``T1w.json``, a subject-level sidecar for every other subject and a sidecar beside every tenth image (the
three inheritance levels ingest resolves). Times ``BIDSLayout(root, validate=...)`` (indexing) and
``get_metadata`` of every image (:class:`synthmri.data.acquisition.SidecarReader` does both). Appends to
``benchmarks/results/sidecars.csv`` and prints each row.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from bench_vqgan_curve import append_rows
from common import run_stamp

OUT = Path(__file__).parent / "results" / "sidecars.csv"


def build_tree(root: Path, subjects: int, sessions: int) -> list[Path]:
    (root / "dataset_description.json").write_text(json.dumps({"Name": "bench", "BIDSVersion": "1.9.0"}))
    (root / "T1w.json").write_text(json.dumps({"MagneticFieldStrength": 3, "RepetitionTime": 2.3, "EchoTime": 0.003}))
    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    images, rows = [], ["participant_id"]
    for s in range(subjects):
        sub = f"sub-{s:05d}"
        rows.append(sub)
        if s % 2:
            (root / sub).mkdir(parents=True, exist_ok=True)
            (root / sub / f"{sub}_T1w.json").write_text(json.dumps({"MagneticFieldStrength": 1.5}))
        for t in range(sessions):
            folder = root / sub / f"ses-{t + 1}" / "anat"
            folder.mkdir(parents=True)
            path = folder / f"{sub}_ses-{t + 1}_T1w.nii.gz"
            nib.save(image, path)
            if len(images) % 10 == 0:
                path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps({"EchoTime": 0.004}))
            images.append(path)
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return images


def main() -> None:
    from bids import BIDSLayout

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = []
    for subjects in args.subjects:
        with tempfile.TemporaryDirectory() as tmp:
            images = build_tree(Path(tmp), subjects, args.sessions)
            for validate in (False, True):
                started = time.perf_counter()
                layout = BIDSLayout(tmp, validate=validate, derivatives=False)
                indexed = time.perf_counter() - started
                started = time.perf_counter()
                fields = [layout.get_metadata(str(p)).get("MagneticFieldStrength") for p in images]
                queried = time.perf_counter() - started
                row = {
                    "subjects": subjects,
                    "images": len(images),
                    "validate": validate,
                    "index_s": round(indexed, 2),
                    "get_metadata_s": round(queried, 2),
                    "ms_per_image": round(1000 * (indexed + queried) / len(images), 2),
                    "field_1p5_images": sum(f == 1.5 for f in fields),
                    **run_stamp(),
                }
                print(row, flush=True)
                rows.append(row)
    append_rows(args.out, rows)


if __name__ == "__main__":
    main()
