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

Rows go in as Arrow tables (``INSERT ... BY NAME SELECT``), not row-by-row SQL.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from seglab.warehouse.schema import TABLES, WarehouseError, connect, ensure_schema

__all__ = ["EvalFileError", "ingest_eval", "ingest_files", "load_eval", "open_warehouse", "run_ingest"]


class EvalFileError(WarehouseError, ValueError):
    """An eval.json that is missing, not JSON, or does not follow the contract."""


# The `run` object's fields with a column of their own, and what each must hold. Other fields
# are kept only in runs.run_json. `weights` and `class_set` are handled apart (see _run_row).
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
}
_REQUIRED_RUN_FIELDS = ("run_id", "name", "variant", "split", "dataset", "class_set", "classes")
_PER_CLASS_SCORES = ("iou", "dice", "precision", "recall", "accuracy")
_PER_CLASS_COUNTS = ("support", "predicted")

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
    """One checked eval.json: its rows for every table, ready to insert."""

    path: Path
    source_file: str  # resolved path: the key under which its runs are replaced
    sha256: str
    run_ids: list[str]
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {t: [] for t in TABLES})


class _Checker:
    """Type checks that raise EvalFileError naming the file and where in it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> EvalFileError:
        return EvalFileError(f"{self.path}: {where}: {problem}")

    def mapping(self, value: Any, where: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(where, f"expected an object, got {_describe(value)}")
        return value

    def sequence(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list, got {_describe(value)}")
        return value

    def require(self, record: Mapping[str, Any], key: str, where: str, expected: str) -> Any:
        if key not in record:
            raise self.fail(where, f"field {key!r} is missing (expected {expected})")
        return record[key]

    def string(self, value: Any, where: str, *, nullable: bool = True) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"expected a non-empty string, got {_describe(value)}")
        return value

    def integer(self, value: Any, where: str, *, minimum: int | None = None,
                nullable: bool = True) -> int | None:
        if value is None and nullable:
            return None
        # JSON writers may emit 8.0 for 8; a fractional value is a real error.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"expected an integer, got {_describe(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(where, f"expected an integer >= {minimum}, got {value}")
        return value

    def number(self, value: Any, where: str, *, from_text: bool = False) -> float | None:
        """A float; null and NaN (the contract's 'undefined') become None; infinities are errors."""
        if value is None:
            return None
        if from_text and isinstance(value, str):
            # history rows come from history.csv, whose cells may still be text.
            if not value.strip():
                return None
            try:
                value = float(value)
            except ValueError:
                raise self.fail(where, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(where, f"expected a number or null, got {_describe(value)}")
        value = float(value)
        if math.isnan(value):
            return None
        if math.isinf(value):
            raise self.fail(where, f"expected a finite number, got {value}")
        return value

    def timestamp(self, value: Any, where: str) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(where, f"expected an ISO 8601 timestamp string, got {_describe(value)}")
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise self.fail(where, f"expected an ISO 8601 timestamp, got {value!r}") from None
        # The contract writes UTC; a timestamp without an offset is read as UTC.
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.astimezone(timezone.utc)

    def of_kind(self, kind: str, value: Any, where: str) -> Any:
        if kind == "str":
            return self.string(value, where)
        if kind == "int":
            return self.integer(value, where)
        if kind == "float":
            return self.number(value, where)
        if kind == "timestamp":
            return self.timestamp(value, where)
        if value is None:
            return None
        items = self.sequence(value, where)
        item_kind = {"str_list": "str", "float_list": "float"}[kind]
        checked = [self.of_kind(item_kind, item, f"{where}[{i}]") for i, item in enumerate(items)]
        if any(item is None for item in checked):
            raise self.fail(where, f"holds a null or NaN entry: {items!r}")
        return checked


def _describe(value: Any) -> str:
    text = json.dumps(value, default=repr)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _run_row(check: _Checker, run: Mapping[str, Any], where: str) -> dict[str, Any]:
    for key in _REQUIRED_RUN_FIELDS:
        check.require(run, key, where, "by the eval.json contract")
    row = {key: check.of_kind(kind, run.get(key), f"{where}.{key}")
           for key, kind in _RUN_FIELD_KINDS.items()}
    for key in ("run_id", "name", "variant", "split", "dataset"):
        check.string(run[key], f"{where}.{key}", nullable=False)

    classes = row["classes"]
    if not classes:
        raise check.fail(f"{where}.classes", "expected a non-empty list of class names")
    if len(set(classes)) != len(classes):
        raise check.fail(f"{where}.classes", "class names must be unique")
    row["num_classes"] = len(classes)

    # A named class set stays as its name; an explicit list of categories is stored as JSON.
    class_set = run["class_set"]
    if isinstance(class_set, list):
        check.of_kind("str_list", class_set, f"{where}.class_set")
        row["class_set"] = json.dumps(class_set)
    else:
        row["class_set"] = check.string(class_set, f"{where}.class_set", nullable=False)

    # For a model `weights` names the pretrained weights; the ensemble's run gives the members'
    # weights in the mean there instead.
    weights = run.get("weights")
    if isinstance(weights, list):
        if row["member_weights"] is not None:
            raise check.fail(f"{where}.weights", "a list, but member_weights is given as well")
        row["member_weights"] = check.of_kind("float_list", weights, f"{where}.weights")
        row["weights"] = None
    else:
        row["weights"] = check.string(weights, f"{where}.weights")
    if row["member_weights"] is not None:
        members = row["members"]
        if members is None or len(members) != len(row["member_weights"]):
            raise check.fail(where, f"member weights {row['member_weights']} do not match "
                                    f"members {members}")
    return row


def _per_class_rows(check: _Checker, entries: Any, classes: list[str], run_id: str,
                    where: str) -> list[dict[str, Any]]:
    entries = check.sequence(entries, where)
    rows: dict[int, dict[str, Any]] = {}
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        entry = check.mapping(entry, at)
        index = check.integer(check.require(entry, "class_index", at, "an integer"),
                              f"{at}.class_index", minimum=0, nullable=False)
        if index >= len(classes):
            raise check.fail(f"{at}.class_index", f"{index} is outside the run's "
                                                  f"{len(classes)} classes")
        if index in rows:
            raise check.fail(f"{at}.class_index", f"class {index} is listed twice")
        name = check.string(check.require(entry, "class_name", at, "a string"),
                            f"{at}.class_name", nullable=False)
        if name != classes[index]:
            raise check.fail(f"{at}.class_name", f"{name!r} but the run's class {index} is "
                                                 f"{classes[index]!r}")
        row: dict[str, Any] = {"run_id": run_id, "class_index": index, "class_name": name}
        for score in _PER_CLASS_SCORES:
            row[score] = check.number(check.require(entry, score, at, "a number or null"),
                                      f"{at}.{score}")
            if row[score] is not None and not 0.0 <= row[score] <= 1.0:
                raise check.fail(f"{at}.{score}", f"expected a value in [0, 1], got {row[score]}")
        for count in _PER_CLASS_COUNTS:
            row[count] = check.integer(check.require(entry, count, at, "a pixel count"),
                                       f"{at}.{count}", minimum=0, nullable=False)
        rows[index] = row
    missing = sorted(set(range(len(classes))) - set(rows))
    if missing:
        raise check.fail(where, f"no entry for class index(es) {missing} "
                                f"(expected one per class, {len(classes)} in all)")
    return [rows[index] for index in range(len(classes))]


def _confusion_rows(check: _Checker, matrix: Any, per_class: list[dict[str, Any]], run_id: str,
                    where: str) -> list[dict[str, Any]]:
    size = len(per_class)
    matrix = check.sequence(matrix, where)
    if len(matrix) != size:
        raise check.fail(where, f"expected {size} rows (one per class), got {len(matrix)}")
    rows = []
    column_sums = [0] * size
    for t, matrix_row in enumerate(matrix):
        matrix_row = check.sequence(matrix_row, f"{where}[{t}]")
        if len(matrix_row) != size:
            raise check.fail(f"{where}[{t}]", f"expected {size} counts, got {len(matrix_row)}")
        for p, count in enumerate(matrix_row):
            count = check.integer(count, f"{where}[{t}][{p}]", minimum=0, nullable=False)
            column_sums[p] += count
            if count:
                rows.append({"run_id": run_id, "true_index": t, "pred_index": p, "count": count})
        # per_class and the matrix must describe the same evaluation.
        if sum(matrix_row) != per_class[t]["support"]:
            raise check.fail(f"{where}[{t}]", f"row sums to {sum(matrix_row)} pixels but "
                                              f"per_class support of class {t} is "
                                              f"{per_class[t]['support']}")
    for p, total in enumerate(column_sums):
        if total != per_class[p]["predicted"]:
            raise check.fail(where, f"column {p} sums to {total} pixels but per_class predicted "
                                    f"of class {p} is {per_class[p]['predicted']}")
    return rows


def _history_rows(check: _Checker, entries: Any, run_id: str, where: str) -> list[dict[str, Any]]:
    entries = check.sequence(entries, where)
    rows = []
    seen_epochs: set[int] = set()
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        entry = check.mapping(entry, at)
        epoch = check.require(entry, "epoch", at, "an integer")
        if isinstance(epoch, str) and epoch.strip().isdigit():  # a history.csv cell
            epoch = int(epoch)
        epoch = check.integer(epoch, f"{at}.epoch", minimum=0, nullable=False)
        if epoch in seen_epochs:
            raise check.fail(f"{at}.epoch", f"epoch {epoch} is listed twice")
        seen_epochs.add(epoch)
        for metric, value in entry.items():
            if metric == "epoch":
                continue
            rows.append({"run_id": run_id, "epoch": epoch, "metric": str(metric),
                         "value": check.number(value, f"{at}.{metric}", from_text=True)})
    return rows


def load_eval(eval_json_path: str | Path) -> EvalFile:
    """Read and check one eval.json completely; raise EvalFileError on the first problem."""
    path = Path(eval_json_path)
    check = _Checker(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise EvalFileError(f"{path}: not found") from None
    except OSError as e:
        raise EvalFileError(f"{path}: cannot be read: {e}") from None
    try:
        document = json.loads(raw)
    except UnicodeDecodeError as e:
        raise EvalFileError(f"{path}: not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise EvalFileError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None

    document = check.mapping(document, "top level")
    entries = check.sequence(check.require(document, "runs", "top level", "a list of runs"), "runs")
    if not entries:
        raise check.fail("runs", "is empty (expected one entry per evaluated variant)")

    result = EvalFile(path=path, source_file=str(path.resolve()),
                      sha256=hashlib.sha256(raw).hexdigest(), run_ids=[])
    ingested_at = datetime.now(timezone.utc)
    for i, entry in enumerate(entries):
        where = f"runs[{i}]"
        entry = check.mapping(entry, where)
        run = check.mapping(check.require(entry, "run", where, "an object"), f"{where}.run")
        run_row = _run_row(check, run, f"{where}.run")
        run_id = run_row["run_id"]
        if run_id in result.run_ids:
            raise check.fail(f"{where}.run.run_id", f"{run_id!r} appears twice in the file")
        result.run_ids.append(run_id)
        run_row.update(source_file=result.source_file, source_sha256=result.sha256,
                       ingested_at=ingested_at,
                       run_json=json.dumps(_nan_to_null(run), sort_keys=True, allow_nan=False))
        result.rows["runs"].append(run_row)

        metrics = check.mapping(check.require(entry, "metrics", where, "an object of mean scores"),
                                f"{where}.metrics")
        check.require(metrics, "miou", f"{where}.metrics", "a number or null")
        for metric, value in metrics.items():
            result.rows["metrics"].append({
                "run_id": run_id, "split": run_row["split"], "metric": str(metric),
                "value": check.number(value, f"{where}.metrics.{metric}"),
            })

        per_class = _per_class_rows(
            check, check.require(entry, "per_class", where, "a list with one entry per class"),
            run_row["classes"], run_id, f"{where}.per_class")
        result.rows["per_class"].extend(per_class)
        result.rows["confusion"].extend(_confusion_rows(
            check, check.require(entry, "confusion", where, "a C x C list of pixel counts"),
            per_class, run_id, f"{where}.confusion"))
        result.rows["history"].extend(_history_rows(
            check, check.require(entry, "history", where, "a list of epochs (may be empty)"),
            run_id, f"{where}.history"))
    return result


def _nan_to_null(value: Any) -> Any:
    # run_json must be valid JSON, which has no NaN.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_null(v) for v in value]
    return value


def _insert(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
    """Bulk-insert an Arrow table into `table`, columns matched by name."""
    view = f"_seglab_new_{table}"
    con.register(view, rows)
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {view}")
    finally:
        con.unregister(view)


def _replace(con: duckdb.DuckDBPyConnection, files: list[EvalFile], replaced_ids: Iterable[str]) -> dict[str, int]:
    """Delete `replaced_ids` from every table, insert the files' rows; the caller holds the transaction."""
    tables = {
        table: pa.Table.from_pylist([row for f in files for row in f.rows[table]],
                                    schema=_TABLE_SCHEMAS[table])
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


def open_warehouse(path: str | Path) -> duckdb.DuckDBPyConnection:
    """A read-write connection to the warehouse at `path`, created and migrated as needed."""
    con = connect(path)
    try:
        ensure_schema(con)
    except BaseException:
        con.close()
        raise
    return con


def _runs_from_sources(con: duckdb.DuckDBPyConnection, where_sql: str, params: list[Any]) -> list[str]:
    return [r[0] for r in con.execute(f"SELECT run_id FROM runs WHERE {where_sql}", params).fetchall()]


def ingest_files(con: duckdb.DuckDBPyConnection, paths: Iterable[str | Path], *,
                 replace_source: bool = False, prune_under: str | Path | None = None) -> dict[str, Any]:
    """Check every file, then replace their runs in one transaction.

    replace_source: also drop runs earlier ingested from the same file that it no longer holds
        (its params_hash, hence run_id, changed), instead of keeping them as history.
    prune_under: also drop runs ingested from any file under this folder that is not in `paths`
        (a model removed from params.yaml).
    """
    files = [load_eval(p) for p in paths]
    _check_unique_runs(files)
    ensure_schema(con)
    new_ids = {run_id for f in files for run_id in f.run_ids}
    con.begin()
    try:
        replaced = set(new_ids)
        if replace_source:
            for f in files:
                replaced.update(_runs_from_sources(con, "source_file = ?", [f.source_file]))
        if prune_under is not None:
            prefix = str(Path(prune_under).resolve()).rstrip("/") + "/"
            kept = [f.source_file for f in files]
            replaced.update(_runs_from_sources(
                con, "starts_with(source_file, ?) AND NOT list_contains(?, source_file)", [prefix, kept]))
        rows = _replace(con, files, replaced)
        con.commit()
    except BaseException:
        con.rollback()
        raise
    return {
        "files": [str(f.path) for f in files],
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


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0])


def run_ingest(cfg, *, mirror: bool | None = None) -> dict[str, Any]:
    """The `ingest` stage: every ``<evaluate.out>/*/eval.json`` into ``warehouse.path``, one transaction.

    mirror: None reads ``warehouse.mirror`` from params. False keeps runs from earlier settings as history. True makes the runs that
        came from ``evaluate.out`` exactly those of the current files: runs of eval.json files
        that are gone, or that now hold other run ids, are removed in the same transaction.
        Runs ingested from elsewhere with `ingest_eval` are left alone either way.
    """
    if mirror is None:
        mirror = cfg.warehouse.mirror
    eval_dir = Path(cfg.evaluate.out)
    paths = sorted(eval_dir.glob("*/eval.json"))
    if not paths:
        raise EvalFileError(f"{eval_dir}: no */eval.json to ingest; run `seglab evaluate NAME` "
                            "(or `dvc repro`) first")
    con = open_warehouse(cfg.warehouse.path)
    try:
        summary = ingest_files(con, paths, replace_source=mirror, prune_under=eval_dir if mirror else None)
        # The synthetic-data gate's figures, one idempotent transaction per report (issue: GAN augmenters).
        from seglab.gan.warehouse import ingest_synthetic_validation

        synthetic = sorted(Path(cfg.validate_synthetic.report).glob("*/summary.json"))
        for report in synthetic:
            ingest_synthetic_validation(con, report)
        total = {table: con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                 for table in (*TABLES, "synthetic_validation") if _has_table(con, table)}
        con.execute("CHECKPOINT")  # fold the WAL into the file: DVC caches a single file
    finally:
        con.close()
    return {
        "warehouse": str(cfg.warehouse.path),
        "files": len(paths),
        "runs": len(summary["runs"]),
        "removed_runs": len(summary["removed_runs"]),
        "synthetic_validation_reports": len(synthetic),
        "rows": total,
    }
