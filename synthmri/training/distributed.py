"""Data-parallel training on torch's own engines: ``torchrun`` + DistributedDataParallel.

One process per device (gloo on CPU, NCCL on GPU). The stage command relaunches itself under
``torch.distributed.run`` when ``<stage>.train.processes`` > 1, so ``dvc repro`` needs no other tool;
``torchrun ... -m synthmri.cli train_vqgan`` works directly too (multi-node: README).

Batches stay a pure function of ``(seed, step)`` (see :func:`runtime.batch_indices`): every step draws
one *global* batch of ``batch_size × world_size × grad_accumulation`` rows, and rank ``r`` takes its
slice of each micro-step. This is the distributed sampler of a step-based, resumable loop (torch's
``DistributedSampler`` is epoch-based and cannot resume mid-epoch), and it makes N processes see
exactly the samples one process would see with an N-times larger batch.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from synthmri.logs import get_logger
from synthmri.training.runtime import pick_device

log = get_logger(__name__)

TIMEOUT = datetime.timedelta(minutes=60)
# No buffer broadcast at every forward: the quantizer all-reduces its codebook itself (torch >= 2.14 renamed the flag)
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)  # rank 0 validates and writes figures while the others wait


def under_launcher() -> bool:
    """True inside a process started by torchrun (it sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def relaunch_command(processes: int, argv: Sequence[str]) -> list[str]:
    """The ``torch.distributed.run`` command that runs ``synthmri <argv>`` on ``processes`` local ranks."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "synthmri.cli",
        *argv,
    ]


def relaunch(processes: int, argv: Sequence[str]) -> int:
    """Run this stage again under torchrun with ``processes`` ranks; returns its exit status."""
    command = relaunch_command(processes, argv)
    log.info("Launching %d training processes with torchrun (DistributedDataParallel)", processes)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes))),
    }
    return subprocess.run(command, env=env, check=False).returncode


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank, the world size and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, checkpoints, validates and writes outputs."""
        return self.rank == 0

    def prepare(self, module: torch.nn.Module, channels_last: bool = False, compile: bool = False) -> torch.nn.Module:
        """The module a training step calls: channels-last-3d weights, DDP around it when distributed
        (buffers are synchronised by the modules themselves), then ``torch.compile``. It shares its
        parameters with ``module``, which stays the one to save, validate and average (EMA)."""
        if channels_last:
            module.to(memory_format=torch.channels_last_3d)
        if self.distributed and any(p.requires_grad for p in module.parameters()):
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, **_NO_BUFFER_SYNC)
        return torch.compile(module) if compile else module

    def no_sync(self, module: torch.nn.Module, sync: bool):
        """Skip DDP's gradient all-reduce on accumulation micro-steps that are not the last one."""
        if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return module.no_sync()

    def micro_batch(self, rows: torch.Tensor, micro_step: int, batch_size: int) -> torch.Tensor:
        """This rank's ``batch_size`` rows of micro-step ``micro_step`` in a global batch ``rows``."""
        start = (micro_step * self.world_size + self.rank) * batch_size
        return rows[start : start + batch_size]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Scalars averaged over ranks (the loss of the global batch, what a single process would log)."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return {k: float(v) / self.world_size for k, v in zip(keys, tensor.tolist())}

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def initialize(device_choice: str = "auto") -> Context:
    """Join the process group when started by torchrun; otherwise a single-process context."""
    if not under_launcher() or int(os.environ["WORLD_SIZE"]) == 1:
        return Context(device=pick_device(device_choice))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = pick_device(device_choice)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    if rank != 0:
        import logging

        logging.getLogger("synthmri").setLevel(logging.WARNING)  # one voice in the log: rank 0's
    return Context(rank=rank, world_size=world, device=device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
