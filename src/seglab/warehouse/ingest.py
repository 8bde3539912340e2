"""Load evaluation results (``data/eval/*/eval.json``) into the DuckDB warehouse.

Every eval.json is checked completely before anything is written; a bad file raises
`EvalFileError` naming the file, the record (``runs[1].per_class[3]``) and the field. Writing is
one transaction: the rows of every run being (re)ingested are deleted from all tables and the
new rows inserted, then committed. So re-ingesting is idempotent, a changed eval.json replaces
its run's old values, and a kill or an error at any point leaves the previous state (DuckDB
only makes a transaction durable at COMMIT).

Runs accumulate by default: a run_id hashes the model's settings, so a model re-evaluated with
other settings adds a run and the earlier one stays for comparison (the leaderboard view marks
the newest as ``latest``). ``mirror=True`` makes the warehouse hold exactly the current files'
runs instead.

Rows go in as Arrow tables (``INSERT ... BY NAME SELECT``), not row-by-row SQL; each file's rows
are held as Arrow tables (the confusion cells built with numpy), not Python dicts, until then.

Ingest is incremental: a file whose runs the warehouse already holds from that very file with the
same sha256 is hashed, not read again, and its rows are left as they are, so adding one model to
a warehouse of thousands of runs reads and writes that model's file only. A run id that a changed
file shares with an unchanged one is still refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from seglab.digest import json_safe, sha256_file
from seglab.records import PER_CLASS_COUNTS, PER_CLASS_SCORES, EvalEntry, EvalRecord, EvalRun, RecordError
from seglab.warehouse.schema import (
    LEGACY_PROTOCOL,
    SYNTHETIC_VALIDATION_TABLE,
    TABLES,
    WRITER_LOCK_WAIT_S,
    WarehouseError,
    connect,
    ensure_schema,
)
from seglab.warehouse.synthetic import ingest_synthetic_validation

__all__ = ["EvalFileError", "ingest_eval", "ingest_files", "load_eval", "open_warehouse", "run_ingest"]


class EvalFileError(WarehouseError, ValueError):
    """An eval.json that is missing, not JSON, or does not follow the contract."""


# The `run` object's fields with a column of their own (`seglab.records.EvalRun` checks them) and
# their Arrow types. Other fields are kept only in runs.run_json. `weights` and `class_set` are
# handled apart (see _run_row).
_RUN_FIELD_KINDS: dict[str, str] = {
    "run_id": "str", "name": "str", "variant": "str", "split": "str", "model": "str",
    "arch": "str", "backbone": "str", "weights_loaded": "str", "members": "str_list",
    "member_weights": "float_list", "params_hash": "str", "git_rev": "str", "dataset": "str",
    "classes": "str_list", "image_size": "int", "batch_size": "int", "width": "float",
    "epochs_planned": "int", "epochs_run": "int", "best_epoch": "int", "best_val_miou": "float",
    "seconds_per_epoch": "float", "train_seconds": "float", "train_images_per_second": "float",
    "param_count": "int", "trainable_param_count": "int", "train_images": "int",
    "val_images": "int", "seed": "int", "mixed_precision": "str", "strategy": "str",
    "replicas": "int", "tta": "str_list", "eval_images": "int", "images_per_second": "float",
    "latency_ms_p50": "float", "latency_ms_p90": "float", "created_at": "timestamp",
    "evaluated_at": "timestamp", "augmenter": "str", "synthetic_images_used": "int",
    "train_dataset": "str", "eval_protocol": "str",
}
_PER_CLASS_SCORES = PER_CLASS_SCORES
_PER_CLASS_COUNTS = PER_CLASS_COUNTS

_ARROW_KINDS = {
    "str": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "str_list": pa.list_(pa.string()),
    "float_list": pa.list_(pa.float64()),
    "timestamp": pa.timestamp("us", tz="UTC"),
}
_RUNS_SCHEMA = pa.schema(
    [(name, _ARROW_KINDS[kind]) for name, kind in _RUN_FIELD_KINDS.items()]
    + [
        ("weights", pa.string()),
        ("class_set", pa.string()),
        ("num_classes", pa.int64()),
        ("source_file", pa.string()),
        ("source_sha256", pa.string()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
        ("run_json", pa.string()),
    ]
)
_TABLE_SCHEMAS = {
    "runs": _RUNS_SCHEMA,
    "metrics": pa.schema([("run_id", pa.string()), ("split", pa.string()),
                          ("metric", pa.string()), ("value", pa.float64())]),
    "per_class": pa.schema(
        [("run_id", pa.string()), ("class_index", pa.int64()), ("class_name", pa.string())]
        + [(score, pa.float64()) for score in _PER_CLASS_SCORES]
        + [(count, pa.int64()) for count in _PER_CLASS_COUNTS]
    ),
    "confusion": pa.schema([("run_id", pa.string()), ("true_index", pa.int64()),
                            ("pred_index", pa.int64()), ("count", pa.int64())]),
    "history": pa.schema([("run_id", pa.string()), ("epoch", pa.int64()),
                          ("metric", pa.string()), ("value", pa.float64())]),
}


@dataclass
class EvalFile:
    """One checked eval.json: its rows for every table as Arrow tables, ready to insert."""

    path: Path
    source_file: str  # resolved path: the key under which its runs are replaced
    sha256: str
    run_ids: list[str]
    tables: dict[str, pa.Table] = field(default_factory=dict)


def _utc(moment: str | None) -> datetime | None:
    if moment is None:
        return None
    parsed = datetime.fromisoformat(moment)
    # The contract writes UTC; a timestamp without an offset is read as UTC.
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def _run_row(run: EvalRun) -> dict[str, Any]:
    row = {key: getattr(run, key) for key in _RUN_FIELD_KINDS}
    for key in ("created_at", "evaluated_at"):
        row[key] = _utc(row[key])
    row["num_classes"] = len(run.classes)
    # An eval.json from before evaluations chose their data and protocol: the model's own val split,
    # letterboxed.
    row["train_dataset"] = run.train_dataset if run.train_dataset is not None else run.dataset
    row["eval_protocol"] = run.eval_protocol if run.eval_protocol is not None else LEGACY_PROTOCOL
    # A named class set stays as its name; an explicit list of categories is stored as JSON.
    row["class_set"] = json.dumps(run.class_set) if isinstance(run.class_set, list) else run.class_set
    # For a model `weights` names the pretrained weights; the ensemble's run gives the members'
    # weights in the mean there instead.
    if isinstance(run.weights, list):
        row["member_weights"], row["weights"] = run.weights, None
    else:
        row["weights"] = run.weights
    return row


def _entry_rows(entry: EvalEntry, rows: dict[str, list[dict[str, Any]]], confusion: list[pa.Table]) -> None:
    run_id, split = entry.run.run_id, entry.run.split
    rows["metrics"].extend({"run_id": run_id, "split": split, "metric": metric, "value": value}
                           for metric, value in entry.metrics.items())
    rows["per_class"].extend({"run_id": run_id, **scores.model_dump()} for scores in entry.class_scores())
    # C x C cells per run: the non-zero ones, picked out by numpy rather than a Python loop.
    matrix = np.asarray(entry.confusion, dtype=np.int64).reshape(len(entry.confusion), -1)
    true_index, pred_index = np.nonzero(matrix)
    confusion.append(pa.table({"run_id": pa.array([run_id] * len(true_index), pa.string()),
                               "true_index": true_index.astype(np.int64), "pred_index": pred_index.astype(np.int64),
                               "count": matrix[true_index, pred_index]}, schema=_TABLE_SCHEMAS["confusion"]))
    rows["history"].extend({"run_id": run_id, "epoch": epoch.epoch, "metric": metric, "value": value}
                           for epoch in entry.history for metric, value in epoch.metrics().items())


def load_eval(eval_json_path: str | Path) -> EvalFile:
    """Read and check one eval.json completely (`seglab.records.EvalRecord`); raise EvalFileError
    naming the file and the field on the first problem."""
    path = Path(eval_json_path)
    try:
        record = EvalRecord.load(path)
    except RecordError as e:
        raise EvalFileError(str(e)) from None
    result = EvalFile(path=path, source_file=str(path.resolve()), sha256=sha256_file(path),
                      run_ids=[entry.run.run_id for entry in record.runs])
    ingested_at = datetime.now(timezone.utc)
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES if t != "confusion"}
    confusion: list[pa.Table] = []
    for entry in record.runs:
        run_row = _run_row(entry.run)
        run_row.update(source_file=result.source_file, source_sha256=result.sha256, ingested_at=ingested_at,
                       run_json=json.dumps(json_safe(entry.run.to_json()), sort_keys=True, allow_nan=False))
        rows["runs"].append(run_row)
        _entry_rows(entry, rows, confusion)
    result.tables = {table: pa.Table.from_pylist(table_rows, schema=_TABLE_SCHEMAS[table])
                     for table, table_rows in rows.items()}
    result.tables["confusion"] = pa.concat_tables(confusion) if confusion else _TABLE_SCHEMAS["confusion"].empty_table()
    return result


def _insert(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
    """Bulk-insert an Arrow table into `table`, columns matched by name.

    Ingestion migrates a warehouse to the current schema first, so the table has every column; a
    warehouse deliberately held at an older version (the migration tests build one so) gets the
    columns it has, and a later migration backfills the rest from run_json.
    """
    columns = {row[0] for row in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = ?", [table]).fetchall()}
    rows = rows.select([name for name in rows.column_names if name in columns])
    view = f"_seglab_new_{table}"
    con.register(view, rows)
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {view}")
    finally:
        con.unregister(view)


def _replace(con: duckdb.DuckDBPyConnection, files: list[EvalFile], replaced_ids: Iterable[str]) -> dict[str, int]:
    """Delete `replaced_ids` from every table, insert the files' rows; the caller holds the transaction."""
    # One chunk per table: DuckDB scans an Arrow table of thousands of small chunks (one per file)
    # many times slower and with ~1 GB more memory (3,000 runs).
    tables = {
        table: (pa.concat_tables([f.tables[table] for f in files]).combine_chunks() if files
                else _TABLE_SCHEMAS[table].empty_table())
        for table in TABLES
    }
    doomed = pa.table({"run_id": pa.array(sorted(set(replaced_ids)), type=pa.string())})
    con.register("_seglab_doomed_runs", doomed)
    try:
        for table in TABLES:  # children first, then runs
            con.execute(f"DELETE FROM {table} WHERE run_id IN (SELECT run_id FROM _seglab_doomed_runs)")
    finally:
        con.unregister("_seglab_doomed_runs")
    for table in reversed(TABLES):  # runs first
        _insert(con, table, tables[table])
    return {table: tables[table].num_rows for table in TABLES}


