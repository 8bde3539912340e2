"""Parquet shards: the versioned, self-describing form of a segmentation dataset.

One row per image (schema `SHARD_SCHEMA`); files `<out>/<split>/part-NNNNN.parquet`. Each file's
key-value metadata carries `seglab.classes` (JSON list of class names indexed by label value) and
the rules that produced the labels, so a model can never be evaluated against another mapping.
Shards are split at about `max_shard_mb` of encoded payload, written in parallel, atomically, and
byte-identical for identical inputs and params (so DVC's cache holds).

Each split folder also holds `manifest.json` (`MANIFEST_FILE`): every part's rows, size and
sha256, written by the one writer with the parts. Every reader gets a split's files through
`shard_files`, which checks them against it, so a missing, extra or changed file is an error
naming the split and the file, never a silently smaller or different dataset. Parquet page
checksums are written too and verified by `open_shard` / `read_split`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from seglab.atomic import atomic_dir
from seglab.data.classes import ClassSet
from seglab.data.coco import LabelRules
from seglab.data.manifest import (  # noqa: F401 (shard_files and friends are part of this module's API)
    MANIFEST_FILE, ShardIntegrityError, manifest_entry, open_shard, shard_files, write_manifest, write_manifest_entries,
)

if TYPE_CHECKING:  # readers of shards need not load the label-map reader
    from seglab.data.labelmaps import LabelMapRules

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
SHARD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("file_name", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),       # dataset name, or "synthetic:<generator>"
        pa.field("height", pa.int32(), nullable=False),        # stored size (after max_side resize)
        pa.field("width", pa.int32(), nullable=False),
        pa.field("orig_height", pa.int32(), nullable=False),   # size in the annotation file
        pa.field("orig_width", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),        # JPEG, RGB
        pa.field("label", pa.binary(), nullable=False),        # PNG, uint8: 0 background, 255 ignore
        pa.field("class_pixels", pa.list_(pa.int64()), nullable=False),  # pixels per label value 0..C-1
        pa.field("ignore_pixels", pa.int64(), nullable=False),
    ]
)
# Already-compressed payloads gain nothing from zstd; the rest of the columns do.
_COMPRESSION = {f.name: ("NONE" if f.name in ("image", "label") else "ZSTD") for f in SHARD_SCHEMA}
_ROW_GROUP_ROWS = 64  # readers stream a row group at a time


def shard_metadata(class_set: ClassSet, split: str, rules: LabelRules | LabelMapRules,
                   extra: dict | None = None) -> dict[bytes, bytes]:
    meta = {
        "seglab.schema_version": SCHEMA_VERSION,
        "seglab.classes": json.dumps(list(class_set.classes)),
        "seglab.class_set": class_set.name,
        "seglab.category_ids": json.dumps(list(class_set.category_ids)),
        "seglab.split": split,
        "seglab.label_rules": json.dumps(asdict(rules), sort_keys=True),
        **(extra or {}),
    }
    return {k.encode(): v.encode() for k, v in meta.items()}


class ShardWriter:
    """Rows -> `<out_dir>/part-NNNNN.parquet`, the one place that lays out a shard file.

    A part ends once about `max_shard_mb` of encoded payload is in it (or at `end_part`). `schema`
    is `SHARD_SCHEMA`, optionally followed by extra columns (synthetic shards add the generator);
    `metadata` must name the class list (`seglab.classes`), so no shard is ever written without it.
    Payloads are stored as they are (already compressed), the other columns zstd-compressed, in
    row groups of 64 rows (what readers stream), with page checksums. `close` ends the last part
    and writes the folder's `manifest.json` once, listing every part (rows, bytes, sha256): writing
    is O(parts), and a folder without its manifest is one whose writer did not finish (readers
    refuse it). `write_shards` wraps this in an atomic folder.
    """

    def __init__(self, out_dir: str | Path, metadata: dict[bytes, bytes], *, schema: pa.Schema = SHARD_SCHEMA,
                 max_shard_mb: float = 16.0):
        _check_shard_schema(schema)
        _check_shard_metadata(metadata)
        self.out_dir = Path(out_dir)
        self.schema = schema.with_metadata(metadata)
        self.limit = max_shard_mb * 1024 * 1024
        self.files: list[dict] = []
        self._rows: list[dict] = []
        self._size = 0

    def add(self, row: dict) -> None:
        self._rows.append(row)
        self._size += len(row["image"]) + len(row["label"])
        if self._size >= self.limit:
            self.end_part()

    def end_part(self, metadata: dict[bytes, bytes] | None = None) -> None:
        """Write the rows added since the last part as the next part file (none if there are none);
        `metadata` replaces the writer's for this part only."""
        if not self._rows:
            return
        schema = self.schema
        if metadata is not None:
            _check_shard_metadata(metadata)
            schema = schema.with_metadata(metadata)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"part-{len(self.files):05d}.parquet"
        compression = {name: _COMPRESSION.get(name, "ZSTD") for name in schema.names}
        pq.write_table(pa.Table.from_pylist(self._rows, schema=schema), path, compression=compression,
                       row_group_size=_ROW_GROUP_ROWS, write_page_checksum=True)
        self.files.append(manifest_entry(path, len(self._rows)))
        self._rows, self._size = [], 0

    def close(self) -> list[dict]:
        """End the pending part and write the manifest listing every part (none when no part was
        written); returns the parts' entries."""
        self.end_part()
        if self.files:
            write_manifest_entries(self.out_dir, self.files)
        return self.files


