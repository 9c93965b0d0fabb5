"""A corpus of deliberately bad and odd inputs: every one is converted or rejected with
its reason, the odd-but-valid ones are converted with the right pixels, nothing escapes
the output folder."""

import io
import os
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

import sharding
from data_prep.cli import main as prep_main


def _jpeg(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _png_header_only(width, height):
    """A PNG whose IHDR claims width x height pixels, with no pixel data to speak of."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _gradient(w, h):
    x = np.linspace(0, 255, w, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(x, (h, 1))] * 3, axis=-1), "RGB")


def make_corpus(root):
    """Files under root/cls/; returns {name: expected reason or None (converted)}."""
    d = root / "cls"
    d.mkdir(parents=True)
    good = _jpeg(_gradient(64, 48))
    (d / "good.jpg").write_bytes(good)
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image\n")
    (d / "cmyk.jpg").write_bytes(_jpeg(Image.new("CMYK", (40, 30), (0, 255, 255, 0))))  # pure red
    grey16 = np.full((32, 32), 32768, dtype=np.uint16)
    grey16[:, 16:] = 65535
    (d / "grey16.png").write_bytes(_png(Image.fromarray(grey16)))
    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(0, (0, 0, 16, 32))  # left half = index 0 = transparent
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    (d / "palette_alpha.png").write_bytes(buf.getvalue())
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    (d / "rotated.jpg").write_bytes(_jpeg(_gradient(60, 20), exif=exif.tobytes()))
    (d / "bomb.png").write_bytes(_png_header_only(50_000, 50_000))
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (d / "animated.gif").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (0, 255, 0)).save(buf, "WEBP", lossless=True)
    (d / "image.webp").write_bytes(buf.getvalue())
    os.symlink(d / "does-not-exist.jpg", d / "broken_link.jpg")
    (d / "folder.jpg").mkdir()
    (d / "tiny.png").write_bytes(_png(Image.new("RGB", (4, 4))))
    (d / "sliver.png").write_bytes(_png(Image.new("RGB", (400, 10))))
    return {
        "good.jpg": None,
        "cmyk.jpg": None,
        "grey16.png": None,
        "palette_alpha.png": None,
        "rotated.jpg": None,
        "animated.gif": None,
        "image.webp": None,
        "truncated.jpg": "truncated",
        "zero.jpg": "empty",
        "text.jpg": "not_an_image",
        "bomb.png": "too_many_pixels",
        "broken_link.jpg": "unreadable",
        "folder.jpg": "unreadable",
        "tiny.png": "too_small",
        "sliver.png": "extreme_aspect",
    }


def _images(ds):
    out = {}
    for split in ds.splits:
        for shard in ds.shards(split):
            data = open(shard.path, "rb").read()
            for row in ds.sample_index(split, shard.name).to_pylist():
                jpg = data[row["jpg_offset"] : row["jpg_offset"] + row["jpg_size"]]
                out[row["source_id"].split("/")[-1]] = Image.open(io.BytesIO(jpg)).convert("RGB")
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    expected = make_corpus(base / "in")
    before = sorted(p for p in base.rglob("*"))
    out = base / "out"
    rc = prep_main(
        [
            "convert",
            "--source",
            "imagefolder",
            "--input",
            str(base / "in"),
            "--output",
            str(out),
            "--splits",
            "train=1",
            "--samples-per-shard",
            "4",
            "--max-pixels",
            "10000000",
        ]
    )
    assert rc == 0
    after = sorted(p for p in base.rglob("*") if out not in p.parents and p != out)
    assert after == before, "something was written outside the output folder"
    return sharding.open_dataset(out), expected


def test_every_input_is_converted_or_rejected_with_its_reason(converted):
    ds, expected = converted
    rejected = {r["source_id"].split("/")[-1]: r["reason"] for r in ds.rejected().to_pylist()}
    assert rejected == {k: v for k, v in expected.items() if v}
    images = _images(ds)
    assert set(images) == {k for k, v in expected.items() if v is None}
    assert ds.info["num_inputs"] == len(expected) == ds.info["num_samples"] + ds.info["num_rejected"]


def test_odd_but_valid_images_come_out_right(converted):
    ds, _ = converted
    img = _images(ds)
    assert img["rotated.jpg"].size == (20, 60)  # stored 60x20 with EXIF "rotate 90"
    assert img["cmyk.jpg"].size == (40, 30)
    r, g, b = np.asarray(img["cmyk.jpg"]).reshape(-1, 3).mean(0)
    assert r > 200 and g < 40 and b < 40
    grey = np.asarray(img["grey16.png"]).astype(int)
    assert abs(grey[:, :12].mean() - 128) <= 3 and grey[:, 20:].mean() >= 250  # scaled, not clipped
    pal = np.asarray(img["palette_alpha.png"]).astype(int)
    assert pal[:, :12].min() >= 245  # transparent -> white
    assert pal[:, 20:, 2].mean() > 230 and pal[:, 20:, 0].mean() < 30  # opaque blue stays blue
    gif = np.asarray(img["animated.gif"]).reshape(-1, 3).mean(0)
    assert gif[0] > 230 and gif[2] < 30  # the first frame (red)
    webp = np.asarray(img["image.webp"]).reshape(-1, 3).mean(0)
    assert webp[1] > 230 and img["image.webp"].size == (30, 20)


def test_conforming_jpeg_bytes_pass_through_unchanged(converted, tmp_path):
    ds, _ = converted
    shard = ds.shards("train")[0]
    rows = [r for s in ds.shards("train") for r in ds.sample_index("train", s.name).to_pylist()]
    good = next(r for r in rows if r["source_id"].endswith("good.jpg"))
    data = open(ds.path / f"shards/{good['key'].rsplit('_', 2)[0]}-{good['shard']:06d}.tar", "rb").read()
    original = (ds.path.parent / "in" / "cls" / "good.jpg").read_bytes()
    assert data[good["jpg_offset"] : good["jpg_offset"] + good["jpg_size"]] == original
    assert shard.num_samples >= 0


def test_in21k_tar_of_tars_with_climbing_names(tmp_path):
    def tar_bytes(members):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    jpg = _jpeg(_gradient(40, 30))
    outer = tmp_path / "work" / "fall11.tar"
    outer.parent.mkdir()
    outer.write_bytes(
        tar_bytes(
            [
                (
                    "n0002.tar",
                    tar_bytes([("n0002_1.JPEG", jpg), ("../../escape.JPEG", jpg), ("n0002_2.JPEG", b"junk")]),
                ),
                ("n0001.tar", tar_bytes([("n0001_1.JPEG", jpg), ("/abs.JPEG", jpg)])),
                ("../n0003.tar", tar_bytes([("n0003_1.JPEG", jpg)])),
            ]
        )
    )
    words = tmp_path / "work" / "words.txt"
    words.write_text("n0001\tcat\nn0002\tdog\n")
    out = tmp_path / "work" / "out"
    assert (
        prep_main(
            [
                "convert",
                "--source",
                "in21k",
                "--input",
                str(outer),
                "--words",
                str(words),
                "--output",
                str(out),
                "--splits",
                "train=1",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.rglob("*") if "out" not in p.relative_to(tmp_path).parts) == [
        "fall11.tar",
        "words.txt",
        "work",
    ]
    ds = sharding.open_dataset(out)
    assert [(c.class_id, c.name) for c in ds.classes] == [("n0001", "cat"), ("n0002", "dog")]
    rows = ds.sample_index("train", "train-000000").to_pylist()
    assert sorted((r["source_id"], r["label"]) for r in rows) == [("n0001/n0001_1.JPEG", 0), ("n0002/n0002_1.JPEG", 1)]
    rejected = {r["source_id"]: r["reason"] for r in ds.rejected().to_pylist()}
    assert rejected == {
        "n0002/../../escape.JPEG": "unsafe_name",
        "n0001//abs.JPEG": "unsafe_name",
        "../n0003.tar": "unsafe_name",
        "n0002/n0002_2.JPEG": "not_an_image",
    }
    # The two classes hold the same JPEG bytes: one copy is excluded at merge time.
    assert len(ds.excluded_keys()) == 1 and ds.excluded_keys() < {r["key"] for r in rows}
