"""The DuckDB warehouse: evaluation results as tables (runs, metrics, per_class, confusion,
history) for SQL and the dashboard.

Write side: `run_ingest(cfg)` / `ingest_eval(con_or_path, eval_json)`. Read side:
`connect_read_only(path)` and the queries in `seglab.warehouse.queries`. See docs/sql.md.
"""

from seglab.warehouse.ingest import EvalFileError, ingest_eval, ingest_files, load_eval, open_warehouse, run_ingest
from seglab.warehouse.queries import (
    augmenter_effect,
    augmenter_effect_per_class,
    compare_runs,
    confusion,
    connect_read_only,
    constant_prediction,
    deeplab_beats_unet,
    family_beats,
    history,
    latest_runs,
    leaderboard,
    per_class_matrix,
    seed_summary,
    worst_classes,
)
from seglab.warehouse.schema import SCHEMA_VERSION, SchemaError, WarehouseError, ensure_schema

__all__ = [
    "SCHEMA_VERSION",
    "EvalFileError",
    "SchemaError",
    "WarehouseError",
    "augmenter_effect",
    "augmenter_effect_per_class",
    "compare_runs",
    "confusion",
    "connect_read_only",
    "constant_prediction",
    "deeplab_beats_unet",
    "ensure_schema",
    "family_beats",
    "history",
    "ingest_eval",
    "ingest_files",
    "latest_runs",
    "leaderboard",
    "load_eval",
    "open_warehouse",
    "per_class_matrix",
    "run_ingest",
    "seed_summary",
    "worst_classes",
]
