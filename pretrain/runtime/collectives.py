"""The small collectives that keep ranks in agreement, on one process or many.

Each is a no-op on a single process, so callers need not ask. NCCL moves only CUDA
tensors and gloo only CPU ones, so each collective's tensors go on `comm_device()`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_rank() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`src`'s picklable `obj` on every rank (small things: a decision, a few counters)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_flags(*flags: bool | float) -> list[float]:
    """Element-wise max of small per-rank flags, so every rank takes the same decision."""
    t = torch.tensor([float(f) for f in flags], dtype=torch.float64)
    if is_distributed():
        t = t.to(comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def all_reduce_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """Sum integer counts over ranks (exactly: int64); every rank holds the same keys."""
    if not is_distributed():
        return dict(counts)
    names = sorted(counts)
    t = torch.tensor([counts[n] for n in names], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t)
    return dict(zip(names, t.tolist()))


def sum_counters(counters: Mapping[str, int]) -> dict[str, int]:
    """Per-key sums of every rank's counters (ranks may hold different keys); all ranks must call it."""
    if not is_distributed():
        return dict(counters)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counters))
    total: dict[str, int] = {}
    for per_rank in gathered:
        for key, value in per_rank.items():
            total[key] = total.get(key, 0) + value
    return total


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's (n_r, ...) rows on every rank, in rank order; n_r may differ."""
    if not is_distributed():
        return t
    dev = comm_device()
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)
