"""`vit-prep merge DIR`: fold the per-shard outputs of all convert tasks into the dataset.

Writes index/shards.parquet, rejected.parquet, exclusions/exact_duplicates.parquet,
classes.tsv, dataset.json, _info.json (timm), shards/sizes.json (OpenCLIP) and
provenance.json, checks that inputs = converted + rejected, then removes the work area.
Every file but provenance.json is a function of the plan alone, so T tasks + merge give
the same bytes as one node.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.plan import Plan, ShardTask
from data_prep.policy import ImagePolicy
from data_prep.workdir import canonical_json, done_path, is_done, rejected_part_path, work_path
from sharding import format as fmt
from sharding.index import REJECTED_SCHEMA, SHARD_SCHEMA, concat, read_table, table_from_rows, write_table
from vitscale_common.atomic import atomic_write_text, remove_stale_temps
from vitscale_common.errors import UserError

DUPLICATE = "exact_duplicate"
EXACT_DUPLICATES = "exact_duplicates.parquet"


def run_merge(out: str | Path) -> dict:
    out = Path(out)
    plan_path = work_path(out, "plan.json")
    if not plan_path.is_file():
        if (out / fmt.DATASET_JSON).is_file():
            print(f"{out}: already merged", file=sys.stderr)
            return json.loads((out / fmt.DATASET_JSON).read_text())
        raise UserError(f"{out}: nothing to merge (no conversion started here; run vit-prep convert)")
    doc = json.loads(plan_path.read_text())
    shards = Plan.from_dict(doc["plan"]).shards()
    missing = [t.name for t in shards if not is_done(out, t)]
    if missing:
        raise UserError(
            f"{out}: {len(missing)} of {len(shards)} shards are not converted yet "
            f"(first: {missing[0]}); run or rerun the convert tasks, then merge"
        )
    records = [json.loads(done_path(out, t).read_text()) for t in shards]
    _check_counts(doc, shards, records)
    for folder in (".", fmt.SHARDS_DIR, fmt.INDEX_DIR, fmt.EXCLUSIONS_DIR):
        remove_stale_temps(out / folder, all_writers=True)  # every shard is done: the rest is from killed runs

    write_table(
        out / fmt.SHARD_TABLE, table_from_rows([{k: r[k] for k in SHARD_SCHEMA.names} for r in records], SHARD_SCHEMA)
    )
    write_table(out / fmt.REJECTED, concat([rejected_part_path(out, t) for t in shards], REJECTED_SCHEMA))
    excluded = _write_exclusions(out, shards) if doc["dedup"] else Counter()
    _write_classes(out, doc["classes"])
    info = _dataset_info(doc, records, excluded)
    atomic_write_text(out / fmt.DATASET_JSON, canonical_json(info))
    _write_interop(out, doc["name"], records)
    _write_provenance(out, doc)
    shutil.rmtree(out / fmt.WORK_DIR)
    print(
        f"merged {out}: "
        + ", ".join(f"{s} {v['num_samples']} samples in {v['num_shards']} shards" for s, v in info["splits"].items())
        + f"; {info['num_rejected']} rejected, {info['num_excluded']} excluded as duplicates",
        file=sys.stderr,
    )
    return info


def _check_counts(doc: dict, shards: list[ShardTask], records: list[dict]) -> None:
    """The invariant: every planned input is either a sample or a recorded rejection."""
    for t, r in zip(shards, records):
        if r["num_inputs"] != t.num_inputs or r["num_samples"] + r["num_rejected"] != t.num_inputs:
            raise UserError(
                f"{t.name}: {r['num_samples']} samples + {r['num_rejected']} rejected != {t.num_inputs} planned inputs"
            )
    total = sum(r["num_inputs"] for r in records)
    if total != doc["num_inputs"]:
        raise UserError(f"plan covers {total} inputs but the listing has {doc['num_inputs']}")


def _keep_order(shards: list[ShardTask]) -> list[ShardTask]:
    # Among duplicates the copy in an evaluation split is kept and the training copy is
    # excluded: that is what keeps test images out of training.
    return sorted(shards, key=lambda t: (t.split == "train", t.split, t.shard))


def _write_exclusions(out: Path, shards: list[ShardTask]) -> Counter:
    """Exact duplicates by sha256 of the image bytes, whichever tasks converted them.

    Holds 128 bits of each hash plus where the sample is (24 bytes a sample) rather than
    the index itself: about 7 GB at 300M samples, on the one node that merges.
    """
    order_shards = _keep_order(shards)
    his, los, where, slots = [], [], [], []
    for i, t in enumerate(order_shards):
        table = read_table(out / fmt.shard_index_path(t.split, t.shard)).select(["slot", "sha256"])
        digests = np.frombuffer(bytes.fromhex("".join(table.column("sha256").to_pylist())), dtype=">u8")
        digests = digests.reshape(-1, 4)
        his.append(digests[:, 0].astype(np.uint64))
        los.append(digests[:, 1].astype(np.uint64))
        where.append(np.full(len(digests), i, dtype=np.int32))
        slots.append(table.column("slot").to_numpy().astype(np.int32))
    hi, lo, shard_of, slot = (np.concatenate(a) if a else np.zeros(0, np.int32) for a in (his, los, where, slots))
    order = np.lexsort((lo, hi))  # stable: the first of equal hashes (in keep order) is kept
    dup = np.zeros(len(order), dtype=bool)
    dup[1:] = (hi[order][1:] == hi[order][:-1]) & (lo[order][1:] == lo[order][:-1])
    # Each duplicate's kept copy is the last non-duplicate before it in hash order.
    kept = order[np.maximum.accumulate(np.where(~dup, np.arange(len(order)), 0))]

    def key(row: int) -> str:
        t = order_shards[shard_of[row]]
        return fmt.sample_key(t.split, t.shard, int(slot[row]))

    rows = sorted(zip(order[dup].tolist(), kept[dup].tolist()))  # in keep order
    per_split = Counter(order_shards[shard_of[r]].split for r, _ in rows)
    table = pa.table(
        {
            "key": [key(r) for r, _ in rows],
            "reason": [DUPLICATE] * len(rows),
            "duplicate_of": [key(k) for _, k in rows],
        },
        schema=pa.schema([("key", pa.string()), ("reason", pa.string()), ("duplicate_of", pa.string())]),
    )
    write_table(out / fmt.EXCLUSIONS_DIR / EXACT_DUPLICATES, table)
    return per_split


def _write_classes(out: Path, classes: list[list[str]]) -> None:
    lines = ["index\tclass_id\tname"]
    for i, (class_id, name) in enumerate(classes):
        clean = [str(v).replace("\t", " ").replace("\n", " ") for v in (class_id, name)]
        lines.append(f"{i}\t{clean[0]}\t{clean[1]}")
    atomic_write_text(out / fmt.CLASSES_TSV, "\n".join(lines) + "\n")


def _dataset_info(doc: dict, records: list[dict], excluded: Counter) -> dict:
    splits: dict[str, dict] = {}
    reasons: Counter = Counter()
    for r in records:
        s = splits.setdefault(
            r["split"],
            {
                "num_samples": 0,
                "num_shards": 0,
                "num_inputs": 0,
                "num_rejected": 0,
                "num_excluded": excluded.get(r["split"], 0),
            },
        )
        s["num_samples"] += r["num_samples"]
        s["num_shards"] += 1
        s["num_inputs"] += r["num_inputs"]
        s["num_rejected"] += r["num_rejected"]
        reasons.update(r["rejected_by_reason"])
    return {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "name": doc["name"],
        "source": doc["source"],
        "label_kind": doc["label_kind"],
        "num_classes": len(doc["classes"]),
        "splits": splits,
        "split_order": [sp["name"] for sp in doc["plan"]["splits"]],
        "num_inputs": doc["num_inputs"],
        "num_samples": sum(s["num_samples"] for s in splits.values()),
        "num_rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "num_excluded": sum(excluded.values()),
        "dedup": doc["dedup"],
        "samples_per_shard": doc["plan"]["samples_per_shard"],
        "seed": doc["seed"],
        "split_by": doc["split_by"],
        "members": {
            "image": fmt.IMAGE_EXT,
            "label": fmt.LABELS_EXT if doc["label_kind"] == fmt.LABEL_MULTI else fmt.CLASS_EXT,
            "meta": fmt.META_EXT,
        },
        "policy": ImagePolicy(**doc["policy"]).describe(),
        "plan_id": doc["plan_id"],
    }


def _write_interop(out: Path, name: str, records: list[dict]) -> None:
    """timm's `_info.json` (shard lengths per split) and OpenCLIP's `sizes.json`.

    OpenCLIP looks for sizes.json next to the tars, hence shards/sizes.json.
    """
    splits: dict[str, dict] = {}
    for r in records:
        s = splits.setdefault(r["split"], {"name": r["split"], "num_samples": 0, "filenames": [], "shard_lengths": []})
        s["num_samples"] += r["num_samples"]
        s["filenames"].append(r["path"])
        s["shard_lengths"].append(r["num_samples"])
    atomic_write_text(out / fmt.TIMM_INFO, canonical_json({"name": name, "splits": splits}))
    sizes = {Path(r["path"]).name: r["num_samples"] for r in records}
    atomic_write_text(out / fmt.SHARDS_DIR / fmt.OPENCLIP_SIZES, canonical_json(sizes))


def _write_provenance(out: Path, doc: dict) -> None:
    tasks = [json.loads(p.read_text()) for p in sorted((out / fmt.WORK_DIR).glob("provenance-task-*.json"))]
    listing = json.loads(work_path(out, "listing.json").read_text())
    atomic_write_text(
        out / fmt.PROVENANCE_JSON,
        canonical_json(
            {
                "plan_id": doc["plan_id"],
                "source": listing["fingerprint"],
                "merged": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "merge_command": sys.argv,
                "tasks": tasks,
            }
        ),
    )
