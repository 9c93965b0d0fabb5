"""`vit-prep`: convert image collections into shard datasets, merge, verify, inspect.

    vit-prep convert --source digits --output data/digits
    vit-prep convert --config configs/prep/imagenet21k.yaml --input fall11.tar --output /shards/in21k --workers 16
    vit-prep merge DIR      vit-prep verify DIR      vit-prep info DIR
    vit-prep dedup DIR --against DOWNSTREAM[:SPLIT]

Convert flags carry the names of PrepConfig keys (`--max-side` is `policy.max_side`);
flags override the `--config` files, and trailing `key=value` pairs override both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vitscale_common.errors import UserError, cli_entry

# flag -> (config key, type); type bool flags are switches that set the given value.
CONVERT_FLAGS = {
    "--source": ("source.kind", str),
    "--input": ("source.input", str),
    "--words": ("source.words", str),
    "--image-column": ("source.image_column", str),
    "--label-column": ("source.label_column", str),
    "--labels-column": ("source.labels_column", str),
    "--split-column": ("source.split_column", str),
    "--class-list": ("source.class_list", str),
    "--cifar-labels": ("source.cifar_labels", str),
    "--output": ("output", str),
    "--name": ("name", str),
    "--seed": ("seed", int),
    "--samples-per-shard": ("samples_per_shard", int),
    "--splits": ("splits", str),
    "--workers": ("workers", int),
    "--num-tasks": ("num_tasks", int),
    "--task-index": ("task_index", int),
    "--max-short-side": ("policy.max_short_side", int),
    "--max-side": ("policy.max_side", int),
    "--quality": ("policy.quality", int),
    "--min-side": ("policy.min_side", int),
    "--max-aspect": ("policy.max_aspect", float),
    "--max-pixels": ("policy.max_pixels", int),
}
SWITCHES = {"--no-pass-through": ("policy.pass_through", False), "--no-dedup": ("dedup", False)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vit-prep", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a source (or this array task's share of it)")
    c.add_argument("--config", action="append", default=[], help="recipe YAML (configs/prep/*.yaml); repeatable")
    from data_prep.sources import list_sources

    for flag, (key, typ) in CONVERT_FLAGS.items():
        extra = f" (one of: {', '.join(list_sources())})" if flag == "--source" else ""
        c.add_argument(flag, type=typ, default=None, help=f"config key {key}{extra}")
    for flag, (key, _) in SWITCHES.items():
        c.add_argument(flag, action="store_true", help=f"sets {key} to false")
    c.add_argument(
        "--plan-only",
        action="store_true",
        help="list the source and write the plan only (run once before a large array)",
    )
    c.add_argument("overrides", nargs="*", metavar="key=value", help="further config overrides")
    m = sub.add_parser("merge", help="write the index and dataset.json once every task is done")
    m.add_argument("dir")
    v = sub.add_parser("verify", help="re-read every shard; exit 1 on any problem")
    v.add_argument("dir")
    v.add_argument("--no-decode", action="store_true", help="skip decoding images (checksums only)")
    v.add_argument("--workers", type=int, default=1, help="processes checking shards in parallel")
    i = sub.add_parser("info", help="what a dataset holds")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="print dataset.json")
    from data_prep import dedup

    dedup.add_arguments(sub.add_parser("dedup", help="exclude copies of downstream test images (data_prep/dedup.py)"))
    return p


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for flag, (key, _) in CONVERT_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            # JSON quoting keeps paths with ':' or '{' from being read as YAML structure.
            out.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    for flag, (key, value) in SWITCHES.items():
        if getattr(args, flag[2:].replace("-", "_")):
            out.append(f"{key}={str(value).lower()}")
    return out


def convert_config(args: argparse.Namespace):
    """The recipe files, then the flags, then trailing key=value pairs."""
    from data_prep.config import PrepConfig
    from vitscale_common.config_loader import load_config

    return load_config(PrepConfig, args.config, _flag_overrides(args) + args.overrides)


def cmd_convert(args: argparse.Namespace) -> int:
    from data_prep.convert import run_convert

    run_convert(convert_config(args), plan_only=args.plan_only)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from data_prep.merge import run_merge

    run_merge(args.dir)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sharding.dataset import ShardDataset
    from sharding.verify import verify_dataset

    total = sum(len(ShardDataset(args.dir).shards(s)) for s in ShardDataset(args.dir).splits)
    with tqdm(total=total, unit="shard", desc="verify", file=sys.stderr, disable=None) as bar:
        report = verify_dataset(
            args.dir, decode=not args.no_decode, workers=max(1, args.workers), progress=lambda s: bar.update(1)
        )
    for problem in report.problems:
        print(f"problem: {problem}")
    status = "OK" if report.ok else f"{len(report.problems)} problems"
    print(f"verified {report.shards} shards, {report.samples} samples, {report.bytes / 1e6:.1f} MB: {status}")
    return 0 if report.ok else 1


def cmd_info(args: argparse.Namespace) -> int:
    from sharding.dataset import ShardDataset

    ds = ShardDataset(args.dir)
    if args.json:
        print(json.dumps(ds.info, indent=2, sort_keys=True))
        return 0
    info = ds.info
    print(
        f"{ds.path}: {info['name']} (source {info['source']}), {ds.num_classes} classes, "
        f"{ds.label_kind}-label, format v{info['format_version']}"
    )
    for split in ds.splits:
        s = info["splits"][split]
        size = sum(sh.num_bytes for sh in ds.shards(split))
        print(
            f"  {split:<8} {s['num_samples']:>10} samples {s['num_shards']:>6} shards {size / 1e6:>10.1f} MB"
            f"   rejected {s['num_rejected']}, excluded {s['num_excluded']}"
        )
    reasons = ", ".join(f"{k} {v}" for k, v in info["rejected_by_reason"].items()) or "none"
    pol = info["policy"]
    bound = f"longer side <= {pol['max_side']}" if pol["max_side"] else f"shorter side <= {pol['max_short_side']}"
    print(f"  inputs {info['num_inputs']}, rejected: {reasons}")
    print(
        f"  images: RGB JPEG q{pol['quality']}, {bound}, seed {info['seed']}, "
        f"{info['samples_per_shard']} inputs per shard"
    )
    return 0


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "dir", None) and not Path(args.dir).is_dir():
        raise UserError(f"{args.dir}: not a folder")
    if args.command == "dedup":
        from data_prep import dedup

        return dedup.run(args)
    return {"convert": cmd_convert, "merge": cmd_merge, "verify": cmd_verify, "info": cmd_info}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
