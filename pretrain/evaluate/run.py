"""`vit-eval`: score a run, an export or foreign weights on a split of a shard dataset.

The same functions as the trainer's periodic evaluation (features.py), on one process or
many; with `--real`, ImageNet ReaL labels are matched to the split by source id.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Iterator, Sequence

import torch

from pretrain.evaluate import metrics
from pretrain.evaluate.features import (
    Features,
    classification_from_features,
    extract_features,
    fewshot_from_features,
    linear_probe_from_features,
    real_from_features,
)
from pretrain.runtime.collectives import is_main_rank
from pretrain.runtime.fatal import FailureWatch
from vitscale_common.atomic import atomic_write_text
from vitscale_common.errors import UserError, cli_entry

# --------------------------------------------------------------------------- vit-eval
REAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})")


class _WithSampleIds:
    """The eval loader's batches with the split-wide position of each slot as a 4th element.

    `EvalLoader.batches[i]` describes the i-th batch it yields: `count` consecutive positions
    of the split from `start` (padding slots after them are masked out). Its length and its
    `device_input` (the feature extractor normalises on the model's device with it) carry over.
    """

    def __init__(self, loader):
        self.loader, self.device_input = loader, loader.device_input

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple]:
        for (images, targets, valid), batch in zip(self.loader, self.loader.batches, strict=True):
            yield images, targets, valid, torch.arange(batch.start, batch.start + len(valid))


def _split_index(ds, split: str) -> tuple[list[str], list]:
    """(source id, label) of every sample of `split`, in stream position order."""
    sources, labels = [], []
    for shard in ds.shards(split):
        table = ds.sample_index(split, shard.name)
        sources += table.column("source_id").to_pylist()
        labels += table.column("labels" if ds.label_kind == "multi" else "label").to_pylist()
    return sources, labels


def load_real_labels(path: Path, source_ids: Sequence[str]) -> list[list[int]]:
    """ReaL label sets per split position, from the official `real.json`.

    real.json lists, for validation image number n (file ILSVRC2012_val_{n:08d}.JPEG), its
    real labels at index n - 1; an empty list means the image has no reliable label.
    """
    try:
        real = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--real {path}: cannot read JSON: {e}") from None
    if not isinstance(real, list) or not all(isinstance(r, list) for r in real):
        raise UserError(f"--real {path}: expected a list of label lists (the official real.json)")
    out = []
    for sid in source_ids:
        m = REAL_NAME.search(sid)
        if not m or not 1 <= int(m.group(1)) <= len(real):
            raise UserError(f"--real: sample {sid!r} is not an ImageNet validation image covered by {path}")
        out.append([int(c) for c in real[int(m.group(1)) - 1]])
    return out


def _check_ids(f: Features, labels: Sequence, split: str) -> None:
    """The loader's batches must be the positions we think they are: compare with the index."""
    if f.targets.dim() != 1:
        return
    expected = torch.tensor([labels[i] for i in f.ids.tolist()], dtype=torch.int64)
    if not torch.equal(expected, f.targets):
        raise RuntimeError(f"{split}: loader batches do not line up with the dataset index")


def _model_for(source, args) -> torch.nn.Module:
    from pretrain.model import build_model, model_config

    if source.model is not None:
        cfg = source.model
    elif args.model:
        cfg = model_config(args.model)
    else:
        raise UserError(f"{args.weights}: the weights record no model config; name the variant with --model")
    overrides = {"num_classes": source.num_classes, "representation_size": source.representation_size}
    if args.resolution:
        overrides |= {"img_size": args.resolution, "img_width": None}
    return build_model(dataclasses.replace(cfg, **overrides))


def _data_config(source, args):
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from pretrain.data.loaders import DataConfig

    node = OmegaConf.structured(DataConfig)
    run_config = source.run_dir / "config.yaml" if source.run_dir else None
    if run_config is not None and run_config.is_file():
        # The run's normalisation and eval crop are part of what the model learned.
        try:
            node = OmegaConf.merge(node, OmegaConf.load(run_config).get("data", {}))
        except OmegaConfBaseException as e:
            raise UserError(f"{run_config}: data section: {str(e).splitlines()[0]}") from None
    cfg = OmegaConf.to_object(node)
    cfg.path, cfg.workers, cfg.shards_url, cfg.cache_dir = str(args.data), args.workers, None, None
    return cfg


def _markdown(results: dict, header: dict) -> str:
    lines = ["# Evaluation results", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "| metric | value |", "|---|---|"]
    for k, v in results.items():
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vit-eval",
        description="Score a ViT on a shard dataset: top-1/top-5, "
        "ImageNet ReaL, few-shot linear and linear-probe accuracy.",
    )
    p.add_argument("weights", type=Path, help="a run directory, its export/, a timm state dict or an .npz")
    p.add_argument("--data", type=Path, required=True, help="shard dataset written by vit-prep")
    p.add_argument("--split", default="test", help="split to score (default: test)")
    p.add_argument("--real", type=Path, help="ImageNet ReaL labels (real.json) for the validation images")
    p.add_argument("--fewshot", default="", help="comma-separated shots per class, e.g. 1,5,10,25 (default: none)")
    p.add_argument("--fewshot-l2", type=float, default=metrics.DEFAULT_L2_REG, help="ridge regulariser")
    p.add_argument("--linear-probe", action="store_true", help="also fit a logistic-regression probe")
    p.add_argument("--train-split", default="train", help="split the few-shot and probe examples come from")
    p.add_argument("--train-batches", type=int, default=0, help="batches per rank of it to use (0: all)")
    p.add_argument("--resolution", type=int, default=0, help="evaluate at this image size (pos-emb resampled)")
    p.add_argument("--posemb-method", default="bicubic", help="resampling method when --resolution changes the grid")
    p.add_argument("--model", default="", help="model variant, for weights that do not record one (timm, .npz)")
    p.add_argument("--batch-size", type=int, default=64, help="per-rank batch")
    p.add_argument("--workers", type=int, default=2, help="loader processes per rank")
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot example choice")
    p.add_argument("--out", type=Path, help="results folder (default: WEIGHTS/eval or next to the weights file)")
    args = p.parse_args(argv)
    try:
        args.shots = [int(s) for s in args.fewshot.split(",") if s.strip()]
    except ValueError:
        p.error(f"--fewshot {args.fewshot!r}: expected comma-separated integers")
    return args


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    from pretrain.runtime import distributed

    args = parse_args(argv)
    env = distributed.detect()
    if env.world_size > 1:
        distributed.init_process_group(env, timeout_s=1800)
    # A failing rank ends the others at once (they may be waiting in a collective for it).
    with FailureWatch(env.rank, env.world_size, None):
        run_eval(args, env, distributed.device(env))
    distributed.shutdown()
    return 0


