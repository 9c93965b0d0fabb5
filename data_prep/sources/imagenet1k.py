"""ImageNet-1k (ILSVRC-2012) from its release layout.

    ROOT/train/n01440764/n01440764_10026.JPEG ...      one folder per synset (1,000)
    ROOT/val/ILSVRC2012_val_00000001.JPEG ...          flat, labelled by the devkit, or
    ROOT/val/n01440764/ILSVRC2012_val_00000293.JPEG    the same images sorted into synset folders
    ROOT/ILSVRC2012_devkit_t12/data/meta.mat           synsets: ILSVRC2012_ID, WNID, words, ...
    ROOT/ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt
                                                       line n: the ILSVRC2012_ID of val image n

Labels are the position of the synset among the sorted WordNet ids (the convention of
torchvision, timm and the ReaL labels). The devkit's ILSVRC2012_ID numbers synsets in
meta.mat's own order, which is *not* sorted by WordNet id, so a ground-truth id is turned
into a WordNet id through meta.mat and only then into a label; every val synset must be one
of the train folders.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from data_prep.sources import register_source
from data_prep.sources.base import Source
from data_prep.sources.downstream import ClassEntry, Item, Listing, ReleaseSource, load_mat, require
from vitscale_common.errors import UserError

DEVKIT = "ILSVRC2012_devkit_t12"
WNID = re.compile(r"^n\d{8}$")
VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$", re.IGNORECASE)
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _synset_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and WNID.match(p.name))


def read_devkit(devkit: Path) -> tuple[dict[int, str], dict[str, str], list[int]]:
    """(ILSVRC2012_ID -> WNID of the 1,000 leaf synsets, WNID -> words, val ground-truth ids)."""
    synsets = load_mat(devkit / "data" / "meta.mat", "ImageNet devkit meta.mat").get("synsets")
    if synsets is None:
        raise UserError(f"{devkit}/data/meta.mat: no `synsets` table")
    id_to_wnid, words = {}, {}
    for row in np.atleast_1d(synsets):
        if int(row["num_children"]) == 0:  # the classification classes are the leaves
            id_to_wnid[int(row["ILSVRC2012_ID"])] = str(row["WNID"])
            words[str(row["WNID"])] = str(row["words"])
    gt_path = require(devkit / "data" / "ILSVRC2012_validation_ground_truth.txt", "ImageNet val ground truth")
    try:
        ground_truth = [int(line) for line in gt_path.read_text().split()]
    except ValueError:
        raise UserError(f"{gt_path}: expected one integer ILSVRC2012_ID per line") from None
    return id_to_wnid, words, ground_truth


def read_imagenet1k(root: str | Path, devkit: str | Path | None = None) -> Listing:
    root = Path(root)
    train_dirs = _synset_folders(require(root / "train", "ImageNet train folders"))
    if not train_dirs:
        raise UserError(f"{root}/train: no synset folders (nXXXXXXXX)")
    wnids = [d.name for d in train_dirs]
    label_of = {w: i for i, w in enumerate(wnids)}
    items = [Item("train", str(p.relative_to(root)), label_of[d.name]) for d in train_dirs for p in _images(d)]

    devkit = Path(devkit) if devkit else root / DEVKIT
    words: dict[str, str] = {}
    val = root / "val"
    if val.is_dir() and _synset_folders(val):  # val already sorted into synset folders
        for d in _synset_folders(val):
            if d.name not in label_of:
                raise UserError(f"{d}: synset not among the train folders")
            items += [Item("val", str(p.relative_to(root)), label_of[d.name]) for p in _images(d)]
        if devkit.is_dir():
            words = read_devkit(devkit)[1]
    elif val.is_dir():  # flat val folder: labels from the devkit
        id_to_wnid, words, ground_truth = read_devkit(require(devkit, "ImageNet devkit (or pass its path)"))
        for p in _images(val):
            m = VAL_NAME.match(p.name)
            if not m:
                raise UserError(f"{p}: not an ILSVRC2012_val_NNNNNNNN.JPEG name")
            number = int(m.group(1))
            if number > len(ground_truth):
                raise UserError(f"{p}: beyond the {len(ground_truth)} lines of the ground truth")
            wnid = id_to_wnid.get(ground_truth[number - 1])
            if wnid is None:
                raise UserError(f"{p}: ground-truth id {ground_truth[number - 1]} is not a leaf synset of meta.mat")
            if wnid not in label_of:
                raise UserError(f"{p}: ground-truth synset {wnid} not among the train folders")
            items.append(Item("val", str(p.relative_to(root)), label_of[wnid]))
    classes = [ClassEntry(w, words.get(w, w)) for w in wnids]
    return Listing(root, classes, items)


@register_source("imagenet1k")
class ImageNet1kSource(ReleaseSource, Source):
    """`vit-prep convert --source imagenet1k --input ROOT`: splits train and val; a flat val
    folder needs the devkit at ROOT/ILSVRC2012_devkit_t12."""

    samples_per_shard_hint = 2500

    def read_release(self, root: Path) -> Listing:
        return read_imagenet1k(root)
