"""One rank of the non-finite-step check (run by test_nonfinite_skip.py under torchrun).

The real Trainer trains a small ViT over three batches of 4 micro-batches each; in the
second, rank 0's micro-batch 2 holds a NaN pixel. Every ZeRO stage must skip that whole
window on both ranks: fp32 weights, Adam's moments and step count, the schedule and the
trainer's step unchanged across it; then the third batch trains exactly as it would had
the second never been seen (bitwise against a run over batches 1 and 3 alone), which also
shows that the accumulation boundary is still on the right micro-step. The skip is counted
once and logged. At stage 0, which has no ZeRO optimizer to skip with, the step is applied
and the run stops at the next log line with the step named. With max_nonfinite_skips=0 the
first skip stops the run on every rank.

    torchrun --nproc_per_node 2 tests/multiproc/nonfinite_skip_rank.py RUN_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from rank_report import report  # next to this script

from pretrain.model import create_model
from pretrain.runtime import distributed
from pretrain.runtime.signals import StopRequest
from pretrain.runtime.watchdog import Watchdog
from pretrain.train.loop import Hooks, NonFiniteLoss, TrainConfig, Trainer
from pretrain.train.run_log import RunLog
from pretrain.zero.engine import ZeroConfig, build_engine, deepspeed_config
from pretrain.zero.optimizer import OptimConfig

ARCH = dict(img_size=32, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128, num_classes=10, dropout=0.0)
MICRO, ACCUM = 2, 4
# A schedule that moves every step, so a step it took by mistake would show.
OPTIM = OptimConfig(lr=1e-3, warmup_steps=3, end_lr=1e-4, weight_decay=0.05)


def batches(rank: int, poisoned: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches 1-3 of this rank (poisoned: NaN in micro-batch 2 of batch 2 on rank 0), or 1 and 3."""
    g = torch.Generator().manual_seed(10 + rank)
    out = [(torch.randn(MICRO * ACCUM, 3, 32, 32, generator=g), torch.randint(0, 10, (MICRO * ACCUM,), generator=g))
           for _ in range(3)]  # fmt: skip
    if not poisoned:
        return [out[0], out[2]]
    if rank == 0:
        out[1][0][MICRO * 1, 0, 5, 5] = float("nan")  # micro-batch 2 of 4
    return out


def state(engine) -> dict:
    """Everything a skipped step must leave as it was: this rank's part of the fp32 master
    weights and of Adam's state (what its optimizer steps on), the schedule, the micro-step."""
    base = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    # ZeRO-3 hands its fp32 partitions to the optimizer only while it steps.
    params = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [
        p for group in base.param_groups for p in group["params"]
    ]
    return {
        "weights": {i: p.detach().clone() for i, p in enumerate(params)},
        "adam": {(i, k): v.clone() for i, p in enumerate(params) for k, v in base.state[p].items()},
        "schedule": (engine.lr_scheduler.last_epoch, engine.get_lr()[0]),
        "micro_steps_mod_accum": engine.micro_steps % ACCUM,
    }


def adam_steps(s: dict) -> list[float]:
    return sorted({float(v) for (_, k), v in s["adam"].items() if k == "step"})


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k])
        if isinstance(a[k], dict)
        else a[k] == b[k]
        for k in a
    )


class Recorder:
    """The loader: hands out the batches and records the engine's state before each (the
    optimizer has none before its first step)."""

    def __init__(self, data, engine):
        self.data, self.engine, self.before = data, engine, []

    def __iter__(self):
        for i, batch in enumerate(self.data):
            self.before.append(state(self.engine) if i else {"micro_steps_mod_accum": self.engine.micro_steps % ACCUM})
            yield batch


def train(stage: int, precision: str, data, run_dir: Path, max_skips: int, total_steps: int):
    torch.manual_seed(0)
    model = create_model("vit_ti16", **ARCH)
    torch.nn.init.normal_(model.head.weight, std=0.02)  # every parameter gets a gradient at step 1
    world = dist.get_world_size()
    zero = ZeroConfig(stage=stage, precision=precision, reduce_bucket_size=20_000, allgather_bucket_size=20_000)
    ds = deepspeed_config(zero, global_batch=MICRO * ACCUM * world, micro_batch=MICRO, grad_accum=ACCUM, clip_grad=1.0)
    engine = build_engine(model, ds, OPTIM, total_steps=10)
    cfg = TrainConfig(steps=total_steps, batch_size=MICRO * ACCUM * world, grad_accum=ACCUM, loss="softmax",
                      max_nonfinite_skips=max_skips, log_every=1, optim=OPTIM)  # fmt: skip
    rank = dist.get_rank()
    log = RunLog(run_dir, enabled=rank == 0, resume_step=0)
    loader = Recorder(data, engine)
    trainer = Trainer(engine, loader, cfg, num_classes=10, rank=rank, log=log, hooks=Hooks(save=lambda s, f: None))
    error = None
    try:
        trainer.fit(0, total_steps, StopRequest(), Watchdog(0, rank))
    except NonFiniteLoss as e:
        error = str(e)
    finally:
        log.close()
    return engine, trainer, loader, error


def skipped_window(stage: int, precision: str, rank: int, run_dir: Path) -> dict:
    engine, trainer, loader, error = train(stage, precision, batches(rank, True), run_dir, 1, 2)
    reference, *_ = train(stage, precision, batches(rank, False), run_dir / "reference", 1, 2)
    after_first, after_skip = loader.before[1], loader.before[2]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
    return {
        "error": error,
        "unchanged_across_skip": same(after_first, after_skip),
        "adam_steps": [adam_steps(after_first), adam_steps(after_skip), adam_steps(state(engine))],
        "boundary": [s["micro_steps_mod_accum"] for s in loader.before],
        "as_if_never_seen": same(state(engine), state(reference)),
        "skips": [trainer.nonfinite_skips, engine.skipped_steps],
        "logged": [(line["step"], line["nonfinite_skips"]) for line in logged if line["kind"] == "train"],
    }


def main() -> None:
    distributed.init_process_group(distributed.detect(), 300)
    rank = dist.get_rank()
    root = Path(sys.argv[1])
    results = {}
    for stage, precision in ((1, "fp32"), (2, "fp32"), (3, "fp32"), (1, "bf16"), (2, "bf16")):
        results[f"stage{stage}-{precision}"] = skipped_window(stage, precision, rank, root / f"{stage}-{precision}")
    # No skips allowed: the first one stops the run, on every rank.
    results["no_skips_allowed"] = train(1, "fp32", batches(rank, True), root / "strict", 0, 2)[3]
    # Stage 0 applies the step; the run stops at the next log line (here: that step's).
    _, trainer, _, error = train(0, "fp32", batches(rank, True), root / "stage0", 0, 3)
    results["stage0"] = {"error": error, "skips": trainer.nonfinite_skips}
    distributed.shutdown()
    report(rank, results)


if __name__ == "__main__":
    main()
