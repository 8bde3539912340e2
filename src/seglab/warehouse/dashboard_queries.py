"""Read-side helpers the dashboard needs beyond `seglab.warehouse.queries`.

- `run_read_only_sql`: the SQL page's guard. Exactly one statement, which DuckDB's own parser
  types as a SELECT (``SELECT``, ``WITH ... SELECT``, ``FROM t``, ``VALUES``, ``SHOW``,
  ``DESCRIBE``, ``SUMMARIZE``); anything else is refused with `SqlRefused` before it runs. It
  runs with a row limit and a time limit, on a connection that `harden` has cut off from the file
  system and network (a SELECT could otherwise ``read_csv('/etc/passwd')``).
- ``synthetic_validation`` is read only if present: a warehouse from before schema version 4,
  opened read-only, is never migrated.

Every value reaches SQL as a bound parameter; no identifiers are built from user input.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import duckdb
import pandas as pd

from seglab.warehouse.queries import PER_CLASS_METRICS, require_view
from seglab.warehouse.schema import SYNTHETIC_VALIDATION_TABLE, WarehouseError, table_exists

__all__ = [
    "SYNTHETIC_VALIDATION_TABLE",
    "SqlRefused",
    "SqlResult",
    "SqlTimeout",
    "augmenter_effects",
    "check_read_only_sql",
    "count_runs",
    "harden",
    "run_details",
    "run_read_only_sql",
    "synthetic_validation",
    "table_exists",
    "warehouse_columns",
]

class SqlRefused(ValueError):
    """A query the SQL page does not run (not a single read-only SELECT, or not parseable)."""


class SqlTimeout(WarehouseError):
    """A query interrupted for running longer than its time limit."""


@dataclass(frozen=True)
class SqlResult:
    frame: pd.DataFrame
    truncated: bool  # more rows than max_rows existed; `frame` holds the first max_rows
    seconds: float
    statement: str   # the statement as DuckDB's parser split it out


def harden(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """Cut `con`'s database off from files and the network (irreversible while it is open).

    The warehouse itself stays readable; table functions such as read_csv/read_parquet, COPY,
    ATTACH and extension downloads fail with DuckDB's permission error.
    """
    con.execute("SET enable_external_access = false")
    return con


def check_read_only_sql(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The single SELECT statement in `sql`, or `SqlRefused` saying why it will not run."""
    if not isinstance(sql, str) or not sql.strip():
        raise SqlRefused("the query is empty: enter one SELECT (or WITH ... SELECT) statement")
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise SqlRefused(f"the query does not parse: {e}") from None
    if not statements:
        raise SqlRefused("the query holds no statement (only comments?): enter one SELECT")
    if len(statements) > 1:
        kinds = ", ".join(_kind(s) for s in statements)
        raise SqlRefused(f"one statement at a time: the query holds {len(statements)} ({kinds}); "
                         "remove all but one SELECT")
    statement = statements[0]
    if statement.type != duckdb.StatementType.SELECT:
        raise SqlRefused(f"only read-only SELECT queries run here (SELECT, WITH ... SELECT, SHOW, "
                         f"DESCRIBE, SUMMARIZE); this is a {_kind(statement)} statement. The "
                         "warehouse is opened read-only: it changes only through `seglab ingest`")
    return statement.query.strip().rstrip(";").strip()


def _kind(statement: Any) -> str:
    return str(statement.type.name)


