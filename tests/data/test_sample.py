"""The embedded sample dataset: COCO layout and JSON, exact geometry, occlusion, determinism, atomicity."""

from __future__ import annotations

import hashlib
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage

from seglab.config import Config, SampleConfig
from seglab.data.classes import VOC20_COCO_NAMES
from seglab.data.sample import stage
from seglab.data.sample import (
    COCO_CATEGORIES,
    SAMPLE_CATEGORIES,
    generate_sample,
    mask_to_polygons,
    mask_to_uncompressed_rle,
    run_sample,
)
from seglab.data.sample.scene import MIN_OBJECT_PIXELS, render_scene

COCO_MINI = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "coco-mini"
SPLITS = ("train2017", "val2017")
# Small images for speed; shares raised so every feature shows up in 12 + 6 images.
SMALL = dict(train_images=12, val_images=6, min_side=96, max_side=160, seed=0)
SMALL_SHARES = dict(amodal_fraction=0.3, greyscale_fraction=0.2)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _load(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def _raster(ann: dict, height: int, width: int) -> np.ndarray:
    seg = ann["segmentation"]
    rle = mask_utils.frPyObjects(seg, height, width)
    if isinstance(seg, list):
        rle = mask_utils.merge(rle)
    return mask_utils.decode(rle).astype(bool)


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample") / "sample"
    summary = generate_sample(root, **SMALL, **SMALL_SHARES)
    return root, summary


def test_layout_matches_coco(small_sample):
    root, summary = small_sample
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "train2017", "val2017"]
    assert sorted(p.name for p in (root / "annotations").iterdir()) == [
        "instances_train2017.json",
        "instances_val2017.json",
    ]
    for split, count in zip(SPLITS, (SMALL["train_images"], SMALL["val_images"])):
        data = _load(root, split)
        files = sorted(p.name for p in (root / split).iterdir())
        assert files == sorted(img["file_name"] for img in data["images"])
        assert len(files) == count == summary["splits"][split]["images"]
        greyscale = 0
        for img in data["images"]:
            with Image.open(root / split / img["file_name"]) as im:
                assert im.format == "JPEG"
                assert im.size == (img["width"], img["height"])
                assert SMALL["min_side"] <= min(im.size) and max(im.size) <= SMALL["max_side"]
                assert im.mode in ("RGB", "L")
                greyscale += im.mode == "L"
        assert greyscale == summary["splits"][split]["greyscale"] >= 1
    # atomic_dir left nothing beside the output
    assert [p.name for p in root.parent.iterdir()] == ["sample"]


def test_json_structure(small_sample):
    root, _ = small_sample
    image_ids, ann_ids = set(), set()
    for split in SPLITS:
        data = _load(root, split)
        assert list(data) == ["info", "licenses", "images", "annotations", "categories"]
        license_ids = {lic["id"] for lic in data["licenses"]}
        for img in data["images"]:
            assert set(img) == {"id", "file_name", "height", "width", "license"}
            assert img["license"] in license_ids
            assert img["file_name"] == f"{img['id']:012d}.jpg"
            assert img["id"] not in image_ids  # unique across splits, as in COCO
            image_ids.add(img["id"])
        split_images = {img["id"] for img in data["images"]}
        for ann in data["annotations"]:
            assert set(ann) == {
                "id",
                "image_id",
                "category_id",
                "segmentation",
                "area",
                "bbox",
                "iscrowd",
            }
            assert ann["image_id"] in split_images
            assert ann["iscrowd"] in (0, 1)
            assert len(ann["bbox"]) == 4 and ann["area"] > 0
            assert ann["id"] not in ann_ids
            ann_ids.add(ann["id"])


