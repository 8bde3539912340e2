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

import contextlib
import ctypes
import fcntl
import hashlib
import io
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from seglab.atomic import atomic_dir, write_text_atomic
from seglab.config import SPLIT_NAME
from seglab.data.classes import IGNORE_INDEX, ClassSet
from seglab.data.coco import DataError, ImageTask, LabelRules, decode_image, encode_png, label_map, load_split
from seglab.data.manifest import (  # noqa: F401 (shard_files and friends are part of this module's API)
    MANIFEST_FILE, ShardIntegrityError, manifest_entry, open_shard, shard_files, write_manifest, write_manifest_entries,
)

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


@dataclass(frozen=True)
class ShardSettings:
    max_side: int = 320
    max_shard_mb: float = 16.0
    jpeg_quality: int = 95
    workers: int = 2


def _resize(image: np.ndarray, label: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = label.shape
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return image, label
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL wants (W, H)
    image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))  # area average
    label = np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST))  # never mixes classes
    return image, label


def _encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def process_image(
    task: ImageTask, class_set: ClassSet, rules: LabelRules, settings: ShardSettings, source: str
) -> tuple[str, dict | str | tuple[str, str]]:
    """One image record -> ("row", row) | ("filtered", why) | ("error", (rule, message)). Runs in workers."""
    try:
        image = decode_image(task.path, (task.height, task.width), task.record)
        label = label_map(task.annotations, task.height, task.width, class_set, rules)
    except DataError as e:
        return "error", (e.rule, str(e))
    if task.split == "train" and rules.min_train_area > 0:
        labelled = int(np.count_nonzero((label > 0) & (label != IGNORE_INDEX)))
        if labelled < rules.min_train_area:
            return "filtered", f"{task.record}: {labelled} labelled px < min_train_area {rules.min_train_area}"
    image, label = _resize(image, label, settings.max_side)
    counts = np.bincount(label.ravel(), minlength=256)
    return "row", {
        "image_id": task.image_id,
        "file_name": task.file_name,
        "split": task.split,
        "source": source,
        "height": int(label.shape[0]),
        "width": int(label.shape[1]),
        "orig_height": task.height,
        "orig_width": task.width,
        "image": _encode_jpeg(image, settings.jpeg_quality),
        "label": encode_png(label),
        "class_pixels": [int(c) for c in counts[: class_set.num_classes]],
        "ignore_pixels": int(counts[IGNORE_INDEX]),
    }


def _process_star(args):
    return process_image(*args)


