"""Table (parquet / CSV / JSONL, single and multi-label) and CIFAR (binary and python) sources."""

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

import sharding
from data_prep.cli import main as prep_main
from data_prep.sources.cifar import safe_unpickle
from vitscale_common.errors import UserError


def _images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.new("RGB", (20 + i, 16), (i * 20 % 256, 0, 0)).save(p)
        paths.append(p)
    return paths


def _all_rows(ds):
    return [r for s in ds.splits for sh in ds.shards(s) for r in ds.sample_index(s, sh.name).to_pylist()]


def test_multi_label_parquet_table_with_splits(tmp_path):
    paths = _images(tmp_path / "imgs", 6)
    labels = [["cat", "dog"], ["dog"], [], ["bird", "cat", "cat"], ["bird"], ["dog", "bird"]]
    pq.write_table(
        pa.table(
            {
                "path": [f"imgs/{p.name}" for p in paths],
                "tags": labels,
                "part": ["train", "train", "train", "train", "val", "val"],
            }
        ),
        tmp_path / "jft.parquet",
    )
    out = tmp_path / "out"
    assert (
        prep_main(
            [
                "convert",
                "--source",
                "table",
                "--input",
                str(tmp_path / "jft.parquet"),
                "--image-column",
                "path",
                "--labels-column",
                "tags",
                "--split-column",
                "part",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    ds = sharding.open_dataset(out)
    assert ds.label_kind == "multi" and [c.name for c in ds.classes] == ["bird", "cat", "dog"]
    assert ds.splits == ["train", "val"] and ds.num_samples("train") == 4 and ds.num_samples("val") == 2
    got = {r["source_id"]: r["labels"] for r in _all_rows(ds)}
    assert got == {
        "imgs/img0.png": [1, 2],
        "imgs/img1.png": [2],
        "imgs/img2.png": [],
        "imgs/img3.png": [0, 1],
        "imgs/img4.png": [0],
        "imgs/img5.png": [0, 2],
    }
    sample = next(iter(wds.WebDataset([ds.shards("val")[0].url], shardshuffle=False)))
    assert json.loads(sample["labels.json"]) == got[json.loads(sample["json"])["source_id"]]


def test_csv_and_jsonl_tables_with_class_names_and_a_missing_file(tmp_path):
    paths = _images(tmp_path / "imgs", 4)
    rows = [(str(paths[0]), "b"), ("imgs/img1.png", "a"), ("imgs/missing.png", "b"), ("imgs/img3.png", "a")]
    (tmp_path / "t.csv").write_text("file,cls\n" + "".join(f"{p},{c}\n" for p, c in rows))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"file": p, "cls": c}) + "\n" for p, c in rows))
    results = []
    for name in ("t.csv", "t.jsonl"):
        out = tmp_path / f"out-{name}"
        assert (
            prep_main(
                [
                    "convert",
                    "--source",
                    "table",
                    "--input",
                    str(tmp_path / name),
                    "--image-column",
                    "file",
                    "--label-column",
                    "cls",
                    "--splits",
                    "train=1",
                    "--output",
                    str(out),
                ]
            )
            == 0
        )
        ds = sharding.open_dataset(out)
        assert [c.name for c in ds.classes] == ["a", "b"]
        assert {r["source_id"]: r["label"] for r in _all_rows(ds)} == {
            str(paths[0]): 1,
            "imgs/img1.png": 0,
            "imgs/img3.png": 0,
        }
        assert ds.rejected().column("reason").to_pylist() == ["unreadable"]
        results.append((out / "shards" / "train-000000.tar").read_bytes())
    assert results[0] == results[1]  # same rows, same shards, whatever the table format


