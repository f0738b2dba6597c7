"""Every collective ds-cl issues goes through this module, with its tensors on the accelerator's device.

Why one place: on GPUs the process group is NCCL, which torch maps to CUDA tensors only. A
`torch.tensor([...])` built on the host and all-reduced works under gloo (every CPU test) and fails
on the first GPU step ("No backend type associated with device type cpu"). The helpers here build
their tensors on `device()` and refuse a tensor that lives elsewhere, so a CPU test of any caller
exercises the same rule a GPU run needs; `tests/test_architecture.py` checks that no other module of
ds_cl calls a `torch.distributed` or `deepspeed.comm` collective directly.

Every function is a no-op (or returns its input) when no process group is initialised, so one-process
tools and tests call them unconditionally.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def device() -> torch.device:
    """The accelerator's current device (cuda:N under NCCL, cpu under gloo)."""
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:  # torch-only use: the default device of the default group's backend
        backend = dist.get_backend() if initialized() else "gloo"
        return torch.device(f"cuda:{torch.cuda.current_device()}") if backend == "nccl" else torch.device("cpu")
    return torch.device(get_accelerator().current_device_name())


def _check(tensor: torch.Tensor, what: str) -> None:
    want = device()
    if tensor.device.type != want.type:
        raise RuntimeError(f"{what}: tensor on {tensor.device}, but collectives need the accelerator's device "
                           f"({want}); build it with device=ds_cl.core.collectives.device()")


def all_reduce_(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce of a tensor already on the accelerator's device; returns it."""
    _check(tensor, "all_reduce")
    if initialized():
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
    return tensor


def all_reduce_values(values: Sequence[float | torch.Tensor], op: str = "sum", group=None) -> list[float]:
    """All-reduce a few numbers (float64 on the device, one host sync to read them back): host numbers,
    or one-element tensors, which join on the device without being read first (a training step's loss)."""
    t = torch.tensor([0.0 if torch.is_tensor(v) else float(v) for v in values], dtype=torch.float64,
                     device=device())
    for i, v in enumerate(values):
        if torch.is_tensor(v):
            t[i] = v.detach().reshape(())
    return all_reduce_(t, op, group).tolist()


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank if `flag` is true on any rank."""
    return all_reduce_values([1.0 if flag else 0.0], "max", group)[0] > 0


def barrier(group=None) -> None:
    if initialized():
        # A bare gloo/NCCL barrier picks its own device; device_ids pins NCCL to ours (no hang on a
        # process whose current device was set after the group was made).
        if dist.get_backend(group) == "nccl":
            dist.barrier(group=group, device_ids=[device().index or 0])
        else:
            dist.barrier(group=group)


def all_gather_object(obj: Any, group=None) -> list:
    """Every rank's `obj`, in rank order (picklable objects; torch moves the bytes through the device)."""
    if not initialized():
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_object(obj: Any, dst: int = 0, group=None) -> list | None:
    """Every rank's `obj` on rank `dst` (in rank order), None elsewhere."""
    if not initialized():
        return [obj]
    rank = dist.get_rank(group)
    out = [None] * dist.get_world_size(group) if rank == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def all_to_all_single(recv: torch.Tensor, send: torch.Tensor, out_split: list[int], in_split: list[int],
                      group=None, async_op: bool = False):
    """`torch.distributed.all_to_all_single` with both buffers checked to be on the accelerator's device."""
    _check(send, "all_to_all_single")
    _check(recv, "all_to_all_single")
    return dist.all_to_all_single(recv, send, out_split, in_split, group=group, async_op=async_op)
