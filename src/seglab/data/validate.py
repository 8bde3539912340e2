"""The `validate_data` stage: Great Expectations checks on the Parquet shards.

`shard_profile` turns the shards into one row per image: the shard columns except the payloads,
plus columns derived by decoding each image and label (sizes, formats, label statistics). The
expectation suite `seglab_shards` (built by `build_expectation_suite`) runs on that profile through
a GX Checkpoint whose `UpdateDataDocsAction` renders HTML Data Docs into the report folder, next
to a `summary.json` naming the offending rows. A failed expectation raises `ShardValidationError`
after the complete report is in place.

Rules and the expectations that check them (`rule` names the entry in summary.json):

    table_columns             ExpectTableColumnsToMatchSet(exact): the profile's columns are the shard
                              schema's non-payload columns plus the derived ones (missing/extra column)
    file_schema               ExpectColumnValuesToBeNull(schema_mismatch): each file's Arrow schema
                              equals SHARD_SCHEMA (names and types, payload columns included)
    not_null:<column>         ExpectColumnValuesToNotBeNull: no missing value (a null derived value means
                              a payload or the class-list metadata is missing or unreadable)
    split_nonempty            ExpectColumnDistinctValuesToContainSet(shard_split): every configured split
                              has at least one image
    unique_image_id           ExpectCompoundColumnsToBeUnique: (split, image_id) unique
    unique_file_name          ExpectCompoundColumnsToBeUnique: (split, file_name) unique
    unique_image_content      ExpectColumnValuesToBeUnique(image_sha1): no JPEG stored twice, within a
                              split or across splits (train/val leakage)
    split_matches_folder      ExpectColumnPairValuesToBeEqual: `split` equals the folder the file is in
    file_name_nonempty,       ExpectColumnValueLengthsToBeBetween(min 1)
    source_nonempty
    height_bounds,            ExpectColumnValuesToBeBetween: min_side <= height, width <= max_side
    width_bounds
    orig_height_ge_height,    ExpectColumnPairValuesAToBeGreaterThanB(or_equal): stored size <= annotated
    orig_width_ge_width       size (shards only downscale)
    label_height_eq_height,   ExpectColumnPairValuesToBeEqual: label PNG and image JPEG sizes equal the
    label_width_eq_width,     row's height/width
    image_height_eq_height,
    image_width_eq_width
    label_values_in_class_set ExpectColumnValuesToBeBetween(invalid_label_pixels, 0, 0): every label value
                              is < num_classes or 255
    class_list_consistent     ExpectColumnValuesToBeInSet(classes_digest): every file carries the first
                              file's `seglab.classes` list
    class_pixels_length       ExpectColumnPairValuesToBeEqual: len(class_pixels) == len(seglab.classes)
    label_stats_match         ExpectColumnValuesToBeInSet([True]): class_pixels / ignore_pixels equal
                              the label's histogram
    image_format,             ExpectColumnValuesToBeInSet: payloads are JPEG / PNG
    label_format
    decodable                 ExpectColumnValuesToBeNull(decode_error): payloads decode (a truncated
                              JPEG is caught here)
    unlabelled_share:<split>  ExpectColumnValuesToBeBetween(labelled_pixels >= 1, mostly=1 - max_unlabelled_share,
                              row_condition shard_split == <split>): at most that share of the split's
                              images has no labelled pixel

Before any of these, each split's part files are checked against its manifest (missing, extra or
changed files, see seglab.data.manifest): a split that fails raises `ShardIntegrityError` naming
the split and the files, and no report is written, since the profile would describe other data.

Rules on a column the profile lacks are left out (`skipped_rules` in summary.json), since
`table_columns` already reports the column missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from seglab.atomic import atomic_dir, write_text_atomic
from seglab.data.classes import IGNORE_INDEX
from seglab.data.expectations import ROW_KEYS, annotate, ephemeral_context, run_checkpoint
from seglab.data.shards import SHARD_SCHEMA, ShardIntegrityError, open_shard, shard_files

if TYPE_CHECKING:  # GX takes ~2 s to import: only the functions that run it import it.
    import great_expectations as gx

    from seglab.config import Config

log = logging.getLogger(__name__)

SUITE_NAME = "seglab_shards"
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
# Columns that are null on purpose when all is well.
_NULL_WHEN_OK = ("schema_mismatch", "decode_error")
# What a null derived value means, for the not-null rules' descriptions.
_NULL_MEANS = {
    "num_classes": "the file's metadata has no valid seglab.classes list",
    "classes_digest": "the file's metadata has no valid seglab.classes list",
    "image_format": "the image payload is missing or not an image",
    "image_height": "the image payload is missing or not an image",
    "image_width": "the image payload is missing or not an image",
    "image_sha1": "the image payload is missing",
    "label_format": "the label payload is missing or not an image",
    "label_height": "the label payload is missing or not a single-channel class map",
    "label_width": "the label payload is missing or not a single-channel class map",
    "invalid_label_pixels": "the label does not decode or the class list is missing",
    "labelled_pixels": "the label does not decode or the class list is missing",
    "class_pixels_length": "class_pixels is missing",
    "label_stats_match": "the label, the class list, class_pixels or ignore_pixels is missing",
}
# Identify an offending row in GX results and in the error message.
MAX_ROWS_IN_MESSAGE = 10


class ShardValidationError(ValueError):
    """The shards broke at least one expectation; the message lists them and the offending rows."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


