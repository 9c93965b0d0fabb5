"""One training loop's speed at a pretraining recipe: on synthetic batches already on the device, or fed shards.

    python benchmarks/step_speed.py --recipe configs/pretrain/vit_b16_in21k.yaml --loop trainer
        [--compile none|blocks|both] [--batch 128] [--steps 20] [--warmup 5] [--device cuda]
        [--set KEY=VALUE ...] [--feed SHARDS] [--out results.jsonl] [--smoke]
    torchrun --nproc_per_node 2 benchmarks/step_speed.py ... --loop trainer   (the trainer on 2 ranks)
    python benchmarks/step_speed.py --summary results.jsonl

Loops (one per process, so each starts with an empty GPU and no compiled code):
- `trainer`: vit-pretrain's own step: the recipe's model and DeepSpeed engine (its ZeRO
  stage and precision) on one rank (or the launcher's ranks), driven by `Trainer.fit`, eager
  or with `train.compile`; `--compile both` builds both and times them in alternating rounds
  of the same run, and prints the compiled one's speed as a ratio of the eager one's.
- `bare`: the same model in a plain compiled PyTorch loop: fp32 weights, forward and loss
  under bf16 autocast (on a GPU), clip, fused AdamW. What the trainer is measured against.
- `timm`: timm's ViT of the same size in that bare loop.
`--feed SHARDS` (trainer): the same engine also fed real shards through the recipe's loader
(`--set data.decode=gpu` etc.), in rounds alternating with the synthetic batches; the fed row
gives its speed as a ratio of the synthetic one's, and the CPU cores its loader processes and
the training process kept busy meanwhile.

Each prints one JSON line (and appends it to --out): images/s over the timed steps, MFU
against the detected card's dense bf16 peak (3 x forward FLOPs per image), and for the
trainer on a GPU the host syncs of its steady-state steps, by source line
(`torch.cuda.set_sync_debug_mode`). `--smoke` shrinks the model to 2 narrow blocks at 32 px
and compiles with `aot_eager`: every code path of a section in seconds on a CPU
(benchmarks/gpu_suite.sh --cpu-smoke). `--summary` prints the table of a results file,
with each loop's speed as a ratio of the bare loop's of the same recipe, same run.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import torch

from pretrain.model import build_model
from pretrain.model.compile import compile_blocks
from pretrain.runtime import distributed
from pretrain.runtime.signals import StopRequest
from pretrain.runtime.watchdog import Watchdog
from pretrain.train.config import load_pretrain_config
from pretrain.train.loop import Hooks, Trainer, loss_fn
from pretrain.train.run_log import RunLog, peak_flops, vit_forward_flops
from pretrain.zero.engine import build_engine, build_model_for, deepspeed_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader_speed import children_cpu_seconds  # noqa: E402  (next to this script)

SMOKE = ["model.depth=2", "model.width=64", "model.heads=2", "model.mlp_dim=128", "model.representation_size=null"]
TIMM_NAMES = {"vit_b16": "vit_base_patch16_224", "vit_l16": "vit_large_patch16_224", "vit_h14": "vit_huge_patch14_224"}


def recipe(args):
    overrides = [f"train.batch_size={args.batch}", "train.grad_accum=1", f"train.steps={args.warmup + args.steps}",
                 "data.path=unused", "run.dir=unused", *args.set]  # fmt: skip
    if args.smoke:
        patch = 14 if "h14" in Path(args.recipe).name else 16
        overrides += [*SMOKE, f"model.img_size={2 * patch}", "train.compile_backend=aot_eager"]
    return load_pretrain_config([args.recipe], overrides)


def synthetic_batch(cfg, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, cfg.model.img_size, cfg.model.img_size, generator=g)
    targets = torch.randint(0, cfg.model.num_classes, (batch,), generator=g)
    return images.to(device), targets.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class SyncCount:
    """Host syncs inside the block, by source line (a GPU only: on a CPU there are none)."""

    def __init__(self, device: torch.device):
        self.on = device.type == "cuda"
        self.where: collections.Counter = collections.Counter()

    def __enter__(self):
        if self.on:
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.on:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(*exc)
            for w in self._records:
                if "synchroniz" in str(w.message):
                    self.where[f"{Path(w.filename).name}:{w.lineno}"] += 1


def start_ranks() -> tuple[int, int]:
    """Join the launcher's process group (torchrun), or be rank 0 of 1."""
    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = distributed.detect()
    distributed.init_process_group(env, 600)
    return env.rank, env.world_size


def build_engine_for_mode(cfg, args, mode: str, world: int):
    """The recipe's DeepSpeed engine with `train.compile` = mode, and the config it was built from."""
    cfg = copy.deepcopy(cfg)
    cfg.train.compile = mode
    cfg.train.batch_size = args.batch * world
    ds = deepspeed_config(cfg.zero, global_batch=args.batch * world, micro_batch=args.batch, grad_accum=1,
                          clip_grad=cfg.train.clip_grad)  # fmt: skip
    torch.manual_seed(0)
    model = build_model_for(cfg.zero, ds, lambda: build_model(cfg.model))
    if mode == "blocks":
        compile_blocks(model, cfg.train.compile_backend)
    rounds = 2 if args.feed else 1  # fed batches take turns with the synthetic ones on one engine
    return build_engine(model, ds, cfg.train.optim, args.warmup * rounds + args.steps * rounds), cfg


