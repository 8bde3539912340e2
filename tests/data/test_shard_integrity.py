"""Shards that prove their integrity (issue 13): manifests, page checksums, named payload errors,
one writer at a time, pool workers that die with their parent."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from seglab.data.classes import ClassSet
from seglab.data.coco import DataError, LabelRules, encode_png
from seglab.data.shards import (
    MANIFEST_FILE,
    SHARD_SCHEMA,
    ShardIntegrityError,
    open_shard,
    read_split,
    shard_files,
    shard_metadata,
    summarize_splits,
    write_shards,
)
from seglab.config import ShardConfig
from seglab.data.shard_stage import build_shards
from seglab.data.stats import pixel_counts
from seglab.data.validate import validate_shards
from seglab.digest import sha256_file

SPLITS = {"train": "train2017", "val": "val2017"}
CLASSES = ["person", "car"]
ONE_IMAGE_PER_PART = ShardConfig(max_shard_mb=1e-6, workers=1)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def shards(tiny_coco, tmp_path) -> Path:
    """tiny_coco sharded one image per part: train 3 parts, val 2 (as coco-mini's val was)."""
    out = tmp_path / "shards"
    build_shards(tiny_coco.root, out, splits=SPLITS, class_set=CLASSES, settings=ONE_IMAGE_PER_PART)
    return out


def _readers(shard_dir: Path, split: str) -> dict:
    """Every way a stage opens a split: listing, whole-split reads, footers summary, pixel counts
    (GAN label prior), the tf.data pipeline (train, evaluate), validate-data."""
    from seglab.data.pipeline import classes_of, make_dataset

    return {
        "shard_files": lambda: shard_files(shard_dir, split),
        "read_split": lambda: read_split(shard_dir, split),
        "summarize_splits": lambda: summarize_splits(shard_dir, [split]),
        "pixel_counts": lambda: pixel_counts(shard_dir, split),
        "classes_of": lambda: classes_of(shard_dir, split),
        "make_dataset": lambda: make_dataset(shard_dir, split, image_size=(16, 16)),
        "validate_shards": lambda: validate_shards(shard_dir, [split], shard_dir.parent / "report", min_side=1,
                                                   max_side=1000, max_unlabelled_share=1.0),
    }


def _refused_everywhere(shard_dir: Path, split: str, match: str) -> None:
    for name, read in _readers(shard_dir, split).items():
        with pytest.raises(ShardIntegrityError, match=match):
            read()
            pytest.fail(f"{name} read a split that does not match its manifest")


def test_the_writer_records_rows_sizes_and_checksums(shards, tmp_path):
    for split, parts in (("train", 3), ("val", 2)):
        manifest = json.loads((shards / split / MANIFEST_FILE).read_text())
        assert [e["file"] for e in manifest["files"]] == [f"part-{i:05d}.parquet" for i in range(parts)]
        for entry in manifest["files"]:
            path = shards / split / entry["file"]
            assert entry["rows"] == pq.ParquetFile(path).metadata.num_rows == 1
            assert entry["bytes"] == path.stat().st_size and entry["sha256"] == sha256_file(path)
        assert manifest["rows"] == parts
    # Every writer goes through ShardWriter: a synthetic-style schema with an extra column gets one too.
    import pyarrow as pa

    schema = SHARD_SCHEMA.append(pa.field("generator", pa.string()))
    table = read_split(shards, "train")
    rows = [{**r, "generator": "g"} for r in table.to_pylist()]
    files = write_shards(rows, tmp_path / "synthetic" / "train", table.schema.metadata, schema=schema)
    manifest = json.loads((tmp_path / "synthetic" / "train" / MANIFEST_FILE).read_text())
    assert manifest["files"] == files and manifest["rows"] == 3
    assert [p.name for p in shard_files(tmp_path / "synthetic", "train")] == ["part-00000.parquet"]


def _flip_inside_first_jpeg(path: Path) -> None:
    jpeg = pq.read_table(path, columns=["image"]).column("image")[0].as_py()
    data = bytearray(path.read_bytes())
    offset = bytes(data).find(jpeg)
    assert offset > 0
    data[offset + len(jpeg) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_missing_extra_or_changed_part_is_refused_by_every_reader(shards):
    val = shards / "val"
    kept = (val / "part-00001.parquet").read_bytes()
    (val / "part-00001.parquet").unlink()
    _refused_everywhere(shards, "val", r"split 'val' of .*: part-00001.parquet is missing \(1 rows\)")

    (val / "part-00001.parquet").write_bytes(kept)
    shutil.copy(val / "part-00001.parquet", val / "part-00007.parquet")
    _refused_everywhere(shards, "val", r"split 'val' .*part-00007.parquet is not in the manifest")

    (val / "part-00007.parquet").unlink()
    _flip_inside_first_jpeg(val / "part-00000.parquet")
    _refused_everywhere(shards, "val", r"split 'val' .*part-00000.parquet changed since it was written")
    assert len(shard_files(shards, "train")) == 3  # the other split is intact


def test_parquet_page_checksums_are_written_and_verified(shards):
    path = shards / "val" / "part-00000.parquet"
    _flip_inside_first_jpeg(path)
    pq.read_table(path)  # without verification the flipped payload reads as data...
    with pytest.raises(OSError, match="(?i)checksum"):
        open_shard(path).read()  # ...with it, the page's CRC no longer matches


def test_shards_without_a_manifest_ask_for_a_rebuild(shards):
    (shards / "train" / MANIFEST_FILE).unlink()
    with pytest.raises(ShardIntegrityError, match=r"split 'train' .*no manifest.json .*`dvc repro shard`"):
        shard_files(shards, "train")
    (shards / "val" / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ShardIntegrityError, match=r"val/manifest.json: unreadable shard manifest"):
        shard_files(shards, "val")
    with pytest.raises(ShardIntegrityError, match=r"validate-data: split 'train'.*\n.*val/manifest.json"):
        validate_shards(shards, ["train", "val"], shards.parent / "report", min_side=1, max_side=1000,
                        max_unlabelled_share=1.0)


# ---- payloads written corrupt: the manifest vouches for the file, the row is still bad ----------

def _corrupt_png_rows(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """One split per kind of bad label PNG, each row 1 of its file; the manifests match."""
    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, (16, 16), dtype=np.uint8)
    good = encode_png(label)
    idat = good.index(b"IDAT")
    flipped = bytearray(good)
    flipped[idat + 8] ^= 0xFF  # inside the compressed data: the chunk CRC fails
    recrc = bytearray(flipped)  # the same damage with a matching CRC: the data no longer inflates
    length = int.from_bytes(good[idat - 4:idat], "big")
    recrc[idat + 4 + length:idat + 8 + length] = zlib.crc32(bytes(recrc[idat:idat + 4 + length])).to_bytes(4, "big")
    bad = {"flipped": bytes(flipped), "recrc": bytes(recrc), "cut": good[:len(good) // 2]}

    class_set = ClassSet("custom", ("background", "cat"), (0, 1))
    image = np.asarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG")
    counts = np.bincount(label.ravel(), minlength=256)

    def row(image_id: int, png: bytes) -> dict:
        return {"image_id": image_id, "file_name": f"{image_id}.jpg", "split": "train", "source": "t",
                "height": 16, "width": 16, "orig_height": 16, "orig_width": 16, "image": buf.getvalue(),
                "label": png, "class_pixels": [int(c) for c in counts[:2]], "ignore_pixels": 0}

    root = tmp_path / "corrupt"
    for kind, png in bad.items():
        write_shards([row(1, good), row(42, png)], root / kind / "train",
                     shard_metadata(class_set, "train", LabelRules()))
    return root, bad


def test_a_label_png_written_corrupt_names_file_and_row_in_training(tmp_path):
    import tensorflow as tf

    from seglab.data.pipeline import make_dataset

    root, bad = _corrupt_png_rows(tmp_path)
    for kind, png in bad.items():
        with pytest.raises(tf.errors.InvalidArgumentError):
            tf.io.decode_png(png)  # what TF says on its own, naming nothing
        dataset = make_dataset(root / kind, "train", image_size=(16, 16), training=True, batch_size=1, seed=0)
        with pytest.raises(tf.errors.OpError,
                           match=rf"{kind}/train/part-00000.parquet row 1 \(image_id 42\): label PNG is corrupt"):
            for _ in dataset:
                pass


def test_valid_payloads_pass_the_payload_checks():
    from seglab.data.payloads import jpeg_problem, png_problem

    rng = np.random.default_rng(1)
    for shape in ((1, 1), (7, 13), (240, 320)):
        assert png_problem(encode_png(rng.integers(0, 21, shape, dtype=np.uint8))) is None
        image = Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8))
        for mode in ("RGB", "L", "CMYK"):
            for options in ({}, {"progressive": True}, {"quality": 50, "optimize": True}):
                buf = io.BytesIO()
                image.convert(mode).save(buf, format="JPEG", **options)
                assert jpeg_problem(buf.getvalue()) is None, (mode, options)
    assert "truncated" in jpeg_problem(buf.getvalue()[:-100])
    assert jpeg_problem(b"not a jpeg") == "not a JPEG"
    assert png_problem(buf.getvalue()) == "not a PNG"


def test_each_corrupt_label_png_gets_a_reason(tmp_path):
    from seglab.data.payloads import png_problem

    _, bad = _corrupt_png_rows(tmp_path)
    reasons = {kind: png_problem(png) for kind, png in bad.items()}
    assert "checksum" in reasons["flipped"]  # the chunk CRC
    assert "broken data stream" in reasons["recrc"]  # a matching CRC, data that does not inflate
    assert "Truncated" in reasons["cut"]


# ---- concurrent runs and killed parents ---------------------------------------------------------

_SLOW_SHARD = """
import os, sys, time
from pathlib import Path
import seglab.data.shard_stage as shards
from seglab.config import ShardConfig
real = shards.process_image
def slow(*a, **k):
    Path(sys.argv[3], str(os.getpid())).touch()
    time.sleep(float(sys.argv[4]))
    return real(*a, **k)
shards.process_image = slow
shards.build_shards(sys.argv[1], sys.argv[2], splits={"train": "train2017", "val": "val2017"},
                    class_set=["person", "car"], settings=ShardConfig(workers=int(sys.argv[5])))
"""


def _start_slow_shard(root: Path, out: Path, pids: Path, sleep: float, workers: int) -> subprocess.Popen:
    pids.mkdir()
    return subprocess.Popen([sys.executable, "-c", _SLOW_SHARD, str(root), str(out), str(pids), str(sleep),
                             str(workers)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_second_shard_run_is_refused_while_one_writes(tiny_coco, tmp_path):
    out = tmp_path / "shards"
    build_shards(tiny_coco.root, out, splits=SPLITS, class_set=CLASSES)
    before = _files(out)
    first = _start_slow_shard(tiny_coco.root, out, tmp_path / "pids", sleep=0.5, workers=1)
    try:
        _wait_for(lambda: any((tmp_path / "pids").iterdir()), 60, "the first run to start")
        live = [p for p in tmp_path.iterdir() if p.name.startswith(".shards.") and p.name.endswith(".tmp")]
        assert len(live) == 1
        with pytest.raises(DataError, match=rf"another seglab shard is writing {out}"):
            build_shards(tiny_coco.root, out, splits=SPLITS, class_set=CLASSES)
        assert live[0].is_dir(), "the refused run deleted the first run's live temporary folder"
        assert _files(out) == before
    finally:
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert _files(out) == before  # same inputs, same shards
    build_shards(tiny_coco.root, out, splits=SPLITS, class_set=CLASSES)  # the lock is free again


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its entry waits to be reaped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and PR_SET_PDEATHSIG")
def test_pool_workers_die_with_a_parent_killed_by_sigkill(tiny_coco, tmp_path):
    pids = tmp_path / "pids"
    parent = _start_slow_shard(tiny_coco.root, tmp_path / "shards", pids, sleep=120, workers=2)
    workers: list[int] = []
    try:
        _wait_for(lambda: len(list(pids.iterdir())) >= 2, 60, "two pool workers to start")
        workers = [int(p.name) for p in pids.iterdir()]
        assert parent.pid not in workers
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        _wait_for(lambda: not any(_alive(pid) for pid in workers), 10, f"workers {workers} to exit")
    finally:
        for pid in workers:  # only on failure: don't leave them sleeping
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
        parent.communicate()