# ---- profile -----------------------------------------------------------------------------------

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


# ---- the suite ---------------------------------------------------------------------------------

def _mostly(max_share: float) -> float:
    # Rounded so that a share exactly at the limit (e.g. 1 - 0.2 vs 4/5) compares equal, not one ulp off.
    return min(1.0, max(0.0, round(1.0 - max_share, 12)))


def build_expectation_suite(
    splits: Iterable[str],
    *,
    min_side: int,
    max_side: int,
    max_unlabelled_share: float,
    classes_digest: str | None,
    columns: Iterable[str] = PROFILE_COLUMNS,
) -> "gx.ExpectationSuite":
    """The `seglab_shards` suite for a profile from `shard_profile` (see the module docstring).

    `classes_digest` is the reference class list's (the first shard file's; None when no file has one);
    `columns` are the profile's columns: rules on a column it lacks are left out (listed in the
    suite's meta `skipped_rules`), since `table_columns` already reports the column missing.
    """
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    splits = list(splits)
    present = set(columns)

    skipped: dict[str, str] = {}

    def rule(name: str, expectation, description: str):
        # A rule on a column the profile lacks could only raise; `table_columns` reports the column.
        referenced = [getattr(expectation, a, None) for a in ("column", "column_A", "column_B")]
        referenced += list(getattr(expectation, "column_list", None) or [])
        absent = [c for c in referenced if c is not None and c not in present]
        if absent:
            skipped[name] = f"column(s) {absent} absent"
            return None
        return annotate(expectation, name, description)

    expectations = [
        rule("table_columns", E.ExpectTableColumnsToMatchSet(column_set=list(PROFILE_COLUMNS), exact_match=True),
             "the shard columns (payloads aside) and the derived columns are exactly the expected set"),
        rule("file_schema", E.ExpectColumnValuesToBeNull(column="schema_mismatch"),
             "every shard file's schema equals SHARD_SCHEMA (column names and types)"),
    ]
    for column in PROFILE_COLUMNS:
        if column not in _NULL_WHEN_OK:
            meaning = _NULL_MEANS.get(column)
            expectations.append(rule(f"not_null:{column}", E.ExpectColumnValuesToNotBeNull(column=column),
                                     f"{column} is never null" + (f" (null: {meaning})" if meaning else "")))
    expectations += [
        rule("split_nonempty", E.ExpectColumnDistinctValuesToContainSet(column="shard_split", value_set=splits),
             f"every configured split ({', '.join(splits)}) has at least one image"),
        rule("unique_image_id", E.ExpectCompoundColumnsToBeUnique(column_list=["shard_split", "image_id"]),
             "image_id is unique within each split"),
        rule("unique_file_name", E.ExpectCompoundColumnsToBeUnique(column_list=["shard_split", "file_name"]),
             "file_name is unique within each split"),
        rule("unique_image_content", E.ExpectColumnValuesToBeUnique(column="image_sha1"),
             "no image (JPEG bytes) is stored twice, within a split or across splits (leakage)"),
        rule("split_matches_folder", E.ExpectColumnPairValuesToBeEqual(column_A="split", column_B="shard_split"),
             "the split column equals the split folder the shard lies in"),
        rule("file_name_nonempty", E.ExpectColumnValueLengthsToBeBetween(column="file_name", min_value=1),
             "file_name is not empty"),
        rule("source_nonempty", E.ExpectColumnValueLengthsToBeBetween(column="source", min_value=1),
             "source is not empty"),
        rule("height_bounds", E.ExpectColumnValuesToBeBetween(column="height", min_value=min_side, max_value=max_side),
             f"height is between min_side={min_side} and max_side={max_side}"),
        rule("width_bounds", E.ExpectColumnValuesToBeBetween(column="width", min_value=min_side, max_value=max_side),
             f"width is between min_side={min_side} and max_side={max_side}"),
        rule("orig_height_ge_height",
             E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="orig_height", column_B="height", or_equal=True),
             "stored height <= orig_height (shards only downscale)"),
        rule("orig_width_ge_width",
             E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="orig_width", column_B="width", or_equal=True),
             "stored width <= orig_width (shards only downscale)"),
        rule("label_height_eq_height", E.ExpectColumnPairValuesToBeEqual(column_A="label_height", column_B="height"),
             "the label PNG's height equals the row's height"),
        rule("label_width_eq_width", E.ExpectColumnPairValuesToBeEqual(column_A="label_width", column_B="width"),
             "the label PNG's width equals the row's width"),
        rule("image_height_eq_height", E.ExpectColumnPairValuesToBeEqual(column_A="image_height", column_B="height"),
             "the image JPEG's height equals the row's height"),
        rule("image_width_eq_width", E.ExpectColumnPairValuesToBeEqual(column_A="image_width", column_B="width"),
             "the image JPEG's width equals the row's width"),
        rule("label_values_in_class_set",
             E.ExpectColumnValuesToBeBetween(column="invalid_label_pixels", min_value=0, max_value=0),
             f"every label value is a class index (< num_classes) or {IGNORE_INDEX} (ignore)"),
        rule("class_pixels_length",
             E.ExpectColumnPairValuesToBeEqual(column_A="class_pixels_length", column_B="num_classes"),
             "class_pixels has one count per class of the file's class list"),
        rule("label_stats_match", E.ExpectColumnValuesToBeInSet(column="label_stats_match", value_set=[True]),
             "class_pixels and ignore_pixels equal the label's pixel histogram"),
        rule("image_format", E.ExpectColumnValuesToBeInSet(column="image_format", value_set=["JPEG"]),
             "the image payload is a JPEG"),
        rule("label_format", E.ExpectColumnValuesToBeInSet(column="label_format", value_set=["PNG"]),
             "the label payload is a PNG"),
        rule("decodable", E.ExpectColumnValuesToBeNull(column="decode_error"),
             "image and label payloads decode"),
    ]
    if classes_digest is not None:
        expectations.append(rule(
            "class_list_consistent", E.ExpectColumnValuesToBeInSet(column="classes_digest", value_set=[classes_digest]),
            "every shard file carries the same class list (seglab.classes metadata) as the first one"))
    for split in splits:
        expectations.append(rule(
            f"unlabelled_share:{split}",
            E.ExpectColumnValuesToBeBetween(column="labelled_pixels", min_value=1, mostly=_mostly(max_unlabelled_share),
                                            row_condition=Column("shard_split") == split),
            f"at most {max_unlabelled_share:.0%} of the {split} images have no labelled pixel"))
    return gx.ExpectationSuite(name=SUITE_NAME, expectations=[e for e in expectations if e is not None],
                               meta={"skipped_rules": skipped})


