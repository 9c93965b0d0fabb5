"""Names and fixed constants of the on-disk shard dataset (see docs/DATA_PREP.md).

One folder holds a dataset:

    dataset.json                  what the dataset is (splits, counts, classes, image policy)
    provenance.json               how and when it was made (the one file outside byte identity)
    classes.tsv                   class index, class id, name
    shards/{split}-NNNNNN.tar     the samples: KEY.jpg + KEY.cls | KEY.labels.json + KEY.json
    index/shards.parquet          one row per shard
    index/{split}-NNNNNN.parquet  one row per sample of that shard (member offsets, labels, sha256)
    rejected.parquet              every input not converted, with its reason
    exclusions/*.parquet          keys to leave out when reading (columns key, reason)
    _info.json, sizes.json        shard lengths for timm's and OpenCLIP's WebDataset readers
"""

from __future__ import annotations

import re

FORMAT_NAME = "vitscale-shards"
FORMAT_VERSION = 1

DATASET_JSON = "dataset.json"
PROVENANCE_JSON = "provenance.json"
CLASSES_TSV = "classes.tsv"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
SHARD_TABLE = "index/shards.parquet"
REJECTED = "rejected.parquet"
EXCLUSIONS_DIR = "exclusions"
TIMM_INFO = "_info.json"
OPENCLIP_SIZES = "sizes.json"
# Per-shard outputs of convert tasks, folded into the files above by merge and then removed.
WORK_DIR = "_work"

LABEL_SINGLE = "single"
LABEL_MULTI = "multi"

# Member extensions of one sample; webdataset cuts the key at the first dot of a name.
IMAGE_EXT = "jpg"
CLASS_EXT = "cls"
LABELS_EXT = "labels.json"
META_EXT = "json"

_SPLIT_RE = re.compile(r"^[a-z0-9_]+$")
_SHARD_RE = re.compile(r"^([a-z0-9_]+)-(\d{6})(?:\.tar)?$")


def check_split_name(split: str) -> str:
    if not _SPLIT_RE.match(split):
        raise ValueError(f"split name {split!r} must be lower-case letters, digits or '_'")
    return split


def shard_name(split: str, index: int) -> str:
    """`train-000012`: the stem shared by the tar and its per-sample index."""
    return f"{split}-{index:06d}"


def parse_shard_name(name: str) -> tuple[str, int]:
    """`train-000012` or `train-000012.tar` -> ("train", 12)."""
    m = _SHARD_RE.match(name)
    if not m:
        raise ValueError(f"not a shard name: {name!r}")
    return m.group(1), int(m.group(2))


def shard_path(split: str, index: int) -> str:
    return f"{SHARDS_DIR}/{shard_name(split, index)}.tar"


def shard_index_path(split: str, index: int) -> str:
    return f"{INDEX_DIR}/{shard_name(split, index)}.parquet"


def sample_key(split: str, shard: int, slot: int) -> str:
    """A sample's key: its place in the plan, so it never depends on how work was split.

    `slot` is the position inside the shard's planned range, counting rejected inputs too,
    so a key stays the same whatever else in the shard was rejected. No dots, by contract.
    """
    return f"{split}_{shard:06d}_{slot:06d}"
