"""COCO -> label maps: class sets, overlap and crowd rules, and every kind of bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from seglab.data.classes import IGNORE_INDEX, VOC20_COCO_IDS, resolve_class_set
from seglab.data.coco import DataError, LabelRules, decode_image, label_map, load_split
from seglab.data.shards import decode_label, read_split
from seglab.config import ShardConfig
from seglab.data.shard_stage import build_shards

from .conftest import CATEGORIES, square

SPLITS = {"train": "train2017", "val": "val2017"}


# ---- class sets ------------------------------------------------------------------------------

def _all_coco_categories():
    # COCO's 80 ids with its gaps (1..90); names do not matter for all80's ordering rule.
    ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    return [{"id": i, "name": f"c{i}"} for i in ids]


def test_all80_is_background_plus_80_contiguous_in_id_order():
    cs = resolve_class_set("all80", list(reversed(_all_coco_categories())))
    assert cs.num_classes == 81 and cs.classes[0] == "background"
    assert list(cs.category_ids[1:]) == sorted(cs.category_ids[1:])
    assert cs.label_of()[90] == 80 and cs.label_of()[1] == 1 and cs.label_of()[13] == 12


def test_voc20_matches_torchvision_cat_list(coco_mini):
    cats = json.loads((coco_mini / "annotations" / "instances_val2017.json").read_text())["categories"]
    cs = resolve_class_set("voc20", cats)
    # torchvision references/segmentation/coco_utils.py: CAT_LIST = [0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21,
    # 67, 18, 19, 4, 1, 64, 20, 63, 7, 72]
    assert cs.category_ids == (0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)
    assert cs.category_ids[1:] == VOC20_COCO_IDS and cs.num_classes == 21


def test_explicit_list_keeps_given_order_and_rejects_unknown_or_duplicate_names():
    cs = resolve_class_set(["dog", "person"], CATEGORIES)
    assert cs.classes == ("background", "dog", "person") and cs.label_of() == {18: 1, 1: 2}
    with pytest.raises(ValueError, match=r"unknown COCO categories \['unicorn'\]"):
        resolve_class_set(["dog", "unicorn"], CATEGORIES)
    with pytest.raises(ValueError, match="listed twice"):
        resolve_class_set(["dog", "dog"], CATEGORIES)
    with pytest.raises(ValueError, match="voc20 needs COCO categories"):
        resolve_class_set("voc20", CATEGORIES)


# ---- label rules -----------------------------------------------------------------------------

def _ann(i, cat, seg, crowd=0):
    return {"id": i, "image_id": 1, "category_id": cat, "iscrowd": crowd, "segmentation": seg}


def _rle(mask):
    """COCO-style uncompressed RLE (column-major run lengths, starting with zeros)."""
    flat = np.asarray(mask, np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


CS = resolve_class_set(["person", "car", "cat"], CATEGORIES)  # person=1, car=2, cat=3; dog/toothbrush outside


def test_polygon_rasterisation_matches_pycocotools():
    seg = [[2, 2, 15, 3, 12, 14, 3, 11]]
    label = label_map([_ann(1, 1, seg)], 20, 20, CS, LabelRules())
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, 20, 20))).astype(bool)
    assert np.array_equal(label == 1, expected) and set(np.unique(label)) == {0, 1}


def test_categories_outside_the_set_are_background_and_do_not_cause_overlaps():
    anns = [_ann(1, 18, square(0, 0, 10, 10)), _ann(2, 1, square(5, 5, 15, 15))]  # dog (outside) under person
    label = label_map(anns, 20, 20, CS, LabelRules())
    assert label[2, 2] == 0 and label[7, 7] == 1 and IGNORE_INDEX not in label


def test_overlapping_instances_are_ignored_or_last_wins():
    anns = [_ann(1, 1, square(0, 0, 10, 10)), _ann(2, 3, square(5, 5, 15, 15))]  # person, car
    ignore = label_map(anns, 20, 20, CS, LabelRules(overlap="ignore"))
    assert ignore[2, 2] == 1 and ignore[12, 12] == 2 and ignore[7, 7] == IGNORE_INDEX
    last = label_map(anns, 20, 20, CS, LabelRules(overlap="last"))
    assert last[7, 7] == 2 and IGNORE_INDEX not in last
    # Two instances of the same class overlapping are an overlap too (torchvision's rule).
    same = label_map([_ann(1, 1, square(0, 0, 10, 10)), _ann(2, 1, square(5, 5, 15, 15))], 20, 20, CS, LabelRules())
    assert same[7, 7] == IGNORE_INDEX


def test_crowd_rules_and_crowd_never_overrides_an_instance():
    crowd = np.zeros((20, 20), bool)
    crowd[:, 10:] = True
    anns = [_ann(1, 1, square(12, 0, 16, 5)), _ann(2, 1, _rle(crowd), crowd=1)]
    ignore = label_map(anns, 20, 20, CS, LabelRules(crowd="ignore"))
    assert ignore[15, 15] == IGNORE_INDEX and ignore[2, 14] == 1 and ignore[15, 2] == 0
    assert label_map(anns, 20, 20, CS, LabelRules(crowd="label"))[15, 15] == 1
    assert label_map(anns, 20, 20, CS, LabelRules(crowd="background"))[15, 15] == 0
    # A crowd of a category outside the set is plain background.
    outside = label_map([_ann(3, 18, _rle(crowd), crowd=1)], 20, 20, CS, LabelRules(crowd="ignore"))
    assert not outside.any()


def test_min_train_area_drops_small_training_images_only(tiny_coco, tmp_path):
    d = tiny_coco.data["train2017"]
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] != 100] + [
        {"id": 9999, "image_id": 100, "category_id": 1, "iscrowd": 0, "segmentation": square(0, 0, 3, 3)}
    ]
    tiny_coco.write()
    report = build_shards(tiny_coco.root, tmp_path / "s", splits=SPLITS, class_set=["person", "car"],
                          rules=LabelRules(min_train_area=100))
    assert report["splits"]["train"]["filtered_min_area"] == 1 and report["splits"]["train"]["images"] == 2
    assert report["splits"]["val"]["filtered_min_area"] == 0 and report["splits"]["val"]["images"] == 2
    assert 100 not in read_split(tmp_path / "s", "train", ["image_id"]).column("image_id").to_pylist()


# ---- bad input -------------------------------------------------------------------------------

def _shard(tiny_coco, tmp_path, on_bad_record="error"):
    return build_shards(tiny_coco.root, tmp_path / "shards", splits=SPLITS, class_set=["person", "car"],
                        on_bad_record=on_bad_record)


def _expect(tiny_coco, tmp_path, match, rule):
    """error mode names the file/record and rule; skip mode counts the skip under that rule."""
    with pytest.raises(DataError, match=match) as info:
        _shard(tiny_coco, tmp_path)
    assert info.value.rule == rule
    assert not (tmp_path / "shards").exists()  # nothing half-written
    report = _shard(tiny_coco, tmp_path, "skip")
    skipped = {k: v for s in report["splits"].values() for k, v in s["skipped_by_rule"].items()}
    assert skipped.get(rule, 0) >= 1, report
    assert report["skipped_records"], report
    shutil.rmtree(tmp_path / "shards")
    return report


def test_missing_image_file(tiny_coco, tmp_path):
    tiny_coco.image_path("train2017", 1).unlink()
    report = _expect(tiny_coco, tmp_path, r"instances_train2017.json: images\[1\].*000000000101.jpg.*not found", "missing image file")
    assert report["splits"]["train"]["images"] == 2


def test_corrupt_and_truncated_jpeg(tiny_coco, tmp_path):
    path = tiny_coco.image_path("val2017", 0)
    path.write_bytes(path.read_bytes()[:200])  # truncated
    _expect(tiny_coco, tmp_path, r"000000000200.jpg is not a readable image", "unreadable image")
    path.write_bytes(b"this is not a jpeg at all")
    _expect(tiny_coco, tmp_path, r"000000000200.jpg is not a readable image", "unreadable image")


@pytest.mark.parametrize("text", ['{"images": [', "not json", '{"images": [], "annotations": []'])
def test_malformed_or_truncated_json(tiny_coco, tmp_path, text):
    (tiny_coco.root / "annotations" / "instances_val2017.json").write_text(text)
    with pytest.raises(DataError, match=r"instances_val2017.json: not valid JSON .* line \d+ column \d+"):
        _shard(tiny_coco, tmp_path)


def test_json_missing_fields(tiny_coco, tmp_path):
    del tiny_coco.data["val2017"]["categories"]
    tiny_coco.write()
    with pytest.raises(DataError, match="instances_val2017.json: field 'categories' missing"):
        _shard(tiny_coco, tmp_path)


def test_annotation_of_unknown_image(tiny_coco, tmp_path):
    tiny_coco.data["train2017"]["annotations"].append(
        {"id": 5, "image_id": 424242, "category_id": 1, "iscrowd": 0, "segmentation": square(0, 0, 5, 5)})
    tiny_coco.write()
    report = _expect(tiny_coco, tmp_path, r"annotations\[6\] \(id 5, image_id 424242\): image_id 424242 is not a known image",
                     "annotation of an unknown image")
    assert report["splits"]["train"]["images"] == 3  # an orphan annotation costs no image


def test_annotation_of_unknown_category_drops_its_image(tiny_coco, tmp_path):
    tiny_coco.data["train2017"]["annotations"][0]["category_id"] = 999
    tiny_coco.write()
    report = _expect(tiny_coco, tmp_path, r"category_id 999 is not a declared category", "annotation of an unknown category")
    assert report["splits"]["train"]["images"] == 2


def test_polygon_with_fewer_than_three_points(tiny_coco, tmp_path):
    tiny_coco.data["val2017"]["annotations"][1]["segmentation"] = [[1, 1, 5, 5]]
    tiny_coco.write()
    _expect(tiny_coco, tmp_path, r"annotations\[1\] .* polygon 0 has 2 points; a polygon needs at least 3",
            "polygon with fewer than 3 points")


@pytest.mark.parametrize("name", ["../outside.jpg", "/etc/passwd", "a/../../x.jpg"])
def test_file_name_escaping_the_image_folder(tiny_coco, tmp_path, name):
    tiny_coco.data["train2017"]["images"][0]["file_name"] = name
    tiny_coco.write()
    _expect(tiny_coco, tmp_path, r"images\[0\] \(id 100\): file_name .* escapes the image folder",
            "file_name escapes the image folder")


def test_image_size_disagreeing_with_record(tiny_coco, tmp_path):
    tiny_coco.data["val2017"]["images"][0]["height"] = 41
    tiny_coco.data["val2017"]["annotations"] = tiny_coco.data["val2017"]["annotations"][2:]
    tiny_coco.write()
    _expect(tiny_coco, tmp_path, r"is 40x60 \(HxW\) but the record says 41x60", "image size disagrees with record")


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_greyscale_palette_rgba_cmyk_and_16bit_images_become_rgb(tmp_path, mode):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    if mode == "I;16":
        im = Image.fromarray((rng.integers(0, 4000, (12, 16))).astype(np.uint16))
    else:
        im = rgb.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png")
    im.save(path)
    out = decode_image(path, (12, 16), "rec")
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    if mode == "L":
        assert np.array_equal(out[..., 0], out[..., 2])


def test_cmyk_jpeg(tmp_path):
    rgb = Image.fromarray(np.full((8, 8, 3), (200, 30, 30), np.uint8))
    rgb.convert("CMYK").save(tmp_path / "c.jpg")
    out = decode_image(tmp_path / "c.jpg", (8, 8), "rec")
    assert out.shape == (8, 8, 3) and out[..., 0].mean() > out[..., 1].mean()


def test_exif_rotation_is_applied_when_the_record_describes_the_upright_image(tmp_path):
    stored = np.zeros((10, 20, 3), np.uint8)
    stored[:, :5] = 255  # white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=100)
    upright = decode_image(tmp_path / "r.jpg", (20, 10), "rec")  # record gives the displayed size
    assert upright.shape == (20, 10, 3) and upright[:5].mean() > 200 and upright[-5:].mean() < 50
    raw = decode_image(tmp_path / "r.jpg", (10, 20), "rec")  # record gives the stored size
    assert raw.shape == (10, 20, 3) and raw[:, :5].mean() > 200


def test_greyscale_image_in_a_split_is_sharded_as_rgb(tiny_coco, tmp_path):
    path = tiny_coco.image_path("train2017", 0)
    Image.open(path).convert("L").save(path)
    _shard(tiny_coco, tmp_path)
    table = read_split(tmp_path / "shards", "train")
    from seglab.data.shards import decode_rgb
    assert decode_rgb(table.column("image")[0].as_py()).shape == (40, 60, 3)


def test_load_split_reports_missing_root_and_folders(tmp_path):
    with pytest.raises(DataError, match="COCO root not found"):
        load_split(tmp_path / "nope", "train", "train2017", "voc20")
    (tmp_path / "root").mkdir()
    with pytest.raises(DataError, match="image folder for split 'train' not found"):
        load_split(tmp_path / "root", "train", "train2017", "voc20")
    (tmp_path / "root" / "train2017").mkdir()
    with pytest.raises(DataError, match="annotation file not found"):
        load_split(tmp_path / "root", "train", "train2017", "voc20")


# ---- real data --------------------------------------------------------------------------------

@pytest.mark.coco_mini
def test_coco_mini_shards_agree_with_independent_pycocotools_rasterisation(coco_mini, tmp_path):
    """Rebuild every val label with pycocotools' own COCO API (torchvision's rules) and compare."""
    from pycocotools.coco import COCO

    build_shards(coco_mini, tmp_path / "s", splits={"val": "val2017"}, class_set="voc20",
                 rules=LabelRules(crowd="ignore", overlap="ignore"),
                 settings=ShardConfig(max_side=10_000))
    coco = COCO(str(coco_mini / "annotations" / "instances_val2017.json"))
    lut = {cid: i + 1 for i, cid in enumerate(VOC20_COCO_IDS)}
    table = read_split(tmp_path / "s", "val", ["image_id", "label", "class_pixels", "ignore_pixels"])
    assert table.num_rows == len(coco.getImgIds()) == 133
    checked_crowd = checked_overlap = 0
    for row in table.to_pylist():
        info = coco.loadImgs(row["image_id"])[0]
        h, w = info["height"], info["width"]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=row["image_id"]))
        expected = np.zeros((h, w), np.uint8)
        count = np.zeros((h, w), np.int32)
        for a in sorted(anns, key=lambda a: a["id"]):
            if a["iscrowd"] or a["category_id"] not in lut:
                continue
            m = coco.annToMask(a).astype(bool)
            expected[m] = lut[a["category_id"]]
            count += m
        expected[count > 1] = 255
        checked_overlap += int((count > 1).any())
        for a in anns:
            if a["iscrowd"] and a["category_id"] in lut:
                expected[coco.annToMask(a).astype(bool) & (count == 0)] = 255
                checked_crowd += 1
        got = decode_label(row["label"])
        assert got.shape == (h, w)
        assert np.array_equal(got, expected), f"image {row['image_id']}: {np.count_nonzero(got != expected)} px differ"
        assert row["class_pixels"] == np.bincount(expected.ravel(), minlength=256)[:21].tolist()
        assert row["ignore_pixels"] == int((expected == 255).sum())
    assert checked_crowd > 0 and checked_overlap > 0  # the rules were actually exercised
