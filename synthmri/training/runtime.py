"""Device, precision and seeding: the same rules for every training stage."""

from __future__ import annotations

import contextlib
import functools
import os
import random
from pathlib import Path

import numpy as np
import torch


def pick_device(choice: str = "auto") -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; ask torch for deterministic kernels where they exist."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


#: CPU feature flags (``/proc/cpuinfo``) of native bf16 arithmetic: x86 AVX512-BF16 or AMX, Arm's BF16 extension
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively. Without it oneDNN emulates bf16 on AVX-512, slower than fp32: 1.8x
    (VQ-GAN) and 2.4x (diffusion U-Net) the fp32 step time on an Ice Lake Xeon (benchmarks/RESULTS.md, 17th session),
    although ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` says yes there. Read from the CPU's feature flags
    (Linux); elsewhere oneDNN's answer is all there is."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    flags = {
        flag
        for line in text.splitlines()
        if line.split(":")[0].strip().lower() in ("flags", "features")
        for flag in line.partition(":")[2].split()
    }
    return bool(flags & NATIVE_BF16_FLAGS)


def autocast(
    device: torch.device, precision: str = "bf16", cpu_bf16: bool = False
) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp16 + accumulation gave NaNs in 3D VQ-GANs), and on a CPU with native bf16 when
    ``cpu_bf16`` (``train.cpu_bf16``: 1.3x faster diffusion steps on the demo's EPYC, benchmarks/RESULTS.md);
    full precision otherwise or when ``precision`` is fp32."""
    if precision != "bf16":
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_bf16 and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_text(device: torch.device, precision: str = "bf16", cpu_bf16: bool = False) -> str:
    """What :func:`autocast` will train in on ``device``, for logs: ``"bf16"`` or ``"fp32"``."""
    return "bf16" if isinstance(autocast(device, precision, cpu_bf16), torch.autocast) else "fp32"


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The batch of a step depends only on (seed, step): a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(n, (batch_size,), generator=generator)


def to_device(
    batch: torch.Tensor, device: torch.device, pin_memory: bool = True, channels_last: bool = False
) -> torch.Tensor:
    """Host batch → device: page-locked and asynchronous on CUDA; optionally channels-last-3d."""
    if device.type == "cuda":
        batch = (batch.pin_memory() if pin_memory else batch).to(device, non_blocking=pin_memory)
    if channels_last and batch.dim() == 5:
        batch = batch.contiguous(memory_format=torch.channels_last_3d)
    return batch


@contextlib.contextmanager
def intra_op_threads(threads: int):
    """Run torch's CPU kernels of the calling thread on exactly ``threads`` intra-op threads.

    A CPU reduction's summation order (and so its last bits) depends on how many threads split it, and
    the ambient count differs between processes (a Dask worker starts with OMP_NUM_THREADS=1, the main
    process with one per core). Fixing it makes a result independent of where it ran. torch keeps the
    count per OS thread, so concurrent callers (a thread-pool task runner) do not disturb each other.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_numerics() -> str:
    """What besides the inputs decides a CPU result's bits: torch version and the vector ISA it dispatched to."""
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"
