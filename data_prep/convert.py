"""`vit-prep convert`: run this task's share of the plan on `workers` processes.

Work unit = one shard. A worker converts the shard's planned inputs in slot order and
writes, each atomically: the tar, the shard's per-sample index, its rejected inputs, and
last a small `done` record. A shard with a `done` record is never redone, so rerunning
after a crash (or kill -9) redoes only unfinished shards; since every file is a pure
function of the plan, the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_prep.config import PrepConfig, parse_splits, resolve_tasks, validate
from data_prep.plan import Plan, ShardTask, split_sort_key
from data_prep.policy import ImagePolicy, Rejected, convert_image
from data_prep.sources import Listing, Source, build_source
from data_prep.workdir import canonical_json, done_path, is_done, rejected_part_path, work_path
from sharding import format as fmt
from sharding.index import REJECTED_SCHEMA, SAMPLE_SCHEMA, table_from_rows, write_table
from sharding.writer import ShardTarWriter
from vitscale_common.atomic import atomic_open, atomic_write_text
from vitscale_common.errors import UserError

LISTING_CACHE = "listing.arrow"  # Arrow IPC, so tasks can memory-map it
UNEXPECTED = "unexpected_error"  # a bug or an exotic input: counted and kept, not fatal


# ---------------------------------------------------------------------------- listing
def _check_listing(listing: Listing, kind: str) -> None:
    names = listing.items.column_names
    label_col = "labels" if listing.label_kind == fmt.LABEL_MULTI else "label"
    for col in ("source_id", label_col):
        if col not in names:
            raise UserError(f"source {kind}: listing lacks column {col!r}")
    if listing.items.num_rows == 0:
        raise UserError(f"source {kind}: found no inputs")


def _group_by_split(items: pa.Table) -> pa.Table:
    """Make each source-defined split one contiguous block, in SPLIT_ORDER."""
    splits = items.column("split").to_pylist()
    order = sorted(set(splits), key=split_sort_key)
    rank = np.array([order.index(s) for s in splits], dtype=np.int32)
    return items.take(pa.array(np.argsort(rank, kind="stable")))


def _shared_write(path: Path, write) -> None:
    """Write a file that every array task writes with the same content (plan, listing).

    Tasks on different hosts may share a pid, hence a temp name: if another task's rename
    took our temp file away, its identical file is already in place.
    """
    try:
        write(path)
    except FileNotFoundError:
        if not path.is_file():
            raise


def _write_arrow(path: Path, table: pa.Table) -> None:
    def write(p):
        with atomic_open(p, "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)

    _shared_write(path, write)


def read_listing_cache(out: Path) -> pa.Table:
    """The cached listing, memory-mapped: a task pages in only the rows it converts."""
    return pa.ipc.open_file(pa.memory_map(str(work_path(out, LISTING_CACHE)))).read_all()


def load_listing(source: Source, out: Path, cache_it: bool = True) -> Listing:
    """List the source once per output folder: array tasks share the cached listing."""
    meta_path = work_path(out, "listing.json")
    fingerprint = source.fingerprint()
    if work_path(out, LISTING_CACHE).is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["fingerprint"] == fingerprint:
            return Listing(read_listing_cache(out), [tuple(c) for c in meta["classes"]], meta["label_kind"])
    print(f"listing source {source.kind} ...", file=sys.stderr)
    listing = source.list_items()
    _check_listing(listing, source.kind)
    if "split" in listing.items.column_names:
        listing.items = _group_by_split(listing.items)
    if not cache_it:
        return listing
    _write_arrow(work_path(out, LISTING_CACHE), listing.items)
    meta = canonical_json(
        {"fingerprint": fingerprint, "classes": [list(c) for c in listing.classes], "label_kind": listing.label_kind}
    )
    _shared_write(meta_path, lambda p: atomic_write_text(p, meta))
    return listing


def make_plan(listing: Listing, cfg: PrepConfig, samples_per_shard: int) -> tuple[Plan, str]:
    items = listing.items
    try:
        if "split" in items.column_names:
            counts = Counter(items.column("split").to_pylist())
            ordered = {s: counts[s] for s in sorted(counts, key=split_sort_key)}
            return Plan.by_source_splits(ordered, cfg.seed, samples_per_shard), "source"
        return Plan.by_fraction(items.num_rows, parse_splits(cfg.splits), cfg.seed, samples_per_shard), "fraction"
    except ValueError as e:
        raise UserError(f"plan: {e}") from None


def plan_document(cfg: PrepConfig, source: Source, listing: Listing) -> dict:
    """Everything the output depends on; identical for every task of one conversion."""
    spp = cfg.samples_per_shard or source.samples_per_shard_hint
    plan, split_by = make_plan(listing, cfg, spp)
    doc = {
        "name": cfg.name or source.kind,
        "source": source.kind,
        "label_kind": listing.label_kind,
        "classes": [list(c) for c in listing.classes],
        "num_inputs": listing.items.num_rows,
        "seed": cfg.seed,
        "split_by": split_by,
        "plan": plan.to_dict(),
        "policy": asdict(cfg.policy),
        "dedup": cfg.dedup,
    }
    doc["plan_id"] = hashlib.sha256(canonical_json(doc).encode()).hexdigest()[:16]
    return doc


# ---------------------------------------------------------------------------- workers
class _Worker:
    """Per-process state: the listing (memory-mapped), the source, the policy."""

    def __init__(self, out: Path, source: Source, doc: dict):
        self.out = out
        self.source = source
        self.policy = ImagePolicy(**doc["policy"])
        self.plan = Plan.from_dict(doc["plan"])
        self.multi = doc["label_kind"] == fmt.LABEL_MULTI
        self.listing = read_listing_cache(out)

    def _label_member(self, row: dict) -> tuple[str, bytes, Optional[int], Optional[list]]:
        if self.multi:
            labels = sorted(set(row["labels"] or []))
            return fmt.LABELS_EXT, json.dumps(labels).encode(), None, labels
        return fmt.CLASS_EXT, str(int(row["label"])).encode(), int(row["label"]), None

    def convert_shard(self, task: ShardTask) -> dict:
        cpu_start = time.process_time()
        remove_shard_temps(self.out, task)
        rows = self.listing.take(pa.array(self.plan.listing_indices(task))).to_pylist()
        samples, rejected, passed = [], [], 0
        with ShardTarWriter(self.out / fmt.shard_path(task.split, task.shard)) as tar:
            for slot, row in enumerate(rows):
                try:
                    image = convert_image(self.source.read(row), self.policy)
                except Rejected as r:
                    rejected.append(self._rejection(task, slot, row, r.reason, r.detail))
                    continue
                except Exception as e:  # never let one odd input kill a 10k-image shard
                    rejected.append(self._rejection(task, slot, row, UNEXPECTED, f"{type(e).__name__}: {e}"))
                    continue
                key = fmt.sample_key(task.split, task.shard, slot)
                label_ext, label_bytes, label, labels = self._label_member(row)
                meta = json.dumps(
                    {"source_id": row["source_id"], "orig_size": list(image.orig_size), "size": list(image.size)},
                    sort_keys=True,
                ).encode()
                loc = tar.add(key, [(fmt.IMAGE_EXT, image.jpeg), (label_ext, label_bytes), (fmt.META_EXT, meta)])
                passed += image.passed_through
                samples.append(
                    {
                        "key": key,
                        "split": task.split,
                        "shard": task.shard,
                        "slot": slot,
                        "sample_offset": loc.offset,
                        "sample_size": loc.size,
                        "jpg_offset": loc.members[fmt.IMAGE_EXT].offset,
                        "jpg_size": len(image.jpeg),
                        "label_offset": loc.members[label_ext].offset,
                        "label_size": len(label_bytes),
                        "json_offset": loc.members[fmt.META_EXT].offset,
                        "json_size": len(meta),
                        "label": label,
                        "labels": labels,
                        "sha256": hashlib.sha256(image.jpeg).hexdigest(),
                        "source_id": row["source_id"],
                        "width": image.size[0],
                        "height": image.size[1],
                    }
                )
        write_table(self.out / fmt.shard_index_path(task.split, task.shard), table_from_rows(samples, SAMPLE_SCHEMA))
        write_table(rejected_part_path(self.out, task), table_from_rows(rejected, REJECTED_SCHEMA))
        record = {
            "split": task.split,
            "shard": task.shard,
            "name": task.name,
            "path": fmt.shard_path(task.split, task.shard),
            "num_samples": tar.num_samples,
            "num_bytes": tar.num_bytes,
            "sha256": tar.sha256(),
            "num_inputs": task.num_inputs,
            "num_rejected": len(rejected),
            "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
            "num_passed_through": passed,
            "cpu_seconds": round(time.process_time() - cpu_start, 6),  # not in the dataset: timing only
        }
        atomic_write_text(done_path(self.out, task), canonical_json(record))  # the commit point
        return record

    @staticmethod
    def _rejection(task: ShardTask, slot: int, row: dict, reason: str, detail: str) -> dict:
        return {
            "split": task.split,
            "shard": task.shard,
            "slot": slot,
            "source_id": row["source_id"],
            "reason": reason,
            "detail": detail[:500],
        }


_worker: Optional[_Worker] = None


def _init_worker(out: Path, source: Source, doc: dict) -> None:
    global _worker
    _worker = _Worker(out, source, doc)


def _convert_in_worker(task: ShardTask) -> dict:
    return _worker.convert_shard(task)


# ---------------------------------------------------------------------------- driver
def _check_output(out: Path, doc: dict) -> Optional[str]:
    """Refuse to mix two different conversions in one folder; report a finished one."""
    plan_path = work_path(out, "plan.json")
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        if old["plan_id"] != doc["plan_id"]:
            raise UserError(
                f"{out}: holds a conversion with different settings (plan {old['plan_id']}, "
                f"now {doc['plan_id']}); use another --output or delete it"
            )
        return None
    info = out / fmt.DATASET_JSON
    if info.is_file():
        if json.loads(info.read_text()).get("plan_id") != doc["plan_id"]:
            raise UserError(f"{out}: holds a finished dataset made with different settings")
        return "complete"
    _shared_write(plan_path, lambda p: atomic_write_text(p, canonical_json(doc)))
    return None


def remove_shard_temps(out: Path, task: ShardTask) -> None:
    """Temp files a killed attempt at this shard left. Only this shard's: other tasks
    writing into the same folders right now own theirs."""
    for folder in (fmt.SHARDS_DIR, fmt.INDEX_DIR, fmt.WORK_DIR):
        for p in (out / folder).glob(f".{task.name}.*.tmp-*"):
            p.unlink(missing_ok=True)


def run_convert(cfg: PrepConfig, plan_only: bool = False) -> dict:
    """Convert this task's shards (merging when it is the only task).

    `plan_only`: list the source and write the plan, convert nothing: run once before a
    large array so its tasks map the cached listing instead of each listing the source.
    """
    validate(cfg)
    out = Path(cfg.output)
    task_index, num_tasks = resolve_tasks(cfg)
    source = build_source(cfg.source)
    # A merged folder has no work area left; listing again only to compare settings.
    merged = (out / fmt.DATASET_JSON).is_file() and not work_path(out, "plan.json").is_file()
    listing = load_listing(source, out, cache_it=not merged)
    doc = plan_document(cfg, source, listing)
    del listing  # workers map the cached listing themselves
    if _check_output(out, doc) == "complete":
        # A merge killed while removing its work area leaves some of it behind.
        shutil.rmtree(out / fmt.WORK_DIR, ignore_errors=True)
        print(f"{out}: already converted and merged; nothing to do", file=sys.stderr)
        return {"converted": 0, "complete": True}
    for folder in (fmt.SHARDS_DIR, fmt.INDEX_DIR, fmt.WORK_DIR):
        (out / folder).mkdir(parents=True, exist_ok=True)
    if plan_only:
        print(
            f"{out}: planned {doc['num_inputs']} inputs into {len(Plan.from_dict(doc['plan']).shards())} shards "
            f"(plan {doc['plan_id']}); now run the convert tasks",
            file=sys.stderr,
        )
        return {"planned": True, "plan_id": doc["plan_id"]}

    plan = Plan.from_dict(doc["plan"])
    mine = plan.shards_for_task(task_index, num_tasks)
    todo = [t for t in mine if not is_done(out, t)]
    started = time.time()
    records = _run_shards(out, source, doc, todo, min(cfg.workers, max(1, len(todo))))
    elapsed = time.time() - started
    atomic_write_text(
        work_path(out, f"provenance-task-{task_index:05d}.json"),
        canonical_json(
            {
                "task_index": task_index,
                "num_tasks": num_tasks,
                "host": socket.gethostname(),
                "workers": cfg.workers,
                "command": sys.argv,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(elapsed, 3),
                "shards_converted": len(todo),
                "shards_already_done": len(mine) - len(todo),
            }
        ),
    )
    summary = _summarise(records, len(mine) - len(todo), elapsed)
    print(_summary_line(summary, task_index, num_tasks), file=sys.stderr)
    if num_tasks == 1:
        from data_prep.merge import run_merge

        run_merge(out)
    else:
        print(f"task {task_index} of {num_tasks} done; after all tasks: vit-prep merge {out}", file=sys.stderr)
    return summary


def _run_shards(out: Path, source: Source, doc: dict, todo: list[ShardTask], workers: int) -> list[dict]:
    records = []
    total = sum(t.num_inputs for t in todo)
    # In a SLURM log (not a terminal) a line every 30 s instead of a live bar.
    with tqdm(
        total=total,
        unit="img",
        desc="convert",
        smoothing=0.05,
        file=sys.stderr,
        mininterval=0.5 if sys.stderr.isatty() else 30,
    ) as bar:
        if workers == 1:
            _init_worker(out, source, doc)
            for task in todo:
                records.append(_convert_in_worker(task))
                bar.update(task.num_inputs)
            return records
        # An executor, not multiprocessing.Pool: a worker that dies (a crash inside a
        # decoder, the OOM killer) fails the run instead of hanging it.
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(out, source, doc)) as pool:
            futures = [pool.submit(_convert_in_worker, t) for t in todo]
            try:
                for future in as_completed(futures):
                    records.append(future.result())
                    bar.update(records[-1]["num_inputs"])
            except BrokenProcessPool:
                raise UserError(
                    f"a convert worker died; the {len(records)} shards finished here are kept: "
                    "rerun the same command to convert the rest"
                ) from None
            finally:
                for f in futures:
                    f.cancel()
    return records


def _summarise(records: list[dict], already_done: int, elapsed: float) -> dict:
    reasons: Counter = Counter()
    for r in records:
        reasons.update(r["rejected_by_reason"])
    inputs = sum(r["num_inputs"] for r in records)
    return {
        "shards": len(records),
        "shards_already_done": already_done,
        "inputs": inputs,
        "converted": sum(r["num_samples"] for r in records),
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "passed_through": sum(r["num_passed_through"] for r in records),
        "bytes": sum(r["num_bytes"] for r in records),
        "seconds": elapsed,
        "images_per_second": inputs / elapsed if elapsed > 0 else 0.0,
        "cpu_seconds": (cpu := sum(r["cpu_seconds"] for r in records)),
        "images_per_cpu_second": inputs / cpu if cpu > 0 else 0.0,
    }


def _summary_line(s: dict, task_index: int, num_tasks: int) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in s["rejected_by_reason"].items()) or "none"
    task = f"task {task_index}/{num_tasks}: " if num_tasks > 1 else ""
    return (
        f"{task}{s['shards']} shards converted ({s['shards_already_done']} already done): "
        f"{s['inputs']} inputs -> {s['converted']} samples ({s['passed_through']} passed through), "
        f"{s['rejected']} rejected ({reasons}); {s['bytes'] / 1e6:.1f} MB in {s['seconds']:.1f} s, "
        f"{s['images_per_second']:.0f} img/s ({s['images_per_cpu_second']:.0f} per busy core)"
    )