def run_read_only_sql(con: duckdb.DuckDBPyConnection, sql: str, *, max_rows: int = 1000,
                      timeout_s: float = 30.0) -> SqlResult:
    """Run one checked SELECT, returning at most `max_rows` rows; interrupt it after `timeout_s`.

    `con` should be read-only and hardened (`harden`); the check here is the first line, the
    connection the second.
    """
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive integer; got {max_rows!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive; got {timeout_s!r}")
    statement = check_read_only_sql(con, sql)
    # One row past the limit tells whether the result was cut.
    timer = threading.Timer(timeout_s, con.interrupt)
    start = time.perf_counter()
    timer.start()
    try:
        frame = con.sql(statement).limit(max_rows + 1).df()
    except duckdb.InterruptException:
        raise SqlTimeout(f"the query ran longer than {timeout_s:g} s and was stopped; "
                         "narrow it (WHERE, LIMIT) or aggregate first") from None
    finally:
        timer.cancel()
    seconds = time.perf_counter() - start
    truncated = len(frame) > max_rows
    if truncated:
        frame = frame.iloc[:max_rows]
    return SqlResult(frame=frame, truncated=truncated, seconds=seconds, statement=statement)


def warehouse_columns(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Every table and view with its columns and types (the SQL page's schema reference)."""
    return con.execute("""
        SELECT c.table_name, t.table_type, c.column_name, c.data_type
        FROM information_schema.columns AS c
        JOIN information_schema.tables AS t USING (table_catalog, table_schema, table_name)
        WHERE c.table_schema = current_schema()
        ORDER BY t.table_type, c.table_name, c.ordinal_position
    """).df()


def count_runs(con: duckdb.DuckDBPyConnection) -> int:
    return int(con.execute("SELECT count(*) FROM runs").fetchall()[0][0])


def run_details(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any]:
    """The run's `runs` row as a dict (without the bulky run_json); WarehouseError if unknown."""
    cursor = con.execute("SELECT * EXCLUDE (run_json) FROM runs WHERE run_id = ?", [run_id])
    rows = cursor.fetchall()
    if not rows:
        raise WarehouseError(f"no run {run_id!r} in the warehouse (see the leaderboard for run ids)")
    return dict(zip([d[0] for d in cursor.description], rows[0]))


def synthetic_validation(con: duckdb.DuckDBPyConnection) -> pd.DataFrame | None:
    """The GAN gate's validation reports (`synthetic_validation`), or None in a warehouse without it."""
    if not table_exists(con, SYNTHETIC_VALIDATION_TABLE):
        return None
    return con.sql(f"SELECT * FROM {SYNTHETIC_VALIDATION_TABLE}").df()


def augmenter_effects(con: duckdb.DuckDBPyConnection, metric: str = "iou") -> pd.DataFrame:
    """Per class, how much each GAN augmenter moved a per-class score against its real-only run.

    The pairs are the ``augmenter_pairs`` view's, the ones `seglab report` averages: the latest
    augmented run of a model and the real-only run of the same configuration (arch, weights,
    width, image size, batch size, epochs, data, class set, split, variant) and seed. Columns:
    augmenter, name, variant, run_id, synthetic_images_used (0: the gate accepted no synthetic
    sample, the run trained on real data only; NULL: not recorded), baseline_name,
    baseline_run_id, class_index, class_name, augmented, baseline, delta (augmented - baseline).
    Empty when no run is paired. SchemaError for a warehouse older than the view.
    """
    if metric not in PER_CLASS_METRICS:
        raise ValueError(f"metric must be one of {PER_CLASS_METRICS}; got {metric!r}")
    require_view(con, "augmenter_pairs")
    return con.execute(f"""
        SELECT p.augmenter, p.augmented_name AS name, p.variant, p.augmented_run_id AS run_id,
               p.synthetic_images_used, p.base_name AS baseline_name, p.base_run_id AS baseline_run_id,
               pa.class_index, pa.class_name, pa.{metric} AS augmented, pb.{metric} AS baseline,
               pa.{metric} - pb.{metric} AS delta
        FROM augmenter_pairs AS p
        JOIN per_class AS pa ON pa.run_id = p.augmented_run_id
        JOIN per_class AS pb ON pb.run_id = p.base_run_id AND pb.class_index = pa.class_index
        ORDER BY p.augmenter, p.augmented_name, p.variant, p.seed, pa.class_index
    """).df()
