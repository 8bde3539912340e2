"""Parquet shards: schema and metadata, bounded size, byte-identical reruns, atomic writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from seglab.atomic import atomic_dir, atomic_path
from seglab.data.coco import DataError
from seglab.data.shards import SHARD_SCHEMA, decode_label, decode_rgb, read_classes, read_split, shard_files
from seglab.config import ShardConfig
from seglab.data.shard_stage import build_shards

SPLITS = {"train": "train2017", "val": "val2017"}


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_schema_metadata_and_contents(tiny_coco, tmp_path):
    report = build_shards(tiny_coco.root, tmp_path / "s", splits=SPLITS, class_set=["person", "car"],
                          report_path=tmp_path / "r.json")
    f = shard_files(tmp_path / "s", "train")[0]
    schema = pq.read_schema(f)
    assert schema.remove_metadata().equals(SHARD_SCHEMA)
    assert read_classes(f) == ["background", "person", "car"]
    meta = schema.metadata
    assert meta[b"seglab.class_set"] == b"custom" and json.loads(meta[b"seglab.category_ids"]) == [0, 1, 3]
    assert json.loads(meta[b"seglab.label_rules"]) == {"crowd": "ignore", "min_train_area": 0, "overlap": "ignore"}
    table = read_split(tmp_path / "s", "train")
    assert table.column("image_id").to_pylist() == [100, 101, 102]
    row = table.slice(0, 1).to_pylist()[0]
    label = decode_label(row["label"])
    assert label.dtype == np.uint8 and label.shape == (40, 60) == decode_rgb(row["image"]).shape[:2]
    assert row["class_pixels"] == np.bincount(label.ravel(), minlength=3)[:3].tolist()
    assert row["class_pixels"][1] > 0 and row["class_pixels"][2] > 0
    assert json.loads((tmp_path / "r.json").read_text())["splits"]["val"]["images"] == 2 == report["splits"]["val"]["images"]


def test_longer_side_is_capped_with_nearest_labels(tiny_coco, tmp_path):
    build_shards(tiny_coco.root, tmp_path / "s", splits=SPLITS, class_set=["person", "car"],
                 settings=ShardConfig(max_side=30))
    row = read_split(tmp_path / "s", "val").slice(0, 1).to_pylist()[0]
    assert (row["height"], row["width"], row["orig_height"], row["orig_width"]) == (20, 30, 40, 60)
    label = decode_label(row["label"])
    assert label.shape == (20, 30) and set(np.unique(label)) <= {0, 1, 2}  # nearest: no blended values
    assert decode_rgb(row["image"]).shape == (20, 30, 3)


@pytest.mark.coco_mini
def test_coco_mini_shards_are_byte_identical_on_rerun_and_bounded_in_size(coco_mini, tmp_path):
    settings = ShardConfig(max_shard_mb=1.0, workers=2)
    build_shards(coco_mini, tmp_path / "a", splits=SPLITS, settings=settings)
    build_shards(coco_mini, tmp_path / "b", splits=SPLITS, settings=ShardConfig(max_shard_mb=1.0, workers=1))
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), "shards differ between runs/worker counts"
    parts = shard_files(tmp_path / "a", "train")
    assert len(parts) >= 4
    # Bounded: a shard closes as soon as its payload reaches the limit, so it exceeds it by < one image.
    for p in parts:
        payload = sum(len(x) for c in ("image", "label") for x in pq.read_table(p, columns=[c]).column(c).to_pylist())
        assert payload < 1.0 * 2**20 + 300_000, p


def test_a_failure_in_a_later_split_keeps_the_previous_output_intact(tiny_coco, tmp_path):
    out = tmp_path / "s"
    build_shards(tiny_coco.root, out, splits=SPLITS, class_set=["person", "car"])
    before = _files(out)
    tiny_coco.image_path("val2017", 1).write_bytes(b"garbage")
    with pytest.raises(DataError):
        build_shards(tiny_coco.root, out, splits=SPLITS, class_set=["person", "car"])
    assert _files(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp folder removed


_KILL_SCRIPT = """
import sys, time
import seglab.data.shard_stage as shards
from seglab.config import ShardConfig
real = shards.process_image
def slow(*a, **k):
    time.sleep(0.2)
    return real(*a, **k)
shards.process_image = slow
print("started", flush=True)
shards.build_shards(sys.argv[1], sys.argv[2], splits={"train": "train2017", "val": "val2017"},
                    class_set=["person", "car"], settings=ShardConfig(workers=1))
