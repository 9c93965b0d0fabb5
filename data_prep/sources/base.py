"""The Source interface: how a raw image collection is listed and read.

A source does two things, and nothing else:

1. `list_items()` returns a `Listing`: a pyarrow table with one row per input image, in a
   deterministic order (sorted), with columns
     - `source_id` (string): a stable, unique id of the input (a relative path, a tar
       member name, a record number), recorded in the index and in rejected.parquet;
     - `label` (int32) for single-label sources, or `labels` (list<int32>) for multi-label;
     - `split` (string), only when the source itself defines splits (e.g. CIFAR's
       train/test files); otherwise the plan splits by seeded fraction;
     - any further columns the source needs to read the item later (a path, an offset).
   plus the classes (index -> class id, name) and the label kind.
2. `read(item)` returns the encoded bytes of one item, given its listing row as a dict.
   It runs in worker processes, so a source keeps only plain settings in its attributes
   and opens files lazily. A missing or unreadable input raises
   `Rejected(UNREADABLE, detail)`; it never extracts anything to disk.

Sources register themselves with `@register_source("name")`; every module in
`data_prep/sources/` is imported on first use, so adding a source is adding a file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import pyarrow as pa

from data_prep.policy import Rejected

UNREADABLE = "unreadable"  # missing, a directory, a broken link, an I/O error
UNSAFE_NAME = "unsafe_name"  # an archive member name that climbs out (`../`) or is absolute


@dataclass
class SourceConfig:
    """Which collection to read and how to interpret it."""

    kind: str = "digits"  # source type: see `vit-prep convert --help` for the list
    input: Optional[str] = None  # path of the collection (folder, tar, table or archive)
    words: Optional[str] = None  # in21k: words file `synset<TAB>name` for classes.tsv names
    image_column: str = "image"  # table: column holding image paths (relative to the table)
    label_column: Optional[str] = "label"  # table: single label (class index or class name)
    labels_column: Optional[str] = None  # table: list of labels (multi-label); wins over label_column
    split_column: Optional[str] = None  # table: column naming each row's split
    class_list: Optional[str] = None  # table: text file with one class name per line (its order = index)
    cifar_labels: str = "fine"  # cifar100: `fine` (100 classes) or `coarse` (20)


@dataclass
class Listing:
    items: pa.Table
    classes: list[tuple[str, str]] = field(default_factory=list)  # (class id, name) by index
    label_kind: str = "single"


class Source(ABC):
    kind: ClassVar[str] = ""
    # Shard size used when the recipe does not choose one.
    samples_per_shard_hint: ClassVar[int] = 5000

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg

    @abstractmethod
    def list_items(self) -> Listing:
        """Every input, once, in a deterministic order."""

    @abstractmethod
    def read(self, item: dict) -> bytes:
        """The encoded bytes of one listed item; Rejected(UNREADABLE, ...) if unavailable."""

    def fingerprint(self) -> dict:
        """What identifies this source's listing (checked when an output folder is reused)."""
        return {"kind": self.kind, "input": self.cfg.input}


def require_input(cfg: SourceConfig, what: str):
    from pathlib import Path

    from vitscale_common.errors import UserError

    if not cfg.input:
        raise UserError(f"--input is required for --source {cfg.kind} ({what})")
    path = Path(cfg.input)
    if not path.exists():
        raise UserError(f"--input {path}: not found")
    return path


def read_file_bytes(path) -> bytes:
    """Read a listed file, turning every way it can be unavailable into a rejection.

    The detail leaves the path out (the rejection row already names the source id), so
    rejected.parquet does not change with where the collection is mounted.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except IsADirectoryError:
        raise Rejected(UNREADABLE, "is a directory") from None
    except FileNotFoundError:
        raise Rejected(UNREADABLE, "missing, or a broken link") from None
    except OSError as e:
        raise Rejected(UNREADABLE, e.strerror or type(e).__name__) from None


__all__ = [
    "Source",
    "SourceConfig",
    "Listing",
    "Rejected",
    "UNREADABLE",
    "UNSAFE_NAME",
    "require_input",
    "read_file_bytes",
]