# ---- running it --------------------------------------------------------------------------------

def _failure_detail(entry: dict) -> str:
    if entry["exception"]:
        return f"could not be evaluated: {entry['exception']}"
    observed = entry.get("observed")
    if entry["rule"] == "table_columns" and isinstance(entry.get("details"), dict):
        mismatched = entry["details"].get("mismatched", {})
        parts = [f"{k} {v}" for k, v in mismatched.items()]
        return "columns " + "; ".join(parts) if parts else f"observed {observed}"
    if entry["rule"] == "split_nonempty":
        return f"splits without images: {entry.get('missing')}"
    if entry.get("unexpected_count") is not None:
        share = f" ({entry['unexpected_percent']:.1f}%)" if entry.get("unexpected_percent") is not None else ""
        return f"{entry['unexpected_count']} of {entry['element_count']} rows{share}"
    return f"observed {observed}"


def _describe_row(row: dict) -> str:
    if "row_index" in row:
        return f"profile row {row['row_index']}"
    values = ", ".join(f"{k}={v}" for k, v in (row.get("values") or {}).items())
    where = f"{row['shard_file']} row {row['row']}"
    return f"{row['split']} image_id={row['image_id']} file_name={row['file_name']} ({where})" + (
        f": {values}" if values else "")


def _failure_message(summary: dict, index_html: Path, summary_json: Path) -> str:
    failed = [e for e in summary["expectations"] if not e["success"]]
    lines = [f"shard validation failed: {len(failed)} of {len(summary['expectations'])} expectations "
             f"broken in {summary['shard_dir']} (suite {SUITE_NAME})"]
    for e in failed:
        lines.append(f"- {e['description']} [{e['rule']}: {e['expectation']}]: {_failure_detail(e)}")
        for row in e["offending_rows"][:MAX_ROWS_IN_MESSAGE]:
            lines.append(f"    {_describe_row(row)}")
        if e["offending_rows_total"] > MAX_ROWS_IN_MESSAGE:
            lines.append(f"    ... and {e['offending_rows_total'] - MAX_ROWS_IN_MESSAGE} more")
    lines.append(f"Data Docs: {index_html}")
    lines.append(f"Summary: {summary_json}")
    return "\n".join(lines)


