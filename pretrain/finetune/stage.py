"""vit-finetune: transfer a pretrained ViT to a new task at a higher resolution (paper 3.2).

    vit-finetune CONFIG [CONFIG ...] [key=value ...] [--force]

The config is the pretraining one (run, model, data, train, zero, checkpoint, eval, slurm)
plus `init`: where the starting weights come from and how they are adapted. The pretrained
head (and pre-logits layer) is dropped, a zero-initialised head for the target classes is
attached and the position embeddings are resampled to the new patch grid; then the same
DeepSpeed trainer as pretraining runs (ZeRO, checkpoints, exact resume, signals). At the
end every held-out split is evaluated at the new resolution and `results.json` /
`results.md` are written into the run directory.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch

from pretrain.model.posemb import METHODS as POSEMB_METHODS
from pretrain.train.config import PretrainConfig, RunConfig, load_pretrain_config
from pretrain.train.loop import TrainConfig
from pretrain.zero.optimizer import OptimConfig
from vitscale_common.atomic import atomic_write_text
from vitscale_common.config_loader import ConfigError, to_yaml
from vitscale_common.errors import cli_entry

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
INIT_JSON = "init.json"  # what the start did (source, resolution and grid change, keys re-initialised)


@dataclass
class InitConfig:
    # run dir, its export/, timm .safetensors/.pth, or official .npz; null/empty = random init
    weights: Optional[str] = None
    reset_head: bool = True  # replace the pretraining head with a zero-initialised one for the target classes
    drop_representation: bool = True  # drop the pre-logits (Dense + tanh) layer, as the official fine-tuning does
    # pos-emb resampling: bicubic (antialiased, timm) | bicubic_no_antialias | linear (JAX parity)
    posemb_method: str = "bicubic"
    linear_probe: bool = False  # freeze everything but the head (quick transfer check)
    # [H, W] patch grid of init.weights' position embedding, for timm and .npz files, which
    # record none; run directories and exports record theirs. Unset: a square grid.
    source_grid: Optional[List[int]] = None

    def validate(self, where: str = "init") -> None:
        if self.posemb_method not in POSEMB_METHODS:
            raise ConfigError(
                f"{where}.posemb_method: must be one of {', '.join(POSEMB_METHODS)}, got {self.posemb_method!r}"
            )
        if self.source_grid is not None and (len(self.source_grid) != 2 or min(self.source_grid) <= 0):
            raise ConfigError(f"{where}.source_grid: must be [H, W] with H, W > 0, got {list(self.source_grid)}")
        if not self.reset_head and self.linear_probe:
            raise ConfigError(f"{where}.linear_probe: trains only a new head; it needs init.reset_head=true")


def paper_recipe() -> TrainConfig:
    """The paper's fine-tuning (vision_transformer configs/common.py): SGD momentum 0.9, no
    weight decay, clip 1, cosine decay after 500 warm-up steps, batch 512, softmax loss."""
    return TrainConfig(
        batch_size=512,
        clip_grad=1.0,
        loss="softmax",
        optim=OptimConfig(
            name="sgd", lr=0.01, weight_decay=0.0, momentum=0.9, schedule="cosine", warmup_steps=500, end_lr=0.0
        ),
    )


@dataclass
class FinetuneConfig(PretrainConfig):
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/finetune"))
    train: TrainConfig = field(default_factory=paper_recipe)
    init: InitConfig = field(default_factory=InitConfig)  # starting weights and how to adapt them


def load_finetune_config(files, overrides=()) -> FinetuneConfig:
    cfg = load_pretrain_config(files, overrides, schema=FinetuneConfig)
    cfg.init.validate()
    if cfg.init.linear_probe and cfg.zero.stage < 2:
        # Below stage 2 DeepSpeed's checkpoints keep no fp32 copy of frozen weights, so the
        # backbone would be missing from consolidated exports.
        raise ConfigError(
            f"init.linear_probe: needs zero.stage >= 2 (got {cfg.zero.stage}), "
            "so that checkpoints hold the frozen backbone"
        )
    return cfg


def adopt_source_shape(cfg: FinetuneConfig, source) -> list[str]:
    """Model fields the starting weights decide (kept layers must keep their shapes)."""
    notes = []
    representation = None if cfg.init.drop_representation else source.representation_size
    if representation != cfg.model.representation_size:
        why = "init.drop_representation" if cfg.init.drop_representation else "kept from the source"
        notes.append(f"model.representation_size={representation} ({why})")
        cfg.model.representation_size = representation
    if not cfg.init.reset_head and source.num_classes != cfg.model.num_classes:
        raise ConfigError(
            f"init.reset_head=false keeps the source head of {source.num_classes} classes, "
            f"but model.num_classes is {cfg.model.num_classes}"
        )
    return notes


def freeze_backbone(model: torch.nn.Module) -> int:
    """Linear probe: only the head trains; returns the number of trainable parameters."""
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("head.")
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- final results
def held_out_splits(cfg: FinetuneConfig, available) -> list[str]:
    wanted = [cfg.eval.split or cfg.data.eval_split, "val", "test"]
    return [s for s in dict.fromkeys(wanted) if s in available and s != cfg.data.train_split]


def final_step(run_dir: Path) -> int:
    from pretrain.checkpoint.checkpointer import scan, step_of

    newest = scan(run_dir / "checkpoints").newest
    return step_of(newest.name) if newest else 0


def use_ema_weights(model: torch.nn.Module, run_dir: Path) -> bool:
    """Load the Polyak-averaged weights of the final checkpoint into `model` when it has them."""
    from pretrain.checkpoint.checkpointer import Checkpointer, scan

    newest = scan(run_dir / "checkpoints").newest
    ema = Checkpointer.read_state(newest).get("ema") if newest else None
    if not ema:
        return False
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ema[name].to(p.dtype))
    return True


def final_evaluation(cfg: FinetuneConfig, model: torch.nn.Module, rank: int, world: int) -> dict[str, dict]:
    """Top-1/top-5 on every held-out split at the fine-tuning resolution (collective)."""
    import sharding
    from pretrain.data.loaders import build_eval_loader
    from pretrain.evaluate.features import evaluate_classification

    dataset = sharding.open_dataset(cfg.data.path)
    results = {}
    for split in held_out_splits(cfg, dataset.splits):
        loader = build_eval_loader(
            cfg.data, split, img_size=cfg.model.img_size, batch_size=cfg.eval.batch_size, rank=rank, world_size=world
        )
        results[split] = evaluate_classification(
            model, loader, multi_label=dataset.label_kind == "multi", desc=f"final {split}"
        )
    return results


def results_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Fine-tuning results: {summary['model']} at {summary['img_size']} px",
        "",
        f"Run `{summary['run_dir']}`, {summary['steps']} steps, weights: {summary['weights']}.",
        "",
    ]
    metrics = sorted({k for r in summary["results"].values() for k in r if k != "samples"})
    lines.append("| split | samples | " + " | ".join(metrics) + " |")
    lines.append("|---|---:|" + "---:|" * len(metrics))
    for split, r in summary["results"].items():
        lines.append(f"| {split} | {r['samples']} | " + " | ".join(f"{r[m]:.4f}" for m in metrics) + " |")
    if summary.get("init"):
        lines += ["", "Start:", ""] + [f"- {line.removeprefix('init: ')}" for line in summary["init"]["lines"]]
    return "\n".join(lines) + "\n"


def write_results(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(run_dir / RESULTS_JSON, json.dumps(summary, indent=1) + "\n")
    atomic_write_text(run_dir / RESULTS_MD, results_markdown(summary))


# --------------------------------------------------------------------------- entry point
def run_finetune(cfg: FinetuneConfig, *, force: bool = False) -> int:
    from pretrain.checkpoint.starting_weights import fit_to_model, read_source
    from pretrain.model import build_model
    from pretrain.runtime import distributed
    from pretrain.train.run import run_training, say

    # ---------------------------------------------------------------- starting weights
    run_dir = Path(cfg.run.dir)
    start: dict[str, Any] = {"source": None, "notes": [], "resumed_at": None}

    def prepare(saved: dict | None) -> None:
        """Once the resume point is agreed: a resumed run keeps the shape it started with and
        takes its weights from the checkpoint (a requeued ViT-H job need not re-read 2.5 GB
        per rank); a fresh one reads init.weights."""
        if saved is not None:
            cfg.model.representation_size = saved["config"]["model"]["representation_size"]
            start["resumed_at"] = saved["step"]
        elif cfg.init.weights:
            start["source"] = read_source(cfg.init.weights)
            start["notes"] = adopt_source_shape(cfg, start["source"])

    def build(model_cfg):
        model = build_model(model_cfg)
        rank = distributed.detect().rank
        source, notes = start["source"], start["notes"]
        if source is not None:
            report = fit_to_model(
                source,
                model,
                reset_head=cfg.init.reset_head,
                posemb_method=cfg.init.posemb_method,
                source_grid=tuple(cfg.init.source_grid) if cfg.init.source_grid else None,
            )
            init = {**report.as_dict(), "lines": report.lines() + [f"init: {n}" for n in notes]}
            source.state.clear()  # the model holds the weights now; a ViT-H source is 2.5 GB per rank
            for line in init["lines"]:
                say(rank, line)
            if rank == 0:  # kept for the results table of this run, however often it is resumed
                run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(run_dir / INIT_JSON, json.dumps(init, indent=1) + "\n")
        elif start["resumed_at"] is not None:
            say(rank, f"init: resuming from step {start['resumed_at']}; init.weights is not read again")
        else:
            say(rank, "init: random initialisation (init.weights is not set)")
        if cfg.init.linear_probe:
            say(rank, f"init: linear probe, {freeze_backbone(model):,} trainable parameters (the head)")
        return model

    # ---------------------------------------------------------------- final evaluation
    def finish(model: torch.nn.Module) -> None:
        """Collective, before the process group goes: every rank scores its share of each split."""
        env = distributed.detect()
        ema = bool(cfg.train.ema_decay) and use_ema_weights(model, run_dir)
        results = final_evaluation(cfg, model, env.rank, env.world_size)
        if env.rank == 0:
            _report(ema, results)

    def _report(ema: bool, results: dict[str, dict]) -> None:
        init = json.loads((run_dir / INIT_JSON).read_text()) if (run_dir / INIT_JSON).is_file() else None
        summary = {
            "run_dir": cfg.run.dir,
            "model": cfg.model.name,
            "img_size": cfg.model.img_size,
            "steps": final_step(run_dir),
            "weights": cfg.init.weights or "random init",
            "ema_weights": ema,
            "init": init,
            "results": results,
        }
        write_results(run_dir, summary)
        print(results_markdown(summary), file=sys.stderr)

    # ---------------------------------------------------------------- train (shared loop)
    return run_training(cfg, build_model=build, force=force, prepare=prepare, finish=finish)


def parse_args(argv):
    from pretrain.train.run import parse_args as parse_training_args

    return parse_training_args(
        argv,
        prog="vit-finetune",
        description=__doc__.split("\n\n")[0],
        example="vit-finetune configs/finetune/demo.yaml init.weights=runs/demo data.path=shards run.dir=runs/demo_ft",
    )


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_finetune_config(args.configs, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    return run_finetune(cfg, force=args.force)


if __name__ == "__main__":
    sys.exit(main())
