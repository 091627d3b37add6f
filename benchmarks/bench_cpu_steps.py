"""How the demo's three training loops use a CPU: bf16 against fp32, 1 against 2 intra-op threads, and two small
runs side by side in threads against one after the other.

    .venv/bin/python benchmarks/bench_cpu_steps.py [--steps 8]

Why: whether ``cpu_bf16`` pays depends on the CPU (native AVX512-BF16/AMX, or oneDNN's emulation on plain AVX-512,
which is slower than fp32), and small models use a second core poorly, so two runs on one thread each can beat one
run on two. Times one optimizer step of the demo's shapes (``params.yaml``): the VQ-GAN autoencoder (batch 2, L1 +
quantizer), the diffusion U-Net with its covariate encoder (batch 4 and 2) and the utility ViT (batch 16 and 8),
fixed weights and inputs (seed 0), after two warm-up steps. Prints markdown tables; writes
``benchmarks/results/cpu_steps.json`` with the machine (CPU model, whether its flags have native bf16, load).
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable

import torch
from common import RESULTS_DIR, ROOT, machine_info, write_result

from synthmri.config import load_params
from synthmri.models.loading import build_ldm
from synthmri.models.vqgan import VQGAN
from synthmri.training.runtime import cpu_has_native_bf16, intra_op_threads
from synthmri.utility.vit import ViTRegressor


def vqgan_step(params, batch: int, bf16: bool, channels_last: bool = False) -> Callable[[], None]:
    torch.manual_seed(0)
    model = VQGAN.from_params(params.vqgan.model, params.vqgan.quantizer).train()
    x = torch.randn(batch, 1, *params.normalize.shape)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last_3d), x.contiguous(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            reconstruction, vq_loss, _ = model(x)
            loss = (reconstruction.float() - x).abs().mean() + vq_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def diffusion_step(params, batch: int, bf16: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    model = build_ldm(params.diffusion.unet, params.covariates, params.vqgan.model.latent_channels).train()
    factor = params.vqgan.model.downsample_factor
    z = torch.randn(batch, params.vqgan.model.latent_channels, *(s // factor for s in params.normalize.shape))
    covariates = model.encoder.encode_values([{"age": 50.0, "sex": "F"}] * batch)
    t = torch.randint(1, params.diffusion.schedule.num_train_timesteps, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (model(z, t, covariates).float() - z).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def vit_step(params, batch: int, bf16: bool = False) -> Callable[[], None]:
    torch.manual_seed(0)
    model = ViTRegressor(params.utility.vit, params.normalize.shape, 8).train()
    x, y = torch.randn(batch, 1, *params.normalize.shape), torch.randn(batch, 8)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (model(x).float() - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def ms_per_step(make: Callable[[], Callable[[], None]], threads: int, steps: int) -> float:
    with intra_op_threads(threads):
        step = make()
        for _ in range(2):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return 1000 * (time.perf_counter() - start) / steps


def side_by_side_seconds(make: Callable[[], Callable[[], None]], steps: int) -> dict[str, float]:
    """Two runs of ``steps`` steps: one after the other on 2 threads, and at once in 2 Python threads of 1 each."""

    def run(threads: int) -> None:
        with intra_op_threads(threads):
            step = make()
            for _ in range(steps):
                step()

    start = time.perf_counter()
    run(2)
    run(2)
    serial = time.perf_counter() - start
    start = time.perf_counter()
    workers = [threading.Thread(target=run, args=(1,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    parallel = time.perf_counter() - start
    return {"serial_2_threads_s": round(serial, 2), "parallel_2x1_thread_s": round(parallel, 2),
            "speedup": round(serial / parallel, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per setting (the U-Net and ViT: 2.5x)")
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    small = int(args.steps * 2.5)
    loops = {
        "vqgan, batch 2": (lambda bf16: vqgan_step(params, 2, bf16), args.steps),
        "vqgan, batch 2, channels-last": (lambda bf16: vqgan_step(params, 2, bf16, channels_last=True), args.steps),
        "diffusion U-Net, batch 4": (lambda bf16: diffusion_step(params, 4, bf16), small),
        "diffusion U-Net, batch 2": (lambda bf16: diffusion_step(params, 2, bf16), small),
        "utility ViT, batch 16": (lambda bf16: vit_step(params, 16, bf16), small),
        "utility ViT, batch 8": (lambda bf16: vit_step(params, 8, bf16), small),
    }
    rows = {}
    for name, (make, steps) in loops.items():
        rows[name] = {
            "fp32_1_thread_ms": round(ms_per_step(lambda m=make: m(False), 1, steps), 1),
            "fp32_2_threads_ms": round(ms_per_step(lambda m=make: m(False), 2, steps), 1),
            "bf16_2_threads_ms": round(ms_per_step(lambda m=make: m(True), 2, steps), 1),
        }
        print(name, rows[name], flush=True)
    side = side_by_side_seconds(lambda: vit_step(params, 16), 40)
    native = cpu_has_native_bf16()
    lines = [
        f"CPU native bf16 (feature flags): {native}",
        "",
        "| step | fp32, 1 thread | fp32, 2 threads | 2-thread speed-up | bf16, 2 threads | bf16 / fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['fp32_1_thread_ms']:.0f} ms | {r['fp32_2_threads_ms']:.0f} ms | "
            f"{r['fp32_1_thread_ms'] / r['fp32_2_threads_ms']:.2f}x | {r['bf16_2_threads_ms']:.0f} ms | "
            f"{r['bf16_2_threads_ms'] / r['fp32_2_threads_ms']:.2f} |"
        )
    lines += [
        "",
        f"Two utility-ViT runs of 40 steps (batch 16): {side['serial_2_threads_s']} s one after the other on 2 threads, "
        f"{side['parallel_2x1_thread_s']} s at once in 2 threads of 1 ({side['speedup']}x)",
    ]
    result = {"machine": machine_info(torch.device("cpu")), "native_bf16": native, "steps": rows, "side_by_side": side}
    write_result(result, RESULTS_DIR / "cpu_steps.json", "\n".join(lines))


if __name__ == "__main__":
    main()
