"""Images + label maps -> shards (seglab.data.labelmaps through the one shard stage).

Real data: CamVid's folder pairs (a few files copied to tmp_path, and a list file over the real
folders), every stored pixel checked against the source PNG under the value map. A VOC-layout
fixture built here (list files, palette PNGs with 255 borders). Each bad input as a named error and
as a counted skip. The shards downstream: validate_data's suite and the tf.data pipeline.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from seglab.config import Config, LabelMapLayout, LabelMapsConfig, ShardConfig
from seglab.data.coco import DataError
from seglab.data.labelmaps import labelmap_classes, pair_image_id
from seglab.data.shard_stage import build_shards, run_shard
from seglab.data.shards import SHARD_SCHEMA, decode_label, decode_rgb, read_split

from ..conftest import CAMVID_PICK, REPO, copy_camvid_pairs

CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
                  "pedestrian", "bicyclist"]
CAMVID_LABELMAPS = {"class_set": "camvid11", "classes": CAMVID_CLASSES, "ignore": [11]}
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
VOC_LABELMAPS = {"class_set": "voc21", "classes": VOC_CLASSES, "ignore": [255]}
# Stored at their own size (CamVid is 480x360), so stored labels compare pixel for pixel with the source.
FULL_SIZE = ShardConfig(max_side=512, workers=1)


def _rules(labelmaps: dict, min_train_area: int = 0):
    return labelmap_classes(LabelMapsConfig(**labelmaps), min_train_area)


def _build(root: Path, out: Path, splits: dict, labelmaps: dict, **kwargs) -> dict:
    class_set, rules = _rules(labelmaps)
    kwargs.setdefault("settings", FULL_SIZE)
    return build_shards(root, out, splits=splits, class_set=class_set, rules=rules, **kwargs)


def _rows(out: Path, split: str) -> list[dict]:
    return read_split(out, split).to_pylist()


# ---- CamVid (real) ------------------------------------------------------------------------------

CAMVID_SPLITS = {"train": LabelMapLayout(images="train", labels="trainannot"),
                 "val": LabelMapLayout(images="val", labels="valannot")}


@pytest.fixture
def camvid_subset(camvid, tmp_path) -> Path:
    """A few CamVid pairs copied into a folder also called camvid (as the dataset's `source`)."""
    return copy_camvid_pairs(tmp_path / "subset" / "camvid")


def _expected_camvid_label(path: Path) -> np.ndarray:
    """CamVid's stored values under its value map: 0..10 are the classes, void (11) is ignore."""
    stored = np.asarray(Image.open(path))
    assert stored.dtype == np.uint8 and stored.max() <= 11
    return np.where(stored == 11, 255, stored).astype(np.uint8)


@pytest.mark.camvid
def test_camvid_folder_pairs_become_shards_holding_the_source_labels_under_the_value_map(camvid, camvid_subset,
                                                                                         tmp_path):
    report = _build(camvid_subset, tmp_path / "shards", CAMVID_SPLITS, CAMVID_LABELMAPS)
    assert report["source"] == "camvid" and report["class_set"] == "camvid11" and report["classes"] == CAMVID_CLASSES
    for split, names in CAMVID_PICK.items():
        rows = _rows(tmp_path / "shards", split)
        assert [r["file_name"] for r in rows] == [f"{n}.png" for n in sorted(names)]
        assert report["splits"][split]["images"] == len(names) and report["splits"][split]["skipped"] == 0
        total = np.zeros(len(CAMVID_CLASSES), np.int64)
        for row in rows:
            name = row["file_name"]
            label = decode_label(row["label"])
            expected = _expected_camvid_label(camvid / f"{split}annot" / name)  # the real dataset's file
            assert label.shape == expected.shape == (360, 480) and (row["height"], row["width"]) == (360, 480)
            np.testing.assert_array_equal(label, expected, err_msg=f"{split}/{name}")
            assert (expected == 255).any(), "the picked images hold void pixels"
            counts = np.bincount(expected.ravel(), minlength=256)
            assert row["class_pixels"] == counts[:11].tolist() and row["ignore_pixels"] == counts[255]
            total += counts[:11]
            source_rgb = np.asarray(Image.open(camvid / split / name).convert("RGB"), np.float64)
            assert np.abs(decode_rgb(row["image"]) - source_rgb).mean() < 3  # JPEG at quality 95
            assert row["image_id"] == pair_image_id(name.removesuffix(".png"))
            assert row["source"] == "camvid" and row["split"] == split
        details_classes = report["splits"][split]["class_pixels"]
        assert list(details_classes) == CAMVID_CLASSES and list(details_classes.values()) == total.tolist()
    meta = pq.read_schema(next((tmp_path / "shards" / "val").glob("part-*.parquet"))).metadata
    assert json.loads(meta[b"seglab.classes"]) == CAMVID_CLASSES and meta[b"seglab.class_set"] == b"camvid11"
    assert json.loads(meta[b"seglab.label_rules"]) == {
        "min_train_area": 0, "value_map": {**{str(i): i for i in range(11)}, "11": 255}}
    assert pq.read_schema(next((tmp_path / "shards" / "val").glob("part-*.parquet"))).remove_metadata() == SHARD_SCHEMA


@pytest.mark.camvid
def test_a_list_file_picks_pairs_from_the_real_camvid_folders_and_downsizing_keeps_the_classes(camvid, tmp_path):
    listing = tmp_path / "few.txt"
    listing.write_text("\n".join(CAMVID_PICK["train"]) + "\n\n")  # a blank line is no entry
    layout = LabelMapLayout(images="train", labels="trainannot", list_file=str(listing), image_suffix=".png",
                            label_suffix=".png")
    report = _build(camvid, tmp_path / "shards", {"train": layout}, CAMVID_LABELMAPS,
                    settings=ShardConfig(max_side=240, workers=2))
    rows = _rows(tmp_path / "shards", "train")
    assert report["splits"]["train"]["images"] == 4 and report["source"] == "camvid"
    for row in rows:
        expected = _expected_camvid_label(camvid / "trainannot" / row["file_name"])
        label = decode_label(row["label"])
        assert (row["orig_height"], row["orig_width"]) == (360, 480) and label.shape == (180, 240)
        # Nearest-neighbour downsizing: every stored value is one of the source's, never a blend.
        assert set(np.unique(label)) <= set(np.unique(expected))
        reference = np.asarray(Image.fromarray(expected).resize((240, 180), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(label, reference)


@pytest.mark.camvid
def test_run_shard_reads_the_format_from_params_and_validate_data_and_the_pipeline_take_the_shards(
        camvid_subset, tmp_path, monkeypatch):
    from seglab.data.validate import run_validate_data

    monkeypatch.chdir(tmp_path)  # the stage writes data/reports/ under the working directory
    cfg = Config.model_validate({
        "data": {"format": "labelmaps", "root": str(camvid_subset),
                 "splits": {"train": {"images": "train", "labels": "trainannot"},
                            "val": {"images": "val", "labels": "valannot"}},
                 "labelmaps": CAMVID_LABELMAPS},
        "shard": {"out": "data/shards", "workers": 1},
    })
    run_shard(cfg)
    metrics = json.loads((tmp_path / "data/reports/shard.json").read_text())
    assert metrics["source"] == "camvid" and metrics["class_set"] == "camvid11" and metrics["num_classes"] == 11
    assert metrics["splits"]["train"]["images"] == 4 and metrics["splits"]["val"]["images"] == 3
    details = json.loads((tmp_path / "data/reports/shard_details.json").read_text())
    assert details["classes"] == CAMVID_CLASSES

    summary = run_validate_data(cfg)  # every expectation of the seglab_shards suite
    assert summary["success"] and summary["num_classes"] == 11 and summary["images"] == 7
    assert summary["statistics"]["unsuccessful"] == 0

    import tensorflow as tf

    from seglab.data.pipeline import make_dataset, num_classes_of

    assert num_classes_of("data/shards", "val") == 11
    batches = list(make_dataset("data/shards", "val", image_size=(96, 128), batch_size=2).as_numpy_iterator())
    labels = np.concatenate([y for _, y in batches])
    assert labels.shape == (3, 96, 128) and set(np.unique(labels)) <= set(range(11)) | {255}
    assert len(set(np.unique(labels)) - {255}) >= 5
    x, y = next(iter(make_dataset("data/shards", "train", image_size=(64, 64), batch_size=4, training=True, seed=0)))
    assert x.shape == (4, 64, 64, 3) and y.dtype == tf.int32


# ---- Pascal VOC layout (built here) ---------------------------------------------------------------

def voc_palette() -> list[int]:
    """Pascal VOC's colour map (its devkit's labelcolormap): the index's bits spread over R, G, B."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= (c & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


class TinyVoc:
    """VOCdevkit/VOC2012 in small: JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette indices, 255
    along object borders), ImageSets/Segmentation/<split>.txt."""

    IDS: ClassVar[dict[str, list[str]]] = {"train": ["2007_000032", "2007_000039", "2007_000063"],
                                           "val": ["2007_000033", "2007_000042"]}

    def __init__(self, root: Path):
        self.root = root
        self.labels: dict[str, np.ndarray] = {}
        for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (root / folder).mkdir(parents=True)
        rng = np.random.default_rng(0)
        for split, ids in self.IDS.items():
            for k, name in enumerate(ids):
                h, w = 40 + 4 * k, 56
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(self.image(name), quality=90)
                label = np.zeros((h, w), np.uint8)
                for cls, (y0, x0) in zip((1 + 7 * k % 20, 15), ((4, 4), (20, 30))):
                    label[y0 - 1:y0 + 13, x0 - 1:x0 + 17] = 255  # VOC's unlabelled border band
                    label[y0:y0 + 12, x0:x0 + 16] = cls
                self.save_label(name, label)
            self.write_list(split, ids)

    def image(self, name: str) -> Path:
        return self.root / "JPEGImages" / f"{name}.jpg"

    def label(self, name: str) -> Path:
        return self.root / "SegmentationClass" / f"{name}.png"

    def save_label(self, name: str, label: np.ndarray) -> None:
        im = Image.fromarray(label, "P")
        im.putpalette(voc_palette())
        im.save(self.label(name))
        self.labels[name] = label

    def write_list(self, split: str, ids: list[str]) -> None:
        (self.root / "ImageSets/Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))

    @staticmethod
    def splits() -> dict[str, LabelMapLayout]:
        return {split: LabelMapLayout(images="JPEGImages", labels="SegmentationClass", image_suffix=".jpg",
                                      label_suffix=".png", list_file=f"ImageSets/Segmentation/{split}.txt")
                for split in TinyVoc.IDS}


@pytest.fixture
def tiny_voc(tmp_path) -> TinyVoc:
    return TinyVoc(tmp_path / "VOC2012")


def test_voc_palette_label_maps_keep_their_indices_and_the_255_border(tiny_voc, tmp_path):
    sample = Image.open(tiny_voc.label("2007_000032"))
    assert sample.mode == "P" and sample.convert("RGB").getpixel((5, 5)) == (128, 0, 0)  # aeroplane's colour
    report = _build(tiny_voc.root, tmp_path / "shards", TinyVoc.splits(), VOC_LABELMAPS)
    assert report["source"] == "VOC2012" and report["class_set"] == "voc21" and report["classes"] == VOC_CLASSES
    for split, ids in TinyVoc.IDS.items():
        rows = _rows(tmp_path / "shards", split)
        assert [r["file_name"] for r in rows] == [f"{i}.jpg" for i in sorted(ids)]
        assert len({r["image_id"] for r in rows}) == len(ids)
        for row in rows:
            expected = tiny_voc.labels[row["file_name"].removesuffix(".jpg")]
            label = decode_label(row["label"])
            np.testing.assert_array_equal(label, expected)
            counts = np.bincount(expected.ravel(), minlength=256)
            assert row["class_pixels"] == counts[:21].tolist() and row["ignore_pixels"] == counts[255] > 0
            assert (row["orig_height"], row["orig_width"]) == expected.shape
    meta = pq.read_schema(next((tmp_path / "shards" / "train").glob("part-*.parquet"))).metadata
    assert json.loads(meta[b"seglab.classes"]) == VOC_CLASSES and json.loads(meta[b"seglab.category_ids"]) == []


def test_a_value_map_renumbers_stored_values_and_the_ids_do_not_depend_on_the_other_files(tiny_voc, tmp_path):
    # Stored 0 -> 0, 1..20 -> class 1 ("object"), 255 ignored: a merge as Cityscapes-style maps do.
    merge = {"class_set": "objectness", "classes": ["background", "object"],
             "value_map": {0: 0, **{v: 1 for v in range(1, 21)}}, "ignore": [255]}
    _build(tiny_voc.root, tmp_path / "a", TinyVoc.splits(), merge)
    for row in _rows(tmp_path / "a", "val"):
        expected = tiny_voc.labels[row["file_name"].removesuffix(".jpg")]
        np.testing.assert_array_equal(decode_label(row["label"]), np.where((expected > 0) & (expected < 255), 1,
                                                                          expected))
    tiny_voc.write_list("val", ["2007_000042"])
    _build(tiny_voc.root, tmp_path / "b", TinyVoc.splits(), merge)
    [only] = _rows(tmp_path / "b", "val")
    assert only["image_id"] == {r["file_name"]: r["image_id"] for r in _rows(tmp_path / "a", "val")}["2007_000042.jpg"]


def test_a_failed_run_keeps_the_shards_already_written(tiny_voc, tmp_path):
    out = tmp_path / "shards"
    _build(tiny_voc.root, out, TinyVoc.splits(), VOC_LABELMAPS)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    tiny_voc.image("2007_000042").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="unreadable image"):
        _build(tiny_voc.root, out, TinyVoc.splits(), VOC_LABELMAPS)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VOC2012", "shards", "shards.lock"]  # no temp folder left


# ---- bad input: each a named error, or a counted skip ---------------------------------------------

class TinyPairs:
    """CamVid's layout in small: images/<name>.png and labels/<name>.png (greyscale class indices 0..2,
    void 3), three pairs."""

    NAMES: ClassVar[list[str]] = ["a", "b", "c"]
    LABELMAPS: ClassVar[dict] = {"class_set": "three", "classes": ["road", "car", "sky"], "ignore": [3]}

    def __init__(self, root: Path):
        self.root = root
        (root / "images").mkdir(parents=True)
        (root / "labels").mkdir()
        rng = np.random.default_rng(1)
        for name in self.NAMES:
            Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(self.image(name))
            label = rng.integers(0, 4, (24, 32), dtype=np.uint8)
            Image.fromarray(label, "L").save(self.label(name))

    def image(self, name: str) -> Path:
        return self.root / "images" / f"{name}.png"

    def label(self, name: str) -> Path:
        return self.root / "labels" / f"{name}.png"

    @staticmethod
    def splits() -> dict[str, LabelMapLayout]:
        return {"train": LabelMapLayout(images="images", labels="labels")}


def _outside_file(root: Path) -> Path:
    target = root.parent / "elsewhere" / "secret.png"
    target.parent.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((24, 32), np.uint8), "L").save(target)
    return target


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_pixel_data_bit(path: Path) -> None:
    # A flipped bit inside IDAT: the chunk's CRC no longer matches (the data may still inflate).
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT") + 8
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


# Folder pairs: (planted defect, rule, text the message must hold)
PAIR_DEFECTS = {
    "image without label map": (lambda t: t.label("b").unlink(), "image without label map", "b.png has no label map"),
    "label map without image": (lambda t: t.image("b").unlink(), "label map without image", "b.png has no image"),
    "size mismatch": (lambda t: Image.fromarray(np.zeros((20, 32), np.uint8), "L").save(t.label("b")),
                      "image size disagrees with label map", "is 24x32 (HxW) but the label map says 20x32"),
    "value outside the map": (
        lambda t: Image.fromarray(np.full((24, 32), 7, np.uint8), "L").save(t.label("b")),
        "label value outside the value map", "stored values 7 (768 px)"),
    "colour label map": (lambda t: Image.new("RGB", (32, 24)).save(t.label("b")), "label map not single-channel",
                         "has mode RGB"),
    "unreadable image": (lambda t: t.image("b").write_bytes(b"\x89PNG\r\n\x1a\n garbage"), "unreadable image",
                         "is not a readable image"),
    "truncated label map": (lambda t: _truncated(t.label("b")), "unreadable label map", "labels/b.png"),
    "label map checksum": (lambda t: _flip_pixel_data_bit(t.label("b")), "unreadable label map", "bad header checksum in b'IDAT'"),
    "symlink out of the folder": (
        lambda t: (t.image("b").unlink(), t.image("b").symlink_to(_outside_file(t.root))),
        "file name escapes the folder", "outside"),
    "two images named b": (lambda t: shutil.copyfile(t.image("b"), t.root / "images" / "b.jpg"),
                           "ambiguous pair name", "holds 2 images named 'b' (b.jpg, b.png)"),
    "decompression bomb": (
        # 8000 x 7000 = 56 M pixels of zeros: a 60 kB PNG, over the 50 M pixel cap.
        lambda t: Image.new("L", (8000, 7000)).save(t.label("b")), "image too large", "over the 50,000,000-pixel"),
}


@pytest.mark.parametrize("defect", list(PAIR_DEFECTS))
def test_each_bad_pair_is_a_named_error_or_a_counted_skip(defect, tmp_path):
    plant, rule, text = PAIR_DEFECTS[defect]
    pairs = TinyPairs(tmp_path / "data")
    plant(pairs)
    with pytest.raises(DataError) as caught:
        _build(pairs.root, tmp_path / "error", TinyPairs.splits(), TinyPairs.LABELMAPS)
    message = str(caught.value)
    assert caught.value.rule == rule and f"[rule: {rule}]" in message and text in message, message
    assert "'b'" in message and "data.on_bad_record: skip" in message  # the pair, and how to skip it
    assert not (tmp_path / "error").exists()

    report = _build(pairs.root, tmp_path / "skip", TinyPairs.splits(), TinyPairs.LABELMAPS, on_bad_record="skip",
                    report_path=tmp_path / "shard.json", details_path=tmp_path / "details.json")
    assert report["splits"]["train"]["images"] == 2 and report["splits"]["train"]["skipped_by_rule"] == {rule: 1}
    assert [r["file_name"] for r in _rows(tmp_path / "skip", "train")] == ["a.png", "c.png"]
    assert json.loads((tmp_path / "shard.json").read_text())["splits"]["train"]["skipped_by_rule"] == {rule: 1}
    [record] = json.loads((tmp_path / "details.json").read_text())["skipped_records"]
    assert "'b'" in record and text in record


def test_a_file_name_that_is_not_utf8_is_a_named_error_or_a_counted_skip(tmp_path):
    pairs = TinyPairs(tmp_path / "data")
    for folder in ("images", "labels"):  # a Latin-1 name, as old archives unpack it
        os.rename(pairs.root / folder / "b.png", os.path.join(os.fsencode(pairs.root / folder), b"caf\xe9.png"))
    with pytest.raises(DataError, match=r"\[rule: file name not UTF-8\]"):
        _build(pairs.root, tmp_path / "error", TinyPairs.splits(), TinyPairs.LABELMAPS)
    report = _build(pairs.root, tmp_path / "skip", TinyPairs.splits(), TinyPairs.LABELMAPS, on_bad_record="skip")
    assert report["splits"]["train"]["skipped_by_rule"] == {"file name not UTF-8": 1}


# List files: (planted defect, rule, text the message must hold, whether 2007_000039 is still written
# when skipping); each concerns VOC's 2007_000039.
LIST_DEFECTS = {
    "listed image missing": (lambda v: v.image("2007_000039").unlink(), "missing image file",
                             "JPEGImages/2007_000039.jpg not found", False),
    "listed label map missing": (lambda v: v.label("2007_000039").unlink(), "image without label map",
                                 "SegmentationClass/2007_000039.png not found", False),
    "listed twice": (lambda v: v.write_list("train", [*TinyVoc.IDS["train"], "2007_000039"]), "duplicate list entry",
                     "listed twice (first on line 2)", True),  # the second line is dropped, not the pair
    "NUL in a name": (lambda v: v.write_list("train", ["2007_000032", "2007_000039\x00", "2007_000063"]),
                      "malformed list entry", "contains a NUL character", False),
    "name leaving the folder": (
        lambda v: (v.write_list("train", ["2007_000032", "../../elsewhere/2007_000039", "2007_000063"]),
                   (v.root.parent / "elsewhere").mkdir(), shutil.copyfile(v.image("2007_000039"),
                                                                          v.root.parent / "elsewhere" / "2007_000039.jpg"),
                   shutil.copyfile(v.label("2007_000039"), v.root.parent / "elsewhere" / "2007_000039.png")),
        "file name escapes the folder", "outside", False),
    "value outside the map": (lambda v: v.save_label("2007_000039", np.full((44, 56), 21, np.uint8)),
                              "label value outside the value map", "stored values 21 (2464 px)", False),
}


@pytest.mark.parametrize("defect", list(LIST_DEFECTS))
def test_each_bad_listed_pair_is_a_named_error_or_a_counted_skip(defect, tiny_voc, tmp_path):
    plant, rule, text, still_written = LIST_DEFECTS[defect]
    plant(tiny_voc)
    with pytest.raises(DataError) as caught:
        _build(tiny_voc.root, tmp_path / "error", TinyVoc.splits(), VOC_LABELMAPS)
    message = str(caught.value)
    assert caught.value.rule == rule and text in message and "2007_000039" in message, message
    assert re.search(r"train\.txt: line \d", message), message  # where the pair is named
    report = _build(tiny_voc.root, tmp_path / "skip", TinyVoc.splits(), VOC_LABELMAPS, on_bad_record="skip")
    assert report["splits"]["train"]["skipped_by_rule"] == {rule: 1}
    assert report["splits"]["train"]["images"] == 2 + still_written and report["splits"]["val"]["images"] == 2
    assert ("2007_000039.jpg" in {r["file_name"] for r in _rows(tmp_path / "skip", "train")}) == still_written


def test_what_no_skip_can_mend_stops_the_stage_in_either_mode(tiny_voc, tmp_path):
    splits = TinyVoc.splits()
    for on_bad_record in ("error", "skip"):
        with pytest.raises(DataError, match=r"SegmentationObject: label map folder of split 'val' not found"):
            _build(tiny_voc.root, tmp_path / "s", {"val": splits["val"].model_copy(
                update={"labels": "SegmentationObject"})}, VOC_LABELMAPS, on_bad_record=on_bad_record)
        with pytest.raises(DataError, match=r"test\.txt: split list file not found"):
            _build(tiny_voc.root, tmp_path / "s", {"test": splits["val"].model_copy(
                update={"list_file": "ImageSets/Segmentation/test.txt"})}, VOC_LABELMAPS, on_bad_record=on_bad_record)
    (tiny_voc.root / "ImageSets/Segmentation/val.txt").write_bytes(b"2007_000033\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"val\.txt: split list file is not UTF-8"):
        _build(tiny_voc.root, tmp_path / "s", splits, VOC_LABELMAPS, on_bad_record="skip")
    for name in TinyVoc.IDS["val"]:
        tiny_voc.label(name).unlink()
    tiny_voc.write_list("val", TinyVoc.IDS["val"])
    with pytest.raises(DataError, match=r"split 'val' has no usable image \+ label map pair \(2 paired, 2 bad"):
        _build(tiny_voc.root, tmp_path / "s", splits, VOC_LABELMAPS, on_bad_record="skip")
    assert not (tmp_path / "s").exists()


# ---- settings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, problem", [
    ({"splits": {"train": {"images": "a", "labels": "b"}}},
     r"data\.splits: \['train'\] give images/labels folders, but data\.format is coco"),
    ({"format": "labelmaps", "labelmaps": CAMVID_LABELMAPS}, r"\['train', 'val'\] name a COCO image folder"),
    ({"format": "labelmaps", "splits": {"train": {"images": "a", "labels": "b"}}},
     r"data\.format is labelmaps but data\.labelmaps is null"),
    ({"format": "labelmaps", "splits": {"train": {"images": "a", "labels": "b", "list_file": "t.txt"}},
      "labelmaps": CAMVID_LABELMAPS}, r"list_file needs image_suffix and label_suffix"),
    ({"format": "labelmaps", "splits": {"train": {"images": "a", "labels": "a"}}, "labelmaps": CAMVID_LABELMAPS},
     r"images and labels are the same folder 'a'"),
    ({"format": "labelmaps", "splits": {"train": {"images": "a", "labels": "b", "masks": "c"}},
      "labelmaps": CAMVID_LABELMAPS}, r"data\.splits\.train\..*masks"),
    ({"format": "labelmaps", "splits": {"train": {"images": "a", "labels": "b"}},
      "labelmaps": {**CAMVID_LABELMAPS, "value_map": {0: 0, 1: 11}}}, r"\{1: 11\} map to no class"),
    ({"format": "labelmaps", "splits": {"train": {"images": "a", "labels": "b"}},
      "labelmaps": {**CAMVID_LABELMAPS, "ignore": [10, 11]}}, r"stored values \[10\] are classes"),
    ({"format": "labelmaps", "splits": {"train": {"images": "a", "labels": "b"}},
      "labelmaps": {**CAMVID_LABELMAPS, "classes": ["sky", "sky"]}}, r"classes listed twice: \['sky'\]"),
    ({"format": "labelmaps", "splits": {"train": {"images": "a", "labels": "b"}},
      "labelmaps": {**CAMVID_LABELMAPS, "classes": [f"c{i}" for i in range(256)]}}, r"at most 255 fit"),
    ({"format": "voc"}, r"data\.format"),
])
def test_settings_that_cannot_describe_a_dataset_are_refused_naming_the_key(data, problem, tmp_path):
    from seglab.config import ConfigError, load_config

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(data)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=problem):
        load_config(tmp_path / "params.yaml")


def test_the_documented_camvid_and_voc_settings_are_valid_and_mean_what_the_docs_say():
    text = (REPO / "docs" / "labelmaps.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)]
    camvid, voc = (Config.model_validate(block).data for block in blocks)
    assert camvid.format == voc.format == "labelmaps" and camvid.labelmaps.classes == CAMVID_CLASSES
    assert labelmap_classes(camvid.labelmaps)[1].value_map == {**{i: i for i in range(11)}, 11: 255}
    assert voc.labelmaps.classes == VOC_CLASSES and labelmap_classes(voc.labelmaps)[1].value_map[255] == 255
    assert voc.splits["val"].list_file == "ImageSets/Segmentation/val.txt"
    # The command line sets the same values as the YAML block.
    [command] = re.findall(r"```bash\n(dvc exp run .*?)```", text, flags=re.DOTALL)
    words = shlex.split(command.replace("\\\n", " "))
    sets = dict(value.split("=", 1) for flag, value in itertools.pairwise(words) if flag == "-S")
    assert yaml.safe_load(sets["data.labelmaps"]) == {k: v for k, v in blocks[0]["data"]["labelmaps"].items()
                                                      if v is not None}
    assert yaml.safe_load(sets["data.splits"]) == blocks[0]["data"]["splits"]
    assert sets["data.root"] == blocks[0]["data"]["root"] and sets["data.format"] == "labelmaps"
    assert sets["train.class_weights"] == blocks[0]["train"]["class_weights"] == "median_frequency"
    assert yaml.safe_load(sets["evaluate.tta"]) == blocks[0]["evaluate"]["tta"] == ["identity", "hflip"]


def test_the_default_params_keep_coco_and_need_no_labelmaps_block():
    from seglab.config import load_config

    data = load_config(REPO / "params.yaml").data
    assert data.format == "coco" and data.labelmaps is None and data.splits == {"train": "train2017", "val": "val2017"}


def test_label_map_values_from_16_bit_and_bilevel_files(tmp_path):
    from seglab.data.labelmaps import read_label_map

    wide = np.array([[0, 300], [65535, 300]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode.startswith("I")
    out = read_label_map(tmp_path / "wide.png", {0: 0, 300: 1, 65535: 255}, "rec")
    np.testing.assert_array_equal(out, [[0, 1], [255, 1]])
    Image.fromarray(np.array([[True, False]])).save(tmp_path / "mask.png")  # mode '1'
    np.testing.assert_array_equal(read_label_map(tmp_path / "mask.png", {0: 0, 1: 1}, "rec"), [[1, 0]])
    buf = io.BytesIO()
    Image.new("LA", (2, 2)).save(buf, format="PNG")
    (tmp_path / "la.png").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"has mode LA; expected one value per pixel") as caught:
        read_label_map(tmp_path / "la.png", {0: 0}, "rec")
    assert caught.value.rule == "label map not single-channel"
