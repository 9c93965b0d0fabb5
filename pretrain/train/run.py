"""vit-pretrain: pretrain a ViT on a shard dataset with DeepSpeed ZeRO.

    vit-pretrain CONFIG [CONFIG ...] [key=value ...] [--force]

Runs unchanged as one process, under torchrun / the deepspeed launcher, or under srun.
Starting on a run directory that holds checkpoints resumes from the newest complete one;
a SIGUSR1/SIGTERM saves at the next step and exits with code 85 (requeue me). A rank that
fails ends every rank within seconds (86 on the others); a hang exits with 87.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from pretrain.checkpoint.checkpointer import Checkpointer, file_digest, fingerprint_diff
from pretrain.model.compile import compile_blocks
from pretrain.runtime import distributed
from pretrain.runtime.fatal import FailureWatch
from pretrain.runtime.glibc_host_memory import keep_freed_host_memory
from pretrain.runtime.signals import StopRequest
from pretrain.runtime.watchdog import Watchdog
from pretrain.train.config import RESUMABLE_CHANGES, derive, load_pretrain_config
from pretrain.train.loop import Ema, Hooks, Trainer
from pretrain.train.run_log import RunLog, peak_flops, vit_forward_flops
from pretrain.zero.engine import build_engine, build_model_for, deepspeed_config
from vitscale_common.config_loader import ConfigError, save_config, to_yaml
from vitscale_common.errors import UserError, cli_entry
from vitscale_common.exit_codes import EXIT_REQUEUE


def say(rank: int, msg: str) -> None:
    if rank == 0:
        tqdm.write(msg, file=sys.stderr)


def _resolved(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def check_resumable(saved: dict, cfg, dataset_digest: str, *, force: bool) -> None:
    """Refuse a resume whose model, data or recipe differ from the run's, unless forced."""
    changed = fingerprint_diff(saved["config"], _resolved(cfg), RESUMABLE_CHANGES)
    if saved.get("dataset_digest") != dataset_digest:
        changed.append(f"dataset ({cfg.data.path}/dataset.json content)")
    if changed and not force:
        raise UserError(
            f"{cfg.run.dir} was trained with a different config: {', '.join(changed)} changed; "
            "use a new run.dir, or --force to resume anyway"
        )
    if changed:
        print(f"warning: resuming despite changes to {', '.join(changed)} (--force)", file=sys.stderr)


def run_training(
    cfg,
    *,
    build_model: Callable,
    force: bool = False,
    prepare: Callable[[dict | None], None] | None = None,
    finish: Callable[[torch.nn.Module], None] | None = None,
) -> int:
    """Train per `cfg` (sections run, model, data, train, zero, checkpoint, eval); returns the exit code.

    `build_model(model_cfg)` constructs the network (fine-tuning passes one that loads
    its starting weights); under ZeRO-3 it runs inside `deepspeed.zero.Init`. `prepare(saved)`
    runs on every rank once the resume point is agreed (`saved`: its trainer state, or None
    for a fresh start), before the config is checked against it. `finish(model)`
    runs on every rank once training is complete, while the process group is still up, so
    it may be collective (the fine-tune stage's final evaluation over all ranks' shares).
    """
    # ---------------------------------------------------------------- process group
    env = distributed.detect()
    distributed.init_process_group(env, cfg.run.dist_timeout_s)
    watchdog = Watchdog(cfg.train.watchdog_s, env.rank)
    try:
        with FailureWatch(env.rank, env.world_size, Path(cfg.run.dir), step=lambda: watchdog.step or None):
            outcome = _train(cfg, env, build_model, force, prepare, finish, watchdog)
    finally:
        watchdog.stop()
    distributed.shutdown()
    return outcome


