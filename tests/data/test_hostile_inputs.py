"""Hostile COCO inputs (issue 13): each is a named bad record or error, fast, and never replaces good shards."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pydantic import ValidationError

from seglab.cli import main
from seglab.config import Config, DataConfig
from seglab.data.coco import DataError, LabelRules, compressed_rle_counts, label_map, load_split
from seglab.data.classes import resolve_class_set
from seglab.data.shards import read_split
from seglab.data.shard_stage import build_shards, run_shard

from .conftest import CATEGORIES

SPLITS = {"train": "train2017", "val": "val2017"}
CLASSES = ["person", "car"]


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _cfg(tiny_coco, out: Path, workers: int = 2, on_bad_record: str = "error") -> Config:
    return Config.model_validate({
        "data": {"root": str(tiny_coco.root), "splits": SPLITS, "class_set": CLASSES, "on_bad_record": on_bad_record},
        "shard": {"out": str(out), "workers": workers},
    })


def _expect_rejected(tiny_coco, tmp_path, monkeypatch, plant, match: str, rule: str, workers: int = 2):
    """Good shards first; then `plant` edits the files or `tiny_coco.data` (written after it): a named
    error within seconds, previous shards untouched, no temp folder left behind; with
    on_bad_record: skip the record is counted under `rule`."""
    monkeypatch.chdir(tmp_path)  # run_shard writes its report under data/reports
    out = tmp_path / "shards"
    run_shard(_cfg(tiny_coco, out, workers))
    before, entries = _files(out), sorted(p.name for p in tmp_path.iterdir())
    plant()
    tiny_coco.write()
    started = time.monotonic()
    with pytest.raises(DataError, match=match) as info:
        run_shard(_cfg(tiny_coco, out, workers))
    assert time.monotonic() - started < 30
    assert info.value.rule == rule and f"[rule: {rule}]" in str(info.value)
    assert _files(out) == before, "previous shards changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == entries, "a temp folder was left behind"
    report = run_shard(_cfg(tiny_coco, out, workers, on_bad_record="skip"))
    counted = {k: v for s in report["splits"].values() for k, v in s["skipped_by_rule"].items()}
    assert counted.get(rule, 0) >= 1, report
    return report


def _set(record: dict, **fields):
    return lambda: record.update(fields)


# ---- 1. polygon coordinates -------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e12, -1e12, 10**30])
def test_polygon_coordinate_not_finite_or_far_outside_the_image(tiny_coco, tmp_path, monkeypatch, value):
    plant = _set(tiny_coco.data["val2017"]["annotations"][1], segmentation=[[1, 1, value, 5, 5, 30]])
    report = _expect_rejected(tiny_coco, tmp_path, monkeypatch, plant,
                              r"instances_val2017.json: annotations\[1\] .*polygon 0 has x = .* at index 2",
                              "polygon coordinate out of range")
    assert report["splits"]["val"]["images"] == 1


def test_polygon_coordinate_through_a_single_worker(tiny_coco, tmp_path, monkeypatch):
    # workers: 1 used to segfault inside pycocotools, leaving a stale temp folder.
    plant = _set(tiny_coco.data["train2017"]["annotations"][3], segmentation=[[1, 1, 50, float("nan"), 5, 30]])
    _expect_rejected(tiny_coco, tmp_path, monkeypatch, plant, r"polygon 0 has y = nan at index 3",
                     "polygon coordinate out of range", workers=1)


def test_coordinates_just_outside_the_frame_are_still_accepted(tiny_coco, tmp_path):
    # Real COCO outlines stray a little past the border; they are clipped by rasterisation as before.
    tiny_coco.data["val2017"]["annotations"][1]["segmentation"] = [[-3.5, -2, 64, -1, 61.5, 43, -1, 41]]
    tiny_coco.write()
    report = build_shards(tiny_coco.root, tmp_path / "s", splits=SPLITS, class_set=CLASSES)
    assert report["splits"]["val"]["images"] == 2


# ---- 3. empty split ---------------------------------------------------------------------------

def test_annotation_file_without_images_does_not_replace_the_shards(tiny_coco, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "shards"
    run_shard(_cfg(tiny_coco, out))
    before = _files(out)
    tiny_coco.data["val2017"].update(images=[], annotations=[])
    tiny_coco.write()
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match=r"instances_val2017.json: split 'val' has no usable images") as info:
            run_shard(_cfg(tiny_coco, out, on_bad_record=mode))
        assert info.value.rule == "empty split"
        assert _files(out) == before


def test_split_whose_every_image_is_skipped_or_filtered_is_an_error(tiny_coco, tmp_path):
    out = tmp_path / "shards"
    build_shards(tiny_coco.root, out, splits=SPLITS, class_set=CLASSES)
    before = _files(out)
    for i in range(2):
        tiny_coco.image_path("val2017", i).unlink()  # skipped while decoding, after the record checks
    with pytest.raises(DataError, match=r"instances_val2017.json: split 'val' has no image left to write "
                                        r"\(0 below min_train_area, 2 skipped\)"):
        build_shards(tiny_coco.root, out, splits=SPLITS, class_set=CLASSES, on_bad_record="skip")
    with pytest.raises(DataError, match=r"split 'train' has no image left to write \(3 below min_train_area"):
        build_shards(tiny_coco.root, out, splits={"train": "train2017"}, class_set=CLASSES,
                     rules=LabelRules(min_train_area=10**6))
    assert _files(out) == before


# ---- 4. RLE counts ----------------------------------------------------------------------------

def _compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _runs(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def test_compressed_rle_decoder_agrees_with_pycocotools_encoder():
    rng = np.random.default_rng(0)
    for shape, density in [((40, 60), 0.5), ((7, 3), 0.9), ((300, 200), 0.001), ((64, 64), 0.0), ((5, 5), 1.0)]:
        mask = rng.random(shape) < density
        assert compressed_rle_counts(_compressed(mask)["counts"]) == _runs(mask)
    big = np.zeros((5000, 4000), bool)
    big[4999, 3999] = True  # one long run: a count that needs all seven 5-bit groups
    assert compressed_rle_counts(_compressed(big)["counts"]) == [5000 * 4000 - 1, 1]


def test_valid_compressed_rle_is_still_rasterised_as_pycocotools_decodes_it():
    mask = np.zeros((40, 60), bool)
    mask[10:30, 5:40] = True
    cs = resolve_class_set(["person", "car"], CATEGORIES)
    ann = {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": _compressed(mask)}
    assert np.array_equal(label_map([ann], 40, 60, cs, LabelRules()) == 1, mask)


def _small_mask_counts() -> str:
    return _compressed(np.ones((10, 10), bool))["counts"]


def _big_mask_counts() -> str:
    return _compressed(np.ones((50, 60), bool))["counts"]


@pytest.mark.parametrize("counts, why", [
    ("0", r"compressed RLE counts sum to 0, expected height\*width = 2400"),
    ("~~~~", "compressed RLE counts are not a valid RLE string"),
    ("@", "compressed RLE counts contain a negative run"),  # a single run of -16
    ("0`", "compressed RLE counts are not a valid RLE string"),  # ends inside a run
    (_small_mask_counts(), r"compressed RLE counts sum to 100, expected"),
    (_big_mask_counts(), r"compressed RLE counts sum to 3000, expected"),
    ([-5, 2405], "uncompressed RLE counts contain a negative run"),
    ([2400.0], "uncompressed RLE counts must be integers"),
])
def test_rle_counts_must_cover_exactly_the_image(tiny_coco, tmp_path, monkeypatch, counts, why):
    plant = _set(tiny_coco.data["val2017"]["annotations"][0], iscrowd=1, segmentation={"size": [40, 60], "counts": counts})
    _expect_rejected(tiny_coco, tmp_path, monkeypatch, plant, rf"annotations\[0\] .*{why}", "malformed segmentation")


# ---- 6. crashes that named nothing ------------------------------------------------------------

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with a token payload: PIL checks sizes on open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side, message", [
    (30000, "exceeds limit of"),                 # PIL's DecompressionBombError, raised on open
    (8000, r"is 8000x8000 \(HxW\), over the 50,000,000-pixel limit"),  # under PIL's limit, over ours
])
def test_image_file_with_too_many_pixels_is_a_named_bad_record(tiny_coco, tmp_path, monkeypatch, side, message):
    def plant():
        tiny_coco.image_path("val2017", 0).write_bytes(_png_header_only(side, side))
    _expect_rejected(tiny_coco, tmp_path, monkeypatch, plant, rf"images\[0\] .*000000000200.jpg.*{message}", "image too large")


def test_declared_size_over_the_cap_is_refused_before_decoding(tiny_coco, tmp_path, monkeypatch):
    plant = _set(tiny_coco.data["val2017"]["images"][1], height=13000, width=13000)
    _expect_rejected(tiny_coco, tmp_path, monkeypatch, plant,
                     r"images\[1\] \(id 201\): declared size 13000x13000 \(HxW\) exceeds the 50,000,000-pixel limit",
                     "image too large")


@pytest.mark.parametrize("field, rule, orphan", [
    ("image_id", "malformed annotation", True),
    ("category_id", "malformed annotation", False),
    ("id", "malformed annotation", False),
])
def test_unhashable_ids_are_named_bad_records(tiny_coco, tmp_path, monkeypatch, field, rule, orphan):
    plant = _set(tiny_coco.data["train2017"]["annotations"][2], **{field: [101]})
    report = _expect_rejected(tiny_coco, tmp_path, monkeypatch, plant, rf"annotations\[2\] .*{field} \[101\]", rule)
    assert report["splits"]["train"]["images"] == (3 if orphan else 2)


def test_list_as_image_id_is_a_named_bad_record(tiny_coco, tmp_path, monkeypatch):
    def plant():
        tiny_coco.data["train2017"]["images"][1]["id"] = [101]
        tiny_coco.data["train2017"]["annotations"] = tiny_coco.data["train2017"]["annotations"][:2]
    _expect_rejected(tiny_coco, tmp_path, monkeypatch, plant, r"images\[1\] \(id \[101\]\): field 'id' missing or not an integer",
                     "malformed image record")


@pytest.mark.parametrize("name, why", [("\ud800.jpg", "not encodable as UTF-8"), ("a\x00.jpg", "NUL character")])
def test_file_name_that_cannot_be_a_path_is_a_named_bad_record(tiny_coco, tmp_path, monkeypatch, name, why):
    plant = _set(tiny_coco.data["val2017"]["images"][0], file_name=name)
    _expect_rejected(tiny_coco, tmp_path, monkeypatch, plant, rf"images\[0\] \(id 200\): file_name .* {why}",
                     "malformed image record")


# ---- 7. paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("link", ["file", "folder"])
def test_symlink_out_of_the_image_folder_is_refused(tiny_coco, tmp_path, monkeypatch, link):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tiny_coco.image_path("val2017", 0)
    (outside / "secret.jpg").write_bytes(target.read_bytes())
    if link == "file":
        (tiny_coco.root / "val2017" / "linked.jpg").symlink_to(outside / "secret.jpg")
        name = "linked.jpg"
    else:
        (tiny_coco.root / "val2017" / "sub").symlink_to(outside, target_is_directory=True)
        name = "sub/secret.jpg"
    plant = _set(tiny_coco.data["val2017"]["images"][0], file_name=name)
    _expect_rejected(tiny_coco, tmp_path, monkeypatch, plant, rf"images\[0\] \(id 200\): file_name '{name}' resolves outside",
                     "file_name escapes the image folder")


def test_symlinks_within_the_image_folder_and_a_linked_root_are_fine(tiny_coco, tmp_path):
    folder = tiny_coco.root / "val2017"
    (folder / "alias.jpg").symlink_to(folder / tiny_coco.data["val2017"]["images"][0]["file_name"])
    tiny_coco.data["val2017"]["images"][0]["file_name"] = "alias.jpg"
    tiny_coco.write()
    (tmp_path / "linked-root").symlink_to(tiny_coco.root, target_is_directory=True)
    assert len(load_split(tmp_path / "linked-root", "val", "val2017", CLASSES).tasks) == 2


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "", "val 2"])
def test_split_names_cannot_leave_the_shard_folder(tiny_coco, tmp_path, name):
    with pytest.raises(ValidationError, match="may use only letters, digits"):
        DataConfig(splits={name: "val2017"})
    with pytest.raises(DataError, match="may use only letters, digits"):
        build_shards(tiny_coco.root, tmp_path / "a" / "b" / "shards", splits={name: "val2017"}, class_set=CLASSES)
    assert not (tmp_path / "a").exists() and not (tmp_path / "x").exists()


# ---- the CLI on a hostile input ---------------------------------------------------------------

def test_seglab_shard_exits_with_a_named_error_and_keeps_the_shards(tiny_coco, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({
        "data": {"root": str(tiny_coco.root), "splits": SPLITS, "class_set": CLASSES},
        "shard": {"out": str(tmp_path / "shards"), "workers": 2},
    }))
    assert main(["--params", str(params), "shard"]) == 0
    before = _files(tmp_path / "shards")
    tiny_coco.data["train2017"]["annotations"][0]["segmentation"] = [[0, 0, 1e12, 0, 5, 5]]
    tiny_coco.write()
    capsys.readouterr()
    started = time.monotonic()
    assert main(["--params", str(params), "shard"]) == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert "instances_train2017.json: annotations[0]" in err and "[rule: polygon coordinate out of range]" in err
    assert _files(tmp_path / "shards") == before
    assert read_split(tmp_path / "shards", "train").num_rows == 3

