"""A table of image paths and labels: parquet, CSV or JSONL (JFT-style, any number of labels).

Columns (names set by flags): `--image-column` path of the image (relative paths are
relative to the table's folder); `--label-column` one label, or `--labels-column` a list
of labels (a list column, or in CSV a string split on ',', '|' or spaces); optional
`--split-column`. Labels are class indices (ints) or class names (strings); the class
list comes from `--class-list` (one name per line, in index order) or is the sorted set
of names found (or 0..max for indices). Rows keep the table's order.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from data_prep.sources import register_source
from data_prep.sources.base import UNREADABLE, Listing, Rejected, Source, read_file_bytes, require_input
from vitscale_common.errors import UserError

_LABEL_SEPARATORS = re.compile(r"[,|\s]+")


def read_any_table(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path)
        if suffix in (".jsonl", ".json", ".ndjson"):
            import pyarrow.json as pjson

            return pjson.read_json(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"--input {path}: cannot read as {suffix[1:]}: {str(e).splitlines()[0]}") from None
    raise UserError(f"--input {path}: unknown table type {suffix!r} (use .parquet, .csv or .jsonl)")


def _as_label_lists(values: list) -> list[list]:
    out = []
    for v in values:
        if v is None:
            out.append([])
        elif isinstance(v, str):
            out.append([s for s in _LABEL_SEPARATORS.split(v.strip()) if s])
        elif isinstance(v, (list, tuple)):
            out.append([x for x in v if x is not None])
        else:
            out.append([v])
    return out


@register_source("table")
class TableSource(Source):
    def _column(self, table: pa.Table, name: str, flag: str) -> list:
        if name not in table.column_names:
            raise UserError(
                f"--input {self.cfg.input}: no column {name!r} ({flag}); columns are {', '.join(table.column_names)}"
            )
        return table.column(name).to_pylist()

    def _classes(self, names: set) -> list[str]:
        if self.cfg.class_list:
            path = Path(self.cfg.class_list)
            if not path.is_file():
                raise UserError(f"--class-list {path}: not found")
            return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if all(isinstance(n, int) or (isinstance(n, str) and n.isdigit()) for n in names):
            return [str(i) for i in range(max((int(n) for n in names), default=-1) + 1)]
        return sorted(str(n) for n in names)

    def list_items(self) -> Listing:
        path = require_input(self.cfg, "a parquet, CSV or JSONL table")
        table = read_any_table(path)
        images = self._column(table, self.cfg.image_column, "--image-column")
        multi = self.cfg.labels_column is not None
        if multi:
            raw = _as_label_lists(self._column(table, self.cfg.labels_column, "--labels-column"))
        elif self.cfg.label_column:
            raw = [[v] for v in self._column(table, self.cfg.label_column, "--label-column")]
        else:
            raise UserError("table source needs --label-column or --labels-column")
        classes = self._classes({v for labels in raw for v in labels})
        by_name = {c: i for i, c in enumerate(classes)}
        numeric = all(c == str(i) for i, c in enumerate(classes))
        label_lists = []
        for row, labels in enumerate(raw):
            idx = []
            for v in labels:
                key = str(v)
                if key not in by_name and not (numeric and key.isdigit()):
                    raise UserError(f"--input {path}: row {row}: label {v!r} is not a known class")
                i = by_name.get(key, int(key) if key.isdigit() else -1)
                if not 0 <= i < len(classes):
                    raise UserError(f"--input {path}: row {row}: label {v!r} outside 0..{len(classes) - 1}")
                idx.append(i)
            if not multi and len(idx) != 1:
                raise UserError(f"--input {path}: row {row}: missing label")
            label_lists.append(idx)
        columns = {"source_id": pa.array([str(p) if p is not None else "" for p in images], pa.string())}
        if multi:
            columns["labels"] = pa.array(label_lists, pa.list_(pa.int32()))
        else:
            columns["label"] = pa.array([labels[0] for labels in label_lists], pa.int32())
        if self.cfg.split_column:
            splits = self._column(table, self.cfg.split_column, "--split-column")
            if any(s is None for s in splits):
                raise UserError(f"--input {path}: empty value in split column {self.cfg.split_column!r}")
            columns["split"] = pc.utf8_lower(pa.array([str(s) for s in splits], pa.string()))
        return Listing(pa.table(columns), [(c, c) for c in classes], "multi" if multi else "single")

    def read(self, item: dict) -> bytes:
        if not item["source_id"]:
            raise Rejected(UNREADABLE, "empty image path")
        path = Path(item["source_id"])
        if not path.is_absolute():
            path = Path(self.cfg.input).parent / path
        return read_file_bytes(path)