def _train(cfg, env, build_model, force, prepare, finish, watchdog: Watchdog) -> int:
    import sharding
    from pretrain.data.loaders import build_train_loader
    from pretrain.evaluate.periodic import build_evaluator

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if cfg.run.reuse_host_memory and not torch.cuda.is_available():
        keep_freed_host_memory()  # before the model, engine and loader workers allocate
    rank, world = env.rank, env.world_size
    run_dir = Path(cfg.run.dir)

    # ---------------------------------------------------------------- dataset
    dataset = sharding.open_dataset(cfg.data.path)
    if cfg.model.num_classes != dataset.num_classes:
        raise ConfigError(
            f"model.num_classes: {cfg.model.num_classes}, but {cfg.data.path} has {dataset.num_classes} classes"
        )
    digest = file_digest(Path(cfg.data.path) / "dataset.json")

    # ---------------------------------------------------------------- resume decision
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, rank, world)
    checkpointer.clean_incomplete()
    resume, saved = checkpointer.agree_on_resume(cfg.checkpoint.resume)
    if prepare is not None:
        prepare(saved)
    if saved:
        check_resumable(saved, cfg, digest, force=force)
        say(rank, f"resuming from {resume} (step {saved['step']}, saved on {saved['world_size']} ranks)")
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    world_changed = bool(saved) and saved["world_size"] != world
    # Partitioned optimizer state must be re-cut for the new world size through DeepSpeed's
    # universal layout; stage 0 keeps the whole optimizer in one file any world size loads.
    universal = world_changed and Checkpointer.partitioned(resume)

    # ---------------------------------------------------------------- data
    loader = build_train_loader(
        cfg.data,
        img_size=cfg.model.img_size,
        global_batch=cfg.train.batch_size,
        rank=rank,
        world_size=world,
        seed=cfg.run.seed,
    )
    derived = derive(cfg.train, world, loader.steps_per_epoch)
    say(rank, f"derived: {derived.describe()}")

    # ---------------------------------------------------------------- model and engine
    ds_config = deepspeed_config(
        cfg.zero,
        global_batch=cfg.train.batch_size,
        micro_batch=derived.micro_batch,
        grad_accum=cfg.train.grad_accum,
        clip_grad=cfg.train.clip_grad,
    )
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
        checkpointer.prepare_universal(resume)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = build_model_for(cfg.zero, ds_config, lambda: build_model(cfg.model))
    if cfg.train.compile == "blocks":
        n = compile_blocks(model, cfg.train.compile_backend)
        say(rank, f"compiling {n} transformer blocks in place ({cfg.train.compile_backend}) on their first call")
    engine = build_engine(model, ds_config, cfg.train.optim, derived.total_steps)
    say(rank, engine.vitscale_patches_line)
    torch.manual_seed(cfg.run.seed * 1_000_003 + rank + 1)  # dropout differs across ranks
    ema = Ema(engine.module, cfg.train.ema_decay) if cfg.train.ema_decay else None

    # ---------------------------------------------------------------- restore
    start_step, samples_seen, skips = 0, 0, 0
    if saved:
        ema_state = checkpointer.load(
            engine, resume, universal=universal, same_world=not world_changed, with_ema=ema is not None
        )
        loader.load_state_dict(saved["data"])
        start_step, samples_seen, skips = saved["step"], saved["samples_seen"], saved.get("nonfinite_skips", 0)
        if ema is not None and ema_state is not None:
            ema.load_state_dict(ema_state)
        if world_changed:
            torch.manual_seed(cfg.run.seed * 1_000_003 + rank + 1 + start_step)

    # ---------------------------------------------------------------- train
    log = RunLog(run_dir, enabled=rank == 0, resume_step=start_step)
    resolved = _resolved(cfg)

    def save(step: int, final: bool) -> None:
        state = {
            "step": step,
            "samples_seen": trainer.samples_seen,
            "nonfinite_skips": trainer.nonfinite_skips,
            "data": loader.state_dict(),
            "config": resolved,
            "dataset_digest": digest,
        }
        if ema is not None:
            state["ema"] = ema.state_dict()
        finished = checkpointer.finish()
        if finished:
            say(rank, f"saved {finished}")
        folder = checkpointer.save(engine, step, state, final=final)
        say(rank, f"writing {folder} in the background" if checkpointer.pending else f"saved {folder}")

    evaluate = build_evaluator(
        cfg.eval,
        cfg.data,
        engine.module,
        img_size=cfg.model.img_size,
        num_classes=dataset.num_classes,
        multi_label=dataset.label_kind == "multi",
        rank=rank,
        world_size=world,
    )
    trainer = Trainer(
        engine,
        loader,
        cfg.train,
        num_classes=dataset.num_classes,
        rank=rank,
        log=log,
        hooks=Hooks(save=save, evaluate=evaluate, checkpoint_every=cfg.checkpoint.every, eval_every=cfg.eval.every),
        ema=ema,
        flops_per_image=vit_forward_flops(cfg.model),
        peak_flops=peak_flops(),
    )
    trainer.samples_seen, trainer.nonfinite_skips = samples_seen, skips
    stop = StopRequest().install()
    watchdog.start()
    try:
        outcome = trainer.fit(start_step, derived.total_steps, stop, watchdog)
    finally:
        stop.uninstall()
        log.close()
    if outcome == "done" and finish is not None:
        finish(engine.module)
    if outcome == "stopped":
        say(
            rank,
            f"stop requested (signal {stop.signum or 'on another rank'}): checkpoint saved, exiting {EXIT_REQUEUE}",
        )
        return EXIT_REQUEUE
    say(rank, f"done: {derived.total_steps} steps, {trainer.samples_seen} samples; run directory {run_dir}")
    return 0


def parse_args(
    argv,
    *,
    prog: str = "vit-pretrain",
    description: str = __doc__.split("\n\n")[0],
    example: str = "vit-pretrain configs/pretrain/demo.yaml data.path=shards run.dir=runs/demo",
):
    """The command line shared by the training stages: configs, overrides, --force."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=f"Example: {example}")
    p.add_argument(
        "items",
        nargs="+",
        metavar="CONFIG|key=value",
        help="YAML config files (merged in order), then key=value overrides",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="resume even when the model, data or recipe differ from the run directory's",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    args.configs = [i for i in args.items if "=" not in i]
    args.overrides = [i for i in args.items if "=" in i]
    return args


@cli_entry
def main(argv=None) -> int:
    from pretrain.model import build_model

    args = parse_args(argv)
    cfg = load_pretrain_config(args.configs, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    return run_training(cfg, build_model=build_model, force=args.force)


if __name__ == "__main__":
    sys.exit(main())
