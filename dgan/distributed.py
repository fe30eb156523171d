"""Process-group setup and the few collectives dgan needs.

Every rank check in dgan goes through this module. A plain `python -m dgan.train` takes the
same code path as `torchrun` with world size 1: no special cases elsewhere.
"""
from __future__ import annotations

import datetime
import functools
import inspect
import os
import pickle
import sys
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def resolve_device(name: str) -> torch.device:
    """A --device value as a device: "auto" is CUDA where there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def init(device: str = "auto") -> torch.device:
    """Join the process group if launched by torchrun; return this rank's device.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR; a plain python run has none and
    stays a world of one without a process group.
    """
    if device == "auto":
        device = resolve_device(device).type
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


def print_rank(message: str) -> None:
    """One line on stderr from every rank, tagged with the rank. One write call, not print():
    print writes the text and its newline separately, and the ranks of a torchrun job share one
    pipe, so two ranks' lines ran together ("...exit code 75[rank 0] stopped...")."""
    sys.stderr.write(f"[rank {get_rank()}] {message}\n")
    sys.stderr.flush()


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


def on_main(fn: Callable[[], T]) -> T:
    """Collective: rank 0 runs fn() and every rank gets its result, or raises its exception.

    For rank-0-only work (finding a checkpoint, writing a report) whose failure must stop every
    rank: an exception that stayed on rank 0 would leave the others waiting in their next
    collective for ever. An exception that cannot be pickled reaches the others as a RuntimeError.
    """
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    if get_world_size() > 1:
        try:
            result, error = broadcast_object((result, error))
        except (TypeError, AttributeError, pickle.PicklingError):
            result, error = broadcast_object((None, RuntimeError(f"rank 0 failed: {error}")))
    if error is not None:
        raise error
    return result


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP for a world of several ranks; the module itself for a world of one.

    No buffer sync in forward: DDP would otherwise broadcast rank 0's buffers before EVERY
    forward. Buffers, if a model has any (BatchNorm statistics with model.norm=batch), are
    synced here at wrap time and after each optimizer step by `broadcast_buffers` instead,
    so that every rank's EMA (which averages buffers too) stays identical.
    No find_unused_parameters: every trainable parameter gets a gradient in every backward
    (frozen ones have requires_grad=False, which DDP skips).
    """
    if get_world_size() == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    ddp_class = torch.nn.parallel.DistributedDataParallel
    # torch 2.14 renamed the switch; the old name there also skips the buffer sync at init
    no_forward_sync = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(ddp_class).parameters
                       else {"broadcast_buffers": False})
    ddp = ddp_class(module, device_ids=ids, **no_forward_sync)
    broadcast_buffers(module)  # the init sync, whichever torch skipped it
    return ddp


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP and torch.compile wrappers: what checkpoints and the EMA hold,
    so their keys carry no `module.`/`_orig_mod.` prefix whatever the launch options."""
    while True:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif "_orig_mod" in module._modules:  # torch.compile's OptimizedModule
            module = module._modules["_orig_mod"]
        else:
            return module


def ddp_sync(module: torch.nn.Module, sync: bool):
    """`no_sync()` for gradient-accumulation micro-steps; a no-op outside DDP."""
    # torch.compile(DDP(m)): the no_sync switch lives on the DDP inside the compiled wrapper
    inner = module._modules.get("_orig_mod", module)
    if not sync and isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        return inner.no_sync()
    return nullcontext()


def broadcast_buffers(*modules: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers: one flat broadcast per dtype, none without buffers.

    BatchNorm updates its running statistics from the rank's own batch, so without this the
    ranks' buffers (and so their EMA copies) drift apart. A no-op for a world of one.
    """
    if not dist.is_initialized():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for m in modules:
        for b in m.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors(group)
        dist.broadcast(flat, src=src)
        for b, v in zip(group, _unflatten_dense_tensors(flat, group)):
            b.copy_(v)


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 does the work (e.g. builds a cache) while the others wait, then they follow."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
