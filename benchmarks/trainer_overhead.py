"""Trainer overhead: our full DeepSpeed training step against a bare PyTorch loop.

Same model, optimizer (AdamW + warm-up/decay schedule), loss, gradient clipping and batch,
in one process: the bare loop is forward, loss, backward, clip, step; ours is
`Trainer.fit` over the DeepSpeed engine (ZeRO stage `--stage`, one rank) with everything a real
run has at step boundaries except data loading (an in-memory batch is repeated, so only
the trainer is measured). Then a checkpoint save is timed against writing the same
number of bytes with fsync: the disk's bandwidth measured in the same run.

    python benchmarks/trainer_overhead.py [--model vit_s16] [--img 64] [--batch 32] [--steps 30]

Prints the throughput ratio (ours / bare) last. Timings on a shared machine are noisy;
the ratio, measured in one process, is what counts.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from pretrain import distributed
from pretrain.checkpoint import CheckpointConfig, Checkpointer
from pretrain.engine import ZeroConfig, build_engine, deepspeed_config
from pretrain.model import build_model, model_config
from pretrain.optim import OptimConfig, build_optimizer, build_scheduler
from pretrain.run_log import RunLog
from pretrain.signals import StopRequest, Watchdog
from pretrain.trainer import Hooks, TrainConfig, Trainer, loss_fn


class RepeatBatch:
    def __init__(self, images, targets):
        self.batch = (images, targets)

    def __iter__(self):
        while True:
            yield self.batch


def bare_loop(model_cfg, optim_cfg, images, targets, steps: int, clip: float, threads: int) -> float:
    """Seconds per step of the plain PyTorch loop (after one warm-up step)."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = build_model(model_cfg)
    opt = build_optimizer(optim_cfg, model.named_parameters())
    sched = build_scheduler(optim_cfg, opt, steps + 1)
    loss_of = loss_fn("softmax", model_cfg.num_classes)
    for step in range(steps + 1):
        if step == 1:  # after one warm-up step, as ours
            t0 = time.perf_counter()
        loss = loss_of(model(images), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        loss.item()
    return (time.perf_counter() - t0) / steps


def our_loop(model_cfg, optim_cfg, images, targets, steps: int, clip: float, run_dir: Path, threads: int, stage: int):
    """Seconds per step of Trainer.fit over the DeepSpeed engine, and the engine."""
    torch.manual_seed(0)
    batch = images.shape[0]
    ds_cfg = deepspeed_config(ZeroConfig(stage=stage), global_batch=batch, micro_batch=batch, grad_accum=1, clip_grad=clip)
    engine = build_engine(build_model(model_cfg), ds_cfg, optim_cfg, steps + 1)
    torch.set_num_threads(threads)  # DeepSpeed's CPU set-up may change it; both loops get the same
    train_cfg = TrainConfig(steps=steps + 1, batch_size=batch, clip_grad=clip, loss="softmax", log_every=10,
                            optim=optim_cfg)
    trainer = Trainer(engine, RepeatBatch(images, targets), train_cfg, num_classes=model_cfg.num_classes, rank=0,
                      log=RunLog(run_dir, enabled=True, resume_step=0), hooks=Hooks(save=lambda step: None))
    trainer.fit(0, 1, StopRequest(), Watchdog(0, 0))  # warm-up step, as in the bare loop
    t0 = time.perf_counter()
    trainer.fit(1, steps + 1, StopRequest(), Watchdog(0, 0))
    return (time.perf_counter() - t0) / steps, engine


def disk_bandwidth(folder: Path, nbytes: int) -> float:
    """Bytes/s writing `nbytes` in 8 MiB blocks with a final fsync (as the checkpoint writes)."""
    block = os.urandom(8 << 20)
    path = folder / "bandwidth.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(nbytes // len(block), 1)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    written = path.stat().st_size
    path.unlink()
    return written / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_s16")
    p.add_argument("--img", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch threads for both loops")
    p.add_argument("--stage", type=int, default=1, help="ZeRO stage of our engine (0: no sharding)")
    args = p.parse_args()
    distributed.init_process_group(distributed.detect(), 600)

    model_cfg = model_config(args.model, img_size=args.img, num_classes=100)
    optim_cfg = OptimConfig(lr=1e-3, weight_decay=0.03, warmup_steps=5)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img, args.img, generator=g)
    targets = torch.randint(0, 100, (args.batch,), generator=g)

    bare = bare_loop(model_cfg, optim_cfg, images, targets, args.steps, 1.0, args.threads)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        ours, engine = our_loop(model_cfg, optim_cfg, images, targets, args.steps, 1.0, Path(tmp), args.threads,
                                args.stage)
        ckpt = Checkpointer(Path(tmp) / "checkpoints", CheckpointConfig(keep=1), 0, 1)
        t0 = time.perf_counter()
        folder = ckpt.save(engine, 1, {"step": 1})
        save_s = time.perf_counter() - t0
        nbytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        bandwidth = disk_bandwidth(Path(tmp), nbytes)

    params = sum(p.numel() for p in engine.module.parameters())
    print(f"model {args.model} ({params / 1e6:.1f}M params) at {args.img}px, batch {args.batch}, "
          f"{args.threads} threads, ZeRO stage {args.stage}")
    print(f"bare PyTorch loop : {bare * 1e3:8.1f} ms/step  {args.batch / bare:8.1f} img/s")
    print(f"vitscale trainer  : {ours * 1e3:8.1f} ms/step  {args.batch / ours:8.1f} img/s")
    print(f"checkpoint save   : {nbytes / 1e6:.0f} MB in {save_s:.2f} s = {nbytes / save_s / 1e6:.0f} MB/s; "
          f"disk with fsync {bandwidth / 1e6:.0f} MB/s -> {nbytes / bandwidth / save_s:.2f} of the disk's speed")
    print(f"trainer throughput / bare loop: {bare / ours:.3f}")


if __name__ == "__main__":
    main()
