"""Oxford-IIIT Pets (Parkhi et al. 2012) from its release layout.

    ROOT/images/Abyssinian_100.jpg ...
    ROOT/annotations/list.txt      '#' comment lines, then "Image CLASS-ID SPECIES BREED-ID"
    ROOT/annotations/trainval.txt  the same columns, the 3,680 training images
    ROOT/annotations/test.txt      the 3,669 test images

CLASS-ID is 1-based (1..37); our labels are 0-based. The class name is the image name
without its trailing number (`american_pit_bull_terrier_12` -> american_pit_bull_terrier).
Splits: train = trainval.txt, test = test.txt (the paper's protocol).
"""

from __future__ import annotations

from pathlib import Path

from data_prep.sources import register_source
from data_prep.sources.base import Source
from data_prep.sources.downstream import ClassEntry, Item, Listing, ReleaseSource, require
from vitscale_common.errors import UserError

SPLIT_FILES = {"train": "trainval.txt", "test": "test.txt"}


def _rows(path: Path) -> list[tuple[str, int]]:
    """(image name, 1-based class id) of each data line."""
    rows = []
    for n, line in enumerate(require(path, "Oxford-IIIT Pets annotation list").read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        try:
            rows.append((parts[0], int(parts[1])))
        except (IndexError, ValueError):
            raise UserError(f"{path}:{n}: expected 'IMAGE CLASS-ID SPECIES BREED-ID', got {line!r}") from None
    return rows


def read_pets(root: str | Path) -> Listing:
    root = Path(root)
    class_names: dict[int, str] = {}
    for image, cid in _rows(root / "annotations" / "list.txt"):
        name = image.rsplit("_", 1)[0]
        if class_names.setdefault(cid, name) != name:
            raise UserError(f"{root}/annotations/list.txt: class {cid} named both {class_names[cid]} and {name}")
    if sorted(class_names) != list(range(1, len(class_names) + 1)):
        raise UserError(f"{root}/annotations/list.txt: class ids are not 1..{len(class_names)}")
    items = []
    for split, fname in SPLIT_FILES.items():
        for image, cid in _rows(root / "annotations" / fname):
            if cid not in class_names:
                raise UserError(f"{root}/annotations/{fname}: {image} has class id {cid}, unknown to list.txt")
            items.append(Item(split, f"images/{image}.jpg", cid - 1))
    classes = [ClassEntry(str(cid), class_names[cid]) for cid in sorted(class_names)]
    return Listing(root, classes, items)


@register_source("pets")
class PetsSource(ReleaseSource, Source):
    """`vit-prep convert --source pets --input ROOT`: splits train (trainval) and test."""

    samples_per_shard_hint = 1000

    def read_release(self, root: Path) -> Listing:
        return read_pets(root)
