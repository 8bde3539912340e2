"""Read-side helpers the dashboard needs beyond `seglab.warehouse.queries`.

- The SQL page's sandbox (`run_sql`, `SqlLimits`, `WORKERS`, the guard `check_read_only_sql`, `harden`) lives
  in `seglab.warehouse.sql_sandbox` and is re-exported here.
- ``synthetic_validation`` is read only if present: a warehouse from before schema version 4,
  opened read-only, is never migrated.

Every value reaches SQL as a bound parameter; no identifiers are built from user input.
"""

from __future__ import annotations

from typing import Any

import duckdb
import pandas as pd

from seglab.warehouse.queries import PER_CLASS_METRICS, require_view
from seglab.warehouse.schema import SYNTHETIC_VALIDATION_TABLE, WarehouseError, table_exists
from seglab.warehouse.sql_sandbox import (
    WORKERS,
    SqlLimits,
    SqlOutOfMemory,
    SqlRefused,
    SqlResult,
    SqlTimeout,
    SqlValueTooLarge,
    check_read_only_sql,
    harden,
    run_read_only_sql,
    run_sql,
)

__all__ = [
    "SYNTHETIC_VALIDATION_TABLE",
    "WORKERS",
    "SqlLimits",
    "SqlOutOfMemory",
    "SqlRefused",
    "SqlResult",
    "SqlTimeout",
    "SqlValueTooLarge",
    "augmenter_effect_summary",
    "augmenter_effects",
    "check_read_only_sql",
    "count_runs",
    "harden",
    "run_details",
    "run_read_only_sql",
    "run_sql",
    "synthetic_validation",
    "table_exists",
    "warehouse_columns",
]


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


_PAIR_ORDER = "p.augmenter, p.augmented_name, p.variant, p.seed, p.augmented_run_id"


def _check_metric(metric: str) -> None:
    if metric not in PER_CLASS_METRICS:
        raise ValueError(f"metric must be one of {PER_CLASS_METRICS}; got {metric!r}")


def augmenter_effects(con: duckdb.DuckDBPyConnection, metric: str = "iou", *,
                      pairs: int | None = None) -> pd.DataFrame:
    """Per class, how much each GAN augmenter moved a per-class score against its real-only run.

    The pairs are the ``augmenter_pairs`` view's, the ones `seglab report` averages: the latest
    augmented run of a model and the real-only run of the same configuration (arch, weights,
    width, image size, batch size, epochs, data, class set, split, variant) and seed. Columns:
    augmenter, name, variant, run_id, synthetic_images_used (0: the gate accepted no synthetic
    sample, the run trained on real data only; NULL: not recorded), baseline_name,
    baseline_run_id, class_index, class_name, augmented, baseline, delta (augmented - baseline).
    `pairs` keeps the first that many pairs (by augmenter, name, variant, seed), chosen in DuckDB.
    Empty when no run is paired. SchemaError for a warehouse older than the view.
    """
    _check_metric(metric)
    if pairs is not None and (isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1):
        raise ValueError(f"pairs must be a positive integer or None; got {pairs!r}")
    require_view(con, "augmenter_pairs")
    return con.execute(f"""
        WITH p AS (SELECT * FROM augmenter_pairs AS p ORDER BY {_PAIR_ORDER} LIMIT $pairs)
        SELECT p.augmenter, p.augmented_name AS name, p.variant, p.augmented_run_id AS run_id,
               p.synthetic_images_used, p.base_name AS baseline_name, p.base_run_id AS baseline_run_id,
               pa.class_index, pa.class_name, pa.{metric} AS augmented, pb.{metric} AS baseline,
               pa.{metric} - pb.{metric} AS delta
        FROM p
        JOIN per_class AS pa ON pa.run_id = p.augmented_run_id
        JOIN per_class AS pb ON pb.run_id = p.base_run_id AND pb.class_index = pa.class_index
        ORDER BY {_PAIR_ORDER}, pa.class_index
    """, {"pairs": pairs}).df()


def augmenter_effect_summary(con: duckdb.DuckDBPyConnection, metric: str = "iou") -> pd.DataFrame:
    """One row per pair of `augmenter_effects`, aggregated in DuckDB: augmenter, name,
    baseline_name, variant, synthetic_images_used, mean_change (mean over the classes where both
    scores are defined), classes_improved, classes_worse; in the same order."""
    _check_metric(metric)
    require_view(con, "augmenter_pairs")
    return con.execute(f"""
        SELECT p.augmenter, p.augmented_name AS name, p.base_name AS baseline_name, p.variant,
               p.synthetic_images_used,
               avg(pa.{metric} - pb.{metric})                             AS mean_change,
               count(*) FILTER (WHERE pa.{metric} - pb.{metric} > 0)      AS classes_improved,
               count(*) FILTER (WHERE pa.{metric} - pb.{metric} < 0)      AS classes_worse
        FROM augmenter_pairs AS p
        JOIN per_class AS pa ON pa.run_id = p.augmented_run_id
        JOIN per_class AS pb ON pb.run_id = p.base_run_id AND pb.class_index = pa.class_index
        GROUP BY p.augmented_run_id, p.augmenter, p.augmented_name, p.base_name, p.variant,
                 p.synthetic_images_used, p.seed
        ORDER BY {_PAIR_ORDER}
    """).df()
