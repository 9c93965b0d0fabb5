"""`vit-prep dedup`: de-duplicate a pretraining shard dataset against downstream test sets.

Transfer numbers are honest only if the pretraining data holds no copy of a test image
(paper section 4.1). Exact copies (the same decoded pixels) and near copies (resized,
re-encoded or slightly cropped; near_duplicates.py says how they are recognised) are found.

The result is `exclusions/dedup-NAME.parquet` (columns key, reason) in the pretraining
dataset, which the sample stream honours without rewriting shards, plus an HTML report
with each excluded image beside the test image it copies.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
from tqdm import tqdm

from data_prep.near_duplicates import (
    COLOUR_WEIGHT,
    THRESHOLD,
    Match,
    Signatures,
    decode,
    find_matches,
    signatures,
    thumbnail_jpeg,
)
from sharding import format as fmt
from sharding import open_dataset
from sharding.index import write_table
from sharding.tar_reader import ShardDamage, iter_samples
from vitscale_common.atomic import atomic_write_text
from vitscale_common.errors import UserError, cli_entry

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what a test-set folder may hold


# --------------------------------------------------------------------------- datasets
def split_shards(dataset: Path, split: str) -> list[Path]:
    if not (dataset / fmt.DATASET_JSON).is_file():
        raise UserError(f"{dataset}: not a shard dataset (no {fmt.DATASET_JSON})")
    shards = [Path(s.path) for s in open_dataset(dataset).shards(split)]
    if not shards:
        raise UserError(f"{dataset}: split {split!r} has no shards")
    return shards


def shard_images(shard: Path) -> Iterator[tuple[str, bytes]]:
    with open(shard, "rb") as f:
        try:
            for sample in iter_samples(f):
                data = next((sample.members[e] for e in IMAGE_EXTS if e in sample.members), None)
                if data is not None:
                    yield sample.key, data
        except ShardDamage as e:
            print(f"warning: {shard}: {e}; later samples not checked", file=sys.stderr)


@dataclasses.dataclass
class TestSet:
    name: str  # "DATASET:SPLIT", shown in reasons and the report
    signatures: Signatures


def load_test_set(spec: str) -> TestSet:
    """`DIR` or `DIR:SPLIT` (default split: test) -> signatures with variants and thumbnails."""
    path, _, split = spec.partition(":")
    dataset = Path(path)
    split = split or "test"
    parts = []
    for shard in tqdm(split_shards(dataset, split), desc=f"test set {dataset.name}:{split}", unit="shard"):
        parts.append(signatures(shard_images(shard), variants=True, thumbs=True))
    return TestSet(f"{dataset.name}:{split}", Signatures.concat(parts))


_TEST: Signatures | None = None  # the combined test signatures, shared with pool workers


def _init_worker(test: Signatures) -> None:
    global _TEST
    _TEST = test


def _scan_shard(shard: Path) -> tuple[list[Match], dict[str, bytes], list]:
    skipped: list = []
    sigs = signatures(shard_images(shard), variants=False, skipped=skipped)
    matches = find_matches(sigs, _TEST)
    # thumbnails only of the few matched images, taken from a second read of the shard
    wanted = {m.key for m in matches}
    thumbs = {k: thumbnail_jpeg(decode(d)) for k, d in shard_images(shard) if k in wanted}
    return matches, thumbs, skipped


@dataclasses.dataclass
class DedupResult:
    scanned_shards: int
    matches: list[Match]
    test_names: list[str]  # per test image: its test set's name
    test_keys: list[str]
    thumbs: dict[str, bytes]  # pretraining key -> thumbnail
    test_thumbs: list[bytes]
    skipped: list


def deduplicate(
    pretrain: Path,
    splits: Sequence[str],
    test_sets: Sequence[TestSet],
    workers: int = 1,
    task_index: int = 0,
    num_tasks: int = 1,
) -> DedupResult:
    """Scan this task's share of the pretraining shards (every num_tasks-th) against the test sets."""
    test = Signatures.concat([t.signatures for t in test_sets])
    names = [t.name for t in test_sets for _ in t.signatures.keys]
    shards = [s for split in splits for s in split_shards(pretrain, split)][task_index::num_tasks]
    matches, thumbs, skipped = [], {}, []
    pool = None
    if workers > 1:
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(test,))
        scanned = pool.map(_scan_shard, shards)
    else:
        _init_worker(test)
        scanned = map(_scan_shard, shards)
    try:
        for m, t, s in tqdm(scanned, total=len(shards), desc="pretraining shards", unit="shard"):
            matches += m
            thumbs |= t
            skipped += s
    finally:
        if pool is not None:
            pool.shutdown()
    return DedupResult(len(shards), matches, names, test.keys, thumbs, test.thumbs, skipped)


# --------------------------------------------------------------------------- outputs
def exclusion_name(name: str, task_index: int, num_tasks: int) -> str:
    return f"dedup-{name}" if num_tasks == 1 else f"dedup-{name}-task{task_index:05d}-of-{num_tasks:05d}"