"""


def test_a_killed_run_leaves_the_previous_output_intact_and_is_cleaned_up_next_time(tiny_coco, tmp_path):
    out = tmp_path / "s"
    build_shards(tiny_coco.root, out, splits=SPLITS, class_set=["person", "car"])
    before = _files(out)
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tiny_coco.root), str(out)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    time.sleep(1.0)  # mid-run: some images processed, nothing renamed yet
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _files(out) == before
    assert any(p.name.startswith(".s.") for p in tmp_path.iterdir())  # the killed run's debris...
    build_shards(tiny_coco.root, out, splits=SPLITS, class_set=["person", "car"])
    assert not any(p.name.startswith(".s.") for p in tmp_path.iterdir())  # ...is gone after the next run
    assert _files(out) == before


def test_atomic_helpers_leave_the_target_untouched_on_error(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "x").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(folder) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("boom")
    assert (folder / "x").read_text() == "old"
    with atomic_dir(folder) as tmp:
        (tmp / "y").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["y"]
    assert oct(folder.stat().st_mode & 0o777) == "0o755"


def test_reading_reports_missing_shards_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards"):
        shard_files(tmp_path, "train")
    pq.write_table(__import__("pyarrow").table({"x": [1]}), tmp_path / "foreign.parquet")
    with pytest.raises(ValueError, match="not a seglab shard"):
        read_classes(tmp_path / "foreign.parquet")


def _row(index: int, payload: int = 1000) -> dict:
    return {"image_id": index, "file_name": f"{index}.jpg", "split": "train", "source": "t", "height": 1,
            "width": 1, "orig_height": 1, "orig_width": 1, "image": b"\xff" * payload, "label": b"\x89",
            "class_pixels": [1], "ignore_pixels": 0}


def test_the_one_writer_splits_by_payload_keeps_extra_columns_and_requires_a_class_list(tmp_path):
    import pyarrow as pa

    from seglab.data.shards import ShardWriter, write_shards

    metadata = {b"seglab.classes": b'["background"]'}
    schema = SHARD_SCHEMA.append(pa.field("generator", pa.string()))
    rows = [{**_row(i, 600_000), "generator": "g"} for i in range(5)]
    files = write_shards(rows, tmp_path / "s", metadata, 1.0, schema=schema)
    # A part closes once its payload reaches the limit: 2 rows of ~0.6 MB each, then the rest.
    assert [f["rows"] for f in files] == [2, 2, 1]
    table = read_split(tmp_path, "s")
    assert table.column("generator").to_pylist() == ["g"] * 5 and read_classes(shard_files(tmp_path, "s")[0]) == [
        "background"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written through an atomic folder
    writer = ShardWriter(tmp_path / "parts", metadata, max_shard_mb=float("inf"))
    for i in range(3):
        writer.add(_row(i))
        writer.end_part({**metadata, b"part": str(i).encode()})
    writer.end_part()  # nothing pending: no empty part
    assert [f["rows"] for f in writer.files] == [1, 1, 1]
    assert pq.read_schema(tmp_path / "parts" / "part-00002.parquet").metadata[b"part"] == b"2"
    with pytest.raises(ValueError, match="seglab.classes"):
        ShardWriter(tmp_path / "x", {})
    with pytest.raises(ValueError, match="must start with SHARD_SCHEMA"):
        ShardWriter(tmp_path / "x", metadata, schema=pa.schema([pa.field("image", pa.binary())]))


def test_the_manifest_is_written_once_not_after_every_part(tmp_path, monkeypatch):
    # Rewriting manifest.json (every entry so far) after each part made writing O(parts²).
    from seglab.data import shards

    writes = []
    real = shards.write_manifest_entries
    monkeypatch.setattr(shards, "write_manifest_entries",
                        lambda folder, entries: writes.append(len(entries)) or real(folder, entries))
    metadata = {b"seglab.classes": b'["background"]'}
    files = shards.write_shards((_row(i, 300_000) for i in range(40)), tmp_path / "s", metadata, 0.25)
    assert len(files) == 40 and writes == [40]
    assert len(shard_files(tmp_path, "s")) == 40  # the one manifest lists every part
    unfinished = shards.ShardWriter(tmp_path / "unfinished", metadata, max_shard_mb=0.25)
    unfinished.add(_row(0, 300_000))  # a part, but the writer was never closed: no manifest
    with pytest.raises(shards.ShardIntegrityError, match="no manifest.json"):
        shard_files(tmp_path, "unfinished")