def _check_shard_schema(schema: pa.Schema) -> None:
    head = [(f.name, f.type) for f in schema][:len(SHARD_SCHEMA)]
    if head != [(f.name, f.type) for f in SHARD_SCHEMA]:
        raise ValueError(f"a shard schema must start with SHARD_SCHEMA's columns {SHARD_SCHEMA.names}, "
                         f"got {schema.names}")


def _check_shard_metadata(metadata: dict[bytes, bytes]) -> None:
    if b"seglab.classes" not in metadata:
        raise ValueError("shard metadata lacks 'seglab.classes' (the class list, see shard_metadata)")


def write_shards(
    rows: Iterable[dict], out_dir: Path, metadata: dict[bytes, bytes], max_shard_mb: float = 16.0, *,
    schema: pa.Schema = SHARD_SCHEMA,
) -> list[dict]:
    """Write rows into `out_dir`/part-NNNNN.parquet files of about max_shard_mb each (`ShardWriter`),
    atomically: `out_dir` ends up with all of them or keeps what it held. Returns per-file info."""
    with atomic_dir(out_dir) as tmp:
        writer = ShardWriter(tmp, metadata, schema=schema, max_shard_mb=max_shard_mb)
        for row in rows:
            writer.add(row)
        writer.close()
    return writer.files


def read_classes(path: str | Path) -> list[str]:
    """Class names indexed by label value, from a shard file's metadata."""
    meta = pq.read_schema(path).metadata or {}
    if b"seglab.classes" not in meta:
        raise ValueError(f"{path}: not a seglab shard (no 'seglab.classes' in its metadata)")
    return json.loads(meta[b"seglab.classes"])


def read_split(shard_dir: str | Path, split: str, columns: list[str] | None = None) -> pa.Table:
    """All rows of a split (optionally only some columns); all files must share one class list."""
    files = shard_files(shard_dir, split)
    classes = read_classes(files[0])
    for f in files[1:]:
        if read_classes(f) != classes:
            raise ValueError(f"{f}: class list differs from {files[0]}; shards of one split must share it")
    return pa.concat_tables(pq.read_table(f, columns=columns, page_checksum_verification=True) for f in files)


@dataclass(frozen=True)
class SplitSummary:
    """What the shards of some splits hold, from the files' footers and `source` column (no payload read)."""

    classes: list[str]
    class_set: str | None  # the files' `seglab.class_set` names, joined with "+"
    dataset: str  # the rows' sources, joined with "+"
    rows: dict[str, int]  # per split
    fingerprint: str  # changes when a file of these splits is added, removed, resized or holds other rows


def summarize_splits(shard_dir: str | Path, splits: Iterable[str] = ("train", "val")) -> SplitSummary:
    """Summary of `splits` of `shard_dir`; every file of them must carry the same class list."""
    shard_dir, splits = Path(shard_dir), list(splits)
    classes: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    sources: set[str] = set()
    class_sets: set[str] = set()
    digest = hashlib.sha256()
    for split in splits:
        rows[split] = 0
        for path in shard_files(shard_dir, split):
            file_classes = read_classes(path)
            if classes.setdefault(split, file_classes) != file_classes:
                raise ValueError(f"{path}: class list differs from the split's first file; "
                                 "shards of one split must share it")
            parquet = open_shard(path)
            rows[split] += parquet.metadata.num_rows
            digest.update(f"{split}/{path.name}:{path.stat().st_size}:{parquet.metadata.num_rows};".encode())
            meta = parquet.schema_arrow.metadata or {}
            if b"seglab.class_set" in meta:
                class_sets.add(meta[b"seglab.class_set"].decode())
            sources.update(parquet.read(columns=["source"]).column("source").to_pylist())
    first = classes[splits[0]]
    for split in splits[1:]:
        if classes[split] != first:
            raise ValueError(f"{shard_dir}: split '{split}' has classes {classes[split]} but '{splits[0]}' has "
                             f"{first}; train and val must share one class list (rebuild the shards)")
    return SplitSummary(first, "+".join(sorted(class_sets)) or None, "+".join(sorted(sources)), rows,
                        digest.hexdigest())


def decode_label(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def decode_rgb(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as im:
        return np.asarray(im.convert("RGB"))
