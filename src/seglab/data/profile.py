"""The shards as one row per image, for the `validate_data` suite (`seglab.data.suite`).

`shard_profile` keeps the shard columns except the payloads and adds `DERIVED_COLUMNS`, derived
from each file's schema and metadata and by decoding each image and label (sizes, formats, label
statistics). A payload that does not decode is described in `decode_error`, never raised.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from seglab.data.classes import IGNORE_INDEX
from seglab.data.shards import SHARD_SCHEMA, open_shard

__all__ = ["DERIVED_COLUMNS", "PAYLOAD_COLUMNS", "PROFILE_COLUMNS", "SHARD_COLUMNS", "shard_profile"]

PAYLOAD_COLUMNS = ("image", "label")
SHARD_COLUMNS = tuple(f.name for f in SHARD_SCHEMA if f.name not in PAYLOAD_COLUMNS)
DERIVED_COLUMNS = (
    "shard_file",            # path of the Parquet file relative to the shard folder
    "shard_split",           # the split folder the file lies in
    "shard_row",             # row index inside the file
    "schema_mismatch",       # how the file's schema differs from SHARD_SCHEMA; null when it matches
    "num_classes",           # len(seglab.classes) of the file; null when the metadata is missing
    "classes_digest",        # sha1 (12 hex) of the file's class list; null when missing
    "image_format",          # PIL format of the image payload ("JPEG")
    "image_height",
    "image_width",
    "label_format",          # PIL format of the label payload ("PNG")
    "label_height",
    "label_width",
    "invalid_label_pixels",  # pixels neither < num_classes nor 255
    "labelled_pixels",       # pixels of a class > 0 (valid, not 255)
    "class_pixels_length",   # len(class_pixels), to compare with num_classes
    "label_stats_match",     # class_pixels and ignore_pixels equal the label's histogram
    "image_sha1",            # hash of the JPEG bytes, to find duplicated images
    "decode_error",          # why a payload could not be decoded; null when both decode
)
PROFILE_COLUMNS = SHARD_COLUMNS + DERIVED_COLUMNS


def _schema_mismatch(schema: pa.Schema) -> str | None:
    expected = {f.name: f.type for f in SHARD_SCHEMA}
    actual = {f.name: f.type for f in schema}
    problems = []
    missing = [n for n in expected if n not in actual]
    extra = [n for n in actual if n not in expected]
    if missing:
        problems.append(f"missing columns {missing}")
    if extra:
        problems.append(f"unexpected columns {extra}")
    for name in expected:
        if name in actual and actual[name] != expected[name]:
            problems.append(f"{name} is {actual[name]}, expected {expected[name]}")
    return "; ".join(problems) or None


def _file_classes(schema: pa.Schema) -> list[str] | None:
    raw = (schema.metadata or {}).get(b"seglab.classes")
    if raw is None:
        return None
    try:
        classes = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return classes if isinstance(classes, list) and classes else None


def _classes_digest(classes: list[str]) -> str:
    return hashlib.sha1(json.dumps(classes).encode()).hexdigest()[:12]


def _payload_columns(image: bytes | None, label: bytes | None, class_pixels: Any, ignore_pixels: Any,
                     num_classes: int | None, decode_images: bool) -> dict:
    """Derived per-row columns from the two payloads; a decoding failure becomes `decode_error`."""
    out: dict[str, Any] = dict.fromkeys(
        ("image_format", "image_height", "image_width", "label_format", "label_height", "label_width",
         "invalid_label_pixels", "labelled_pixels", "label_stats_match", "image_sha1", "decode_error"))
    errors = []
    if image is None:
        errors.append("image payload missing")
    else:
        out["image_sha1"] = hashlib.sha1(image).hexdigest()
        try:
            with Image.open(io.BytesIO(image)) as im:
                out["image_format"], (out["image_width"], out["image_height"]) = im.format, im.size
                if decode_images:
                    im.load()  # the header alone does not reveal a truncated file
        except Exception as e:  # PIL raises several types for corrupt data
            errors.append(f"image: {type(e).__name__}: {e}")
    if label is None:
        errors.append("label payload missing")
    else:
        try:
            with Image.open(io.BytesIO(label)) as lm:
                out["label_format"] = lm.format
                values = np.asarray(lm)
            if values.ndim != 2 or values.dtype.kind not in "ui":
                raise ValueError(f"expected a single-channel integer class map, got shape {values.shape} "
                                 f"dtype {values.dtype}")
            out["label_height"], out["label_width"] = values.shape
            histogram = np.bincount(values.ravel(), minlength=IGNORE_INDEX + 1)
            if num_classes is not None:
                valid = histogram[:num_classes].sum() + (histogram[IGNORE_INDEX] if num_classes <= IGNORE_INDEX else 0)
                out["invalid_label_pixels"] = int(values.size - valid)
                out["labelled_pixels"] = int(histogram[1:min(num_classes, IGNORE_INDEX)].sum())
                if class_pixels is not None and ignore_pixels is not None:
                    out["label_stats_match"] = bool(
                        len(class_pixels) == num_classes
                        and np.array_equal(np.asarray(class_pixels, np.int64), histogram[:num_classes])
                        and int(ignore_pixels) == int(histogram[IGNORE_INDEX]))
        except Exception as e:
            errors.append(f"label: {type(e).__name__}: {e}")
    out["decode_error"] = "; ".join(errors) or None
    return out


def _profile_file(path: Path, shard_dir: Path, split: str, decode_images: bool) -> tuple[list[dict], list[str]]:
    try:
        parquet = open_shard(path)
        schema = parquet.schema_arrow
        classes = _file_classes(schema)
        num_classes = len(classes) if classes is not None else None
        per_file = {
            "shard_file": path.relative_to(shard_dir).as_posix(),
            "shard_split": split,
            "schema_mismatch": _schema_mismatch(schema),
            "num_classes": num_classes,
            "classes_digest": _classes_digest(classes) if classes is not None else None,
        }
        plain = [n for n in schema.names if n not in PAYLOAD_COLUMNS]
        rows: list[dict] = []
        # A row group at a time keeps memory flat on big shards.
        for batch in parquet.iter_batches(batch_size=64, columns=schema.names):
            columns = batch.to_pydict()
            for i in range(batch.num_rows):
                row = {name: columns[name][i] for name in plain}
                row.update(per_file, shard_row=len(rows))
                class_pixels = row.get("class_pixels")
                row["class_pixels_length"] = len(class_pixels) if class_pixels is not None else None
                row.update(_payload_columns(
                    columns["image"][i] if "image" in columns else None,
                    columns["label"][i] if "label" in columns else None,
                    class_pixels, row.get("ignore_pixels"), num_classes, decode_images))
                rows.append(row)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return rows, plain


def shard_profile(shard_dir: str | Path, splits: Iterable[str], *, decode_images: bool = True) -> pd.DataFrame:
    """One row per image of `splits` under `shard_dir`: the shard columns except the payloads plus
    `DERIVED_COLUMNS`. A split folder without shards contributes no rows (the suite reports it);
    a missing `shard_dir` or an unreadable Parquet file raises, naming the path."""
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise FileNotFoundError(f"{shard_dir}: shard folder not found; run `dvc repro shard` first")
    rows: list[dict] = []
    columns: dict[str, None] = dict.fromkeys(SHARD_COLUMNS)  # ordered set
    seen_columns: set[str] = set()
    files = 0
    for split in splits:
        for path in sorted((shard_dir / split).glob("part-*.parquet")):
            file_rows, file_columns = _profile_file(path, shard_dir, split, decode_images)
            rows += file_rows
            seen_columns.update(file_columns)
            columns.update(dict.fromkeys(file_columns))
            files += 1
    if files:
        # Columns no file has are left out, so the schema expectation reports them missing.
        columns = {c: None for c in columns if c in seen_columns}
    return pd.DataFrame(rows, columns=[*columns, *DERIVED_COLUMNS])