def make_trainer(engine, batches, cfg, rank: int, work: Path, name: str) -> Trainer:
    # Steady state: a log line (which reads the window) only where a fit call ends.
    cfg.train.log_every = cfg.train.stop_check_every = 10**9
    log = RunLog(work / f"trainer-{name}", enabled=False, resume_step=0)
    return Trainer(engine, batches, cfg.train, num_classes=cfg.model.num_classes, rank=rank, log=log,
                   hooks=Hooks(save=lambda step, final: None))  # fmt: skip


class Repeat:
    """One batch already on the device, forever: the step with no input cost at all."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


class LiveLoader:
    """A training loader whose one iterator spans fit calls: its workers start once, as in a run."""

    def __init__(self, loader):
        self.device_input, self.counters = loader.device_input, loader.counters
        self._batches = iter(loader)

    def __iter__(self):
        return self._batches


def shard_loader(cfg, args, rank: int, world: int) -> LiveLoader:
    from pretrain.data.loaders import build_train_loader

    cfg.data.path = str(args.feed)
    return LiveLoader(build_train_loader(cfg.data, img_size=cfg.model.img_size, global_batch=args.batch * world,
                                         rank=rank, world_size=world, seed=0))  # fmt: skip


def fit_seconds(trainer: Trainer, start: int, steps: int, device: torch.device) -> float:
    t0 = time.perf_counter()
    trainer.fit(start, start + steps, StopRequest(), Watchdog(0, trainer.rank))
    sync(device)
    return time.perf_counter() - t0


def trainer_loops(cfg, args, device) -> list[dict]:
    """vit-pretrain's step, eager and/or compiled, or fed synthetic and real batches: in alternating
    rounds of the same run where two are timed."""
    rank, world = start_ranks()
    work = Path(args.work)
    modes = ["none", "blocks"] if args.compile == "both" else [args.compile]
    trainers = {}
    for m in modes:
        engine, mcfg = build_engine_for_mode(cfg, args, m, world)
        torch.manual_seed(rank)
        trainers[m] = make_trainer(engine, Repeat(synthetic_batch(mcfg, args.batch, engine.device)), mcfg, rank,
                                   work, m)  # fmt: skip
        if args.feed:
            fed = f"{m}, shards ({mcfg.data.decode} decode)"
            trainers[fed] = make_trainer(engine, shard_loader(mcfg, args, rank, world), mcfg, rank, work, "fed")
    warmup = {m: fit_seconds(t, 0, args.warmup, device) for m, t in trainers.items()}
    seconds, syncs, done = dict.fromkeys(trainers, 0.0), {m: SyncCount(device) for m in trainers}, 0
    cpu = {m: {"loader": 0.0, "trainer": 0.0} for m in trainers}
    while done < args.steps:
        n = min(args.round, args.steps - done)
        for m, trainer in trainers.items():
            c0, p0 = children_cpu_seconds(), time.process_time()
            with syncs[m]:
                seconds[m] += fit_seconds(trainer, args.warmup + done, n, device)
            cpu[m]["loader"] += children_cpu_seconds() - c0
            cpu[m]["trainer"] += time.process_time() - p0
        done += n
    rows = []
    for m, trainer in trainers.items():
        trainer.log.close()
        row = {"loop": f"trainer {m}", "seconds": seconds[m], "steps": args.steps, "world": world,
               "warmup_s": warmup[m], "host_syncs": dict(syncs[m].where),
               "deepspeed": trainer.engine.vitscale_patches_line}  # fmt: skip
        if isinstance(trainer.loader, LiveLoader):
            synthetic = m.split(",")[0]
            row["vs_synthetic_same_run"] = round(seconds[synthetic] / seconds[m], 3)
            # CPU cores busy while fed: the loader's processes, and this one's (the step's host side, GPU decode's)
            row["loader_cores"] = round(cpu[m]["loader"] / seconds[m], 2)
            row["trainer_process_cores"] = round(cpu[m]["trainer"] / seconds[m], 2)
            row["data_counters"] = trainer.loader.counters()
        rows.append(row)
    if args.compile == "both":
        compiled = next(r for r in rows if r["loop"] == "trainer blocks")
        compiled["vs_eager_same_run"] = round(seconds["none"] / seconds["blocks"], 3)
    distributed.shutdown()
    return rows if rank == 0 else []


def bare_loop(cfg, args, device, model: torch.nn.Module) -> dict:
    """Forward and loss under bf16 autocast (on a GPU), backward, clip, fused AdamW; compiled whole."""
    model.to(device).train()
    model.compile(backend=cfg.train.compile_backend if args.smoke else "inductor")
    o = cfg.train.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay, fused=device.type == "cuda")  # fmt: skip
    loss_of = loss_fn(cfg.train.loss, cfg.model.num_classes)
    images, targets = synthetic_batch(cfg, args.batch, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = loss_of(model(images), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    return {"loop": "bare compiled", "seconds": time.perf_counter() - t0, "steps": args.steps, "world": 1,
            "warmup_s": warmup_s}  # fmt: skip


def timm_model(cfg) -> torch.nn.Module:
    import timm

    m = cfg.model
    return timm.create_model(TIMM_NAMES[m.name], pretrained=False, num_classes=m.num_classes, img_size=m.img_size,
                             depth=m.depth, embed_dim=m.width, num_heads=m.heads,
                             mlp_ratio=m.mlp_dim / m.width)  # fmt: skip


def measure(args) -> list[dict]:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = recipe(args)
    torch.manual_seed(0)
    if args.loop == "trainer":
        timings = trainer_loops(cfg, args, device)
    elif args.loop == "bare":
        timings = [bare_loop(cfg, args, device, build_model(cfg.model))]
    else:
        timings = [{**bare_loop(cfg, args, device, timm_model(cfg)), "loop": "timm compiled"}]
    peak = peak_flops()
    flops = vit_forward_flops(cfg.model)
    rows = []
    for t in timings:
        images_per_s = args.batch * t["world"] * t["steps"] / t["seconds"]
        rows.append({
            "recipe": Path(args.recipe).stem + (" (smoke)" if args.smoke else ""),
            "loop": t["loop"],
            "model": f"{cfg.model.name} {cfg.model.img_size}px",
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "zero": f"stage {cfg.zero.stage}, {cfg.zero.precision}, {cfg.zero.grad_dtype} gradients",
            "batch": args.batch * t["world"],
            "steps": t["steps"],
            "images_per_s": round(images_per_s, 2),
            "step_ms": round(1000 * t["seconds"] / t["steps"], 2),
            # Per device: a rank's share of the images against one card's peak.
            "mfu": round(3 * flops * images_per_s / (peak * t["world"]), 4) if peak else None,
            **{k: v for k, v in t.items() if k not in ("loop", "seconds", "steps", "world")},
        })  # fmt: skip
    return rows


def summary(path: Path) -> str:
    """The results as a table; speeds as ratios to the bare loop and to the eager trainer of the
    same recipe in the same file (one suite run)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    bare = {r["recipe"]: r["images_per_s"] for r in rows if r["loop"] == "bare compiled"}
    eager = {r["recipe"]: r["images_per_s"] for r in rows if r["loop"] == "trainer none"}
    lines = [
        "| recipe | loop | images/s | step ms | vs bare loop | vs eager trainer | MFU | host syncs per step "
        "| fed vs synthetic (CPU cores: loader + trainer) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratios = [f"{r['images_per_s'] / ref[r['recipe']]:.3f}" if r["recipe"] in ref else "-" for ref in (bare, eager)]
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        syncs = r.get("host_syncs")
        per_step = "-" if syncs is None else f"{sum(syncs.values()) / r['steps']:.2f}"
        if syncs:
            per_step += f" ({', '.join(syncs)})"
        fed = "-"
        if "vs_synthetic_same_run" in r:
            fed = f"{r['vs_synthetic_same_run']:.3f} ({r['loader_cores']} + {r['trainer_process_cores']})"
        lines.append(f"| {r['recipe']} | {r['loop']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | {ratios[0]} "
                     f"| {ratios[1]} | {mfu} | {per_step} | {fed} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", help="a configs/pretrain/*.yaml recipe")
    p.add_argument("--loop", choices=("trainer", "bare", "timm"), default="trainer")
    p.add_argument(
        "--compile",
        choices=("none", "blocks", "both"),
        default="none",
        help="the trainer's train.compile; both: eager and compiled in alternating rounds, with their ratio",
    )
    p.add_argument("--round", type=int, default=5, help="timed steps per round (--compile both, --feed)")
    p.add_argument(
        "--feed",
        type=Path,
        metavar="SHARDS",
        help="trainer: also feed the same engine from these shards through the recipe's loader (data.* from "
        "--set), in alternating rounds with the synthetic batches; prints its speed as a ratio of theirs",
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides of the recipe")
    p.add_argument("--batch", type=int, default=32, help="images per step (one rank, no accumulation)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compiling happens here)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="2 narrow blocks at 32 px, aot_eager: a CPU check of the code")
    p.add_argument("--out", type=Path, help="append the result line to this JSON-lines file")
    p.add_argument("--work", default="/tmp", help="scratch folder")
    p.add_argument("--summary", type=Path, help="print the table of a results file and exit")
    args = p.parse_args()
    if args.summary:
        print(summary(args.summary))
        return 0
    if not args.recipe or args.steps < 1 or args.warmup < 1:
        p.error("--recipe is required; --steps and --warmup must be >= 1")
    for row in measure(args):
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
