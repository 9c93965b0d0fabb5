"""Loader throughput: our shard stream against three baselines on the same JPEG bytes.

    python benchmarks/loader_speed.py [--images 1500] [--size 224] [--batch 32] [--runs 5]
        [--device cuda] [--json results.json]
    python benchmarks/loader_speed.py --make-shards DIR [--images 4096]   (shards for the GPU suite)

Builds a folder of real-photo JPEGs (640 x 512, the converter's default 512 px shorter side
with pass-through), converts it with `vit-prep convert --source imagefolder`, then measures
the training input (Inception crop, flip, normalise, batch) for:
  bare         our transform (transforms.train_image: libjpeg-turbo decode, torch's antialiased
               crop-resize, flip) + normalise in a plain loop over the JPEG bytes, 1 process
  PIL          the same loop with PIL's decode, crop-resize and flip
  ours cpu     pretrain.data.loaders.build_train_loader (1 reader; 1 and 2 decoder workers),
               uint8 batches normalised by its DeviceInput in this process, as the trainer does
  ours gpu     data.decode=gpu: the readers' side (read, verify, plan the crop, pack the JPEGs);
               with --device cuda also end to end, decoded, cropped and normalised on the GPU
  webdataset   a stock webdataset pipeline over the same shards (decode("pil"), torchvision
               RandomResizedCrop(scale=(0.05, 1)) + flip + ToTensor + Normalize, 2 workers)
  imagefolder  torchvision ImageFolder + DataLoader over the same JPEGs as files, 2 workers
Each path runs --runs times with fresh workers, timed from its second batch to 3/4 of an
epoch (no worker start-up, no epoch restart); the table gives the medians of images per wall
second and per CPU second of all the processes involved (the loader's and this one, where
the normalisation runs), and the ratios compare medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
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


def children_cpu_seconds() -> float:
    """CPU time of this process's live child processes (loader workers, readers, decoders), from /proc."""
    total, me, tick = 0.0, os.getpid(), os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def cpu_seconds() -> float:
    """CPU time of this process plus its live children."""
    return time.process_time() + children_cpu_seconds()


@dataclasses.dataclass
class Rate:
    """Images per wall second, and per CPU second (robust when other jobs share the cores)."""

    wall: float
    cpu: float
    cpu_range: tuple[float, float] = (0.0, 0.0)  # lowest and highest per-CPU-second rate of the runs

    @classmethod
    def of(cls, images: int, wall_s: float, cpu_s: float) -> "Rate":
        return cls(images / wall_s, images / cpu_s)


def median_rate(runs: list[Rate]) -> Rate:
    cpu = [r.cpu for r in runs]
    return Rate(statistics.median(r.wall for r in runs), statistics.median(cpu), (min(cpu), max(cpu)))


def normalise(pixels: np.ndarray) -> np.ndarray:
    return (pixels.astype(np.float32) / 255.0 - 0.5) / 0.5


def bare_loop(jpegs: list[bytes], size: int) -> Rate:
    """Our training transform and normalisation in a plain loop: the loader's work without the loader."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i, data in enumerate(jpegs):
        pixels = T.train_image(data, size, np.random.default_rng(i), min_area=0.05, hflip=True, randaug=None)
        normalise(pixels)
    return Rate.of(len(jpegs), time.perf_counter() - t0, time.process_time() - c0)


def pil_loop(jpegs: list[bytes], size: int) -> Rate:
    """The same with PIL's decode, crop-resize and flip instead of libjpeg-turbo's and torch's."""
    rng = np.random.default_rng(0)
    t0, c0 = time.perf_counter(), time.process_time()
    for data in jpegs:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        left, top, w, h = T.inception_crop_box(*img.size, rng, 0.05)
        img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        normalise(np.asarray(img))
    return Rate.of(len(jpegs), time.perf_counter() - t0, time.process_time() - c0)


def timed(batches, images: int, consume=lambda batch: len(batch[0]), done=lambda: None) -> Rate:
    """From the second batch to 3/4 of an epoch: no worker start-up, no epoch restart.

    `consume` makes of a batch what a trainer would take and says how many images it held;
    `done` waits for work still queued on a device.
    """
    it = iter(batches)
    consume(next(it))
    done()
    n, t0, c0 = 0, time.perf_counter(), cpu_seconds()
    for batch in it:
        n += consume(batch)
        if n >= 0.75 * images:
            break
    done()
    return Rate.of(n, time.perf_counter() - t0, cpu_seconds() - c0)


