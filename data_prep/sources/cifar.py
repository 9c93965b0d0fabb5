"""CIFAR-10 / CIFAR-100 archives: the binary release or the python release.

Input: the downloaded `.tar.gz` or its extracted folder. The binary release is read as
fixed-size records (label byte(s) + 3072 pixel bytes). The python release is pickled;
it is read through an unpickler that accepts only plain containers and numpy arrays, so
a tampered archive cannot run code. Each record becomes a lossless 32x32 PNG that the
image policy then encodes. Splits (train/test) come from the archive.
"""

from __future__ import annotations

import functools
import io
import pickle
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
from PIL import Image

from data_prep.sources import register_source
from data_prep.sources.base import Listing, Source, require_input
from vitscale_common.errors import UserError

RECORD_PIXELS = 3072
# (names of the train files, test file, label bytes before the pixels)
BINARY_LAYOUTS = {
    "cifar10": ([f"data_batch_{i}.bin" for i in range(1, 6)], "test_batch.bin", 1),
    "cifar100": (["train.bin"], "test.bin", 2),
}
PYTHON_LAYOUTS = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], "test_batch"),
    "cifar100": (["train"], "test"),
}
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class RestrictedUnpickler(pickle.Unpickler):
    """Plain containers and numpy arrays only: any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 3 protocol-2 pickles spell bytes
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def safe_unpickle(data: bytes, what: str):
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise UserError(f"{what}: not a plain CIFAR pickle ({e})") from None


class _Files:
    """Member files of the release, from a folder or straight out of the .tar.gz."""

    def __init__(self, root: Path):
        self.root = root
        self.names: dict[str, str] = {}  # basename -> member path or file path
        if root.is_dir():
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    self.names.setdefault(p.name, str(p))
        else:
            try:
                with tarfile.open(root, "r:*") as tar:
                    for m in tar.getmembers():
                        if m.isfile():
                            self.names.setdefault(PurePosixPath(m.name).name, m.name)
            except tarfile.TarError as e:
                raise UserError(f"--input {root}: not a CIFAR folder or tar archive: {e}") from None

    def has(self, name: str) -> bool:
        return name in self.names

    def read(self, name: str) -> bytes:
        if self.root.is_dir():
            return Path(self.names[name]).read_bytes()
        with tarfile.open(self.root, "r:*") as tar:
            return tar.extractfile(self.names[name]).read()


@functools.lru_cache(maxsize=8)
def _load(root: str, layout: str, name: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (N, 3072) uint8, labels (N,)) of one release file, cached per process."""
    files = _Files(Path(root))
    data = files.read(name)
    if layout == "binary":
        head = 2 if "cifar100" in label_key else 1
        width = head + RECORD_PIXELS
        if len(data) % width:
            raise UserError(f"{root}: {name} is not a whole number of {width}-byte records")
        records = np.frombuffer(data, np.uint8).reshape(-1, width)
        label_col = 1 if label_key == "cifar100:fine" else 0
        return records[:, head:], records[:, label_col].astype(np.int32)
    batch = safe_unpickle(data, f"{root}: {name}")
    if not isinstance(batch, dict) or b"data" not in batch:
        raise UserError(f"{root}: {name} has no data array")
    key = {"cifar10": b"labels", "cifar100:fine": b"fine_labels", "cifar100:coarse": b"coarse_labels"}[label_key]
    pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, RECORD_PIXELS)
    return pixels, np.asarray(batch[key], dtype=np.int32)


@register_source("cifar")
class CifarSource(Source):
    def _detect(self) -> tuple[str, str, list[str], str]:
        root = require_input(self.cfg, "a CIFAR-10/100 archive or its folder")
        files = _Files(root)
        for variant, (train, test, _) in BINARY_LAYOUTS.items():
            if all(files.has(n) for n in train + [test]):
                return variant, "binary", train, test
        for variant, (train, test) in PYTHON_LAYOUTS.items():
            if all(files.has(n) for n in train + [test]):
                return variant, "python", train, test
        raise UserError(f"--input {root}: no CIFAR-10/100 binary or python batch files found")

    def _label_key(self, variant: str) -> str:
        if variant == "cifar10":
            return "cifar10"
        if self.cfg.cifar_labels not in ("fine", "coarse"):
            raise UserError(f"--cifar-labels must be fine or coarse, got {self.cfg.cifar_labels!r}")
        return f"cifar100:{self.cfg.cifar_labels}"

    def _class_names(self, variant: str, layout: str, n: int) -> list[str]:
        files = _Files(Path(self.cfg.input))
        if variant == "cifar10":
            return CIFAR10_NAMES
        fine = self.cfg.cifar_labels == "fine"
        if layout == "binary":
            name = "fine_label_names.txt" if fine else "coarse_label_names.txt"
            if files.has(name):
                return [s for s in files.read(name).decode().split() if s]
        elif files.has("meta"):
            meta = safe_unpickle(files.read("meta"), f"{self.cfg.input}: meta")
            key = b"fine_label_names" if fine else b"coarse_label_names"
            if isinstance(meta, dict) and key in meta:
                return [v.decode() if isinstance(v, bytes) else str(v) for v in meta[key]]
        return [str(i) for i in range(n)]

    def list_items(self) -> Listing:
        variant, layout, train, test = self._detect()
        label_key = self._label_key(variant)
        ids, labels, splits, files, records = [], [], [], [], []
        for split, names in (("train", train), ("test", [test])):
            for name in names:
                _, y = _load(self.cfg.input, layout, name, label_key)
                ids.extend(f"{name}/{i:05d}" for i in range(len(y)))
                labels.extend(y.tolist())
                splits.extend([split] * len(y))
                files.extend([name] * len(y))
                records.extend(range(len(y)))
        num_classes = max(labels) + 1
        names = self._class_names(variant, layout, num_classes)
        table = pa.table(
            {
                "source_id": pa.array(ids, pa.string()),
                "label": pa.array(labels, pa.int32()),
                "split": pa.array(splits, pa.string()),
                "file": pa.array(files, pa.string()),
                "record": pa.array(records, pa.int32()),
                "layout": pa.array([layout] * len(ids), pa.string()),
            }
        )
        return Listing(table, [(n, n) for n in names], "single")

    def read(self, item: dict) -> bytes:
        variant = "cifar10" if item["file"].startswith(("data_batch", "test_batch")) else "cifar100"
        pixels, _ = _load(self.cfg.input, item["layout"], item["file"], self._label_key(variant))
        img = Image.fromarray(pixels[item["record"]].reshape(3, 32, 32).transpose(1, 2, 0), "RGB")
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue()

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "labels": self.cfg.cifar_labels}