def _check_unique_runs(files: list[EvalFile]) -> None:
    owner: dict[str, Path] = {}
    for f in files:
        for run_id in f.run_ids:
            if run_id in owner:
                raise EvalFileError(f"{f.path}: run_id {run_id!r} is also in {owner[run_id]}; "
                                    "each run must come from one eval.json")
            owner[run_id] = f.path


def open_warehouse(path: str | Path, *, lock_wait_s: float = WRITER_LOCK_WAIT_S) -> duckdb.DuckDBPyConnection:
    """A read-write connection to the warehouse at `path`, created and migrated as needed.

    A reader holding the file (the dashboard's reads take milliseconds) is waited for up to
    `lock_wait_s`; after that WarehouseError names the file and who holds it.
    """
    con = connect(path, lock_wait_s=lock_wait_s)
    try:
        ensure_schema(con)
    except BaseException:
        con.close()
        raise
    return con


def _runs_from_sources(con: duckdb.DuckDBPyConnection, where_sql: str, params: list[Any]) -> list[str]:
    return [r[0] for r in con.execute(f"SELECT run_id FROM runs WHERE {where_sql}", params).fetchall()]


def _unchanged_sources(con: duckdb.DuckDBPyConnection, paths: list[Path]) -> dict[str, Path]:
    """resolved path -> path, for the files whose runs the warehouse holds from that very file at
    its current sha256 (every run ingested from it has that hash): there is nothing to re-read."""
    stored = {source: hashes for source, hashes in con.execute(
        "SELECT source_file, list(DISTINCT source_sha256) FROM runs GROUP BY source_file").fetchall()}
    unchanged = {}
    for path in paths:
        source = str(path.resolve())
        hashes = stored.get(source)
        if hashes is not None and len(hashes) == 1 and path.is_file() and sha256_file(path) == hashes[0]:
            unchanged[source] = path
    return unchanged


