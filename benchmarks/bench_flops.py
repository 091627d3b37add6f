"""Achieved GFLOP/s of one training step as a fraction of this machine's measured matmul peak (issue 7).

    .venv/bin/python benchmarks/bench_flops.py [--repeats 7] [--device auto] [--quick]     (or: make bench)

Why: throughput alone does not say whether a step is slow because it does much work or because it
does its work badly. The peak is measured, not taken from a spec sheet: float32 square matmuls at
torch's thread count, median of repeats per size, the best size's median (measured before and after
the steps; the higher is used, since background load only lowers it). FLOPs of one step (forward +
backward, generator + discriminator for the VQ-GAN) are counted by ``torch.utils.flop_counter``
(convolutions, matmuls, attention; elementwise ops are not counted), then the step is timed. The
steps are exactly those of bench_monai.py (benchmarks/common.py). MONAI's equivalents are included
when MONAI is installed. Prints a markdown table; writes benchmarks/results/flops.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
import warnings
from pathlib import Path

import torch
from common import (  # benchmarks/common.py: a script's own folder is on sys.path
    RESULTS_DIR,
    ROOT,
    build,
    contended,
    load_bench_params,
    machine_info,
    median,
    pick_device,
    sync,
    time_interleaved,
    write_result,
)
from torch.utils.flop_counter import FlopCounterMode


def matmul_peak(device: torch.device, sizes: list[int], repeats: int) -> dict:
    """Median GFLOP/s of ``n x n @ n x n`` float32 per size; ``peak`` = the best size's median."""
    per_size = {}
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        a @ b  # warm-up (thread pool, BLAS initialisation)
        sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            sync(device)
            times.append(time.perf_counter() - start)
        per_size[n] = round(2 * n**3 / median(times) / 1e9, 1)
    return {"gflops_per_size": per_size, "peak_gflops": max(per_size.values())}


def step_flops(run) -> tuple[int, dict[str, float]]:
    """FLOPs of one call of ``run`` and their split per operator (GFLOP)."""
    with FlopCounterMode(display=False) as counter:
        run()
    per_op = {str(op): round(n / 1e9, 3) for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), per_op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per model (default 7; quick 2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny models and matmuls: a smoke run")
    parser.add_argument("--no-monai", action="store_true", help="only our models")
    parser.add_argument("--params", default=None, help="params file (default: the repository's params.yaml)")
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="params override, key=value")
    parser.add_argument("--out", default=str(RESULTS_DIR / "flops.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    repeats = args.repeats or (2 if args.quick else 7)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    params = load_bench_params(args.params or ROOT / "params.yaml", args.quick, args.overrides)
    sizes = [256, 512] if args.quick else [1024, 2048, 4096]
    load_before = list(os.getloadavg())

    names = ["vqgan/ours", "unet/ours"]
    if not args.no_monai:
        if importlib.util.find_spec("monai") is not None:
            names += ["vqgan/monai", "vqgan/monai_ourwidths", "unet/monai"]
        else:
            print("MONAI not installed: our models only")

    peak_before = matmul_peak(device, sizes, repeats + 3)
    works, counted = {}, {}
    for name in names:
        works[name] = build(name, params, device)
        works[name].run()  # warm-up, and the quantizer's codebook initialisation out of the counted step
        counted[name] = step_flops(works[name].run)
    record: dict = {}
    all_times = time_interleaved({name: work.run for name, work in works.items()}, repeats, 0, device, record)
    others = record["other_processes_cores"]
    rows = []
    for name, work in works.items():
        flops, per_op = counted[name]
        times = all_times[name]
        seconds = median(times)
        rows.append(
            {
                "name": name,
                "params_total": sum(work.params.values()),
                "items": work.items,
                "gflop_per_step": round(flops / 1e9, 2),
                "gflop_per_op": per_op,
                "seconds_median": round(seconds, 4),
                "seconds_min": round(min(times), 4),
                "seconds_all": [round(t, 4) for t in times],
                "throughput": round(work.items / seconds, 3),
                "unit": "volumes/s" if name.startswith("vqgan") else "latents/s",
                "achieved_gflops": round(flops / seconds / 1e9, 1),
                "achieved_gflops_best": round(flops / min(times) / 1e9, 1),
            }
        )
        print(f"{name}: {flops / 1e9:.1f} GFLOP/step, {seconds:.3f} s/step", flush=True)
    peak_after = matmul_peak(device, sizes, repeats + 3)
    peak = max(peak_before["peak_gflops"], peak_after["peak_gflops"])
    for r in rows:
        r["fraction_of_peak"] = round(r["achieved_gflops"] / peak, 3)
        r["fraction_of_peak_best"] = round(r["achieved_gflops_best"] / peak, 3)

    info = machine_info(device)
    load_after = list(os.getloadavg())
    info.update(
        load_average_before=load_before,
        load_average_after=load_after,
        other_processes_cores=others,
        rounds_discarded=record["rounds_discarded"],
        contended=contended(others),
    )
    result = {
        "benchmark": "flops",
        "machine": info,
        "settings": {"repeats": repeats, "quick": args.quick, "matmul_sizes": sizes, "dtype": "float32"},
        "matmul_peak_before": peak_before,
        "matmul_peak_after": peak_after,
        "peak_gflops": peak,
        "rows": rows,
    }
    write_result(result, Path(args.out), markdown(result))


def markdown(result: dict) -> str:
    lines = [
        f"Measured float32 matmul peak: {result['peak_gflops']:.0f} GFLOP/s (per size, before: "
        f"{result['matmul_peak_before']['gflops_per_size']}, after: {result['matmul_peak_after']['gflops_per_size']})",
        "",
        "| train step | parameters | GFLOP/step (fwd+bwd) | median s/step | throughput | achieved GFLOP/s | "
        "fraction of peak | same, fastest step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['params_total'] / 1e6:.3f} M | {r['gflop_per_step']:.1f} | {r['seconds_median']:.3f} | "
            f"{r['throughput']:.2f} {r['unit']} | {r['achieved_gflops']:.1f} | {100 * r['fraction_of_peak']:.0f} % | "
            f"{100 * r['fraction_of_peak_best']:.0f} % |"
        )
    m = result["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, device {m['device']}; "
        f"load average before {m['load_average_before']}, after {m['load_average_after']}; other processes used "
        f"{m['other_processes_cores']} cores on average over the kept timing rounds ({m['rounds_discarded']} "
        "contended rounds discarded)"
        f"{' (contended)' if m['contended'] else ''}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
