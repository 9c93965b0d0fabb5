"""Model evaluation: classification metrics and frozen features, on one process or many.

The functions here take a model and an eval loader (an iterable of `(images, targets,
valid_mask)` batches where every rank sees a disjoint share of the split and padding is
masked out) and return the same numbers on every rank. Counts are summed across ranks
exactly; features are gathered in full, since the few-shot and linear probes need all of
them. Every rank runs the same number of forward passes (the loader pads to equal batch
counts), so a ZeRO-3 model, whose forward itself is collective, works too.

The trainer calls `evaluate_classification` and `fewshot_evaluate` for its periodic
evaluation; `vit-eval` (below) is the same on exported weights.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pretrain import metrics


# --------------------------------------------------------------------------- collectives
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _comm_device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo only CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """Sum integer counts over ranks (exactly: int64)."""
    if not _distributed():
        return dict(counts)
    names = sorted(counts)
    t = torch.tensor([counts[n] for n in names], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t)
    return dict(zip(names, t.tolist()))


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's (n_r, ...) rows on every rank, in rank order; n_r may differ."""
    if not _distributed():
        return t
    dev = _comm_device()
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


# --------------------------------------------------------------------------- forward passes
@dataclasses.dataclass
class Features:
    """Frozen outputs of a model over one split (valid samples only, gathered from all ranks)."""

    representation: torch.Tensor  # (N, D) float32: the pre-logits vector the probes use
    logits: torch.Tensor  # (N, C) float32
    targets: torch.Tensor  # (N,) int64, or (N, K) multi-hot

    def __len__(self) -> int:
        return self.targets.shape[0]


def _model_io(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _forward_batches(model, loader, max_batches, desc):
    """Yield (representation, logits, targets, valid_mask) per batch, in eval mode, no grad."""
    device, dtype = _model_io(model)
    was_training = model.training
    model.eval()
    try:
        batches = loader if max_batches is None else itertools.islice(loader, max_batches)
        total = max_batches if max_batches is not None else _safe_len(loader)
        with torch.no_grad():
            for images, targets, valid in tqdm(batches, desc=desc, total=total, disable=not _is_main(),
                                               unit="batch", leave=False):
                tokens = model.forward_features(images.to(device=device, dtype=dtype, non_blocking=True))
                rep = model.forward_head(tokens, pre_logits=True).float().cpu()
                logits = model.forward_head(tokens).float().cpu()
                yield rep, logits, targets, valid.bool()
    finally:
        model.train(was_training)


def _safe_len(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def extract_features(model: torch.nn.Module, loader: Iterable, *, max_batches: int | None = None,
                     desc: str = "features") -> Features:
    """Representation, logits and targets of every valid sample, gathered on every rank.

    `max_batches` stops early (the same count on every rank), e.g. to take a subset of a
    large train split for the few-shot probe; shards are shuffled at conversion time, so a
    prefix of the split is a class-mixed sample of it.
    """
    reps, logits, targets = [], [], []
    for rep, lg, tg, valid in _forward_batches(model, loader, max_batches, desc):
        reps.append(rep[valid])
        logits.append(lg[valid])
        targets.append(tg[valid])
    if not targets:
        raise ValueError(f"{desc}: the loader yielded no batches")
    return Features(
        representation=all_gather_rows(torch.cat(reps)),
        logits=all_gather_rows(torch.cat(logits)),
        targets=all_gather_rows(torch.cat(targets)),
    )


def evaluate_classification(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    ks: Sequence[int] = (1, 5),
    multi_label: bool = False,
    max_batches: int | None = None,
    desc: str = "eval",
) -> dict[str, float]:
    """Top-k accuracy, and mean average precision for multi-label data.

    Returns `{"samples": N, "top1": ..., "top5": ..., ["mAP": ...]}` with the same values
    on every rank.
    """
    counts = {f"top{k}": 0 for k in ks} | {"samples": 0}
    all_logits, all_targets = [], []
    for rep, logits, targets, valid in _forward_batches(model, loader, max_batches, desc):
        logits, targets = logits[valid], targets[valid]
        counts["samples"] += int(valid.sum())
        for k, c in metrics.topk_correct(logits, targets, ks).items():
            counts[f"top{k}"] += c
        if multi_label:
            all_logits.append(logits)
            all_targets.append(targets)
    counts = all_reduce_counts(counts)
    n = max(counts["samples"], 1)
    result: dict[str, float] = {"samples": counts["samples"]}
    result |= {f"top{k}": counts[f"top{k}"] / n for k in ks}
    if multi_label:
        scores = all_gather_rows(torch.cat(all_logits)).numpy()
        result["mAP"] = metrics.mean_average_precision(scores, all_gather_rows(torch.cat(all_targets)).numpy())
    return result


def fewshot_evaluate(
    model: torch.nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    num_classes: int,
    *,
    shots: Sequence[int] = metrics.DEFAULT_SHOTS,
    l2_reg: float = metrics.DEFAULT_L2_REG,
    seed: int = 0,
    max_train_batches: int | None = None,
    max_test_batches: int | None = None,
) -> dict[str, float]:
    """The paper's few-shot linear accuracy: `{"fewshot_1": ..., "fewshot_5": ...}`."""
    train = extract_features(model, train_loader, max_batches=max_train_batches, desc="few-shot train")
    test = extract_features(model, test_loader, max_batches=max_test_batches, desc="few-shot test")
    return fewshot_from_features(train, test, num_classes, shots=shots, l2_reg=l2_reg, seed=seed)


def fewshot_from_features(train: Features, test: Features, num_classes: int, *,
                          shots: Sequence[int] = metrics.DEFAULT_SHOTS,
                          l2_reg: float = metrics.DEFAULT_L2_REG, seed: int = 0) -> dict[str, float]:
    _require_single_label(train, "few-shot")
    acc = metrics.fewshot_accuracy(train.representation.numpy(), train.targets.numpy(),
                                   test.representation.numpy(), test.targets.numpy(),
                                   num_classes, shots=shots, l2_reg=l2_reg, seed=seed)
    return {f"fewshot_{n}": a for n, a in acc.items()}


def linear_probe_from_features(train: Features, test: Features, num_classes: int,
                               weight_decay: float = 1e-4) -> dict[str, float]:
    _require_single_label(train, "linear probe")
    acc = metrics.linear_probe_accuracy(train.representation, train.targets, test.representation,
                                        test.targets, num_classes, weight_decay=weight_decay)
    return {"linear_probe_top1": acc}


def _require_single_label(f: Features, what: str) -> None:
    if f.targets.dim() != 1:
        raise ValueError(f"{what} needs single-label targets; this split is multi-label")