def _check_against_unchanged(con: duckdb.DuckDBPyConnection, files: list[EvalFile], unchanged: dict[str, Path]) -> None:
    """A changed file may not take a run that an unchanged file of the same ingest holds."""
    owner = {run_id: f.path for f in files for run_id in f.run_ids}
    if not unchanged or not owner:
        return
    held = con.execute("SELECT run_id, source_file FROM runs WHERE list_contains(?, run_id)",
                       [sorted(owner)]).fetchall()
    for run_id, source in sorted(held):
        if source in unchanged:
            raise EvalFileError(f"{owner[run_id]}: run_id {run_id!r} is also in {unchanged[source]}; "
                                "each run must come from one eval.json")


def ingest_files(con: duckdb.DuckDBPyConnection, paths: Iterable[str | Path], *,
                 replace_source: bool = False, prune_under: str | Path | None = None) -> dict[str, Any]:
    """Check every new or changed file, then replace their runs in one transaction.

    A file whose runs are in the warehouse from that file with its current sha256 is unchanged:
    only hashed, its rows kept (`unchanged_files` counts them).
    replace_source: also drop runs earlier ingested from the same file that it no longer holds
        (its params_hash, hence run_id, changed), instead of keeping them as history.
    prune_under: also drop runs ingested from any file under this folder that is not in `paths`
        (a model removed from params.yaml).
    """
    paths = [Path(p) for p in paths]
    ensure_schema(con)
    unchanged = _unchanged_sources(con, paths)
    files = [load_eval(p) for p in paths if str(p.resolve()) not in unchanged]
    _check_unique_runs(files)
    _check_against_unchanged(con, files, unchanged)
    new_ids = {run_id for f in files for run_id in f.run_ids}
    con.begin()
    try:
        replaced = set(new_ids)
        if replace_source:
            for f in files:
                replaced.update(_runs_from_sources(con, "source_file = ?", [f.source_file]))
        if prune_under is not None:
            prefix = str(Path(prune_under).resolve()).rstrip("/") + "/"
            kept = [f.source_file for f in files] + list(unchanged)
            replaced.update(_runs_from_sources(
                con, "starts_with(source_file, ?) AND NOT list_contains(?, source_file)", [prefix, kept]))
        rows = _replace(con, files, replaced)
        con.commit()
    except BaseException:
        con.rollback()
        raise
    return {
        "files": [str(f.path) for f in files],
        "unchanged_files": [str(p) for p in unchanged.values()],
        "runs": sorted(new_ids),
        "removed_runs": sorted(replaced - new_ids),
        "rows": rows,
    }


