"""Model evaluation: classification metrics and frozen features, on one process or many.

The functions here take a model and an eval loader (an iterable of `(images, targets,
valid_mask)` batches where every rank sees a disjoint share of the split and padding is
masked out) and return the same numbers on every rank. Counts are summed across ranks
exactly; features are gathered in full, since the few-shot and linear probes need all of
them. Every rank runs the same number of forward passes (the loader pads to equal batch
counts), so a ZeRO-3 model, whose forward itself is collective, works too.

The trainer's periodic evaluation (periodic.py), the fine-tune stage's final scores and
`vit-eval` (run.py) all call these.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Sequence

import torch
from tqdm import tqdm

from pretrain.evaluate import metrics
from pretrain.runtime.collectives import all_gather_rows, all_reduce_counts, is_main_rank


# --------------------------------------------------------------------------- forward passes
@dataclasses.dataclass
class Features:
    """Frozen outputs of a model over one split (valid samples only, gathered from all ranks)."""

    representation: torch.Tensor  # (N, D) float32: the pre-logits vector the probes use
    logits: torch.Tensor | None  # (N, C) float32; None where only the representation was kept
    targets: torch.Tensor  # (N,) int64, or (N, K) multi-hot
    ids: torch.Tensor | None = None  # (N,) int64 sample ids, when the loader yields them (4th element)

    def __len__(self) -> int:
        return self.targets.shape[0]


def _model_io(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _forward_batches(model, loader, max_batches, desc):
    """Yield (representation, logits, targets, valid_mask, ids or None) per batch, eval mode, no grad.

    A batch is `(images, targets, valid_mask)` or `(images, targets, valid_mask, ids)`. A loader of
    `pretrain.data` hands over uint8 images and the `device_input` that normalises them on the
    model's device; any other iterable (tests, user code) yields images ready for the model.
    """
    device, dtype = _model_io(model)
    inputs = getattr(loader, "device_input", None)
    was_training = model.training
    model.eval()
    try:
        batches = loader if max_batches is None else itertools.islice(loader, max_batches)
        total = max_batches if max_batches is not None else _safe_len(loader)
        for images, targets, valid, *ids in tqdm(
            batches, desc=desc, total=total, disable=not is_main_rank(), unit="batch", leave=False
        ):
            # no_grad per batch, never across the yield: a consumer that stops early would
            # otherwise leave gradients switched off for the whole process.
            with torch.no_grad():
                x = images if inputs is None else inputs.images(images, device)
                tokens = model.forward_features(x.to(device=device, dtype=dtype, non_blocking=True))
                rep = model.forward_head(tokens, pre_logits=True).float().cpu()
                logits = model.forward_head(tokens).float().cpu()
            yield rep, logits, targets, valid.bool(), (ids[0] if ids else None)
    finally:
        model.train(was_training)


def _safe_len(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def extract_features(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    max_batches: int | None = None,
    with_logits: bool = True,
    desc: str = "features",
) -> Features:
    """Representation, logits and targets of every valid sample, gathered on every rank.

    `with_logits=False` keeps only the representation (a 21k-class head's logits over a
    large split would be gigabytes). `max_batches` stops early (the same count on every rank), e.g. to take a subset of a
    large train split for the few-shot probe; shards are shuffled at conversion time, so a
    prefix of the split is a class-mixed sample of it.
    """
    reps, logits, targets, ids = [], [], [], []
    for rep, lg, tg, valid, batch_ids in _forward_batches(model, loader, max_batches, desc):
        reps.append(rep[valid])
        if with_logits:
            logits.append(lg[valid])
        targets.append(tg[valid])
        if batch_ids is not None:
            ids.append(batch_ids[valid])
    if not targets:
        raise ValueError(f"{desc}: the loader yielded no batches")
    return Features(
        representation=all_gather_rows(torch.cat(reps)),
        logits=all_gather_rows(torch.cat(logits)) if with_logits else None,
        targets=all_gather_rows(torch.cat(targets)),
        ids=all_gather_rows(torch.cat(ids)) if ids else None,
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
    on every rank. Only counts cross ranks (logits too for mAP), so a 21k-class head over
    a large split costs no memory.
    """
    return _classify(model, loader, ks, multi_label, max_batches, desc, keep_representation=False)[0]


