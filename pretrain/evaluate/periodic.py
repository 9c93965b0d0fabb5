"""Periodic evaluation during training (the `eval` section): top-1 / mAP on a held-out split
and the paper's few-shot linear evaluation on frozen representations.

The metrics themselves live in `pretrain.evaluate.features`; this only decides what to run, on
which splits, and builds the loaders. Every rank calls the returned function together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List

import torch

from pretrain.evaluate import features as evaluate


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations (0: only at the end of training)
    split: str = ""  # split to evaluate on; empty: data.eval_split
    batch_size: int = 256  # per-rank evaluation batch
    max_batches: int = 0  # evaluate on at most this many batches per rank (0: the whole split)
    fewshot_shots: List[int] = field(default_factory=lambda: [1, 5, 10, 25])  # shots per class; [] = no few-shot
    fewshot_train_split: str = ""  # split the few-shot examples are drawn from; empty: data.train_split
    fewshot_train_batches: int = 40  # batches per rank of that split used as the few-shot pool (0: all)
    fewshot_l2_reg: float = 1024.0  # ridge regulariser of the least-squares fit (big_vision's default)


def build_evaluator(
    cfg: EvalConfig,
    data_cfg,
    model: torch.nn.Module,
    *,
    img_size: int,
    num_classes: int,
    multi_label: bool,
    rank: int,
    world_size: int,
) -> Callable[[int], dict]:
    from pretrain.data.loaders import build_eval_loader

    def loader(split: str):
        return build_eval_loader(
            data_cfg, split, img_size=img_size, batch_size=cfg.batch_size, rank=rank, world_size=world_size
        )

    test_split = cfg.split or data_cfg.eval_split
    pool_split = cfg.fewshot_train_split or data_cfg.train_split
    limit = cfg.max_batches or None

    def run(step: int) -> dict:
        results = evaluate.evaluate_classification(
            model, loader(test_split), multi_label=multi_label, max_batches=limit, desc=f"eval {test_split}"
        )
        if cfg.fewshot_shots and not multi_label:
            results |= evaluate.fewshot_evaluate(
                model,
                loader(pool_split),
                loader(test_split),
                num_classes,
                shots=cfg.fewshot_shots,
                l2_reg=cfg.fewshot_l2_reg,
                max_train_batches=cfg.fewshot_train_batches or None,
                max_test_batches=limit,
            )
        return {"split": test_split, **results}

    return run