def test_categories_are_the_80_coco_ones(small_sample):
    root, _ = small_sample
    gaps = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    for split in SPLITS:
        cats = _load(root, split)["categories"]
        assert len(cats) == 80
        assert {c["id"] for c in cats} == set(range(1, 91)) - gaps
        assert len({c["name"] for c in cats}) == 80
        by_id = {c["id"]: (c["name"], c["supercategory"]) for c in cats}
        assert by_id[1] == ("person", "person") and by_id[44] == ("bottle", "kitchen")
        assert by_id[62] == ("chair", "furniture") and by_id[90] == ("toothbrush", "indoor")
    # the drawn categories are all in torchvision's VOC-20 subset
    assert set(SAMPLE_CATEGORIES) <= set(VOC20_COCO_NAMES)


def test_loads_with_pycocotools_and_uses_several_categories(small_sample):
    root, summary = small_sample
    names_seen = set()
    for split in SPLITS:
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == summary["splits"][split]["images"]
        for ann in coco.loadAnns(coco.getAnnIds()):
            img = coco.imgs[ann["image_id"]]
            assert coco.annToMask(ann).shape == (img["height"], img["width"])
            names_seen.add(coco.cats[ann["category_id"]]["name"])
    assert names_seen <= set(SAMPLE_CATEGORIES) and len(names_seen) >= 6


def test_area_and_bbox_agree_with_pycocotools(small_sample):
    root, _ = small_sample
    for split in SPLITS:
        data = _load(root, split)
        images = {img["id"]: img for img in data["images"]}
        for ann in data["annotations"]:
            img = images[ann["image_id"]]
            mask = _raster(ann, img["height"], img["width"])
            assert ann["area"] == mask.sum()
            ys, xs = np.nonzero(mask)
            x0, y0 = xs.min(), ys.min()
            assert ann["bbox"] == pytest.approx([x0, y0, xs.max() + 1 - x0, ys.max() + 1 - y0])


def test_polygons_are_valid(small_sample):
    root, _ = small_sample
    polygons = 0
    for split in SPLITS:
        data = _load(root, split)
        images = {img["id"]: img for img in data["images"]}
        for ann in data["annotations"]:
            if ann["iscrowd"]:
                continue
            img = images[ann["image_id"]]
            assert isinstance(ann["segmentation"], list) and ann["segmentation"]
            for poly in ann["segmentation"]:
                polygons += 1
                assert len(poly) >= 6 and len(poly) % 2 == 0
                xy = np.asarray(poly).reshape(-1, 2)
                assert (
                    (xy >= 0).all()
                    and (xy[:, 0] <= img["width"]).all()
                    and (xy[:, 1] <= img["height"]).all()
                )
    assert polygons > 0


def test_crowds_are_uncompressed_rle(small_sample):
    root, summary = small_sample
    for split in SPLITS:
        data = _load(root, split)
        images = {img["id"]: img for img in data["images"]}
        crowds = [a for a in data["annotations"] if a["iscrowd"]]
        assert len(crowds) == summary["splits"][split]["crowd"] >= 1
        for ann in crowds:
            img = images[ann["image_id"]]
            seg = ann["segmentation"]
            assert set(seg) == {"counts", "size"}
            assert seg["size"] == [img["height"], img["width"]]
            assert all(isinstance(c, int) and c >= 0 for c in seg["counts"])
            assert sum(seg["counts"]) == img["height"] * img["width"]
            assert isinstance(ann["area"], int)


def test_overlaps_and_occlusions_exist(small_sample):
    root, summary = small_sample
    stats = summary["splits"]
    assert sum(s["occluded"] for s in stats.values()) >= 1
    assert sum(s["amodal"] for s in stats.values()) >= 1
    overlapping_pairs = 0
    for split in SPLITS:
        data = _load(root, split)
        images = {img["id"]: img for img in data["images"]}
        by_image: dict[int, list[np.ndarray]] = {}
        for ann in data["annotations"]:
            if not ann["iscrowd"]:
                img = images[ann["image_id"]]
                by_image.setdefault(ann["image_id"], []).append(
                    _raster(ann, img["height"], img["width"])
                )
        for masks in by_image.values():
            overlapping_pairs += sum(bool((a & b).any()) for a, b in combinations(masks, 2))
    # visible regions tile the image; an amodal outline overlaps at least its occluder
    assert overlapping_pairs >= 1