def evaluate_and_extract(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    ks: Sequence[int] = (1, 5),
    multi_label: bool = False,
    max_batches: int | None = None,
    desc: str = "eval",
) -> tuple[dict[str, float], Features]:
    """`evaluate_classification` plus, from the same forward passes, the gathered
    representations (logits not kept), e.g. as the test side of the few-shot probe."""
    return _classify(model, loader, ks, multi_label, max_batches, desc, keep_representation=True)


def _classify(model, loader, ks, multi_label, max_batches, desc, keep_representation):
    counts = {f"top{k}": 0 for k in ks} | {"samples": 0}
    all_logits, all_targets, reps = [], [], []
    for rep, logits, targets, valid, _ in _forward_batches(model, loader, max_batches, desc):
        logits, targets = logits[valid], targets[valid]
        counts["samples"] += int(valid.sum())
        for k, c in metrics.topk_correct(logits, targets, ks).items():
            counts[f"top{k}"] += c
        if multi_label:
            all_logits.append(logits)
        if multi_label or keep_representation:
            all_targets.append(targets)
        if keep_representation:
            reps.append(rep[valid])
    counts = all_reduce_counts(counts)
    n = max(counts["samples"], 1)
    result: dict[str, float] = {"samples": counts["samples"]}
    result |= {f"top{k}": counts[f"top{k}"] / n for k in ks}
    targets = all_gather_rows(torch.cat(all_targets)) if all_targets else None
    if multi_label:
        result["mAP"] = metrics.mean_average_precision(all_gather_rows(torch.cat(all_logits)).numpy(), targets.numpy())
    features = Features(all_gather_rows(torch.cat(reps)), None, targets) if keep_representation else None
    return result, features


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


def fewshot_from_features(
    train: Features,
    test: Features,
    num_classes: int,
    *,
    shots: Sequence[int] = metrics.DEFAULT_SHOTS,
    l2_reg: float = metrics.DEFAULT_L2_REG,
    seed: int = 0,
) -> dict[str, float]:
    _require_single_label(train, "few-shot")
    acc = metrics.fewshot_accuracy(
        train.representation.numpy(),
        train.targets.numpy(),
        test.representation.numpy(),
        test.targets.numpy(),
        num_classes,
        shots=shots,
        l2_reg=l2_reg,
        seed=seed,
    )
    return {f"fewshot_{n}": a for n, a in acc.items()}


def linear_probe_from_features(
    train: Features, test: Features, num_classes: int, weight_decay: float = 1e-4
) -> dict[str, float]:
    _require_single_label(train, "linear probe")
    acc = metrics.linear_probe_accuracy(
        train.representation, train.targets, test.representation, test.targets, num_classes, weight_decay=weight_decay
    )
    return {"linear_probe_top1": acc}


def _require_single_label(f: Features, what: str) -> None:
    if f.targets.dim() != 1:
        raise ValueError(f"{what} needs single-label targets; this split is multi-label")


# --------------------------------------------------------------------------- scores from features
def classification_from_features(
    f: Features, ks: Sequence[int] = (1, 5), multi_label: bool = False
) -> dict[str, float]:
    """Top-k (and mAP) from gathered logits: the same numbers `evaluate_classification` counts."""
    n = len(f)
    result: dict[str, float] = {"samples": n}
    result |= {f"top{k}": c / n for k, c in metrics.topk_correct(f.logits, f.targets, ks).items()}
    if multi_label:
        result["mAP"] = metrics.mean_average_precision(f.logits.numpy(), f.targets.numpy())
    return result


def real_from_features(f: Features, real_labels: Sequence[Sequence[int]]) -> dict[str, float]:
    """ImageNet ReaL top-1: `real_labels[i]` are the real labels of the sample whose id is i."""
    if f.ids is None:
        raise ValueError("ReaL accuracy needs sample ids from the loader")
    predictions = f.logits.argmax(1).tolist()
    correct, counted = metrics.real_correct(predictions, [real_labels[i] for i in f.ids.tolist()])
    return {"real_top1": correct / max(counted, 1), "real_samples": counted}
