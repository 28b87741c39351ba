"""Data-parallel training through torch's own stack: launched by ``torchrun``, synchronised by
``torch.nn.parallel.DistributedDataParallel`` (gloo on CPU, NCCL on CUDA). Nothing home-made: this module
only reads torchrun's environment, wraps modules and moves a few Python values between processes.

Conventions (the usual DDP ones):
* batch sizes are per process: with N processes a step sees N batches, one per process;
* an epoch over real images is split between the processes: every process draws the same shuffled
  order, pads it to a multiple of N by wrapping around (as DistributedSampler does, so all processes
  take the same number of steps) and takes every N-th image from its rank on;
* synthetic batches (generator noise) and per-sample noise come from a per-process generator;
* gradients are averaged over processes by DDP; per-epoch training metrics are averaged too;
* evaluation runs on every process on the whole split with rank 0's buffers, and rank 0's row is the
  one every process acts on, so all processes take the same best-epoch decisions;
* only rank 0 writes files (checkpoints hold every process's RNG state, so resume is exact).

With one process (no torchrun) every helper is the identity and the code paths are the single-process
ones, bit for bit.
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ modules

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module to call for a training forward: DDP around it with several processes, else itself.
        Keep the plain module for state_dict / load_state_dict (checkpoints stay world-size free)."""
        if not self.enabled:
            return module
        device_ids = [module_device(module).index] if module_device(module).type == "cuda" else None
        # DDP warns when a gradient's strides differ from its bucket's; a conv weight with one input
        # channel has two stride patterns for the same memory, so the warning there says nothing.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def sync_buffers(self, *modules: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) to every process, before an evaluation: each
        process's last training forward updated its own copy."""
        if not self.enabled:
            return
        for m in modules:
            for b in m.buffers():
                dist.broadcast(b.data, src=0)

    # ------------------------------------------------------------------ values

    def mean_metrics(self, row: dict[str, Any]) -> dict[str, Any]:
        """Average the float entries of a per-process metrics row over the processes."""
        if not self.enabled:
            return row
        keys = sorted(k for k, v in row.items() if isinstance(v, float))
        if not keys:
            return row
        t = torch.tensor([row[k] for k in keys], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        out = dict(row)
        out.update({k: float(v) / self.world for k, v in zip(keys, t.tolist())})
        return out

    def from_main(self, obj: Any) -> Any:
        """Rank 0's value of ``obj`` on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (on every process)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    # ------------------------------------------------------------------ data

    def shard_order(self, order: torch.Tensor) -> torch.Tensor:
        """This process's part of a shared epoch order: padded by wrap-around to a multiple of the
        number of processes, then every world-th entry from the rank on."""
        if not self.enabled or order.numel() == 0:
            return order
        n = order.numel()
        total = -(-n // self.world) * self.world
        padded = order[torch.arange(total, device=order.device) % n]
        return padded[self.rank : total : self.world]


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_environment(device_name: str) -> tuple[Dist, str]:
    """Join the process group torchrun set up (WORLD_SIZE > 1), else a single process.

    Returns the Dist and the device name to use: with CUDA, ``cuda:<LOCAL_RANK>`` for each process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    elif device_name == "auto":
        device_name = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return Dist(rank=rank, world=world, local_rank=local_rank), device_name


def shutdown_process_group() -> None:
    """Leave the process group at the end of a command (a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
