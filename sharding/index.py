"""Parquet schemas of the dataset index, and deterministic reading/writing of its tables.

Three kinds of table:
- per-sample (`index/{split}-NNNNNN.parquet`, one file per shard, so a reader loads only
  the shards it reads: at JFT scale the whole index is tens of GB);
- per-shard (`index/shards.parquet`);
- rejected inputs (`rejected.parquet`) and exclusions (`exclusions/*.parquet`).
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vitscale_common.atomic import atomic_write_bytes

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("slot", pa.int32(), nullable=False),  # position in the shard's planned range
        pa.field("sample_offset", pa.int64(), nullable=False),  # first header of the sample
        pa.field("sample_size", pa.int64(), nullable=False),  # through the last member's padding
        pa.field("jpg_offset", pa.int64(), nullable=False),  # data offsets, not header offsets
        pa.field("jpg_size", pa.int64(), nullable=False),
        pa.field("label_offset", pa.int64(), nullable=False),  # KEY.cls or KEY.labels.json
        pa.field("label_size", pa.int64(), nullable=False),
        pa.field("json_offset", pa.int64(), nullable=False),
        pa.field("json_size", pa.int64(), nullable=False),
        pa.field("label", pa.int32()),  # single-label datasets
        pa.field("labels", pa.list_(pa.int32())),  # multi-label datasets
        pa.field("sha256", pa.string(), nullable=False),  # of the JPEG bytes
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)

SHARD_SCHEMA = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),  # relative to the dataset folder
        pa.field("num_samples", pa.int64(), nullable=False),
        pa.field("num_bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),  # of the whole tar file
        pa.field("num_inputs", pa.int64(), nullable=False),  # planned inputs: samples + rejected
        pa.field("num_rejected", pa.int64(), nullable=False),
    ]
)

REJECTED_SCHEMA = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("slot", pa.int32(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ]
)

EXCLUSION_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)


def table_from_rows(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialise a table; the same table always gives the same bytes (no timestamps)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=True)
    return buf.getvalue()


def write_table(path: str | Path, table: pa.Table) -> None:
    atomic_write_bytes(path, parquet_bytes(table))


def read_table(path: str | Path, schema: pa.Schema | None = None) -> pa.Table:
    table = pq.read_table(path)
    if schema is not None:
        missing = [n for n in schema.names if n not in table.column_names]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        table = table.select(schema.names).cast(schema)
    return table


def concat(paths: list[Path], schema: pa.Schema) -> pa.Table:
    if not paths:
        return schema.empty_table()
    return pa.concat_tables([read_table(p, schema) for p in paths])
