"""Process-group setup and the few collectives dgan needs.

Every rank check in dgan goes through this module. A plain `python -m dgan.train` takes the
same code path as `torchrun` with world size 1: no special cases elsewhere.
"""
from __future__ import annotations

import datetime
import functools
import os
import sys
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
import torch.distributed as dist


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init(device: str = "auto") -> torch.device:
    """Join the process group if launched by torchrun; return this rank's device.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR; a plain python run has none and
    stays a world of one without a process group.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    local_rank = _env_int("LOCAL_RANK", 0)
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if _env_int("WORLD_SIZE", 1) > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        # A generous timeout: rank 0 may spend minutes writing a checkpoint or building the
        # data cache while the others wait in a collective.
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
    return dev


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def get_local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)
        sys.stdout.flush()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM over ranks; identity for a world of one. Returns the tensor."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy; the input is untouched)."""
    out = t.detach().clone()
    return all_reduce_sum(out) / get_world_size()


@functools.cache
def _cpu_group():
    """A gloo group for host-side flags, so agreeing on them never touches a CUDA stream."""
    if dist.get_backend() == "gloo":
        return None  # the default group is already a CPU group
    return dist.new_group(backend="gloo")


def any_rank_flags(flags: list[bool]) -> list[bool]:
    """For each flag, whether it is set on ANY rank (e.g. a preemption signal seen by one rank).

    One tiny CPU all-reduce at a step boundary: every rank must call it at the same step.
    """
    if not dist.is_initialized():
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
    return [bool(v > 0) for v in t.tolist()]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, indexed by rank (e.g. per-rank RNG states for a checkpoint)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Send a picklable python object from `src` to every rank (used for run names)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def ddp_sync(module: torch.nn.Module, sync: bool):
    """`no_sync()` for gradient-accumulation micro-steps; a no-op outside DDP."""
    if not sync and isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return nullcontext()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 does the work (e.g. builds a cache) while the others wait, then they follow."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
