"""Which fine-tuning recipe makes the utility protocol fair? Pre-train once, fine-tune with several recipes.

    make demo && .venv/bin/python benchmarks/bench_utility_finetune.py [--repeats 2] [--k 8 all] \\
        [--recipes 3e-4:150 1e-4:50 3e-5:100] [--threads 1]

For each repeat the three pre-trainings of the ``utility`` stage (synthetic set, real training split, negative
control; ``params.yaml``'s ``utility.pretrain``) run once; then every arm (scratch included) is fine-tuned on the
same k real subjects with each recipe ``LR:STEPS`` (batch ``utility.finetune.batch_size``) and tested on the real
held-out subjects. Prints, per recipe, the age MAE of every arm and the gains with their 95 % intervals, and
appends them to ``benchmarks/results/utility_finetune.csv``. Used to choose ``utility.finetune`` / ``utility.scratch``
(RESULTS.md, "Utility").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from synthmri.catalog import PROCESSED_DIR, SYNTHETIC_DIR
from synthmri.config import FitParams, load_params
from synthmri.report.inputs import load_report_data
from synthmri.utility.protocol import FINETUNED_ARMS, Protocol, UtilitySets
from synthmri.utility.summary import summarize
from synthmri.utility.targets import TargetCodec

OUT = Path(__file__).parent / "results" / "utility_finetune.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--k", nargs="+", default=["8", "all"])
    parser.add_argument("--recipes", nargs="+", default=["3e-4:150", "1e-4:50", "3e-5:100"], help="LR:STEPS")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k = [v if v == "all" else int(v) for v in args.k]
    params = load_params(args.params, [f"utility.k={k}", f"utility.repeats={args.repeats}"])
    data = load_report_data(params, PROCESSED_DIR, SYNTHETIC_DIR)

    sets = UtilitySets.from_report_data(data)
    names = params.utility.targets or [c.name for c in params.covariates]
    codec = TargetCodec([params.covariate(n) for n in names])
    batch = params.utility.finetune.batch_size
    recipes = {
        r: FitParams(steps=int(r.split(":")[1]), batch_size=batch, lr=float(r.split(":")[0])) for r in args.recipes
    }
    rows = {name: [] for name in recipes}
    for repeat in range(args.repeats):
        protocol = Protocol(params.utility, codec, sets, torch.device("cpu"))
        pretrained, pretrained_rows = {}, []
        start = time.time()
        for name, (volumes, table) in protocol.sources(repeat).items():
            protocol._pretrain(repeat, name, volumes, table, pretrained, pretrained_rows)
        print(f"repeat {repeat}: pre-training {time.time() - start:.0f} s", flush=True)
        for name, recipe in recipes.items():  # every arm, scratch included, with this recipe
            protocol.up = params.utility.model_copy(update={"finetune": recipe, "scratch": recipe})
            rows[name] += pretrained_rows
            for kk in k:
                for arm in FINETUNED_ARMS:
                    protocol._finetune(repeat, kk, arm, pretrained, rows[name])
    out = []
    for name in recipes:
        summary = summarize(pd.DataFrame(rows[name]), params.utility)
        for kk in k:
            row = {"recipe": name, "k": kk, "repeats": args.repeats, "n_synthetic": len(sets.synthetic)}
            for arm in FINETUNED_ARMS:
                row[f"mae_{arm}"] = round(summary[f"error.{arm}.age.k{kk}"], 2)
            for key in ("pretrain_gain", "real_pretrain_gain", "negative_control_gain"):
                for part in ("", "_ci_low", "_ci_high"):
                    row[f"{key}{part}"] = round(summary[f"{key}{part}.age.k{kk}"], 3)
            out.append(row)
            print(row, flush=True)
    frame = pd.DataFrame(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, mode="a", header=not args.out.exists(), index=False)


if __name__ == "__main__":
    main()
