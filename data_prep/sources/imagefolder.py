"""An image folder tree: `ROOT/CLASS/.../IMAGE`, or `ROOT/{train,val,test}/CLASS/.../IMAGE`.

Every entry whose name has an image extension is listed, even when it turns out to be a
directory, a broken link or not an image: those become rejections with a reason rather
than silently missing inputs. Symlinked folders are not followed (no cycles).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from data_prep.sources import register_source
from data_prep.sources.base import Listing, Source, read_file_bytes, require_input
from vitscale_common.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_FOLDERS = {"train", "val", "test"}


def _image_entries(folder: Path) -> list[str]:
    """Relative posix paths of image-named entries under `folder`, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for name in dirnames[:]:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                dirnames.remove(name)  # a folder named like an image: listed, later rejected
                found.append(here / name)
        found.extend(here / n for n in filenames if Path(n).suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(p.relative_to(folder).as_posix() for p in found)


@register_source("imagefolder")
class ImageFolderSource(Source):
    def list_items(self) -> Listing:
        root = require_input(self.cfg, "a folder with one sub-folder per class")
        if not root.is_dir():
            raise UserError(f"--input {root}: not a folder")
        top = sorted(p.name for p in root.iterdir() if p.is_dir())
        split_layout = bool(top) and set(top) <= SPLIT_FOLDERS
        split_roots = [(s, root / s) for s in top] if split_layout else [(None, root)]
        classes = sorted(
            {
                c.name
                for _, r in split_roots
                for c in r.iterdir()
                if c.is_dir() and Path(c.name).suffix.lower() not in IMAGE_EXTENSIONS
            }
        )
        if not classes:
            raise UserError(f"--input {root}: no class sub-folders found")
        class_index = {c: i for i, c in enumerate(classes)}
        paths, labels, splits = [], [], []
        for split, split_root in split_roots:
            for cls in classes:
                if not (split_root / cls).is_dir():
                    continue
                prefix = f"{split}/{cls}" if split else cls
                for rel in _image_entries(split_root / cls):
                    paths.append(f"{prefix}/{rel}")
                    labels.append(class_index[cls])
                    splits.append(split)
        columns = {"source_id": pa.array(paths, pa.string()), "label": pa.array(labels, pa.int32())}
        if split_layout:
            columns["split"] = pa.array(splits, pa.string())
        return Listing(pa.table(columns), [(c, c) for c in classes], "single")

    def read(self, item: dict) -> bytes:
        return read_file_bytes(Path(self.cfg.input) / item["source_id"])
