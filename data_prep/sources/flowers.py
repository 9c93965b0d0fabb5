"""Oxford Flowers-102 (Nilsback & Zisserman 2008) from its release layout.

    ROOT/jpg/image_00001.jpg ... image_08189.jpg
    ROOT/imagelabels.mat   `labels`: (8189,) class of image i+1, 1-based (1..102)
    ROOT/setid.mat         `trnid`, `valid`, `tstid`: 1-based image numbers of each split

Splits: train (1,020), val (1,020), test (6,149), as released.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.sources import register_source
from data_prep.sources.base import Source
from data_prep.sources.downstream import ClassEntry, Item, Listing, ReleaseSource, load_mat
from vitscale_common.errors import UserError

SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}


def read_flowers(root: str | Path) -> Listing:
    root = Path(root)
    labels_mat = load_mat(root / "imagelabels.mat", "Flowers-102 image labels")
    setid = load_mat(root / "setid.mat", "Flowers-102 split ids")
    if "labels" not in labels_mat:
        raise UserError(f"{root}/imagelabels.mat: no `labels` variable")
    labels = np.atleast_1d(labels_mat["labels"]).astype(np.int64)
    num_classes = int(labels.max())
    if labels.min() < 1:
        raise UserError(f"{root}/imagelabels.mat: labels must be 1-based, found {labels.min()}")
    items = []
    for split, key in SPLIT_KEYS.items():
        if key not in setid:
            raise UserError(f"{root}/setid.mat: no `{key}` variable")
        for number in np.atleast_1d(setid[key]).astype(np.int64):
            if not 1 <= number <= labels.size:
                raise UserError(f"{root}/setid.mat: {key} names image {number}, outside 1..{labels.size}")
            items.append(Item(split, f"jpg/image_{number:05d}.jpg", int(labels[number - 1]) - 1))
    classes = [ClassEntry(str(c), f"flower_{c:03d}") for c in range(1, num_classes + 1)]
    return Listing(root, classes, items)


@register_source("flowers")
class FlowersSource(ReleaseSource, Source):
    """`vit-prep convert --source flowers --input ROOT`: splits train, val and test as released."""

    samples_per_shard_hint = 1000

    def read_release(self, root: Path) -> Listing:
        return read_flowers(root)
