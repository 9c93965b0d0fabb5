"""De-duplication: planted copies of test images are found, distinct real pictures are not.

Real pictures are the photos scikit-image and scikit-learn ship. Test images are crops of
some of them; planted copies are those crops resized 0.5x-2x, cropped by up to 10% and
re-encoded as JPEG at quality 60-95. Distinct images are crops of the same photos that
overlap every test crop by IoU < 0.3, crops of the photos no test image comes from, and
the LFW faces scikit-image ships.
"""

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image
from sklearn.datasets import load_sample_images

from data_prep import dedup, near_duplicates
from data_prep.config import PrepConfig
from data_prep.convert import run_convert
from data_prep.sources import SourceConfig
from sharding import open_dataset

SOURCE_PHOTOS = [
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "moon",
    "brick",
    "grass",
]
OTHER_PHOTOS = ["cell", "gravel", "page", "text", "clock", "horse", "logo", "colorwheel", "microaneurysms"]
CROPS_PER_SOURCE_PHOTO = 110
CROPS_PER_OTHER_PHOTO = 50


def _rgb(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        a = (a * 255).astype(np.uint8) if a.max() <= 1 else a.astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return Image.fromarray(np.ascontiguousarray(a[..., :3]))


def _photos(names):
    return {n: _rgb(getattr(skimage.data, n)()) for n in names}


def _iou(a, b):
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return inter / (area(a) + area(b) - inter)


def _box(rng, w, h, lo, hi):
    bw, bh = int(w * rng.uniform(lo, hi)), int(h * rng.uniform(lo, hi))
    x, y = rng.integers(0, w - bw + 1), rng.integers(0, h - bh + 1)
    return (int(x), int(y), int(x + bw), int(y + bh))


def _jpeg(im, quality):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(quality))
    return buf.getvalue()


def _plant(rng, im):
    """Crop up to 10% of each side's length (split between the two edges), resize, re-encode."""
    w, h = im.size
    cut_w, cut_h = rng.uniform(0, 0.1) * w, rng.uniform(0, 0.1) * h
    left, top = rng.uniform(0, cut_w), rng.uniform(0, cut_h)
    im = im.crop((int(left), int(top), int(w - (cut_w - left)), int(h - (cut_h - top))))
    s = rng.uniform(0.5, 2.0)
    im = im.resize((max(8, int(im.size[0] * s)), max(8, int(im.size[1] * s))), Image.BICUBIC)
    return _jpeg(im, rng.integers(60, 96))


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(2020)
    tests, planted, distinct = [], [], []
    photos = _photos(SOURCE_PHOTOS) | {
        f"sklearn{i}": Image.fromarray(a) for i, a in enumerate(load_sample_images().images)
    }
    for name, photo in photos.items():
        w, h = photo.size
        boxes = []
        while len(boxes) < 2:
            b = _box(rng, w, h, 0.35, 0.6)
            if all(_iou(b, o) < 0.3 for o in boxes):
                boxes.append(b)
        for b in boxes:
            crop = photo.crop(b)
            tests.append((f"{name}_test{len(tests)}", _jpeg(crop, 90)))
            for _ in range(3):
                planted.append((f"planted{len(planted)}", _plant(rng, crop), len(tests) - 1))
        # an exact copy in another container: same pixels, PNG instead of JPEG
        png = io.BytesIO()
        Image.open(io.BytesIO(tests[-1][1])).save(png, "PNG")
        planted.append((f"planted{len(planted)}", png.getvalue(), len(tests) - 1))
        n = 0
        while n < CROPS_PER_SOURCE_PHOTO:
            b = _box(rng, w, h, 0.2, 0.6)
            if all(_iou(b, o) < 0.3 for o in boxes):
                distinct.append((f"{name}_crop{n}", _jpeg(photo.crop(b), rng.integers(60, 96))))
                n += 1
    for name, photo in _photos(OTHER_PHOTOS).items():
        distinct.append((f"{name}_whole", _jpeg(photo, 90)))
        for n in range(CROPS_PER_OTHER_PHOTO):
            distinct.append(
                (f"{name}_crop{n}", _jpeg(photo.crop(_box(rng, *photo.size, 0.2, 0.8)), rng.integers(60, 96)))
            )
    faces = skimage.data.lfw_subset()
    for i, face in enumerate(faces[:100]):
        distinct.append((f"lfw{i}", _jpeg(_rgb(face), 90)))
    return tests, planted, distinct


def test_planted_copies_found_and_no_false_positives(corpus, record_property):
    tests, planted, distinct = corpus
    assert len(distinct) >= 2000
    test_sigs = near_duplicates.signatures(((k, b) for k, b in tests), variants=True)
    pool = [(k, b) for k, b, _ in planted] + distinct
    pool_sigs = near_duplicates.signatures(pool, variants=False)
    assert pool_sigs.keys == [k for k, _ in pool]  # every image decoded
    matches = {m.key: m for m in near_duplicates.find_matches(pool_sigs, test_sigs)}

    truth = {k: src for k, _, src in planted}
    found = [k for k in truth if k in matches and matches[k].test_index == truth[k]]
    recall = len(found) / len(truth)
    false_positives = sorted(k for k in matches if k not in truth)

    # the margin: distances of planted copies to their own test image vs distinct images to any
    # exact distances up to 1.5x the threshold; beyond that a distinct image counts as inf
    cutoff = 1.5 * near_duplicates.THRESHOLD
    dist, _ = near_duplicates.near_distances(pool_sigs, test_sigs, cutoff=cutoff)
    per_image = np.full(len(pool), np.inf)
    np.minimum.at(per_image, pool_sigs.owner, dist)
    planted_d = np.sort(per_image[: len(planted)])
    distinct_min = float(per_image[len(planted) :].min())
    margin = distinct_min - planted_d[int(np.ceil(0.95 * len(planted_d))) - 1]
    nearest = f"{distinct_min:.1f}" if np.isfinite(distinct_min) else f"> {cutoff:.0f}"
    summary = (
        f"recall {recall:.3f} ({len(found)}/{len(truth)}), false positives {len(false_positives)}/"
        f"{len(distinct)}; planted distance 95th pct {planted_d[int(0.95 * len(planted_d)) - 1]:.1f}, "
        f"max finite {planted_d[np.isfinite(planted_d)].max():.1f}; nearest distinct {nearest}; "
        f"threshold {near_duplicates.THRESHOLD}; margin {margin:.1f}"
    )
    print(summary)
    record_property("dedup_margin", summary)
    assert recall >= 0.95, summary
    assert not false_positives, f"{false_positives[:5]}: {summary}"
    assert margin > 0, summary
    exact = [m for m in matches.values() if m.kind == "exact"]
    assert len(exact) == len(SOURCE_PHOTOS) + 2  # the PNG copies