def ingest_eval(con_or_path: duckdb.DuckDBPyConnection | str | Path, eval_json_path: str | Path, *,
                replace_source: bool = False) -> dict[str, Any]:
    """Ingest one eval.json into a warehouse (a connection, or the path of the database file).

    Idempotent: the file's runs replace any earlier rows of the same run_id (and, with
    `replace_source`, every run earlier ingested from this file), all in one transaction.
    """
    if isinstance(con_or_path, duckdb.DuckDBPyConnection):
        return ingest_files(con_or_path, [eval_json_path], replace_source=replace_source)
    con = open_warehouse(con_or_path)
    try:
        return ingest_files(con, [eval_json_path], replace_source=replace_source)
    finally:
        con.close()


def run_ingest(cfg, *, mirror: bool | None = None) -> dict[str, Any]:
    """The `ingest` stage: every ``<evaluate.out>/*/eval.json`` into ``warehouse.path``, one transaction:
    the stage's ``<name>/`` folders and the ``<name>@<dataset>.<split>/`` ones `seglab evaluate --data
    --split` writes alike.

    mirror: None reads ``warehouse.mirror`` from params. False keeps runs from earlier settings as history. True makes the runs that
        came from ``evaluate.out`` exactly those of the current files: runs of eval.json files
        that are gone, or that now hold other run ids, are removed in the same transaction.
        Runs ingested from elsewhere with `ingest_eval` are left alone either way.
    """
    if mirror is None:
        mirror = cfg.warehouse.mirror
    eval_dir = Path(cfg.evaluate.out)
    # <name>/ and <name>@<dataset>.<split>/ (`seglab evaluate --data --split`) alike.
    paths = sorted(eval_dir.glob("*/eval.json"))
    if not paths:
        raise EvalFileError(f"{eval_dir}: no */eval.json to ingest; run `seglab evaluate NAME` "
                            "(or `dvc repro`) first")
    con = open_warehouse(cfg.warehouse.path)
    try:
        summary = ingest_files(con, paths, replace_source=mirror, prune_under=eval_dir if mirror else None)
        # The synthetic-data gate's figures, one idempotent transaction per report.
        synthetic = sorted(Path(cfg.validate_synthetic.report).glob("*/summary.json"))
        for report in synthetic:
            ingest_synthetic_validation(con, report)
        total = {table: con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
                 for table in (*TABLES, SYNTHETIC_VALIDATION_TABLE)}
        con.execute("CHECKPOINT")  # fold the WAL into the file: DVC caches a single file
    finally:
        con.close()
    return {
        "warehouse": str(cfg.warehouse.path),
        "files": len(paths),
        "unchanged_files": len(summary["unchanged_files"]),
        "runs": len(summary["runs"]),
        "removed_runs": len(summary["removed_runs"]),
        "synthetic_validation_reports": len(synthetic),
        "rows": total,
    }
