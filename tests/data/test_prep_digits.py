"""The digits demo dataset end to end: convert, open, read with stock webdataset, verify."""

import json
import subprocess
import sys
import tarfile

import pytest
import webdataset as wds

import sharding
from data_prep.cli import main as prep_main
from sharding.verify import verify_dataset


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "digits"
    assert prep_main(["convert", "--source", "digits", "--output", str(out), "--workers", "2"]) == 0
    return out


def test_splits_counts_and_classes(digits):
    ds = sharding.open_dataset(digits)
    assert ds.splits == ["train", "val", "test"]
    assert [ds.num_samples(s) for s in ds.splits] == [1438, 179, 180]
    assert ds.num_classes == 10 and ds.label_kind == "single"
    assert [c.class_id for c in ds.classes] == [str(i) for i in range(10)]
    train = ds.shards("train")
    assert len(train) == 12 and [s.num_samples for s in train] == [128] * 11 + [30]
    assert ds.excluded_keys() == set()
    assert not (digits / "_work").exists()


def test_stock_webdataset_and_tar_read_what_the_index_says(digits):
    ds = sharding.open_dataset(digits)
    shard = ds.shards("val")[1]
    index = ds.sample_index("val", shard.name).to_pylist()
    samples = list(wds.WebDataset([shard.url], shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [r["key"] for r in index]
    assert all(s["jpg"].size == (32, 32) and s["jpg"].mode == "RGB" for s in samples)
    assert [int(s["cls"]) for s in samples] == [r["label"] for r in index]
    assert [s["json"]["source_id"] for s in samples] == [r["source_id"] for r in index]
    names = subprocess.run(["tar", "-tf", shard.path], capture_output=True, text=True, check=True).stdout.split()
    assert names == [f"{r['key']}.{e}" for r in index for e in ("jpg", "cls", "json")]
    raw = open(shard.path, "rb").read()
    with tarfile.open(shard.path) as tar:
        member = tar.getmember(f"{index[3]['key']}.jpg")
        assert (
            raw[index[3]["jpg_offset"] : index[3]["jpg_offset"] + index[3]["jpg_size"]]
            == tar.extractfile(member).read()
        )


def test_labels_match_the_source_and_shuffle_mixes_classes(digits):
    from sklearn.datasets import load_digits

    target = load_digits().target
    ds = sharding.open_dataset(digits)
    rows = ds.sample_index("train", "train-000000").to_pylist()
    assert all(r["label"] == target[int(r["source_id"].split("/")[1])] for r in rows)
    assert len({r["label"] for r in rows}) == 10
    ids = [int(r["source_id"].split("/")[1]) for r in rows]
    assert ids != sorted(ids)


def test_verify_passes_then_catches_a_flipped_byte(digits, tmp_path):
    assert verify_dataset(digits).ok
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(digits, copy)
    shard = sharding.open_dataset(copy).shards("test")[0]
    row = sharding.open_dataset(copy).sample_index("test", shard.name).to_pylist()[5]
    data = bytearray(open(shard.path, "rb").read())
    data[row["jpg_offset"] + row["jpg_size"] // 2] ^= 0xFF
    open(shard.path, "wb").write(bytes(data))
    report = verify_dataset(copy)
    assert not report.ok
    assert any("sha256" in p for p in report.problems)
    r = subprocess.run(
        [sys.executable, "-m", "data_prep.cli", "verify", str(copy), "--workers", "2"], capture_output=True, text=True
    )
    assert r.returncode == 1 and r.stdout.count("problem:") >= 2 and f"{shard.name}/{row['key']}" in r.stdout


def test_info_and_rerun_on_a_finished_dataset(digits, capsys):
    assert prep_main(["info", str(digits)]) == 0
    assert "1438 samples" in capsys.readouterr().out
    before = (digits / "dataset.json").read_bytes()
    assert prep_main(["convert", "--source", "digits", "--output", str(digits)]) == 0
    assert (digits / "dataset.json").read_bytes() == before
    assert prep_main(["convert", "--source", "digits", "--output", str(digits), "--seed", "1"]) == 2
    assert "different settings" in capsys.readouterr().err
    from timm.data.readers.reader_wds import _load_info, _parse_split_info

    val = _parse_split_info("val", _load_info(str(digits)))  # what timm's WebDataset reader sees
    assert val.num_samples == 179 and val.shard_lengths == (128, 51)
    info = json.loads((digits / "_info.json").read_text())
    assert info["splits"]["train"]["shard_lengths"][-1] == 30
    assert json.loads((digits / "shards" / "sizes.json").read_text())["val-000001.tar"] == 51
