"""The validate_data stage: GX suite over Parquet shards, with one planted defect per case."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from seglab.config import Config
from seglab.data.classes import VOC20_COCO_IDS, VOC20_COCO_NAMES, ClassSet
from seglab.data.coco import LabelRules
from seglab.data.shards import (
    SHARD_SCHEMA,
    ShardIntegrityError,
    manifest_entry,
    shard_metadata,
    write_manifest,
    write_manifest_entries,
    write_shards,
)
from seglab.data.profile import DERIVED_COLUMNS, SHARD_COLUMNS, shard_profile
from seglab.data.validate import ShardValidationError, run_validate_data, validate_shards

COCO_MINI = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "coco-mini"
VOC = ClassSet("voc20", ("background", *VOC20_COCO_NAMES), (0, *VOC20_COCO_IDS))
LIMITS = dict(min_side=16, max_side=64, max_unlabelled_share=0.2)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_row(image_id: int, split: str, *, size=(24, 32), label_size=None, labelled=True, label_value=15,
             seed=None) -> dict:
    """A consistent shard row: noise image, label with a block of `label_value` and a 255 border."""
    h, w = size
    rng = np.random.default_rng(image_id if seed is None else seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    lh, lw = label_size or size
    label = np.zeros((lh, lw), np.uint8)
    label[0, :] = 255
    if labelled:
        label[lh // 4: lh // 2, lw // 4: lw // 2] = label_value
    counts = np.bincount(label.ravel(), minlength=256)
    return {
        "image_id": image_id, "file_name": f"{image_id:012d}.jpg", "split": split, "source": "synthetic-test",
        "height": h, "width": w, "orig_height": h, "orig_width": w,
        "image": _jpeg(image), "label": _png(label),
        "class_pixels": [int(c) for c in counts[: VOC.num_classes]], "ignore_pixels": int(counts[255]),
    }


def clean_rows() -> dict[str, list[dict]]:
    return {"train": [make_row(i, "train") for i in range(1, 7)],
            "val": [make_row(i, "val") for i in range(101, 106)]}


def write_dataset(root: Path, rows_by_split: dict[str, list[dict]], classes_by_split=None) -> Path:
    for split, rows in rows_by_split.items():
        class_set = (classes_by_split or {}).get(split, VOC)
        write_shards(rows, root / split, shard_metadata(class_set, split, LabelRules()), max_shard_mb=16)
    return root


def failed_rules(error: ShardValidationError) -> set[str]:
    return {e["rule"] for e in error.value.summary["expectations"] if not e["success"]}


def offending(error, rule: str) -> list[dict]:
    (entry,) = [e for e in error.value.summary["expectations"] if e["rule"] == rule]
    return entry["offending_rows"]


def test_clean_dataset_passes_and_writes_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # GX must write nothing into the working directory
    shards = write_dataset(tmp_path / "shards", clean_rows())
    report = tmp_path / "reports" / "validation"
    summary = validate_shards(shards, ["train", "val"], report, **LIMITS)

    assert summary["success"] is True
    assert summary["splits"]["train"] == {"images": 6, "unlabelled_images": 0, "unlabelled_share": 0.0}
    assert summary["images"] == 11 and summary["num_classes"] == 21
    rules = {e["rule"] for e in summary["expectations"]}
    assert {"table_columns", "unique_image_id", "split_nonempty", "height_bounds", "label_values_in_class_set",
            "label_height_eq_height", "unlabelled_share:train", "unlabelled_share:val"} <= rules
    assert all(e["success"] for e in summary["expectations"])
    assert (report / "index.html").is_file()
    validation_pages = list((report / "validations").rglob("*.html"))
    assert validation_pages and "seglab_shards" in validation_pages[0].read_text()
    assert json.loads((report / "summary.json").read_text()) == json.loads(json.dumps(summary, default=str))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports", "shards"]  # no gx/ folder, no temp dirs
    assert sorted(p.name for p in report.parent.iterdir()) == ["validation"]


def test_profile_derives_sizes_and_label_statistics(tmp_path):
    rows = clean_rows()
    rows["val"][0] = make_row(101, "val", labelled=False)
    rows["val"][1] = make_row(102, "val", label_value=77)
    profile = shard_profile(write_dataset(tmp_path, rows), ["train", "val"])

    assert list(profile.columns) == [*SHARD_COLUMNS, *DERIVED_COLUMNS]
    assert "image" not in profile.columns and "label" not in profile.columns
    first = profile.iloc[0]
    assert (first.image_height, first.image_width, first.label_height, first.label_width) == (24, 32, 24, 32)
    assert first.shard_file == "train/part-00000.parquet" and first.shard_row == 0
    assert first.labelled_pixels == 6 * 8 and first.invalid_label_pixels == 0 and first.label_stats_match
    by_id = profile.set_index("image_id")
    assert by_id.loc[101, "labelled_pixels"] == 0
    assert by_id.loc[102, "invalid_label_pixels"] == 6 * 8 and by_id.loc[102, "labelled_pixels"] == 0


def _duplicate_id(rows):
    rows["train"][3] = make_row(2, "train", seed=99) | {"file_name": "other.jpg"}


def _no_val_shards(rows):
    rows.pop("val")


def _too_small(rows):
    rows["train"][2] = make_row(3, "train", size=(8, 32))


def _too_large(rows):
    rows["val"][1] = make_row(102, "val", size=(24, 80))


def _label_out_of_class_set(rows):
    rows["train"][4] = make_row(5, "train", label_value=77)


def _label_size_differs(rows):
    rows["val"][2] = make_row(103, "val", label_size=(24, 30)) | {"width": 32}


def _too_many_unlabelled(rows):
    rows["val"][0] = make_row(101, "val", labelled=False)
    rows["val"][3] = make_row(104, "val", labelled=False)


def _truncated_jpeg(rows):
    row = rows["train"][1]
    row["image"] = row["image"][: len(row["image"]) // 2]


def _stats_disagree(rows):
    rows["train"][0]["class_pixels"][0] += 1


def _split_column_wrong(rows):
    rows["train"][5]["split"] = "val"


def _image_leaks_across_splits(rows):
    rows["val"][4] = make_row(105, "val", seed=4)  # same pixels as train image_id 4


@pytest.mark.parametrize(
    ("plant", "rule", "image_id"),
    [
        (_duplicate_id, "unique_image_id", 2),
        (_too_small, "height_bounds", 3),
        (_too_large, "width_bounds", 102),
        (_label_out_of_class_set, "label_values_in_class_set", 5),
        (_label_size_differs, "label_width_eq_width", 103),
        (_too_many_unlabelled, "unlabelled_share:val", 101),
        (_truncated_jpeg, "decodable", 2),
        (_stats_disagree, "label_stats_match", 1),
        (_split_column_wrong, "split_matches_folder", 6),
        (_image_leaks_across_splits, "unique_image_content", 105),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_planted_defect_fails_naming_the_row(tmp_path, plant, rule, image_id):
    rows = clean_rows()
    plant(rows)
    shards = write_dataset(tmp_path / "shards", rows)
    with pytest.raises(ShardValidationError) as error:
        validate_shards(shards, ["train", "val"], tmp_path / "report", **LIMITS)

    assert failed_rules(error) == {rule}
    assert image_id in [r["image_id"] for r in offending(error, rule)]
    row = next(r for r in offending(error, rule) if r["image_id"] == image_id)
    assert row["file_name"] == f"{image_id:012d}.jpg" and row["shard_file"].endswith("part-00000.parquet")
    message = str(error.value)
    assert rule in message and f"image_id={image_id} " in message and row["shard_file"] in message
    assert str(tmp_path / "report" / "index.html") in message
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["success"] is False and (tmp_path / "report" / "index.html").is_file()


def test_empty_split_fails(tmp_path):
    rows = clean_rows()
    shards = write_dataset(tmp_path / "shards", {"train": rows["train"]})
    with pytest.raises(ShardValidationError, match=r"splits without images: \['val'\]") as error:
        validate_shards(shards, ["train", "val"], tmp_path / "report", **LIMITS)
    assert failed_rules(error) == {"split_nonempty"}
    assert error.value.summary["splits"]["val"]["images"] == 0

    # A shard file with no rows is an empty split too.
    (shards / "val").mkdir()
    pq.write_table(SHARD_SCHEMA.empty_table().replace_schema_metadata(shard_metadata(VOC, "val", LabelRules())),
                   shards / "val" / "part-00000.parquet")
    write_manifest(shards / "val")  # as if written so: the manifest vouches for the empty file
    with pytest.raises(ShardValidationError) as error:
        validate_shards(shards, ["train", "val"], tmp_path / "report", **LIMITS)
    assert failed_rules(error) == {"split_nonempty"}

    # No images at all: still a report, not a crash.
    with pytest.raises(ShardValidationError, match=r"splits without images: \['test'\]") as error:
        validate_shards(shards, ["test"], tmp_path / "report", **LIMITS)
    assert error.value.summary["images"] == 0 and (tmp_path / "report" / "index.html").is_file()


def test_missing_column_fails_schema(tmp_path):
    shards = write_dataset(tmp_path / "shards", clean_rows())
    path = shards / "val" / "part-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["source"]), path)
    for path in (shards / "train").glob("*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns(["source"]), path)
    for split in ("train", "val"):  # as if written so (else the manifest check stops it first)
        write_manifest(shards / split)

    with pytest.raises(ShardValidationError, match=r"columns missing \['source'\]") as error:
        validate_shards(shards, ["train", "val"], tmp_path / "report", **LIMITS)
    assert failed_rules(error) == {"table_columns", "file_schema"}
    assert "missing columns ['source']" in json.dumps(offending(error, "file_schema")[0])
    assert "source_nonempty" in error.value.summary["skipped_rules"]


def test_class_list_must_agree_across_files(tmp_path):
    renamed = ClassSet("custom", ("background", *VOC20_COCO_NAMES[:-1], "laptop"), (0, *VOC20_COCO_IDS[:-1], 73))
    shards = write_dataset(tmp_path / "shards", clean_rows(), classes_by_split={"val": renamed})
    with pytest.raises(ShardValidationError) as error:
        validate_shards(shards, ["train", "val"], tmp_path / "report", **LIMITS)
    assert failed_rules(error) == {"class_list_consistent"}
    assert {r["split"] for r in offending(error, "class_list_consistent")} == {"val"}


def test_file_without_class_list_fails(tmp_path):
    shards = write_dataset(tmp_path / "shards", clean_rows())
    path = shards / "val" / "part-00000.parquet"
    pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)
    write_manifest(shards / "val")  # as if written so (else the manifest check stops it first)
    with pytest.raises(ShardValidationError, match="no valid seglab.classes list") as error:
        validate_shards(shards, ["train", "val"], tmp_path / "report", **LIMITS)
    assert {"not_null:num_classes", "not_null:classes_digest", "not_null:invalid_label_pixels"} <= failed_rules(error)
    assert {r["split"] for r in offending(error, "not_null:num_classes")} == {"val"}


def test_unlabelled_share_at_the_limit_passes(tmp_path):
    rows = clean_rows()
    rows["val"][0] = make_row(101, "val", labelled=False)  # 1 of 5 = 20 %
    shards = write_dataset(tmp_path / "shards", rows)
    assert validate_shards(shards, ["train", "val"], tmp_path / "report", **LIMITS)["success"]
    with pytest.raises(ShardValidationError, match="at most 19% of the val images"):
        validate_shards(shards, ["train", "val"], tmp_path / "report", **(LIMITS | {"max_unlabelled_share": 0.19}))


def test_message_lists_ten_rows_and_counts_the_rest(tmp_path):
    rows = {"train": [make_row(i, "train", size=(8, 32)) for i in range(1, 15)]}
    shards = write_dataset(tmp_path / "shards", rows)
    with pytest.raises(ShardValidationError) as error:
        validate_shards(shards, ["train"], tmp_path / "report", **LIMITS)
    message = str(error.value)
    assert "height is between min_side=16 and max_side=64" in message
    assert "14 of 14 rows" in message and "... and 4 more" in message
    assert message.count("file_name=") == 10
    assert len(offending(error, "height_bounds")) == 14


def test_report_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    import seglab.data.validate as validate

    good = write_dataset(tmp_path / "good", clean_rows())
    bad_rows = clean_rows()
    _too_small(bad_rows)
    bad = write_dataset(tmp_path / "bad", bad_rows)
    report = tmp_path / "reports" / "validation"
    validate_shards(good, ["train", "val"], report, **LIMITS)
    good_summary = (report / "summary.json").read_text()

    # A crash while writing the report leaves the previous one untouched and no temp folder.
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(validate, "write_text_atomic", crash)
    with pytest.raises(OSError, match="disk full"):
        validate_shards(bad, ["train", "val"], report, **LIMITS)
    assert (report / "summary.json").read_text() == good_summary
    assert sorted(p.name for p in report.parent.iterdir()) == ["validation"]
    monkeypatch.undo()

    # A failed validation replaces it with a complete new report.
    with pytest.raises(ShardValidationError):
        validate_shards(bad, ["train", "val"], report, **LIMITS)
    assert json.loads((report / "summary.json").read_text())["success"] is False
    assert (report / "index.html").is_file()
    assert sorted(p.name for p in report.parent.iterdir()) == ["validation"]


def test_bad_arguments_and_missing_folder_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: shard folder not found"):
        validate_shards(tmp_path / "nowhere", ["train"], tmp_path / "report", **LIMITS)
    with pytest.raises(ValueError, match="min_side"):
        validate_shards(tmp_path, ["train"], tmp_path / "report", min_side=64, max_side=16, max_unlabelled_share=0.2)
    (tmp_path / "shards" / "train").mkdir(parents=True)
    path = tmp_path / "shards" / "train" / "part-00000.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(ShardIntegrityError, match=r"split 'train' .*: no manifest.json beside its 1 part file"):
        validate_shards(tmp_path / "shards", ["train"], tmp_path / "report", **LIMITS)
    write_manifest_entries(path.parent, [manifest_entry(path, 1)])  # written so: the profile names the file
    with pytest.raises(ValueError, match=r"part-00000.parquet: not a readable Parquet file"):
        validate_shards(tmp_path / "shards", ["train"], tmp_path / "report", **LIMITS)
    assert not (tmp_path / "report").exists()


def test_run_validate_data_uses_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "data" / "shards", clean_rows())
    cfg = Config.model_validate({
        "shard": {"out": "data/shards"},
        "data": {"splits": {"train": "train2017", "val": "val2017"}},
        "validate": {"report": "data/reports/validation", "min_side": 16, "max_side": 4096,
                     "max_unlabelled_share": 0.0},
    })
    summary = run_validate_data(cfg)
    assert summary["success"] and summary["settings"]["max_unlabelled_share"] == 0.0
    assert (tmp_path / "data" / "reports" / "validation" / "index.html").is_file()


@pytest.mark.coco_mini
@pytest.mark.skipif(not COCO_MINI.is_dir(), reason=f"coco-mini not found at {COCO_MINI}")
def test_coco_mini_shards_pass(tmp_path):
    from seglab.data.shard_stage import build_shards

    build_shards(COCO_MINI, tmp_path / "shards", splits={"train": "train2017", "val": "val2017"}, class_set="voc20")
    summary = validate_shards(tmp_path / "shards", ["train", "val"], tmp_path / "report",
                              min_side=16, max_side=4096, max_unlabelled_share=0.2)
    assert summary["success"] and summary["splits"]["train"]["images"] == 158
    assert summary["splits"]["val"]["images"] == 133
    assert (tmp_path / "report" / "index.html").is_file()