def test_table_with_an_unknown_label_is_a_clear_error(tmp_path, capsys):
    _images(tmp_path / "imgs", 1)
    (tmp_path / "t.csv").write_text("image,label\nimgs/img0.png,zebra\n")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    rc = prep_main(
        [
            "convert",
            "--source",
            "table",
            "--input",
            str(tmp_path / "t.csv"),
            "--class-list",
            str(tmp_path / "classes.txt"),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "row 0: label 'zebra' is not a known class" in capsys.readouterr().err


def _cifar_pixels(n, seed):
    """n flat-coloured records (a different colour per channel plane, so a plane-order
    mistake shows), in CIFAR's layout: 1024 R, 1024 G, 1024 B bytes."""
    colours = np.random.default_rng(seed).integers(0, 256, (n, 3, 1), dtype=np.uint8)
    return np.repeat(colours, 1024, axis=2).reshape(n, 3072)


def test_cifar10_binary_release_records(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    expected = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        pixels, labels = _cifar_pixels(3, hash(name) % 1000), np.arange(3, dtype=np.uint8) + len(name) % 7
        (root / name).write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())
        for i in range(3):
            expected[f"{name}/{i:05d}"] = (int(labels[i]), pixels[i].reshape(3, 32, 32).transpose(1, 2, 0))
    out = tmp_path / "out"
    assert (
        prep_main(["convert", "--source", "cifar", "--input", str(root), "--output", str(out), "--quality", "100"]) == 0
    )
    ds = sharding.open_dataset(out)
    assert ds.splits == ["train", "test"] and ds.num_samples("train") == 15 and ds.num_samples("test") == 3
    assert ds.classes[0].name == "airplane"
    shard = ds.shards("test")[0]
    data = open(shard.path, "rb").read()
    for r in ds.sample_index("test", shard.name).to_pylist():
        label, pixels = expected[r["source_id"]]
        img = np.asarray(Image.open(io.BytesIO(data[r["jpg_offset"] : r["jpg_offset"] + r["jpg_size"]])))
        assert r["label"] == label and img.shape == (32, 32, 3)
        assert np.abs(img.astype(int) - pixels).mean() < 4  # JPEG: close, not exact


def test_cifar100_python_archive_through_the_restricted_unpickler(tmp_path):
    members = {}
    for name, n in (("train", 4), ("test", 2)):
        members[f"cifar-100-python/{name}"] = pickle.dumps(
            {b"data": _cifar_pixels(n, n), b"fine_labels": list(range(n)), b"coarse_labels": [1] * n}, protocol=2
        )
    members["cifar-100-python/meta"] = pickle.dumps(
        {
            b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
        },
        protocol=2,
    )
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert prep_main(["convert", "--source", "cifar", "--input", str(archive), "--output", str(out)]) == 0
    ds = sharding.open_dataset(out)
    assert ds.num_classes == 100 and ds.classes[3].name == "f3"
    assert sorted(r["label"] for r in _all_rows(ds) if r["split"] == "train") == [0, 1, 2, 3]


def test_the_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with pytest.raises(UserError, match="refusing to load"):
        safe_unpickle(pickle.dumps({b"data": Evil()}), "data_batch_1")
    assert not (tmp_path / "pwned").exists()
    arr = safe_unpickle(pickle.dumps({b"data": np.arange(6, dtype=np.uint8)}, protocol=2), "x")[b"data"]
    assert arr.tolist() == list(range(6))


def test_imagefolder_with_split_folders_keeps_them(tmp_path):
    for split, n in (("train", 5), ("val", 2)):
        for cls in ("b_dog", "a_cat"):
            _images(tmp_path / "in" / split / cls, n)
    out = tmp_path / "out"
    assert prep_main(["convert", "--source", "imagefolder", "--input", str(tmp_path / "in"), "--output", str(out)]) == 0
    ds = sharding.open_dataset(out)
    assert ds.splits == ["train", "val"] and ds.num_samples("train") == 10 and ds.num_samples("val") == 4
    assert [c.class_id for c in ds.classes] == ["a_cat", "b_dog"]
    rows = _all_rows(ds)
    assert all(r["source_id"].startswith(r["split"] + "/") for r in rows)
    assert all(r["label"] == (0 if "/a_cat/" in r["source_id"] else 1) for r in rows)


def test_exact_duplicates_are_excluded_keeping_the_evaluation_copy(tmp_path):
    import shutil

    for c in ("a", "b"):
        (tmp_path / "in" / c).mkdir(parents=True)
    for i in range(30):
        Image.new("RGB", (20, 20), (i * 8, 0, 0)).save(tmp_path / "in" / "a" / f"{i}.png")
    for i in range(10):
        shutil.copy(tmp_path / "in" / "a" / f"{i}.png", tmp_path / "in" / "b" / f"{i}.png")
    shutil.copy(tmp_path / "in" / "a" / "0.png", tmp_path / "in" / "b" / "extra.png")
    out = tmp_path / "out"
    assert (
        prep_main(
            [
                "convert",
                "--source",
                "imagefolder",
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(out),
                "--samples-per-shard",
                "7",
            ]
        )
        == 0
    )
    ds = sharding.open_dataset(out)
    rows = {r["key"]: r for r in _all_rows(ds)}
    excl = pq.read_table(out / "exclusions" / "exact_duplicates.parquet").to_pylist()
    assert len(excl) == 11 and ds.info["num_excluded"] == 11 and ds.excluded_keys() == {e["key"] for e in excl}
    for e in excl:
        dup, kept = rows[e["key"]], rows[e["duplicate_of"]]
        assert dup["sha256"] == kept["sha256"] and e["key"] != e["duplicate_of"]
        assert kept["split"] != "train" or dup["split"] == "train"  # an eval copy is never dropped for a train one
    assert len({rows[e["duplicate_of"]]["sha256"] for e in excl}) == 10