def test_scene_occlusion_logic():
    """Visible regions are the full shapes minus everything drawn later; amodal ones are full."""
    occluded = amodal = 0
    for seed in range(4):
        scene = render_scene(
            np.random.default_rng(seed),
            128,
            144,
            with_crowd=seed % 2 == 0,
            greyscale=False,
            amodal_fraction=0.5,
        )
        assert scene.pixels.shape == (128, 144, 3) and scene.pixels.dtype == np.uint8
        fulls = scene.full_masks
        for i, (ann, full) in enumerate(zip(scene.annotations, fulls)):
            later = np.zeros_like(full)
            for f in fulls[i + 1 :]:
                later |= f
            visible = full & ~later
            assert ann.occluded == bool((full & later).any())
            np.testing.assert_array_equal(ann.mask, full if ann.amodal else visible)
            assert ann.mask.sum() >= MIN_OBJECT_PIXELS
            occluded += ann.occluded
            amodal += ann.amodal
        visible_only = [a.mask for a in scene.annotations if not a.amodal]
        for a, b in combinations(visible_only, 2):
            assert not (a & b).any()
    assert occluded >= 1 and amodal >= 1


def test_mask_to_polygons_is_exact():
    """Holes, islands in holes, diagonal contacts, one-pixel specks, image borders."""
    rng = np.random.default_rng(7)
    masks = []
    for _ in range(40):
        h, w = (int(s) for s in rng.integers(8, 60, size=2))
        blurred = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(0.5, 3.0))
        masks.append(blurred > np.quantile(blurred, rng.uniform(0.2, 0.8)))
    ring = np.zeros((12, 12), bool)
    ring[2:10, 2:10] = True
    ring[4:8, 4:8] = False
    ring[5:7, 5:7] = True  # an island inside the hole
    masks.append(ring)
    masks.append(np.eye(9, dtype=bool))  # diagonal-only contact
    for mask in masks:
        polygons = mask_to_polygons(mask)
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
        if not mask.any():
            assert polygons == []
            continue
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, *mask.shape))
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
    # one polygon per 8-connected component: holes are spliced in, not separate polygons
    assert len(mask_to_polygons(ring)) == 2
    assert len(mask_to_polygons(np.eye(9, dtype=bool))) == 1


def test_uncompressed_rle_roundtrip():
    rng = np.random.default_rng(3)
    for first in (False, True):
        mask = rng.random((17, 23)) > 0.6
        mask[0, 0] = first
        rle = mask_to_uncompressed_rle(mask)
        assert rle["size"] == [17, 23] and (rle["counts"][0] == 0) == first
        decoded = mask_utils.decode(mask_utils.frPyObjects(rle, 17, 23)).astype(bool)
        np.testing.assert_array_equal(decoded, mask)


def test_deterministic_and_seed_sensitive(small_sample, tmp_path):
    root, summary = small_sample
    again = tmp_path / "again"
    assert generate_sample(again, **SMALL, **SMALL_SHARES)["splits"] == summary["splits"]
    assert _tree_digest(again) == _tree_digest(root)

    tiny = dict(train_images=2, val_images=2, min_side=64, max_side=96)
    a, b = (
        generate_sample(tmp_path / "a", seed=1, **tiny),
        generate_sample(tmp_path / "b", seed=2, **tiny),
    )
    assert a["seed"] == 1 and b["seed"] == 2
    digest_a, digest_b = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert digest_a.keys() == digest_b.keys()
    assert all(digest_a[k] != digest_b[k] for k in digest_a)
    # the two splits draw from different streams
    train = sorted((tmp_path / "a" / "train2017").iterdir())[0]
    val = sorted((tmp_path / "a" / "val2017").iterdir())[0]
    assert train.read_bytes() != val.read_bytes()


