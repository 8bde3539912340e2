"""The `validate_data` stage: Great Expectations checks on the Parquet shards.

Each split's part files are first checked against its manifest (missing, extra or changed files,
see seglab.data.manifest): a split that fails raises `ShardIntegrityError` naming the split and the
files, and no report is written, since the profile would describe other data.

Then `shard_profile` (seglab.data.profile) turns the shards into one row per image, and the
expectation suite `seglab_shards` (seglab.data.suite, which lists the rules) runs on that profile
through a GX Checkpoint whose `UpdateDataDocsAction` renders HTML Data Docs into the report folder,
next to a `summary.json` naming the offending rows. A failed expectation raises
`ShardValidationError` after the complete report is in place.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import pandas as pd

from seglab.atomic import atomic_dir, write_text_atomic
from seglab.data.expectations import ROW_KEYS, ephemeral_context, run_checkpoint
from seglab.data.profile import shard_profile
from seglab.data.shards import ShardIntegrityError, shard_files
from seglab.data.suite import SUITE_NAME, build_expectation_suite

if TYPE_CHECKING:
    from seglab.config import Config

log = logging.getLogger(__name__)

__all__ = ["ShardValidationError", "run_validate_data", "validate_shards"]

# Offending rows listed per broken expectation in the error message (summary.json holds more).
MAX_ROWS_IN_MESSAGE = 10


class ShardValidationError(ValueError):
    """The shards broke at least one expectation; the message lists them and the offending rows."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


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
