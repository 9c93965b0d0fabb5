"""Downstream data end to end: fake release layouts -> the real convert job -> vit-eval.

The fake ImageNet-1k has 4 synsets whose images are crops of 4 different shipped photos,
so a frozen random-init ViT's features separate them and the probes have something to find.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from safetensors.torch import save_file

import sharding
from data_prep.config import PrepConfig
from data_prep.convert import run_convert
from data_prep.sources import SourceConfig
from pretrain import weights
from pretrain.data.loaders import DataConfig, build_eval_loader
from pretrain.evaluate import run as vit_eval
from pretrain.model import create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
import test_eval_sources as fakes  # noqa: E402  (the release-layout fakes)

PHOTOS = {"n04000001": "astronaut", "n01000002": "coffee", "n03000003": "chelsea", "n02000004": "rocket"}
VAL_GT = [1, 2, 3, 4, 1, 3, 2, 4, 4, 1, 2, 3]  # ILSVRC2012_ID of val images 1..12 (meta.mat order)


def _crop_jpeg(photo: np.ndarray, rng, path: Path):
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.3, 0.6))
    y, x = rng.integers(0, h - side), rng.integers(0, w - side)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo[y : y + side, x : x + side]).resize((48, 48)).save(path, "JPEG", quality=90)


def _fake_imagenet(root: Path):
    """fakes._fake_imagenet's devkit and layout, with photo crops as the images."""
    fakes._fake_imagenet(root)
    rng = np.random.default_rng(0)
    photos = {w: getattr(skimage.data, name)() for w, name in PHOTOS.items()}
    shutil.rmtree(root / "train")
    shutil.rmtree(root / "val")
    for wnid, photo in photos.items():
        for i in range(12):
            _crop_jpeg(photo, rng, root / "train" / wnid / f"{wnid}_{i}.JPEG")
    wnid_of = {sid: w for sid, w, _, _ in fakes.META}
    (root / "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{g}\n" for g in VAL_GT)
    )
    for n, gt in enumerate(VAL_GT, 1):
        _crop_jpeg(photos[wnid_of[gt]], rng, root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG")


def _convert(kind: str, release: Path, out: Path):
    run_convert(PrepConfig(source=SourceConfig(kind=kind, input=str(release)), output=str(out), dedup=False))
    return sharding.open_dataset(out)


def _labels_by_source(ds, split):
    return {
        r["source_id"]: r["label"]
        for s in ds.shards(split)
        for r in ds.sample_index(split, s.name).select(["source_id", "label"]).to_pylist()
    }


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    _fake_imagenet(root)
    return _convert("imagenet1k", root, tmp_path_factory.mktemp("shards") / "in1k")


def test_imagenet_converts_with_devkit_labels(imagenet):
    assert sorted(imagenet.splits) == ["train", "val"]
    assert (imagenet.num_samples("train"), imagenet.num_samples("val"), imagenet.num_classes) == (48, 12, 4)
    assert [c.class_id for c in imagenet.classes] == fakes.SORTED
    val = _labels_by_source(imagenet, "val")
    assert val["val/ILSVRC2012_val_00000001.JPEG"] == 3  # ID 1 = n04000001, last of the sorted synsets
    assert val["val/ILSVRC2012_val_00000002.JPEG"] == 0  # ID 2 = n01000002
    assert val["val/ILSVRC2012_val_00000009.JPEG"] == 1  # ID 4 = n02000004
    assert _labels_by_source(imagenet, "train")["train/n04000001/n04000001_5.JPEG"] == 3


@pytest.mark.parametrize(
    "kind,make,counts,named",
    [
        ("pets", fakes._fake_pets, {"train": 3, "test": 3}, ("test", "images/american_bulldog_100.jpg", 1)),
        ("flowers", fakes._fake_flowers, {"train": 3, "val": 2, "test": 3}, ("train", "jpg/image_00007.jpg", 101)),
    ],
)
def test_pets_and_flowers_convert(tmp_path, kind, make, counts, named):
    make(tmp_path / "release")
    ds = _convert(kind, tmp_path / "release", tmp_path / "out")
    assert {s: ds.num_samples(s) for s in ds.splits} == counts
    split, source_id, label = named
    assert _labels_by_source(ds, split)[source_id] == label


# --------------------------------------------------------------------------- vit-eval
@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("vit_ti16", img_size=64, num_classes=4)
    path = tmp_path_factory.mktemp("weights") / "vit_ti16_64.safetensors"
    save_file({k: v.contiguous() for k, v in weights.to_timm(model.state_dict()).items()}, str(path))
    return model, path


def _real_json(path: Path):
    # image n: n % 3 == 0 -> no real label (left out); otherwise a set holding every class but one
    real = [[] if n % 3 == 0 else [c for c in range(4) if c != n % 4] for n in range(1, len(VAL_GT) + 1)]
    path.write_text(json.dumps(real))
    return real


@pytest.mark.slow
def test_vit_eval_scores_match_direct_computation(imagenet, timm_weights, tmp_path):
    model, path = timm_weights
    real = _real_json(tmp_path / "real.json")
    out = tmp_path / "results"
    rc = vit_eval.main(
        [
            str(path),
            "--model",
            "vit_ti16",
            "--data",
            str(imagenet.path),
            "--split",
            "val",
            "--resolution",
            "64",
            "--real",
            str(tmp_path / "real.json"),
            "--fewshot",
            "1,5",
            "--linear-probe",
            "--workers",
            "0",
            "--batch-size",
            "5",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    results = json.loads((out / f"{imagenet.name}-val-64px.json").read_text())["results"]
    assert (out / f"{imagenet.name}-val-64px.md").read_text().startswith("# Evaluation results")

    # the same model and loader, scored here directly
    loader = build_eval_loader(
        DataConfig(path=str(imagenet.path), workers=0), "val", img_size=64, batch_size=7, rank=0, world_size=1
    )
    with torch.no_grad():
        batches = [(model(loader.device_input.images(x, "cpu")), y, v) for x, y, v in loader]
    logits = torch.cat([lg[v] for lg, _, v in batches])
    targets = torch.cat([y[v] for _, y, v in batches])
    assert results["samples"] == 12
    assert results["top1"] == pytest.approx((logits.argmax(1) == targets).float().mean().item())
    assert results["top5"] == 1.0  # 4 classes

    sources = [
        sid
        for s in imagenet.shards("val")
        for sid in imagenet.sample_index("val", s.name).column("source_id").to_pylist()
    ]
    numbers = [int(s[-13:-5]) for s in sources]  # ILSVRC2012_val_000000NN.JPEG, in stream order
    pred = logits.argmax(1).tolist()
    kept = [(p, real[n - 1]) for p, n in zip(pred, numbers) if real[n - 1]]
    assert results["real_samples"] == len(kept) == 8
    assert results["real_top1"] == pytest.approx(sum(p in labels for p, labels in kept) / len(kept))

    # frozen random features of 4 different photos: the probes must beat chance (0.25) clearly
    assert results["fewshot_5"] >= 0.6 and results["linear_probe_top1"] >= 0.6
    assert 0.0 <= results["fewshot_1"] <= 1.0


def test_vit_eval_at_another_resolution_resamples_posemb(imagenet, timm_weights, tmp_path):
    _, path = timm_weights
    rc = vit_eval.main(
        [
            str(path),
            "--model",
            "vit_ti16",
            "--data",
            str(imagenet.path),
            "--split",
            "val",
            "--resolution",
            "96",
            "--workers",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    doc = json.loads((tmp_path / f"{imagenet.name}-val-96px.json").read_text())
    assert doc["resolution"] == 96 and "4x4 -> 6x6" in doc["init"] and "resampled" in doc["init"]
    assert doc["results"]["samples"] == 12


def test_vit_eval_real_needs_imagenet_val_names(tmp_path, timm_weights, capsys):
    _, path = timm_weights
    (tmp_path / "real.json").write_text("[[1]]")
    ds_root = tmp_path / "pets"
    fakes._fake_pets(tmp_path / "pets_release")
    _convert("pets", tmp_path / "pets_release", ds_root)
    rc = vit_eval.main(
        [
            str(path),
            "--model",
            "vit_ti16",
            "--data",
            str(ds_root),
            "--split",
            "test",
            "--resolution",
            "64",
            "--real",
            str(tmp_path / "real.json"),
            "--workers",
            "0",
        ]
    )
    assert rc == 2
    assert "is not an ImageNet validation image" in capsys.readouterr().err


def test_vit_eval_other_head_scores_only_the_representation(tmp_path, timm_weights):
    _, path = timm_weights  # a 4-class head; Pets here has 3 classes
    fakes._fake_pets(tmp_path / "release")
    _convert("pets", tmp_path / "release", tmp_path / "pets")
    rc = vit_eval.main(
        [
            str(path),
            "--model",
            "vit_ti16",
            "--data",
            str(tmp_path / "pets"),
            "--split",
            "test",
            "--resolution",
            "64",
            "--fewshot",
            "1",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    results = json.loads((tmp_path / "out" / "pets-test-64px.json").read_text())["results"]
    assert set(results) == {"samples", "fewshot_1"} and results["samples"] == 3