def _split_stats(profile: pd.DataFrame, splits: list[str]) -> dict:
    stats = {}
    for split in splits:
        rows = profile[profile["shard_split"] == split]
        unlabelled = int((rows["labelled_pixels"] == 0).sum())
        stats[split] = {"images": len(rows), "unlabelled_images": unlabelled,
                        "unlabelled_share": round(unlabelled / len(rows), 4) if len(rows) else None}
    return stats


def _reference_classes(profile: pd.DataFrame) -> tuple[int | None, str | None, str | None]:
    known = profile.dropna(subset=["classes_digest"])
    if known.empty:
        return None, None, None
    first = known.iloc[0]
    return int(first["num_classes"]), str(first["classes_digest"]), str(first["shard_file"])


def _check_integrity(shard_dir: Path, splits: list[str]) -> None:
    """Every split against its manifest; one error listing every split that fails."""
    problems = []
    for split in splits:
        try:
            shard_files(shard_dir, split)
        except FileNotFoundError:  # no shards at all: the suite's split_nonempty reports it
            continue
        except ShardIntegrityError as e:
            problems.append(str(e))
    if problems:
        raise ShardIntegrityError("validate-data: " + "\n".join(problems))


def validate_shards(
    shard_dir: str | Path,
    splits: Iterable[str],
    report_dir: str | Path,
    *,
    min_side: int,
    max_side: int,
    max_unlabelled_share: float,
    decode_images: bool = True,
) -> dict:
    """Run the `seglab_shards` suite over `splits` of `shard_dir`; write Data Docs and summary.json
    to `report_dir` (atomically: the old report stays until the complete new one replaces it).

    Returns the summary; if an expectation fails, raises `ShardValidationError` (after writing the
    report) listing the broken expectations with their first offending rows.
    """
    if min_side > max_side:
        raise ValueError(f"validate.min_side ({min_side}) must be <= validate.max_side ({max_side})")
    if not 0.0 <= max_unlabelled_share <= 1.0:
        raise ValueError(f"validate.max_unlabelled_share must be in [0, 1], got {max_unlabelled_share}")
    splits = list(splits)
    if not splits:
        raise ValueError("no splits to validate (data.splits is empty)")
    shard_dir, report_dir = Path(shard_dir), Path(report_dir)
    started = time.perf_counter()
    _check_integrity(shard_dir, splits)
    profile = shard_profile(shard_dir, splits, decode_images=decode_images)
    profiled = time.perf_counter()
    num_classes, classes_digest, reference_file = _reference_classes(profile)

    with atomic_dir(report_dir) as tmp:
        context = ephemeral_context(tmp)
        suite = build_expectation_suite(
            splits, min_side=min_side, max_side=max_side, max_unlabelled_share=max_unlabelled_share,
            classes_digest=classes_digest, columns=profile.columns)
        validation, entries = run_checkpoint(context, "validate_data", suite, profile,
                                             [c for c in ROW_KEYS if c in profile.columns])
        summary = {
            "success": bool(validation.success),
            "suite": SUITE_NAME,
            "shard_dir": str(shard_dir),
            "splits": _split_stats(profile, splits),
            "images": len(profile),
            "shard_files": int(profile["shard_file"].nunique()),
            "reference_classes_file": reference_file,
            "num_classes": num_classes,
            "settings": {"min_side": min_side, "max_side": max_side, "max_unlabelled_share": max_unlabelled_share,
                         "decode_images": decode_images},
            "statistics": {"evaluated": len(entries), "successful": sum(e["success"] for e in entries),
                           "unsuccessful": sum(not e["success"] for e in entries)},
            "data_docs": "index.html",
            "skipped_rules": suite.meta.get("skipped_rules", {}),
            "expectations": entries,
        }
        if not (tmp / "index.html").is_file():
            raise RuntimeError(f"GX did not build the Data Docs index in {tmp}")
        write_text_atomic(tmp / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    log.info("validated %d images in %s: profile %.1fs, suite %.1fs, %s", len(profile), shard_dir,
             profiled - started, time.perf_counter() - profiled, "passed" if summary["success"] else "FAILED")
    if not summary["success"]:
        raise ShardValidationError(
            _failure_message(summary, report_dir / "index.html", report_dir / "summary.json"), summary)
    return summary


def run_validate_data(cfg: "Config") -> dict:
    """The `validate_data` stage: params.yaml -> data/reports/validation/{index.html, summary.json}."""
    v = cfg.validate_
    return validate_shards(cfg.shard.out, list(cfg.data.splits), v.report, min_side=v.min_side,
                           max_side=v.max_side, max_unlabelled_share=v.max_unlabelled_share,
                           decode_images=v.decode_images)