def ours(dataset: Path, workers: int, size: int, batch: int, images: int, decode: str = "cpu",
         device: str | None = None) -> Rate:  # fmt: skip
    """Our loader; with `device`, each batch goes through its DeviceInput there (normalised, decoded for gpu)."""
    cfg = DataConfig(path=str(dataset), workers=workers, readers=1, shuffle_buffer=256, stream_cycle=2,
                     decode=decode)  # fmt: skip
    loader = build_train_loader(cfg, img_size=size, global_batch=batch, rank=0, world_size=1, seed=0)
    if device is None:  # the host side alone: what the GPU path asks of the CPU before the decode
        return timed(loader, images, consume=lambda b: len(b.targets))
    dev = torch.device(device)

    def consume(b) -> int:
        images, _ = loader.device_input(b, dev)
        return len(images)

    wait = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    return timed(loader, images, consume=consume, done=wait)


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


def make_dataset(tmp: Path, images: int) -> list[tuple[str, bytes, int]]:
    """Photos -> shards in tmp/shards; the shards' JPEG bytes also as files in tmp/files (for ImageFolder)."""
    make_images(tmp / "photos", images)
    convert(tmp / "photos", tmp / "shards")
    samples = shard_jpegs(tmp / "shards")
    for key, data, label in samples:
        path = tmp / "files" / f"class{label}" / f"{key}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return samples


def measure(tmp: Path, samples, size: int, batch: int, runs: int, device: str | None) -> dict[str, Rate]:
    n, shards = len(samples), tmp / "shards"
    paths = {
        "bare loop (1 process)": lambda: bare_loop([d for _, d, _ in samples], size),
        "PIL loop (1 process)": lambda: pil_loop([d for _, d, _ in samples], size),
        "ours cpu, 1 worker": lambda: ours(shards, 1, size, batch, n, device="cpu"),
        "ours cpu, 2 workers": lambda: ours(shards, 2, size, batch, n, device="cpu"),
        "ours gpu, readers' side": lambda: ours(shards, 1, size, batch, n, decode="gpu"),
        "webdataset, 2 workers": lambda: stock_webdataset(shards, 2, size, batch, n),
        "ImageFolder, 2 workers": lambda: image_folder(tmp / "files", 2, size, batch, n),
    }
    if device and device.startswith("cuda"):
        paths[f"ours gpu, decoded on {device}"] = lambda: ours(shards, 1, size, batch, n, "gpu", device)
    results: dict[str, list[Rate]] = {name: [] for name in paths}
    for _ in range(runs):  # interleaved, so a burst of load elsewhere hits every path alike
        for name, run in paths.items():
            results[name].append(run())
    return {name: median_rate(r) for name, r in results.items()}


PAIRS = [("ours cpu, 1 worker", "bare loop (1 process)", 0.9), ("ours cpu, 2 workers", "webdataset, 2 workers", 1.5),
         ("ours cpu, 2 workers", "ImageFolder, 2 workers", 1.2)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1500, help="images in the benchmark dataset")
    parser.add_argument("--size", type=int, default=224, help="output image size")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--runs", type=int, default=5, help="runs of each path; the table gives medians")
    parser.add_argument("--device", help="also decode the gpu path there end to end (cuda)")
    parser.add_argument("--json", type=Path, help="write the medians and ratios to this file")
    parser.add_argument("--make-shards", type=Path, metavar="DIR", help="only build the dataset in DIR and exit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.make_shards:
        samples = make_dataset(args.make_shards, args.images)
        print(f"{len(samples)} JPEGs of 640x512 in {args.make_shards / 'shards'}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        samples = make_dataset(Path(tmp), args.images)
        r = measure(Path(tmp), samples, args.size, args.batch, args.runs, args.device)
    n, s, b = len(samples), args.size, args.batch
    print(f"{n} JPEGs of 640x512 -> {s}x{s}, batch {b}, {os.cpu_count()} CPUs, median of {args.runs} runs "
          f"(shared machines: wall rates are noisy)")  # fmt: skip
    print(f"  {'':<30} {'images/s':>9} {'images/CPU-s':>13} {'(range)':>15}")
    for name, v in r.items():
        print(f"  {name:<30} {v.wall:9.1f} {v.cpu:13.1f} {v.cpu_range[0]:7.1f}-{v.cpu_range[1]:.1f}")
    ratios = {}
    for ours_name, base, target in PAIRS:
        wall, cpu = r[ours_name].wall / r[base].wall, r[ours_name].cpu / r[base].cpu
        ratios[f"{ours_name} / {base}"] = {"wall": round(wall, 3), "cpu": round(cpu, 3), "target": target}
        print(f"ratio {ours_name} / {base}: {wall:.2f} wall, {cpu:.2f} per CPU-second (target >= {target})")
    if args.json:
        rows = {name: {"images_per_s": round(v.wall, 1), "images_per_cpu_s": round(v.cpu, 1)} for name, v in r.items()}
        args.json.write_text(json.dumps({"images": n, "size": s, "batch": b, "runs": args.runs,
                                         "cpus": os.cpu_count(), "paths": rows, "ratios": ratios}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
