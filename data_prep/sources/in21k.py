"""The ImageNet-21k release: one tar of per-synset tars (fall11 / winter21), never extracted.

Listing indexes the archive once: for every image, the byte offset and size of its data
inside the outer file (inner member offset + offset of the inner tar). Reading an image
is then one seek and one read, in any order the plan asks for. Also accepted: a folder
of the per-synset tars (the outer tar already unpacked). Synset ids become classes;
`--words` (`synset<TAB>name` lines, as in ImageNet's words.txt) fills in their names.
Member names that are absolute or contain `..` are listed and rejected, never used.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

import pyarrow as pa

from data_prep.sources import register_source
from data_prep.sources.base import UNREADABLE, UNSAFE_NAME, Listing, Rejected, Source, require_input
from vitscale_common.errors import UserError


def unsafe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return p.is_absolute() or ".." in p.parts or "\\" in name


def _read_words(path: str | None) -> dict[str, str]:
    if not path:
        return {}
    words = {}
    try:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                synset, _, name = line.partition("\t")
                words[synset.strip()] = name.strip()
    except OSError as e:
        raise UserError(f"--words {path}: {e.strerror or e}") from None
    return words


class _Rows:
    def __init__(self):
        self.source_id, self.synset, self.file, self.offset, self.size, self.problem = [], [], [], [], [], []

    def add(self, source_id, synset, file, offset, size, problem=""):
        for col, v in zip(
            (self.source_id, self.synset, self.file, self.offset, self.size, self.problem),
            (source_id, synset, file, offset, size, problem),
        ):
            col.append(v)


def _index_inner(rows: _Rows, fileobj, base: int, synset: str, file: str, label: str) -> None:
    """List one synset tar's images; `base` is where its bytes start in `file`."""
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as inner:
            for m in inner:
                if m.isdir():
                    continue
                sid = f"{synset}/{m.name}"
                if unsafe_name(m.name):
                    rows.add(sid, synset, file, 0, 0, f"{UNSAFE_NAME}:member name {m.name!r}")
                elif not m.isfile():
                    rows.add(sid, synset, file, 0, 0, f"{UNREADABLE}:{m.name} is a link or device, not a file")
                else:
                    rows.add(sid, synset, file, base + m.offset_data, m.size)
    except tarfile.TarError as e:
        rows.add(f"{synset}/", synset, file, 0, 0, f"{UNREADABLE}:{label} is not a readable tar: {e}")


@register_source("in21k")
class ImageNet21kSource(Source):
    samples_per_shard_hint = 10000

    def __init__(self, cfg):
        super().__init__(cfg)
        self._handles: dict[str, object] = {}

    def __getstate__(self):
        return {"cfg": self.cfg, "_handles": {}}  # file handles stay in their process

    def list_items(self) -> Listing:
        root = require_input(self.cfg, "the fall11/winter21 tar, or a folder of per-synset tars")
        rows = _Rows()
        if root.is_dir():
            for path in sorted(root.glob("*.tar")):
                with open(path, "rb") as f:
                    _index_inner(rows, f, 0, path.stem, str(path), path.name)
        else:
            try:
                outer = tarfile.open(root, mode="r:")
            except tarfile.TarError as e:
                raise UserError(f"--input {root}: not an uncompressed tar: {e}") from None
            with outer:
                members = sorted((m for m in outer if m.isfile()), key=lambda m: m.name)
                for m in members:
                    synset = PurePosixPath(m.name).name.removesuffix(".tar")
                    if unsafe_name(m.name) or not m.name.endswith(".tar"):
                        reason = UNSAFE_NAME if unsafe_name(m.name) else UNREADABLE
                        rows.add(m.name, synset, str(root), 0, 0, f"{reason}:outer member {m.name!r}")
                        continue
                    _index_inner(rows, outer.extractfile(m), m.offset_data, synset, str(root), m.name)
        synsets = sorted({s for s, p in zip(rows.synset, rows.problem) if not p.startswith(UNSAFE_NAME)})
        if not synsets:
            raise UserError(f"--input {root}: no per-synset tars found")
        words = _read_words(self.cfg.words)
        class_index = {s: i for i, s in enumerate(synsets)}
        table = pa.table(
            {
                "source_id": pa.array(rows.source_id, pa.string()),
                "label": pa.array([class_index.get(s, -1) for s in rows.synset], pa.int32()),
                "file": pa.array(rows.file, pa.string()),
                "offset": pa.array(rows.offset, pa.int64()),
                "size": pa.array(rows.size, pa.int64()),
                "problem": pa.array(rows.problem, pa.string()),
            }
        )
        table = table.sort_by([("source_id", "ascending")])
        return Listing(table, [(s, words.get(s, s)) for s in synsets], "single")

    def read(self, item: dict) -> bytes:
        if item["problem"]:
            reason, _, detail = item["problem"].partition(":")
            raise Rejected(reason, detail)
        f = self._handles.get(item["file"])
        if f is None:
            try:
                f = self._handles[item["file"]] = open(item["file"], "rb")
            except OSError as e:
                raise Rejected(UNREADABLE, f"{item['file']}: {e.strerror or e}") from None
        f.seek(item["offset"])
        data = f.read(item["size"])
        if len(data) != item["size"]:
            raise Rejected(UNREADABLE, f"{item['file']}: ends inside {item['source_id']}")
        return data
