"""torch.distributed helpers that also work as a single process (no process group).

Launched by torchrun, the environment carries RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; without WORLD_SIZE everything runs as rank 0 of 1 and the collectives are identities.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) or fall back to one process.

    On CUDA the process binds to ``cuda:LOCAL_RANK`` before the group is created. Calling it again
    returns the existing setup. timeout_s: how long any collective waits for the other ranks before it
    raises (gloo) or the NCCL watchdog aborts the process, so a dead or stuck rank ends the job with a
    non-zero exit on every rank instead of hanging it (``config.dist_timeout_s``; None = torch's default).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not _active():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE is set but {missing} are not; launch with torchrun")
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"config.dist_timeout_s must be seconds > 0, got {timeout_s!r}")
        timeout = datetime.timedelta(seconds=float(timeout_s)) if timeout_s is not None else None
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"), init_method="env://", **kwargs)
    return DistInfo(rank=rank(), world_size=world_size(), local_rank=local_rank, device=device)


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def _check_same_shape(x: torch.Tensor) -> None:
    # Mismatched shapes make all_gather hang or return garbage; one tiny collective turns that into an error.
    max_dims = 8
    if x.dim() > max_dims:
        raise ValueError(f"all_gather_tensor supports up to {max_dims} dims, got shape {tuple(x.shape)}")
    desc = torch.full((max_dims + 1,), -1, dtype=torch.long, device=x.device)
    desc[0] = x.dim()
    desc[1 : x.dim() + 1] = torch.tensor(x.shape, dtype=torch.long)
    descs = [torch.empty_like(desc) for _ in range(world_size())]
    dist.all_gather(descs, desc)
    shapes = [tuple(d[1 : int(d[0]) + 1].tolist()) for d in descs]
    if len(set(shapes)) != 1:
        raise ValueError(f"all_gather_tensor needs equal shapes on every rank, got {shapes} (rank order)")


def all_gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) along dim 0 in rank order: (world·N, ...).

    A 0-dim tensor counts as shape (1,). nccl gathers only CUDA tensors, so a host tensor travels through
    this rank's CUDA device and comes back on ``x``'s device. Single process: returns ``x`` itself.
    """
    if not _active():
        return x
    home = x.device
    if dist.get_backend() == "nccl" and home.type != "cuda":
        x = x.to(torch.device("cuda", torch.cuda.current_device()))
    x = x.contiguous()
    if x.dim() == 0:
        x = x.reshape(1)
    _check_same_shape(x)
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0).to(home)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, as a list in rank order."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (other ranks' argument is ignored)."""
    if not _active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def check_replicas_equal(params: list[torch.Tensor], what: str = "trainable parameters") -> None:
    """Raise if the ranks' copies of ``params`` differ (a fingerprint: sum and sum of squares, float64).

    Data-parallel training keeps replicas identical by construction; a mismatch means a rank saw
    different gradients or skipped a step, and a checkpoint written then would silently drop one.
    """
    if not _active():
        return
    fingerprint = torch.stack([sum(p.detach().double().sum().cpu() for p in params),
                               sum(p.detach().double().square().sum().cpu() for p in params)])
    prints = all_gather_object(fingerprint.tolist())
    if any(fp != prints[0] for fp in prints):
        raise RuntimeError(f"ranks disagree on the {what}: fingerprints (sum, sum of squares) per rank {prints}")


@torch.no_grad()
def average_gradients(params: list[torch.Tensor]) -> None:
    """grad ← mean over ranks of grad, for every parameter (no-op in a single process).

    The replacement for DDP's all-reduce when gradients are accumulated by hand. A missing grad
    counts as zeros (and is set), so every rank reduces the same flat buffer; one all_reduce per dtype.
    """
    if not _active():
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    n = world_size()
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(n)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def cleanup() -> None:
    """Leave the process group (no-op without one)."""
    if _active():
        dist.destroy_process_group()
