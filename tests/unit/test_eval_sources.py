"""Downstream release layouts read from small fakes that copy the official names and formats."""

import zlib

import numpy as np
import pytest
import scipy.io
from PIL import Image

from data_prep.sources.flowers import read_flowers
from data_prep.sources.imagenet1k import read_imagenet1k
from data_prep.sources.pets import read_pets
from vitscale_common.errors import UserError


def _jpeg(path):
    """A small JPEG whose pixels differ per file name (so no two files are exact duplicates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(path, "JPEG")


def _labels(listing, split):
    return {it.source_id: it.label for it in listing.items if it.split == split}


# --------------------------------------------------------------------------- ImageNet-1k
# meta.mat numbers synsets in its own order (here: not sorted by WordNet id) and also lists
# non-leaf synsets, which are not classes.
META = [  # (ILSVRC2012_ID, WNID, words, num_children)
    (1, "n04000001", "tench", 0),
    (2, "n01000002", "goldfish", 0),
    (3, "n03000003", "shark", 0),
    (4, "n02000004", "ray", 0),
    (5, "n00001740", "entity", 4),
]
SORTED = sorted(w for _, w, _, c in META if c == 0)  # label = position among sorted WordNet ids
VAL_GT = [1, 2, 3, 4, 1, 3]  # ILSVRC2012_ID of val images 1..6


def _fake_imagenet(root, val_layout="flat"):
    for _, wnid, _, children in META:
        if children == 0:
            for i in range(3):
                _jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG")
    devkit = root / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    table = np.zeros(len(META), dtype=[(f, "O") for f in fields])
    for row, (sid, wnid, words, children) in zip(table, META):
        row["ILSVRC2012_ID"], row["WNID"], row["words"], row["gloss"] = sid, wnid, words, "a " + words
        row["num_children"], row["children"] = children, np.zeros(0)
        row["wordnet_height"], row["num_train_images"] = 0, 3
    scipy.io.savemat(devkit / "meta.mat", {"synsets": table})
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{g}\n" for g in VAL_GT))
    wnid_of = {sid: w for sid, w, _, _ in META}
    for n, gt in enumerate(VAL_GT, 1):
        name = f"ILSVRC2012_val_{n:08d}.JPEG"
        _jpeg(root / "val" / (name if val_layout == "flat" else f"{wnid_of[gt]}/{name}"))


def test_imagenet_val_labels_follow_meta_mat_not_sorted_ids(tmp_path):
    _fake_imagenet(tmp_path)
    listing = read_imagenet1k(tmp_path)
    assert [c.class_id for c in listing.classes] == SORTED
    assert [c.name for c in listing.classes] == ["goldfish", "ray", "shark", "tench"]
    assert listing.split_counts() == {"train": 12, "val": 6}
    val = _labels(listing, "val")
    # val image 1 has ILSVRC2012_ID 1 = n04000001 (tench), the *last* sorted synset: label 3, not 0
    assert val["val/ILSVRC2012_val_00000001.JPEG"] == 3
    assert val["val/ILSVRC2012_val_00000002.JPEG"] == 0  # ID 2 = n01000002
    assert val["val/ILSVRC2012_val_00000004.JPEG"] == 1  # ID 4 = n02000004
    assert val["val/ILSVRC2012_val_00000006.JPEG"] == 2  # ID 3 = n03000003
    train = _labels(listing, "train")
    assert train["train/n04000001/n04000001_0.JPEG"] == 3  # val labels agree with train folders


def test_imagenet_val_folder_layout_gives_the_same_labels(tmp_path):
    _fake_imagenet(tmp_path / "flat")
    _fake_imagenet(tmp_path / "folders", val_layout="folders")
    flat = _labels(read_imagenet1k(tmp_path / "flat"), "val")
    folders = {k.rsplit("/", 1)[1]: v for k, v in _labels(read_imagenet1k(tmp_path / "folders"), "val").items()}
    assert {k.rsplit("/", 1)[1]: v for k, v in flat.items()} == folders


def test_imagenet_val_synset_missing_from_train_is_an_error(tmp_path):
    _fake_imagenet(tmp_path)
    for p in (tmp_path / "train" / "n03000003").iterdir():
        p.unlink()
    (tmp_path / "train" / "n03000003").rmdir()
    with pytest.raises(UserError, match="n03000003 not among the train folders"):
        read_imagenet1k(tmp_path)


def test_imagenet_flat_val_without_devkit_names_it(tmp_path):
    _fake_imagenet(tmp_path)
    (tmp_path / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").unlink()
    with pytest.raises(UserError, match="meta.mat: missing"):
        read_imagenet1k(tmp_path)


# --------------------------------------------------------------------------- Pets
PETS = [  # (image, 1-based class id, species, breed id)
    ("Abyssinian_100", 1, 1, 1),
    ("Abyssinian_101", 1, 1, 1),
    ("american_bulldog_10", 2, 2, 1),
    ("american_bulldog_100", 2, 2, 1),
    ("american_pit_bull_terrier_1", 3, 2, 2),
    ("american_pit_bull_terrier_12", 3, 2, 2),
]


def _fake_pets(root):
    ann = root / "annotations"
    ann.mkdir(parents=True)
    header = (
        "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n#BREED ID: 1-25:Cat 1:12:Dog\n"
    )
    row = lambda r: " ".join(map(str, r)) + "\n"
    (ann / "list.txt").write_text(header + "".join(row(r) for r in PETS))
    (ann / "trainval.txt").write_text("".join(row(r) for r in PETS[::2]))
    (ann / "test.txt").write_text("".join(row(r) for r in PETS[1::2]))
    for name, *_ in PETS:
        _jpeg(root / "images" / f"{name}.jpg")


def test_pets_labels_are_zero_based_class_ids(tmp_path):
    _fake_pets(tmp_path)
    listing = read_pets(tmp_path)
    assert listing.split_counts() == {"train": 3, "test": 3}
    assert [c.name for c in listing.classes] == ["Abyssinian", "american_bulldog", "american_pit_bull_terrier"]
    assert _labels(listing, "train") == {
        "images/Abyssinian_100.jpg": 0,
        "images/american_bulldog_10.jpg": 1,
        "images/american_pit_bull_terrier_1.jpg": 2,
    }
    assert _labels(listing, "test")["images/american_bulldog_100.jpg"] == 1
    assert all(listing.path(it).is_file() for it in listing.items)


def test_pets_bad_line_names_file_and_line(tmp_path):
    _fake_pets(tmp_path)
    with open(tmp_path / "annotations" / "test.txt", "a") as f:
        f.write("broken_line\n")
    with pytest.raises(UserError, match=r"test.txt:4: expected"):
        read_pets(tmp_path)


# --------------------------------------------------------------------------- Flowers-102
def _fake_flowers(root):
    root.mkdir(parents=True, exist_ok=True)
    labels = np.array([[3, 1, 2, 3, 1, 2, 102, 5]], dtype=np.uint8)  # 1-based, shape (1, N) as released
    scipy.io.savemat(root / "imagelabels.mat", {"labels": labels})
    scipy.io.savemat(
        root / "setid.mat",
        {
            "trnid": np.array([[1, 2, 7]], np.uint16),
            "valid": np.array([[3, 4]], np.uint16),
            "tstid": np.array([[5, 6, 8]], np.uint16),
        },
    )
    for n in range(1, labels.size + 1):
        _jpeg(root / "jpg" / f"image_{n:05d}.jpg")


def test_flowers_labels_are_zero_based_and_splits_from_setid(tmp_path):
    _fake_flowers(tmp_path)
    listing = read_flowers(tmp_path)
    assert listing.split_counts() == {"train": 3, "val": 2, "test": 3}
    assert len(listing.classes) == 102
    assert _labels(listing, "train") == {"jpg/image_00001.jpg": 2, "jpg/image_00002.jpg": 0, "jpg/image_00007.jpg": 101}
    assert _labels(listing, "test")["jpg/image_00008.jpg"] == 4
    assert all(listing.path(it).is_file() for it in listing.items)


def test_flowers_missing_setid_names_it(tmp_path):
    _fake_flowers(tmp_path)
    (tmp_path / "setid.mat").unlink()
    with pytest.raises(UserError, match="setid.mat: missing"):
        read_flowers(tmp_path)


# --------------------------------------------------------------------------- as convert sources
@pytest.mark.parametrize(
    "kind,make,counts",
    [
        ("pets", _fake_pets, {"train": 3, "test": 3}),
        ("flowers", _fake_flowers, {"train": 3, "val": 2, "test": 3}),
        ("imagenet1k", _fake_imagenet, {"train": 12, "val": 6}),
    ],
)
def test_registered_as_convert_sources(tmp_path, kind, make, counts):
    from data_prep.sources import SourceConfig, build_source

    make(tmp_path)
    source = build_source(SourceConfig(kind=kind, input=str(tmp_path)))
    listing = source.list_items()
    table = listing.items
    ids = table.column("source_id").to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    splits = table.column("split").to_pylist()
    assert {s: splits.count(s) for s in set(splits)} == counts
    row = table.slice(0, 1).to_pylist()[0]
    assert source.read(row)[:2] == b"\xff\xd8"  # the release's JPEG bytes, unchanged
    assert listing.label_kind == "single"