def run_eval(args, env, device) -> None:
    """Score the weights on the split (every rank its share), and write the report on rank 0."""
    import sharding
    from pretrain.checkpoint.starting_weights import fit_to_model, read_source
    from pretrain.data.loaders import build_eval_loader

    # -- data (checked first: a typo should not cost a model load)
    ds = sharding.open_dataset(args.data)
    for split in [args.split] + ([args.train_split] if args.shots or args.linear_probe else []):
        if split not in ds.splits:
            raise UserError(f"{args.data}: no split {split!r} (has {', '.join(ds.splits)})")
    if ds.label_kind == "multi" and (args.shots or args.linear_probe):
        raise UserError(f"{args.data} is multi-label: the few-shot and linear probes need single-label data")
    sources, labels = _split_index(ds, args.split)
    real = load_real_labels(args.real, sources) if args.real else None

    # -- model and weights
    source = read_source(args.weights)
    model = _model_for(source, args)
    init = fit_to_model(source, model, reset_head=False, posemb_method=args.posemb_method)
    model.to(device)
    data_cfg = _data_config(source, args)

    def loader(split):
        return _WithSampleIds(
            build_eval_loader(
                data_cfg,
                split,
                img_size=model.cfg.img_size,
                batch_size=args.batch_size,
                rank=env.rank,
                world_size=env.world_size,
            )
        )

    # -- evaluate
    multi = ds.label_kind == "multi"
    head_fits = model.cfg.num_classes == ds.num_classes
    if real is not None and not head_fits:
        raise UserError(
            f"--real scores the head's predictions: it has {model.cfg.num_classes} outputs, "
            f"{args.data} has {ds.num_classes} classes"
        )
    if not head_fits and is_main_rank():
        print(
            f"note: the head has {model.cfg.num_classes} outputs and {args.data} has {ds.num_classes} classes: "
            "top-k left out (few-shot and probe use the representation)"
        )
    test = extract_features(model, loader(args.split), with_logits=head_fits, desc=f"eval {args.split}")
    _check_ids(test, labels, args.split)
    results: dict[str, float] = {"samples": len(test)}
    if head_fits:
        results |= classification_from_features(test, ks=(1, 5), multi_label=multi)
    if real is not None:
        results |= real_from_features(test, real)
    if args.shots or args.linear_probe:
        train = extract_features(
            model,
            loader(args.train_split),
            max_batches=args.train_batches or None,
            with_logits=False,
            desc=f"features {args.train_split}",
        )
        if args.shots:
            results |= fewshot_from_features(
                train, test, ds.num_classes, shots=args.shots, l2_reg=args.fewshot_l2, seed=args.seed
            )
        if args.linear_probe:
            results |= linear_probe_from_features(train, test, ds.num_classes)

    # -- report
    if is_main_rank():
        out = args.out or (args.weights if args.weights.is_dir() else args.weights.parent) / "eval"
        stem = f"{ds.name}-{args.split}-{model.cfg.img_size}px"
        header = {
            "weights": str(args.weights),
            "data": str(args.data),
            "split": args.split,
            "model": model.cfg.name,
            "resolution": model.cfg.img_size,
            "ranks": env.world_size,
            "init": "; ".join(line.removeprefix("init: ") for line in init.lines()),
        }
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / f"{stem}.json", json.dumps({**header, "results": results}, indent=2) + "\n")
        atomic_write_text(out / f"{stem}.md", _markdown(results, header))
        print(_markdown(results, header))
        print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    sys.exit(main())
