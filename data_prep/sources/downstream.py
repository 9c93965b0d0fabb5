"""What the downstream release-layout readers (ImageNet-1k, Oxford-IIIT Pets, Flowers-102) return.

Each reader turns an official release folder into a `Listing`: the classes in label order
and one `Item` per image with its split and 0-based label. Reading the listing touches only
the small metadata files (lists, .mat tables), never the images, so it is instant even for
ImageNet; converting the images is the convert job's work.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vitscale_common.errors import UserError


@dataclasses.dataclass(frozen=True)
class Item:
    split: str  # train | val | test
    source_id: str  # path relative to the release root: stable, and what ReaL / dedup reports name
    label: int  # 0-based class index


@dataclasses.dataclass(frozen=True)
class ClassEntry:
    class_id: str  # e.g. the WordNet id n01440764, or the 1-based index of the release
    name: str


@dataclasses.dataclass
class Listing:
    root: Path
    classes: list[ClassEntry]
    items: list[Item]

    def split_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for it in self.items:
            counts[it.split] = counts.get(it.split, 0) + 1
        return counts

    def path(self, item: Item) -> Path:
        return self.root / item.source_id


def to_convert_listing(listing: Listing):
    """The convert job's listing: one row per image sorted by source id, with the release split."""
    import pyarrow as pa

    from data_prep.sources.base import Listing as ConvertListing

    items = sorted(listing.items, key=lambda it: it.source_id)
    table = pa.table(
        {
            "source_id": pa.array([it.source_id for it in items], pa.string()),
            "label": pa.array([it.label for it in items], pa.int32()),
            "split": pa.array([it.split for it in items], pa.string()),
        }
    )
    return ConvertListing(table, [(c.class_id, c.name) for c in listing.classes], "single")


class ReleaseSource:
    """Mixin for the convert job's Source: `read_release(root)` gives the listing; files are
    read by their source id, a path relative to `--input`."""

    def read_release(self, root: Path) -> Listing:
        raise NotImplementedError

    def list_items(self):
        from data_prep.sources.base import require_input

        return to_convert_listing(self.read_release(require_input(self.cfg, "the release folder")))

    def read(self, item: dict) -> bytes:
        from data_prep.sources.base import read_file_bytes

        return read_file_bytes(Path(self.cfg.input) / item["source_id"])


def require(path: Path, what: str) -> Path:
    """`path`, or a one-line error saying which release file is missing."""
    if not path.exists():
        raise UserError(f"{path}: missing ({what})")
    return path


def load_mat(path: Path, what: str) -> dict:
    """A MATLAB table (v5, as the releases ship them) read with scipy, without pickle."""
    import scipy.io

    try:
        return scipy.io.loadmat(require(path, what), squeeze_me=True)
    except (ValueError, OSError, NotImplementedError) as e:
        raise UserError(f"{path}: cannot read MATLAB file: {e}") from None