def shard_metadata(class_set: ClassSet, split: str, rules: LabelRules, extra: dict | None = None) -> dict[bytes, bytes]:
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
    row groups of 64 rows (what readers stream), with page checksums. After each part the folder's
    `manifest.json` is rewritten to list every part so far (rows, bytes, sha256), so the folder
    always describes itself. `write_shards` wraps this in an atomic folder.
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
        write_manifest_entries(self.out_dir, self.files)
        self._rows, self._size = [], 0


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
        writer.end_part()
    return writer.files


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent_pid: int) -> None:
    """Pool initializer: the worker is killed when the process that started it dies, even by
    kill -9 (which runs no cleanup), instead of decoding on for nobody."""
    if sys.platform.startswith("linux"):
        # Sent when the forking *thread* ends: the pool lives inside build_shards, in that thread.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _results(tasks: list[tuple], workers: int) -> Iterator[tuple]:
    if workers == 1 or len(tasks) < 2:
        yield from map(_process_star, tasks)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        # map keeps input order, so shard contents do not depend on scheduling.
        yield from pool.map(_process_star, tasks, chunksize=max(1, min(16, len(tasks) // (4 * workers))))


@contextlib.contextmanager
def _sole_writer(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<out_dir>.lock` while writing `out_dir`: a second run would take
    the first's temporary folder for a killed run's debris and delete it (`atomic_dir`)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = out_dir.parent / f"{out_dir.name}.lock"
    with open(lock, "a") as handle:  # the kernel drops the lock when its holder dies
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another seglab shard is writing {out_dir} (it holds {lock}); wait for it to "
                            "finish, then run again", "concurrent run") from None
        yield


def build_shards(
    root: str | Path,
    out_dir: str | Path,
    *,
    splits: dict[str, str],
    class_set: str | list[str] = "voc20",
    rules: LabelRules = LabelRules(),
    settings: ShardSettings = ShardSettings(),
    on_bad_record: str = "error",
    report_path: str | Path | None = None,
    details_path: str | Path | None = None,
) -> dict:
    """COCO root -> `<out_dir>/<split>/part-*.parquet`; returns a report and optionally writes it:
    what runs compare to `report_path` (a DVC metric), per-class counts and skipped records to
    `details_path`."""
    root, out_dir = Path(root), Path(out_dir)
    source = root.resolve().name
    workers = settings.workers or os.cpu_count() or 1
    report: dict = {"source": source, "class_set": None, "classes": None, "splits": {}}
    skipped_records: list[str] = []
    started = time.perf_counter()
    total_images = 0
    for split in splits:
        if not SPLIT_NAME.fullmatch(split):  # params are validated too; build_shards is also called directly
            raise DataError(f"split name {split!r} may use only letters, digits, '_' and '-' (it becomes a folder "
                            f"under {out_dir})", "bad split name")
    with _sole_writer(out_dir), atomic_dir(out_dir) as tmp:
        for split, folder in splits.items():
            coco = load_split(root, split, folder, class_set, on_bad_record)  # raises DataError
            report["class_set"], report["classes"] = coco.class_set.name, list(coco.class_set.classes)
            skipped: Counter = Counter(coco.skipped)
            skipped_records += coco.skipped_records
            filtered = 0
            pixels = np.zeros(coco.class_set.num_classes, np.int64)

            def rows() -> Iterator[dict]:
                nonlocal filtered
                args = [(t, coco.class_set, rules, settings, source) for t in coco.tasks]
                for kind, value in _results(args, workers):
                    if kind == "row":
                        pixels[:] += value["class_pixels"]
                        yield value
                    elif kind == "filtered":
                        filtered += 1
                    elif on_bad_record == "error":
                        rule, message = value
                        raise DataError(f"{message} [rule: {rule}] (data.on_bad_record: skip skips such records)", rule)
                    else:
                        rule, message = value
                        skipped[rule] += 1
                        skipped_records.append(message)

            files = write_shards(rows(), tmp / split, shard_metadata(coco.class_set, split, rules), settings.max_shard_mb)
            written = sum(f["rows"] for f in files)
            if not written:  # every image filtered or skipped: keep the previous shards
                raise DataError(f"{coco.annotation_file}: split '{split}' has no image left to write ({filtered} below "
                                f"min_train_area, {sum(skipped.values())} skipped); refusing to write an empty split",
                                "empty split")
            total_images += written + filtered + sum(skipped.values())
            report["splits"][split] = {
                "images": written,
                "shards": len(files),
                "filtered_min_area": filtered,
                "skipped": sum(skipped.values()),
                "skipped_by_rule": dict(sorted(skipped.items())),
                # Of the pixels with a class (ignore excluded), the share that is not background.
                "labelled_pixel_share": round(float(pixels[1:].sum() / max(int(pixels.sum()), 1)), 4),
                "class_pixels": {c: int(p) for c, p in zip(coco.class_set.classes, pixels)},
            }
    elapsed = time.perf_counter() - started
    log.info("sharded %d images from %s in %.1fs (%.1f images/s, %d workers)", total_images, root, elapsed,
             total_images / max(elapsed, 1e-9), workers)
    report["skipped_records"] = skipped_records
    metrics, details = split_report(report)
    if report_path is not None:
        write_text_atomic(report_path, json.dumps(metrics, indent=2) + "\n")
    if details_path is not None:
        write_text_atomic(details_path, json.dumps(details, indent=2) + "\n")
    return report


# Per class or per record: too wide for `dvc metrics show`, so these go to the details file.
_DETAIL_KEYS = ("classes", "skipped_records")
_SPLIT_DETAIL_KEYS = ("class_pixels",)


def split_report(report: dict) -> tuple[dict, dict]:
    """A shard report as (metrics: what runs compare, details: per-class counts and skipped records)."""
    metrics = {k: v for k, v in report.items() if k not in (*_DETAIL_KEYS, "splits")}
    metrics["num_classes"] = len(report["classes"] or [])
    metrics["splits"] = {split: {k: v for k, v in values.items() if k not in _SPLIT_DETAIL_KEYS}
                         for split, values in report["splits"].items()}
    details = {k: report.get(k) for k in _DETAIL_KEYS}
    details["splits"] = {split: {k: values[k] for k in _SPLIT_DETAIL_KEYS}
                         for split, values in report["splits"].items()}
    return metrics, details


def run_shard(cfg) -> dict:
    """The `shard` stage: params.yaml -> data/shards + data/reports/shard.json (metrics) and
    data/reports/shard_details.json."""
    d, s = cfg.data, cfg.shard
    return build_shards(
        d.root,
        s.out,
        splits=d.splits,
        class_set=d.class_set,
        rules=LabelRules(crowd=d.crowd, overlap=d.overlap, min_train_area=d.min_train_area),
        settings=ShardSettings(max_side=s.max_side, max_shard_mb=s.max_shard_mb, jpeg_quality=s.jpeg_quality,
                               workers=s.workers),
        on_bad_record=d.on_bad_record,
        report_path=Path("data/reports/shard.json"),
        details_path=Path("data/reports/shard_details.json"),
    )


# ---- reading ---------------------------------------------------------------------------------

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
