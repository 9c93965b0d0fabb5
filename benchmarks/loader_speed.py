"""Loader throughput: our shard stream against three baselines on the same JPEG bytes.

    python benchmarks/loader_speed.py [--images 600] [--size 224] [--batch 32]

Builds a folder of real-photo JPEGs (640 x 512, the converter's default 512 px shorter side
with pass-through), converts it with `vit-prep convert --source imagefolder`, then measures
images/s of the training transform (Inception crop, flip, normalise, batch) for:
  bare        decode + crop + resize + flip in a plain loop over the shards' JPEG bytes in memory
  ours        pretrain.data.loaders.build_train_loader with 1 and 2 loader workers
  webdataset  a stock webdataset pipeline over the same shards (decode("pil"), torchvision
              RandomResizedCrop(scale=(0.05, 1)) + flip + ToTensor + Normalize, 2 workers)
  imagefolder torchvision ImageFolder + DataLoader over the same JPEGs as files, 2 workers
Ratios print last. Each run starts its workers fresh; it is timed from its second batch to
3/4 of an epoch, so neither worker start-up nor an epoch restart is counted.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pretrain.data import transforms as T
from pretrain.data.loaders import DataConfig, build_train_loader
from sharding import open_dataset
from sharding.tar_reader import iter_samples

CLASSES = 8


def make_images(folder: Path, count: int) -> None:
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = Image.fromarray(photos[i % len(photos)])
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        img = photo.crop((x, y, x + cw, y + ch)).resize((640, 512), Image.BICUBIC)
        out = folder / f"class{i % CLASSES}" / f"img{i:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out, "JPEG", quality=90)


def convert(images: Path, dataset: Path) -> None:
    cmd = [sys.executable, "-m", "data_prep.cli", "convert", "--source", "imagefolder", "--input", str(images),
           "--output", str(dataset), "--samples-per-shard", "50", "--splits", "train=1.0", "--workers", "2"]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def shard_jpegs(dataset: Path) -> list[tuple[str, bytes, int]]:
    ds = open_dataset(dataset)
    out = []
    for shard in ds.shards("train"):
        with open(shard.path, "rb") as f:
            out += [(s.key, s.members["jpg"], int(s.members["cls"])) for s in iter_samples(f)]
    return out


def cpu_seconds() -> float:
    """CPU time of this process plus its live children (the loader workers), from /proc."""
    total = time.process_time()
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


class Rate:
    """Images per wall second, and per CPU second (robust when other jobs share the cores)."""

    def __init__(self, images: int, wall: float, cpu: float):
        self.wall, self.cpu = images / wall, images / cpu


def bare_loop(jpegs: list[bytes], size: int) -> Rate:
    rng = np.random.default_rng(0)
    t0, c0 = time.perf_counter(), time.process_time()
    for data in jpegs:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        left, top, w, h = T.inception_crop_box(*img.size, rng, 0.05)
        img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        np.asarray(img)
    return Rate(len(jpegs), time.perf_counter() - t0, time.process_time() - c0)


def timed(batches, images: int) -> Rate:
    """From the second batch to 3/4 of an epoch: no worker start-up, no epoch restart."""
    it = iter(batches)
    next(it)
    n, t0, c0 = 0, time.perf_counter(), cpu_seconds()
    for batch in it:
        n += len(batch[0])
        if n >= 0.75 * images:
            break
    return Rate(n, time.perf_counter() - t0, cpu_seconds() - c0)


def ours(dataset: Path, workers: int, size: int, batch: int, images: int) -> Rate:
    cfg = DataConfig(path=str(dataset), workers=workers, shuffle_buffer=256, stream_cycle=2)
    loader = build_train_loader(cfg, img_size=size, global_batch=batch, rank=0, world_size=1, seed=0)
    return timed(loader, images)


def _torchvision_train(size: int):
    import torchvision.transforms as tv

    return tv.Compose([
        tv.RandomResizedCrop(size, scale=(0.05, 1.0)), tv.RandomHorizontalFlip(), tv.ToTensor(),
        tv.Normalize([0.5] * 3, [0.5] * 3),
    ])  # fmt: skip


def stock_webdataset(dataset: Path, workers: int, size: int, batch: int, images: int) -> Rate:
    import webdataset as wds

    urls = [s.path for s in open_dataset(dataset).shards("train")]
    pipeline = (
        wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.single_node_only, empty_check=False)
        .shuffle(256).decode("pil").to_tuple("jpg", "cls").map_tuple(_torchvision_train(size), lambda c: c)
        .batched(batch)
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers)
    return timed(loader, images)


def image_folder(folder: Path, workers: int, size: int, batch: int, images: int) -> Rate:
    import torchvision

    data = torchvision.datasets.ImageFolder(str(folder), transform=_torchvision_train(size))
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    return timed(loader, images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600, help="images in the benchmark dataset")
    parser.add_argument("--size", type=int, default=224, help="output image size")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "photos", args.images)
        convert(tmp / "photos", tmp / "shards")
        samples = shard_jpegs(tmp / "shards")
        # ImageFolder reads the very bytes the shards hold, as files.
        for key, data, label in samples:
            path = tmp / "files" / f"class{label}" / f"{key}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        n, s, b = len(samples), args.size, args.batch
        r = {}
        r["bare loop (1 process)"] = bare_loop([d for _, d, _ in samples], s)
        r["ours, 1 worker"] = ours(tmp / "shards", 1, s, b, n)
        r["ours, 2 workers"] = ours(tmp / "shards", 2, s, b, n)
        r["webdataset, 2 workers"] = stock_webdataset(tmp / "shards", 2, s, b, n)
        r["ImageFolder, 2 workers"] = image_folder(tmp / "files", 2, s, b, n)
    print(f"{n} JPEGs of 640x512 -> {s}x{s}, batch {b}, {os.cpu_count()} CPUs (shared machines: wall rates are noisy)")
    print(f"  {'':<24} {'images/s':>9} {'images/CPU-s':>13}")
    for name, v in r.items():
        print(f"  {name:<24} {v.wall:9.1f} {v.cpu:13.1f}")
    pairs = [("ours, 1 worker", "bare loop (1 process)", 0.9), ("ours, 2 workers", "webdataset, 2 workers", 1.2),
             ("ours, 2 workers", "ImageFolder, 2 workers", 1.2)]  # fmt: skip
    for ours_name, base, target in pairs:
        wall, cpu = r[ours_name].wall / r[base].wall, r[ours_name].cpu / r[base].cpu
        print(f"ratio {ours_name} / {base}: {wall:.2f} wall, {cpu:.2f} per CPU-second (target >= {target})")


if __name__ == "__main__":
    main()
