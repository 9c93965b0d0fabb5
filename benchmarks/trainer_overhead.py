"""Trainer overhead: our full DeepSpeed training step against a bare PyTorch loop.

Same model, optimizer (AdamW + warm-up/decay schedule), loss, gradient clipping and batch,
in one process: the bare loop is forward, loss, backward, clip, step; ours is
`Trainer.fit` over the DeepSpeed engine (ZeRO stage `--stage`, one rank) with everything a real
run has at step boundaries except data loading (an in-memory batch is repeated, so only
the trainer is measured). Then a checkpoint save is timed against writing the same
number of bytes with fsync just before and just after it (the faster of the two): the
disk's bandwidth, measured in the same run; and the time a background save
(`checkpoint.async_save`) blocks training, against the waited save's. At ZeRO stages 1-2
it also times the clipping norm, ours (pretrain/zero/deepspeed_patches.py) against DeepSpeed's, on
the same gradients; `--deepspeed-grad-norm` trains with DeepSpeed's.

    python benchmarks/trainer_overhead.py [--model vit_s16] [--img 64] [--batch 32] [--steps 30] [--round 1]
                                          [--device cpu|cuda] [--no-reuse-host-memory] [--deepspeed-grad-norm]
                                          [--bf16 [--zero grad_dtype=bf16]]

On a GPU both loops run fp32 with TF32 matrix products, on a batch already on the device.
With `--bf16` ours trains as the recipes do (`zero.precision=bf16`, gradients in
`zero.grad_dtype`: fp32 unless `--zero grad_dtype=bf16`) and the bare loop as plain
PyTorch mixed precision would: fp32 weights, forward and loss under `torch.autocast(bfloat16)`.
On a CPU the process first keeps freed host memory for reuse, as `vit-pretrain` does
(`run.reuse_host_memory`, pretrain/runtime/glibc_host_memory.py); `--no-reuse-host-memory` measures
without it. Both loops share the process, so the setting applies to both.

The loops alternate in rounds of `--round` steps (default 1), so a change in the machine's
load hits both alike. Prints the throughput ratio (ours / bare, over all timed steps) last,
and before it the median of the rounds' ratios. One-step rounds are the default because on
a shared machine they agree run to run far better than longer rounds (docs/PERFORMANCE.md).
Each round is its own `Trainer.fit` call, so ours also pays a progress bar
and a log line every step, which a real run does not: the bias is against us.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pretrain.checkpoint.checkpointer import CheckpointConfig, Checkpointer
from pretrain.model import build_model, model_config
from pretrain.runtime import distributed
from pretrain.runtime.glibc_host_memory import keep_freed_host_memory
from pretrain.runtime.signals import StopRequest
from pretrain.runtime.watchdog import Watchdog
from pretrain.train.loop import Hooks, TrainConfig, Trainer, loss_fn
from pretrain.train.run_log import RunLog
from pretrain.zero.deepspeed_patches import fused_grad_norm
from pretrain.zero.engine import ZeroConfig, build_engine, build_model_for, deepspeed_config, input_dtype
from pretrain.zero.optimizer import OptimConfig, build_optimizer, build_scheduler
from vitscale_common.config_loader import load_config


class RepeatBatch:
    def __init__(self, images, targets):
        self.batch = (images, targets)

    def __iter__(self):
        while True:
            yield self.batch


@contextlib.contextmanager
def pytorch_linear():
    """`torch.nn.functional.linear` as PyTorch ships it, for the bare loop. A ZeRO-3 engine
    replaces it for the whole process with DeepSpeed's own autograd function (DeepSpeed's
    `memory_efficient_linear`: it saves the weight, not a view of it, so a released
    parameter's gathered storage is not held until backward). Without this, at `--stage 3`
    the baseline would run DeepSpeed's linear too: a separate bias add instead of one fused
    addmm."""
    functional = torch.nn.functional
    installed = functional.linear
    functional.linear = torch._C._nn.linear
    try:
        yield
    finally:
        functional.linear = installed


class BareLoop:
    """The plain PyTorch loop: forward, loss, backward, clip, AdamW step, schedule step
    (forward and loss under bf16 autocast when asked)."""

    def __init__(self, model_cfg, optim_cfg, images, targets, total_steps: int, clip: float, bf16: bool = False):
        torch.manual_seed(0)
        self.model = build_model(model_cfg).to(images.device)
        self.opt = build_optimizer(optim_cfg, self.model.named_parameters())
        self.sched = build_scheduler(optim_cfg, self.opt, total_steps)
        self.loss_of = loss_fn("softmax", model_cfg.num_classes)
        self.images, self.targets, self.clip, self.bf16 = images, targets, clip, bf16

    def run(self, steps: int) -> None:
        with pytorch_linear():
            self._run(steps)

    def _run(self, steps: int) -> None:
        for _ in range(steps):
            with torch.autocast(self.images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.loss_of(self.model(self.images), self.targets)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
            self.sched.step()
            loss.item()


class OurLoop:
    """`Trainer.fit` over the DeepSpeed engine, run `steps` at a time."""

    def __init__(
        self, model_cfg, optim_cfg, images, targets, total_steps: int, clip: float, run_dir: Path, zero: ZeroConfig
    ):
        torch.manual_seed(0)
        batch = images.shape[0]
        ds_cfg = deepspeed_config(zero, global_batch=batch, micro_batch=batch, grad_accum=1, clip_grad=clip)
        model = build_model_for(zero, ds_cfg, lambda: build_model(model_cfg))  # under zero.Init at stage 3
        self.engine = build_engine(model, ds_cfg, optim_cfg, total_steps)
        train_cfg = TrainConfig(
            steps=total_steps, batch_size=batch, clip_grad=clip, loss="softmax", log_every=10, optim=optim_cfg
        )
        self.trainer = Trainer(
            self.engine,
            RepeatBatch(images, targets),
            train_cfg,
            num_classes=model_cfg.num_classes,
            rank=0,
            log=RunLog(run_dir, enabled=True, resume_step=0),
            hooks=Hooks(save=lambda step, final: None),
        )
        self.step = 0

    def run(self, steps: int) -> None:
        self.trainer.fit(self.step, self.step + steps, StopRequest(), Watchdog(0, 0))
        self.step += steps


def timed(loop, steps: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    loop.run(steps)
    sync()
    return time.perf_counter() - t0


def minor_faults() -> int:
    """Page faults served without I/O so far: each first touch of freshly mapped memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def norm_timings(engine, trainer, images, targets, repeats: int = 10) -> tuple[float, float] | None:
    """ZeRO-1/2: seconds per gradient norm, ours (pretrain/zero/deepspeed_patches.py) and DeepSpeed's,
    over the partition of one more backward; None at other stages. Leaves that backward unstepped."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if not isinstance(opt, DeepSpeedZeroOptimizer):
        return None
    engine.backward(trainer.loss(engine(images.to(input_dtype(engine))), targets))
    groups = [(opt.averaged_gradients[i], opt.params_in_partition[i]) for i in range(len(opt.bit16_groups))]
    seconds = [0.0, 0.0]
    for _ in range(repeats):  # alternated, as the loops are
        for k, norm in enumerate((fused_grad_norm, type(opt).get_grad_norm_direct)):
            t0 = time.perf_counter()
            for grads, params in groups:
                norm(opt, grads, params).item()
            seconds[k] += time.perf_counter() - t0
    return seconds[0] / repeats, seconds[1] / repeats


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
    p.add_argument("--steps", type=int, default=30, help="timed steps per loop, in alternating rounds")
    p.add_argument("--round", type=int, default=1, help="steps per round (each round times the bare loop, then ours)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both loops")
    p.add_argument("--stage", type=int, default=1, help="ZeRO stage of our engine (0: no sharding)")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda needs the GPU DeepSpeed places the engine on",
    )
    p.add_argument(
        "--no-reuse-host-memory",
        dest="reuse_host_memory",
        action="store_false",
        help="on a CPU, leave malloc returning freed buffers to the OS (the trainer's run.reuse_host_memory=false)",
    )
    p.add_argument(
        "--deepspeed-grad-norm",
        action="store_true",
        help="DeepSpeed's own per-parameter clipping norm instead of ours (pretrain/zero/deepspeed_patches.py)",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="ours with zero.precision=bf16, the bare loop under torch.autocast(bfloat16)",
    )
    p.add_argument(
        "--zero",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="other fields of the zero config section, e.g. reduce_bucket_size=200000000 overlap_comm=true",
    )
    args = p.parse_args()
    zero = load_config(
        ZeroConfig, overrides=[f"stage={args.stage}", *(["precision=bf16"] if args.bf16 else []), *args.zero]
    )
    device = torch.device(args.device)
    reuse = device.type == "cpu" and args.reuse_host_memory and keep_freed_host_memory()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = device.type == "cuda"
    distributed.init_process_group(distributed.detect(), 600)

    model_cfg = model_config(args.model, img_size=args.img, num_classes=100)
    optim_cfg = OptimConfig(lr=1e-3, weight_decay=0.03, warmup_steps=5)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img, args.img, generator=g).to(device)
    targets = torch.randint(0, 100, (args.batch,), generator=g).to(device)

    per_round = args.round
    rounds = max(args.steps // per_round, 1)
    total = rounds * per_round + 1
    # On the disk of the working directory, where runs usually live; git ignores the folder,
    # which a killed benchmark leaves behind.
    with tempfile.TemporaryDirectory(dir=".", prefix="trainer_overhead-") as tmp:
        bare_loop = BareLoop(model_cfg, optim_cfg, images, targets, total, 1.0, args.bf16)
        ours_loop = OurLoop(model_cfg, optim_cfg, images, targets, total, 1.0, Path(tmp), zero)
        # Where the engine installed ours: the ZeRO optimizer's norm, or at stage 0 the engine's clip.
        replaced = [
            (obj, name)
            for obj, name in (
                (ours_loop.engine.optimizer, "get_grad_norm_direct"),
                (ours_loop.engine, "clip_fp32_gradients"),
            )
            if name in vars(obj)
        ]
        if args.deepspeed_grad_norm:
            for obj, name in replaced:
                delattr(obj, name)  # back to DeepSpeed's class method
            replaced = []
        fused_norm = bool(replaced)
        torch.set_num_threads(args.threads)  # after DeepSpeed's CPU set-up: both loops get the same
        bare_loop.run(1), ours_loop.run(1)  # warm-up
        # Alternate rounds, so a change in the machine's load hits both loops alike.
        bare_s, ours_s = [], []
        bare_faults = ours_faults = 0
        for _ in range(rounds):
            start = minor_faults()
            bare_s.append(timed(bare_loop, per_round))
            middle = minor_faults()
            ours_s.append(timed(ours_loop, per_round))
            bare_faults, ours_faults = bare_faults + middle - start, ours_faults + minor_faults() - middle
        bare, ours = sum(bare_s) / (rounds * per_round), sum(ours_s) / (rounds * per_round)
        # Each round's pair ran back to back; a burst of load on a shared host hits one
        # round's pair, not the median of the pairs' ratios.
        round_ratios = sorted(b / o for b, o in zip(bare_s, ours_s))
        engine = ours_loop.engine
        ckpt = Checkpointer(Path(tmp) / "checkpoints", CheckpointConfig(keep=1, async_save=True), 0, 1)
        folder = ckpt.save(engine, 1, {"step": 1})  # untimed: folders made, sizes known
        nbytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        # The disk's speed on either side of the timed save, the faster one: a VM's write cache
        # makes a single fsync'd timing swing, and the faster reference gives the lower ratio.
        before = disk_bandwidth(Path(tmp), nbytes)
        t0 = time.perf_counter()
        ckpt.save(engine, 2, {"step": 2})
        save_s = time.perf_counter() - t0
        bandwidth = max(before, disk_bandwidth(Path(tmp), nbytes))
        # checkpoint.async_save: the step boundary waits only for the host copy.
        t0 = time.perf_counter()
        ckpt.save(engine, 3, {"step": 3}, final=False)
        blocked_s = time.perf_counter() - t0
        ckpt.finish()
        norms = norm_timings(engine, ours_loop.trainer, images, targets)

    params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())  # ZeRO-3: partitioned
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(
        f"model {args.model} ({params / 1e6:.1f}M params) at {args.img}px, batch {args.batch}, "
        f"{where}, ZeRO stage {args.stage} {' '.join(args.zero)}"
        f"{f', bf16 with {zero.grad_dtype} gradients (bare loop: autocast)' if args.bf16 else ''}"
        f"{', host memory reused' if reuse else ''}{', fused gradient norm' if fused_norm else ''}"
    )
    steps = rounds * per_round
    print(
        f"bare PyTorch loop : {bare * 1e3:8.1f} ms/step  {args.batch / bare:8.1f} img/s  "
        f"{bare_faults // steps:7d} page faults/step"
    )
    print(
        f"vitscale trainer  : {ours * 1e3:8.1f} ms/step  {args.batch / ours:8.1f} img/s  "
        f"{ours_faults // steps:7d} page faults/step"
    )
    print(
        f"checkpoint save   : {nbytes / 1e6:.0f} MB in {save_s:.2f} s = {nbytes / save_s / 1e6:.0f} MB/s; "
        f"disk with fsync {bandwidth / 1e6:.0f} MB/s -> {nbytes / bandwidth / save_s:.2f} of the disk's speed"
    )
    print(
        f"background save   : training blocked {blocked_s:.2f} s (host copy) -> "
        f"{blocked_s / save_s:.2f} of the waited save's time"
    )
    if norms:
        print(
            f"gradient norm     : {norms[0] * 1e3:.1f} ms fused vs {norms[1] * 1e3:.1f} ms DeepSpeed's per parameter, "
            f"same gradients -> {norms[1] / norms[0]:.1f}x"
        )
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(f"peak RSS          : {peak_rss / 1e9:.2f} GB (both loops and the saves, one process)")
    print(
        f"per-round ratio   : median {statistics.median(round_ratios):.3f} over {rounds} rounds of {per_round} steps "
        f"({round_ratios[0]:.3f}-{round_ratios[-1]:.3f})"
    )
    print(f"trainer throughput / bare loop: {bare / ours:.3f}")


if __name__ == "__main__":
    main()
