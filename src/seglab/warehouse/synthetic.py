"""Ingest into the `synthetic_validation` table (schema version 4): one row per validation of a GAN's
synthetic batch.

Rows come from `data/reports/synthetic/<gan>/summary.json` (written by
`seglab.gan.validate.validate_synthetic`), keyed by (gan, params_hash): params_hash identifies
the validated data and settings (synthetic shards, real reference shards, thresholds), so
re-ingesting the same report replaces its row and a new validation adds one. Each ingestion is
one transaction (delete the key's row, insert), so a failure leaves the previous state.

`rejected_by_rule` is JSON: rule -> samples it rejected (a sample can break several rules;
`batch:<rule>` counts the samples a failed batch rule rejected). Query it with DuckDB's JSON
functions, e.g. ``SELECT gan, key AS rule, value::INT AS samples FROM synthetic_validation,
json_each(rejected_by_rule)``. `summary` keeps the whole report minus per-sample lists.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb

from seglab.warehouse.schema import WarehouseError, connect, ensure_schema

__all__ = ["SummaryFileError", "ingest_synthetic_validation"]

_FIGURES = ("diversity", "kid_mean", "kid_std", *(f"channel_{s}_delta_{c}" for s in ("mean", "std") for c in "rgb"))
_COUNTS = ("images", "accepted", "rejected", "rejected_per_image", "rejected_by_batch")
_BULKY = ("rejected_samples", "expectations")  # per-sample lists and GX results stay in the report


class SummaryFileError(WarehouseError, ValueError):
    """A synthetic-validation summary.json that is missing, not JSON, or lacks a field."""


def _finite(value: Any, path: Path, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SummaryFileError(f"{path}: field {field!r} must be a number or null, got {value!r}")
    return float(value) if math.isfinite(value) else None


def _row(summary: dict, path: Path) -> dict[str, Any]:
    def need(field: str, kind: type | tuple, where: dict = summary, name: str | None = None) -> Any:
        label = name or field
        if field not in where:
            raise SummaryFileError(f"{path}: missing field {label!r} (is this a summary.json written by "
                                   "seglab.gan.validate.validate_synthetic?)")
        value = where[field]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise SummaryFileError(f"{path}: field {label!r} must be {getattr(kind, '__name__', kind)}, "
                                   f"got {value!r}")
        return value

    gan, params_hash = need("gan", str), need("params_hash", str)
    if not gan or not params_hash:
        raise SummaryFileError(f"{path}: gan and params_hash must be non-empty")
    try:
        validated_at = datetime.fromisoformat(need("validated_at", str))
    except ValueError:
        raise SummaryFileError(f"{path}: field 'validated_at' is not an ISO timestamp: "
                               f"{summary['validated_at']!r}") from None
    counts = {field: need(field, int) for field in _COUNTS}
    if counts["accepted"] + counts["rejected"] != counts["images"]:
        raise SummaryFileError(f"{path}: accepted ({counts['accepted']}) + rejected ({counts['rejected']}) "
                               f"!= images ({counts['images']})")
    rejected_by_rule = need("rejected_by_rule", dict)
    batch, real, settings = need("batch", dict), need("real", dict), need("settings", dict)
    generators = need("generator", list)
    seeds = need("generator_seed", list)
    return {
        "gan": gan,
        "params_hash": params_hash,
        "generator": ",".join(str(g) for g in generators) or None,
        "generator_seed": int(seeds[0]) if len(seeds) == 1 else None,
        "validated_at": validated_at,
        **counts,
        "rejected_by_rule": json.dumps(rejected_by_rule, sort_keys=True),
        "success": need("success", bool),
        "batch_success": need("batch_success", bool),
        "decision": need("decision", str),
        **{field: _finite(batch.get(field), path, f"batch.{field}") for field in _FIGURES},
        "real_diversity": _finite(real.get("diversity"), path, "real.diversity"),
        "kid_max": _finite(settings.get("kid_max"), path, "settings.kid_max"),
        "resolution": settings.get("resolution"),
        "feature_size": settings.get("feature_size"),
        "real_images": real.get("images"),
        "source_file": str(path.resolve()),
        "ingested_at": datetime.now(timezone.utc),
        "summary": json.dumps({k: v for k, v in summary.items() if k not in _BULKY}, default=str),
    }


def _load(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise SummaryFileError(f"{path}: not found; run `dvc repro validate_synthetic@<gan>` first") from None
    except json.JSONDecodeError as e:
        raise SummaryFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(summary, dict):
        raise SummaryFileError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    return summary


def ingest_synthetic_validation(con_or_path: duckdb.DuckDBPyConnection | str | Path,
                                summary_json_path: str | Path) -> dict[str, Any]:
    """Put one validation report into `synthetic_validation` (a connection, or the database file's path).

    Idempotent: the row with the report's (gan, params_hash) is replaced, in one transaction.
    The file is checked completely before anything is written.
    """
    path = Path(summary_json_path)
    row = _row(_load(path), path)
    if not isinstance(con_or_path, duckdb.DuckDBPyConnection):
        con = connect(con_or_path)
        try:
            ensure_schema(con)
            return ingest_synthetic_validation(con, path)
        finally:
            con.close()
    con = con_or_path
    columns = list(row)
    ensure_schema(con)  # the table is schema version 4's
    con.begin()
    try:
        con.execute("DELETE FROM synthetic_validation WHERE gan = ? AND params_hash = ?",
                    [row["gan"], row["params_hash"]])
        con.execute(f"INSERT INTO synthetic_validation ({', '.join(columns)}) "
                    f"VALUES ({', '.join('?' for _ in columns)})", [row[c] for c in columns])
        con.commit()
    except BaseException:
        con.rollback()
        raise
    return {"gan": row["gan"], "params_hash": row["params_hash"], "accepted": row["accepted"],
            "rejected": row["rejected"], "source_file": row["source_file"]}
