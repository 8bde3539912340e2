"""The `seglab_shards` expectation suite: what `validate_data` checks on a shard profile.

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

Rules on a column the profile lacks are left out (`skipped_rules` in summary.json), since
`table_columns` already reports the column missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from seglab.data.classes import IGNORE_INDEX
from seglab.data.expectations import annotate
from seglab.data.profile import PROFILE_COLUMNS

if TYPE_CHECKING:  # GX takes ~2 s to import: only the functions that run it import it.
    import great_expectations as gx

__all__ = ["SUITE_NAME", "build_expectation_suite"]

SUITE_NAME = "seglab_shards"
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
