"""Parquet mask shards: the schema, atomic writes, reads, decoding and resume keys.

One row per (image, prompt), as DESIGN.md fixes it:

=============  ========  ==============================================================
column         type      meaning
=============  ========  ==============================================================
image_id       string    stable id: the path relative to the input folder (COCO: the
                         annotation's ``file_name``)
uri            string    where the image was read from (absolute path)
width, height  int32     original image size; the masks have this size (null on error
                         when the file could not be decoded)
prompt         string    the text prompt / COCO category word; null for saliency-only
roi_mask       binary    8-bit grayscale PNG, white = ROI (null on error)
saliency       binary    8-bit grayscale PNG saliency map (null on error or when off)
mask_source    string    what made ``roi_mask``: "clip", "coco" or "saliency"
error          string    null when fine, else why the row has no masks
=============  ========  ==============================================================

(``image_id``, ``prompt``) is the row key: a job skips keys already present, so
re-running it adds nothing. Shards are written to a hidden temporary name and renamed
into place, so a reader or a resumed job never sees a half-written shard. Each shard's
Parquet metadata records the run that wrote it (``roicodec.*`` keys).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.masks.ops import from_png

SHARD_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("prompt", pa.string()),
    pa.field("roi_mask", pa.binary()),
    pa.field("saliency", pa.binary()),
    pa.field("mask_source", pa.string(), nullable=False),
    pa.field("error", pa.string()),
])

Key = tuple[str, str | None]


def shard_files(path: str | Path) -> list[Path]:
    """The committed shard files under a directory (sorted; temporary files excluded)."""
    root = Path(path)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("*.parquet") if not p.name.startswith("."))


def shard_name(run_id: str, index: int) -> str:
    """File name of the ``index``-th shard of a run: unique per run, sortable."""
    return f"part-{run_id}-{index:05d}.parquet"


def write_shard(rows: pa.Table | Iterable[Mapping[str, Any]], path: str | Path,
                metadata: Mapping[str, str] | None = None) -> Path:
    """Write rows (a table or dicts with the schema's columns) as one shard, atomically."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows), schema=SHARD_SCHEMA)
    table = table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
    if metadata:
        table = table.replace_schema_metadata({f"roicodec.{k}": str(v) for k, v in metadata.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def read_shards(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All rows of the shards under ``path`` (a directory or one file), in the shard schema."""
    p = Path(path)
    files = [p] if p.is_file() else shard_files(p)
    schema = SHARD_SCHEMA if columns is None else pa.schema([SHARD_SCHEMA.field(c) for c in columns])
    if not files:
        return schema.empty_table()
    tables = [pq.read_table(f, columns=columns).cast(schema) for f in files]
    return pa.concat_tables(tables).replace_schema_metadata(None)


def existing_keys(path: str | Path) -> set[Key]:
    """The (image_id, prompt) keys already written under ``path`` (error rows included)."""
    table = read_shards(path, columns=["image_id", "prompt"])
    return set(zip(table.column("image_id").to_pylist(), table.column("prompt").to_pylist()))


def decode_masks(row: Mapping[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A row's (roi_mask, saliency) as float32 HxW arrays in [0, 1] (None where null)."""
    roi, sal = row.get("roi_mask"), row.get("saliency")
    return (None if roi is None else from_png(roi)), (None if sal is None else from_png(sal))