def test_flat_image_has_no_near_signature():
    flat = _jpeg(Image.new("RGB", (64, 64), (200, 30, 30)), 90)
    sigs = near_duplicates.signatures([("flat", flat)], variants=True)
    assert sigs.keys == ["flat"] and len(sigs.owner) == 0


def test_undecodable_image_is_reported_not_fatal():
    skipped = []
    sigs = near_duplicates.signatures([("bad", b"not an image")], variants=False, skipped=skipped)
    assert sigs.keys == [] and skipped[0][0] == "bad"


# --------------------------------------------------------------------------- the CLI on shard datasets
def _convert_images(tmp_path, name, images):
    """A shard dataset (split train) made by the convert job from loose image files."""
    release = tmp_path / f"{name}_release"
    folder = release / "train" / "n00000001"  # one synset folder: the simplest release layout
    folder.mkdir(parents=True)
    for key, data in images:
        (folder / f"{key}.JPEG").write_bytes(data)
    out = tmp_path / name
    run_convert(PrepConfig(source=SourceConfig(kind="imagenet1k", input=str(release)), output=str(out), dedup=False))
    ds = open_dataset(out)
    key_of = {
        Path(r["source_id"]).stem: r["key"]
        for s in ds.shards("train")
        for r in ds.sample_index("train", s.name).select(["key", "source_id"]).to_pylist()
    }
    return out, key_of


def test_cli_writes_exclusions_the_stream_honours_and_report(corpus, tmp_path):
    tests, planted, distinct = corpus
    test_dir, test_key = _convert_images(tmp_path, "downstream", tests[:4])
    pretrain_images = [(k, b) for k, b, src in planted if src < 4] + distinct[:40]
    pre_dir, pre_key = _convert_images(tmp_path, "pre", pretrain_images)

    rc = dedup.main([str(pre_dir), "--against", f"{test_dir}:train", "--name", "pets", "--workers", "2"])
    assert rc == 0
    table = pq.read_table(pre_dir / "exclusions" / "dedup-pets.parquet")
    assert table.schema.names[:2] == ["key", "reason"]
    rows = table.to_pylist()
    planted_keys = {pre_key[k] for k, _, src in planted if src < 4}
    assert {r["key"] for r in rows} == planted_keys
    for k, _, src in planted:
        if src < 4:
            row = next(r for r in rows if r["key"] == pre_key[k])
            assert row["duplicate_of"] == f"downstream:train/{test_key[tests[src][0]]}"
            assert row["reason"] in ("near_duplicate_of_test_image", "exact_duplicate_of_test_image")
            assert row["distance"] <= near_duplicates.THRESHOLD
    assert open_dataset(pre_dir).excluded_keys() >= planted_keys  # what the sample stream skips
    page = (pre_dir / "reports" / "dedup-pets.html").read_text()
    assert page.count("<tr>") == len(planted_keys) + 1 and page.count("data:image/jpeg") == 2 * len(planted_keys)


def test_cli_names_missing_split(corpus, tmp_path, capsys):
    _, _, distinct = corpus
    pre_dir, _ = _convert_images(tmp_path, "pre", distinct[:3])
    assert dedup.main([str(pre_dir), "--against", f"{pre_dir}:test"]) == 2
    assert "no split 'test'" in capsys.readouterr().err


def test_tasks_split_the_shards_and_replace_an_earlier_split(corpus, tmp_path):
    tests, planted, distinct = corpus
    test_dir, _ = _convert_images(tmp_path, "downstream", tests[:2])
    images = [(k, b) for k, b, src in planted if src < 2] + distinct[:30]
    release = tmp_path / "pre_release" / "train" / "n00000001"
    release.mkdir(parents=True)
    for key, data in images:
        (release / f"{key}.JPEG").write_bytes(data)
    pre = tmp_path / "pre"
    run_convert(
        PrepConfig(
            source=SourceConfig(kind="imagenet1k", input=str(release.parents[1])),
            output=str(pre),
            dedup=False,
            samples_per_shard=8,
        )
    )
    common = [str(pre), "--against", f"{test_dir}:train", "--name", "t"]
    assert dedup.main(common) == 0
    single = open_dataset(pre).excluded_keys()
    assert len(single) == sum(src < 2 for _, _, src in planted)
    for i in range(3):
        assert dedup.main(common + ["--num-tasks", "3", "--task-index", str(i)]) == 0
    files = sorted(p.name for p in (pre / "exclusions").glob("dedup-*"))
    assert files == [f"dedup-t-task{i:05d}-of-00003.parquet" for i in range(3)]  # the single-task list is gone
    assert open_dataset(pre).excluded_keys() == single
