"""The `shard` stage: a dataset -> label maps -> Parquet shards per split (`seglab shard`).

The dataset is a COCO root (instances rasterised by `seglab.data.coco`) or images + label maps
(`seglab.data.labelmaps`); both give one task per image, and everything after is shared.
Images are decoded and label maps made in a process pool; the one writer (`seglab.data.shards`)
writes the parts and manifests into an atomic folder, so a failed or killed run leaves the
previous shards as they were. A lock on `<out>.lock` keeps a second run from cleaning up the
first one's temporary folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import io
import json
import logging
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from seglab.atomic import atomic_dir, write_text_atomic
from seglab.config import SPLIT_NAME, LabelMapLayout, ShardConfig
from seglab.data.classes import IGNORE_INDEX, ClassSet
from seglab.data.coco import CocoSplit, DataError, ImageTask, LabelRules, encode_png, load_split
from seglab.data.labelmaps import (
    LabelMapRules, LabelMapSplit, LabelMapTask, labelmap_classes, load_labelmap_split,
)
from seglab.data.shards import shard_metadata, write_shards

log = logging.getLogger(__name__)


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
    task: ImageTask | LabelMapTask, class_set: ClassSet, rules: LabelRules | LabelMapRules, settings: ShardConfig,
    source: str,
) -> tuple[str, dict | str | tuple[str, str]]:
    """One image record -> ("row", row) | ("filtered", why) | ("error", (rule, message)). Runs in workers."""
    try:
        image, label = task.image_and_label(class_set, rules)
    except DataError as e:
        return "error", (e.rule, str(e))
    orig_height, orig_width = label.shape
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
        "orig_height": orig_height,
        "orig_width": orig_width,
        "image": _encode_jpeg(image, settings.jpeg_quality),
        "label": encode_png(label),
        "class_pixels": [int(c) for c in counts[: class_set.num_classes]],
        "ignore_pixels": int(counts[IGNORE_INDEX]),
    }


def _process_star(args):
    return process_image(*args)


def _process_chunk(chunk: list[tuple]) -> list[tuple]:
    return [process_image(*args) for args in chunk]


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent_pid: int) -> None:
    """Pool initializer: the worker is killed when the process that started it dies, even by
    kill -9 (which runs no cleanup), instead of decoding on for nobody."""
    if sys.platform.startswith("linux"):
        # Sent when the forking *thread* ends: the pool lives inside build_shards, in that thread.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


# Chunks handed to the pool beyond the one being written, per worker: enough to keep every worker
# busy, few enough that finished rows never pile up (Executor.map would submit every chunk at once,
# and a slow chunk would let the rest of the split's payloads collect behind it).
_CHUNKS_AHEAD_PER_WORKER = 2


def _results(tasks: list[tuple], workers: int) -> Iterator[tuple]:
    """process_image over `tasks`, in input order (so shard contents never depend on scheduling),
    with at most `workers * _CHUNKS_AHEAD_PER_WORKER` chunks submitted and not yet consumed."""
    if workers == 1 or len(tasks) < 2:
        yield from map(_process_star, tasks)
        return
    size = max(1, min(16, len(tasks) // (4 * workers)))
    chunks = (tasks[i:i + size] for i in range(0, len(tasks), size))
    window: deque = deque()
    with ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        try:
            for chunk in chunks:
                window.append(pool.submit(_process_chunk, chunk))
                if len(window) > workers * _CHUNKS_AHEAD_PER_WORKER:
                    yield from window.popleft().result()
            while window:
                yield from window.popleft().result()
        finally:
            for future in window:  # the consumer stopped early (an error): drop the queued chunks
                future.cancel()


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


def _load_split(root: Path, split: str, where: str | LabelMapLayout, class_set: str | list[str] | ClassSet,
                rules: LabelRules | LabelMapRules, on_bad_record: str) -> CocoSplit | LabelMapSplit:
    """One split's tasks. The rules say the format: COCO's instance rules, or a label-map value map."""
    if isinstance(rules, LabelMapRules):
        if not (isinstance(where, LabelMapLayout) and isinstance(class_set, ClassSet)):
            raise TypeError(f"label-map rules need a LabelMapLayout per split and a ClassSet, got {where!r} and "
                            f"{class_set!r}")
        return load_labelmap_split(root, split, where, class_set, on_bad_record)
    if not isinstance(where, str) or isinstance(class_set, ClassSet):
        raise TypeError(f"COCO rules need an image folder per split and a class set spec, got {where!r} and "
                        f"{class_set!r}")
    return load_split(root, split, where, class_set, on_bad_record)


def build_shards(
    root: str | Path,
    out_dir: str | Path,
    *,
    splits: Mapping[str, str | LabelMapLayout],
    class_set: str | list[str] | ClassSet = "voc20",
    rules: LabelRules | LabelMapRules = LabelRules(),
    settings: ShardConfig | None = None,
    on_bad_record: str = "error",
    report_path: str | Path | None = None,
    details_path: str | Path | None = None,
) -> dict:
    """A dataset -> `<out_dir>/<split>/part-*.parquet`; returns a report and optionally writes it:
    what runs compare to `report_path` (a DVC metric), per-class counts and skipped records to
    `details_path`. `settings` (size, payload per part, JPEG quality, workers) defaults to
    params.yaml's `shard` block.

    COCO (`rules`: LabelRules): `splits` maps each split to its image folder, `class_set` is a class
    set spec (all80, voc20, a list of category names). Images + label maps (`rules`: LabelMapRules,
    with the ClassSet from `seglab.data.labelmaps.labelmap_classes`): `splits` maps each split to a
    LabelMapLayout."""
    settings = settings if settings is not None else ShardConfig()
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
        for split, where in splits.items():
            loaded = _load_split(root, split, where, class_set, rules, on_bad_record)  # raises DataError
            report["class_set"], report["classes"] = loaded.class_set.name, list(loaded.class_set.classes)
            skipped: Counter = Counter(loaded.skipped)
            skipped_records += loaded.skipped_records
            filtered = 0
            pixels = np.zeros(loaded.class_set.num_classes, np.int64)

            def rows() -> Iterator[dict]:
                nonlocal filtered
                args = [(t, loaded.class_set, rules, settings, source) for t in loaded.tasks]
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

            files = write_shards(rows(), tmp / split, shard_metadata(loaded.class_set, split, rules),
                                 settings.max_shard_mb)
            written = sum(f["rows"] for f in files)
            if not written:  # every image filtered or skipped: keep the previous shards
                raise DataError(f"{loaded.location}: split '{split}' has no image left to write ({filtered} below "
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
                "class_pixels": {c: int(p) for c, p in zip(loaded.class_set.classes, pixels)},
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
    if d.format == "labelmaps":
        class_set, rules = labelmap_classes(d.labelmaps, d.min_train_area)
    else:
        class_set, rules = d.class_set, LabelRules(crowd=d.crowd, overlap=d.overlap, min_train_area=d.min_train_area)
    return build_shards(
        d.root,
        s.out,
        splits=d.splits,
        class_set=class_set,
        rules=rules,
        settings=s,
        on_bad_record=d.on_bad_record,
        report_path=Path("data/reports/shard.json"),
        details_path=Path("data/reports/shard_details.json"),
    )


# ---- reading ---------------------------------------------------------------------------------