def remove_other_splits(pretrain: Path, name: str, num_tasks: int) -> None:
    """Drop this list's files left by a run cut into a different number of tasks.

    The stream excludes the union of exclusions/*.parquet, so a stale file from an earlier
    split of the work would go on excluding; files of the current split are left alone
    (other tasks may be writing them).
    """
    ours = re.compile(rf"dedup-{re.escape(name)}(-task\d{{5}}-of-(\d{{5}}))?\.parquet")
    for path in (pretrain / fmt.EXCLUSIONS_DIR).glob("dedup-*.parquet"):
        m = ours.fullmatch(path.name)
        if m and int(m.group(2) or 1) != num_tasks:
            path.unlink()


def write_exclusions(pretrain: Path, stem: str, result: DedupResult) -> Path:
    """`exclusions/STEM.parquet`: the stream reads key and reason; the rest is for people."""
    out = pretrain / fmt.EXCLUSIONS_DIR / f"{stem}.parquet"
    table = pa.table(
        {
            "key": [m.key for m in result.matches],
            "reason": [f"{m.kind}_duplicate_of_test_image" for m in result.matches],
            "duplicate_of": [
                f"{result.test_names[m.test_index]}/{result.test_keys[m.test_index]}" for m in result.matches
            ],
            "distance": [m.distance for m in result.matches],
        },
        schema=pa.schema(
            [("key", pa.string()), ("reason", pa.string()), ("duplicate_of", pa.string()), ("distance", pa.float64())]
        ),
    )
    write_table(out, table)
    return out


def _img_tag(jpeg: bytes) -> str:
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}">'


def write_report(path: Path, result: DedupResult, limit: int = 2000) -> None:
    """HTML page: each excluded pretraining image beside the test image it copies."""
    shown = sorted(result.matches, key=lambda m: -m.distance)[:limit]  # least certain first
    rows = "\n".join(
        f"<tr><td>{_img_tag(result.thumbs[m.key])}<br>{html.escape(m.key)}</td>"
        f"<td>{_img_tag(result.test_thumbs[m.test_index])}<br>"
        f"{html.escape(result.test_names[m.test_index])}/{html.escape(result.test_keys[m.test_index])}</td>"
        f"<td>{m.kind}</td><td>{m.distance:.1f}</td></tr>"
        for m in shown
        if m.key in result.thumbs
    )
    exact = sum(m.kind == "exact" for m in result.matches)
    page = f"""<!doctype html><meta charset="utf-8"><title>De-duplication report</title>
<style>body{{font-family:sans-serif}} td{{padding:4px;vertical-align:top;font-size:12px}} img{{max-height:128px}}</style>
<h1>De-duplication report</h1>
<p>{len(result.matches)} pretraining images excluded ({exact} exact, {len(result.matches) - exact} near) after
scanning {result.scanned_shards} shards against {len(result.test_keys)} test images. Near-duplicate distance
threshold {THRESHOLD} (Hamming bits + {COLOUR_WEIGHT} x colour difference). {len(result.skipped)} undecodable
images skipped. Showing {len(shown)}, least certain first.</p>
<table><tr><th>pretraining image</th><th>test image</th><th>kind</th><th>distance</th></tr>
{rows}
</table>
"""
    atomic_write_text(path, page)


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pretrain", type=Path, help="the pretraining shard dataset to clean")
    p.add_argument(
        "--against",
        action="append",
        required=True,
        metavar="DIR[:SPLIT]",
        help="a downstream shard dataset and split (default test); repeat for several",
    )
    p.add_argument("--splits", default="train", help="comma-separated pretraining splits to scan")
    p.add_argument("--name", default="downstream", help="exclusion list name: exclusions/dedup-NAME.parquet")
    p.add_argument("--workers", type=int, default=1, help="processes scanning pretraining shards")
    p.add_argument("--num-tasks", type=int, default=1, help="split the shards over this many jobs (a SLURM array)")
    p.add_argument("--task-index", type=int, default=0, help="this job's share: 0..num-tasks-1")
    p.add_argument("--report", type=Path, help="HTML report path (default: PRETRAIN/reports/dedup-NAME.html)")


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.task_index < args.num_tasks:
        raise UserError(f"--task-index {args.task_index} is not in 0..{args.num_tasks - 1}")
    test_sets = [load_test_set(spec) for spec in args.against]
    result = deduplicate(
        args.pretrain,
        args.splits.split(","),
        test_sets,
        workers=args.workers,
        task_index=args.task_index,
        num_tasks=args.num_tasks,
    )
    stem = exclusion_name(args.name, args.task_index, args.num_tasks)
    remove_other_splits(args.pretrain, args.name, args.num_tasks)
    out = write_exclusions(args.pretrain, stem, result)
    report = args.report or args.pretrain / "reports" / f"{stem}.html"
    report.parent.mkdir(parents=True, exist_ok=True)
    write_report(report, result)
    exact = sum(m.kind == "exact" for m in result.matches)
    print(
        f"scanned {result.scanned_shards} shards against {len(result.test_keys)} test images: "
        f"excluded {len(result.matches)} ({exact} exact, {len(result.matches) - exact} near), "
        f"{len(result.skipped)} undecodable skipped -> {out}, report {report}"
    )
    return 0


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vit-prep dedup", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