# The small sample's annotation files as the generator wrote them when it built each split's whole
# document in memory and json.dumps'ed it (3560a18); it now streams the records to the file.
# (These hashes depend on numpy, scikit-image and pycocotools: a new version may redraw a contour.)
SMALL_ANNOTATION_SHA256 = {
    "annotations/instances_train2017.json": "b3b3ee1df6907565dfbbc7b36307652990f36e3eeaff6b146e1341e049a6fb6c",
    "annotations/instances_val2017.json": "5490798f6f8fa064a99a649a2ad5bcb7fecd9d17873206c9a55c8a61e62e7b5c",
}


def test_streamed_annotation_files_are_the_in_memory_documents_bytes(small_sample):
    root, _ = small_sample
    digest = _tree_digest(root)
    for split in SPLITS:
        path = root / "annotations" / f"instances_{split}.json"
        text = path.read_text(encoding="ascii")
        assert text == json.dumps(json.loads(text), separators=(",", ":")), path  # compact, one document
    assert {k: digest[k] for k in SMALL_ANNOTATION_SHA256} == SMALL_ANNOTATION_SHA256
    assert not [p for p in (root / "annotations").iterdir() if p.name.startswith(".")]  # side files gone


def test_failure_leaves_previous_output_intact(tmp_path, monkeypatch):
    out = tmp_path / "sample"
    generate_sample(out, train_images=2, val_images=1, min_side=64, max_side=80, seed=0)
    before = _tree_digest(out)
    calls = []

    def failing_save(pixels, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        Image.fromarray(pixels).save(path, format="JPEG", quality=stage.JPEG_QUALITY)

    monkeypatch.setattr(stage, "_save_jpeg", failing_save)
    with pytest.raises(OSError, match="simulated"):
        generate_sample(out, train_images=3, val_images=2, min_side=64, max_side=80, seed=5)
    assert _tree_digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(min_side=200, max_side=100), "max_side"),
        (dict(min_side=16), "min_side"),
        (dict(train_images=0), "train_images"),
        (dict(crowd_fraction=1.5), "crowd_fraction"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments_are_named(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        generate_sample(tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()


def test_run_sample_uses_config(tmp_path):
    cfg = Config(
        seed=4,
        sample=SampleConfig(
            out=tmp_path / "cfg",
            train_images=2,
            val_images=1,
            min_side=48,
            max_side=64,
            crowd_fraction=0.5,
        ),
    )
    summary = run_sample(cfg)
    assert summary["seed"] == 4
    assert (
        summary["splits"]["train2017"]["images"] == 2
        and summary["splits"]["val2017"]["images"] == 1
    )
    generate_sample(
        tmp_path / "direct",
        train_images=2,
        val_images=1,
        min_side=48,
        max_side=64,
        crowd_fraction=0.5,
        seed=4,
    )
    assert _tree_digest(tmp_path / "cfg") == _tree_digest(tmp_path / "direct")


@pytest.mark.coco_mini
@pytest.mark.skipif(
    not COCO_MINI.is_dir(), reason="../shared/data/coco-mini (real COCO subset) is not present"
)
def test_same_structure_as_real_coco(small_sample):
    root, _ = small_sample
    for split in SPLITS:
        real = json.loads((COCO_MINI / "annotations" / f"instances_{split}.json").read_text())
        ours = _load(root, split)
        assert list(ours) == list(real)
        assert ours["categories"] == real["categories"]
        assert [(c["id"], c["name"], c["supercategory"]) for c in real["categories"]] == list(
            COCO_CATEGORIES
        )
        assert set(ours["images"][0]) <= set(real["images"][0]) | {"license"}
        assert set(ours["annotations"][0]) == set(real["annotations"][0])
        real_crowd = next(a for a in real["annotations"] if a["iscrowd"])
        our_crowd = next(a for a in ours["annotations"] if a["iscrowd"])
        assert set(our_crowd["segmentation"]) == set(real_crowd["segmentation"])
        assert type(our_crowd["segmentation"]["counts"]) is type(
            real_crowd["segmentation"]["counts"]
        )
