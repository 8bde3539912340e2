"""The warehouse's read side: the queries the dashboard and users run, as pandas DataFrames.

All values go in as bound parameters; the only names put into SQL text (a metric column) come
from a fixed list. Open the warehouse with `connect_read_only`, so a dashboard can never change it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from seglab.warehouse.schema import SCHEMA_VERSION, SchemaError, WarehouseError, connect, schema_version, table_exists

__all__ = [
    "PER_CLASS_METRICS",
    "augmenter_effect",
    "augmenter_effect_per_class",
    "compare_runs",
    "confusion",
    "connect_read_only",
    "constant_prediction",
    "curves",
    "deeplab_beats_unet",
    "family_beats",
    "history",
    "latest_runs",
    "leaderboard",
    "per_class_matrix",
    "require_view",
    "seed_summary",
    "worst_classes",
]

PER_CLASS_METRICS = ("iou", "dice", "precision", "recall", "accuracy", "support", "predicted")

# Architecture families, as regular expressions over runs.arch (seglab.models registry names).
DEEPLABV3PLUS_ARCH = r"^deeplabv3plus"
UNET_ARCH = r"(^|_)unet($|_)"  # unet, attention_unet, unet_resnet50, unet_mobilenetv2, ...


def connect_read_only(path: str | Path) -> duckdb.DuckDBPyConnection:
    """Open the warehouse for reading only; clear errors if it is missing or not a warehouse."""
    con = connect(path, read_only=True)
    try:
        version = schema_version(con)
        if version == 0:
            raise SchemaError(f"{path}: a DuckDB file but not a seglab warehouse (no schema_version "
                              "table); build it with `seglab ingest`")
        if version > SCHEMA_VERSION:
            raise SchemaError(f"{path}: schema version {version} is newer than this seglab's "
                              f"{SCHEMA_VERSION}; upgrade seglab")
    except BaseException:
        con.close()
        raise
    return con


def _df(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None) -> pd.DataFrame:
    return con.execute(sql, params).df()


def _require_run(con: duckdb.DuckDBPyConnection, run_id: str) -> tuple[list[str], str, str]:
    row = con.execute("SELECT classes, name, variant FROM runs WHERE run_id = ?", [run_id]).fetchone()
    if row is None:
        raise WarehouseError(f"no run {run_id!r} in the warehouse (see the leaderboard for run ids)")
    return list(row[0]), row[1], row[2]


# Filters shared by the queries over `leaderboard` / `class_scores`; NULL means "any". The
# protocol (schema version 5) is filtered only when one is asked for, so a warehouse from before it,
# which a read-only connection never migrates, still answers the rest.
def _filters(con: duckdb.DuckDBPyConnection, protocol: str | None, alias: str = "") -> str:
    clauses = f"""
    ($dataset IS NULL OR {alias}dataset = $dataset)
    AND ($class_set IS NULL OR {alias}class_set = $class_set)
    AND ($variant IS NULL OR {alias}variant = $variant)
    AND ($split IS NULL OR {alias}split = $split)
    AND ({alias}latest OR NOT $latest_only)
"""
    if protocol is None:
        return clauses
    require_protocol(con)
    return clauses + f"    AND {alias}eval_protocol = $protocol\n"


def _filter_params(dataset, class_set, variant, latest_only, split=None, protocol=None) -> dict[str, Any]:
    params = {"dataset": dataset, "class_set": class_set, "variant": variant, "split": split,
              "latest_only": bool(latest_only)}
    return params if protocol is None else params | {"protocol": protocol}


def require_protocol(con: duckdb.DuckDBPyConnection) -> None:
    """A clear error for a protocol filter on a warehouse from before schema version 5."""
    version = schema_version(con)
    if version < 5:
        raise SchemaError(f"the warehouse (schema version {version}) does not record evaluation protocols, "
                          "which schema version 5 adds; run `seglab ingest` (or `dvc repro`) to upgrade it")


def leaderboard(con: duckdb.DuckDBPyConnection, dataset: str | None = None,
                class_set: str | None = None, variant: str | None = None, *,
                split: str | None = None, protocol: str | None = None,
                latest_only: bool = True, name: str | None = None, run_id: str | None = None,
                search: str | None = None, limit: int | None = None) -> pd.DataFrame:
    """One row per run (name, variant, scores, size, speed), best mIoU first.

    dataset / split: the evaluated shards'; protocol: full | letterbox (`eval_protocol`).
    latest_only: only the newest run of each model and variant per dataset, class set, split and
    protocol; False adds the runs of earlier settings. name / run_id: that model's / that run's
    rows; search: runs whose name, variant, dataset, split or run id contains it (any case);
    limit: the first `limit` rows only.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None; got {limit!r}")
    return _df(con, f"""SELECT * FROM leaderboard WHERE {_filters(con, protocol)}
                    AND ($name IS NULL OR name = $name) AND ($run_id IS NULL OR run_id = $run_id)
                    AND ($search IS NULL OR contains(lower(concat_ws(' ', name, variant, dataset, split, run_id)),
                                                     lower($search)))
                    ORDER BY miou DESC NULLS LAST, name, variant, run_id LIMIT $limit""",
               _filter_params(dataset, class_set, variant, latest_only, split, protocol)
               | {"name": name, "run_id": run_id, "search": search or None, "limit": limit})


def per_class_matrix(con: duckdb.DuckDBPyConnection, metric: str = "iou", *,
                     dataset: str | None = None, class_set: str | None = None,
                     variant: str | None = None, split: str | None = None,
                     protocol: str | None = None, latest_only: bool = True,
                     variants: Sequence[str] | None = None, top: int | None = None) -> pd.DataFrame:
    """Runs x classes table of one per-class metric (NaN where undefined).

    Rows: a (name, variant, run_id) index, best mIoU first; columns: class names in class order.
    Filters as in `leaderboard`, plus `variants` (any of these); `top` keeps only the best `top`
    runs, chosen in DuckDB, so only their rows are read.
    """
    if metric not in PER_CLASS_METRICS:
        raise ValueError(f"metric must be one of {PER_CLASS_METRICS}; got {metric!r}")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ValueError(f"top must be a positive integer or None; got {top!r}")
    long = _df(con, f"""
        WITH chosen AS (
            SELECT l.run_id, l.miou FROM leaderboard AS l
            WHERE {_filters(con, protocol, "l.")} AND ($variants IS NULL OR list_contains($variants, l.variant))
            ORDER BY l.miou DESC NULLS LAST, l.name, l.variant, l.run_id
            LIMIT $top
        )
        SELECT c.name, c.variant, c.run_id, c.class_index, c.class_name, c.{metric} AS value, chosen.miou
        FROM class_scores AS c JOIN chosen USING (run_id)
        ORDER BY chosen.miou DESC NULLS LAST, c.name, c.variant, c.run_id, c.class_index
    """, {**_filter_params(dataset, class_set, variant, latest_only, split, protocol),
          "variants": None if variants is None else list(variants), "top": top})
    index = ["name", "variant", "run_id"]
    if long.empty:
        return pd.DataFrame(index=pd.MultiIndex.from_arrays([[], [], []], names=index), dtype=float)
    class_order = long.groupby("class_name", sort=False)["class_index"].min().sort_values(kind="stable")
    run_order = list(dict.fromkeys(map(tuple, long[index].itertuples(index=False))))
    matrix = long.pivot(index=index, columns="class_name", values="value")
    matrix = matrix.reindex(index=pd.MultiIndex.from_tuples(run_order, names=index),
                            columns=list(class_order.index))
    matrix.columns.name = None
    return matrix.astype(float)


def compare_runs(con: duckdb.DuckDBPyConnection, run_a: str, run_b: str) -> pd.DataFrame:
    """Per class: IoU, Dice, precision and recall of runs a and b, and b - a; same classes required."""
    classes_a, name_a, _ = _require_run(con, run_a)
    classes_b, name_b, _ = _require_run(con, run_b)
    if classes_a != classes_b:
        raise WarehouseError(f"runs {run_a} ({name_a}) and {run_b} ({name_b}) were evaluated on "
                             f"different class lists ({len(classes_a)} vs {len(classes_b)} classes); "
                             "per-class comparison needs the same classes")
    return _df(con, """
        SELECT a.class_index, a.class_name,
               a.iou AS iou_a, b.iou AS iou_b, b.iou - a.iou AS iou_delta,
               a.dice AS dice_a, b.dice AS dice_b, b.dice - a.dice AS dice_delta,
               a.precision AS precision_a, b.precision AS precision_b,
               b.precision - a.precision AS precision_delta,
               a.recall AS recall_a, b.recall AS recall_b, b.recall - a.recall AS recall_delta,
               a.support AS support_a, b.support AS support_b
        FROM per_class AS a JOIN per_class AS b USING (class_index)
        WHERE a.run_id = $a AND b.run_id = $b
        ORDER BY a.class_index
    """, {"a": run_a, "b": run_b})


def history(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """The training curves of a run: one row per epoch, then one column per logged metric (A-Z).

    Empty (just an `epoch` column) for runs without training history (TTA, ensemble).
    """
    _require_run(con, run_id)
    long = _df(con, "SELECT epoch, metric, value FROM history WHERE run_id = ? ORDER BY epoch, metric",
               [run_id])
    if long.empty:
        return pd.DataFrame({"epoch": pd.Series([], dtype="int64")})
    wide = long.pivot(index="epoch", columns="metric", values="value")
    wide.columns.name = None
    return wide.reset_index()


def curves(con: duckdb.DuckDBPyConnection, run_ids: Sequence[str], metric: str = "val_miou") -> pd.DataFrame:
    """One logged metric's value per epoch for many runs in one query: run_id, epochs and `values`
    (a list in epoch order); runs without that metric in their history have no row."""
    return _df(con, """
        SELECT run_id, count(*) AS epochs, list(value ORDER BY epoch) AS "values"
        FROM history WHERE metric = $metric AND list_contains($run_ids, run_id)
        GROUP BY run_id
    """, {"metric": metric, "run_ids": list(run_ids)})


def confusion(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """The run's dense C x C confusion matrix (int64): rows truth, columns prediction, by class name."""
    classes, _, _ = _require_run(con, run_id)
    cells = con.execute("SELECT true_index, pred_index, count FROM confusion WHERE run_id = ?",
                        [run_id]).fetchnumpy()
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    # Only non-zero cells are stored; the rest are 0.
    matrix[cells["true_index"], cells["pred_index"]] = cells["count"]
    frame = pd.DataFrame(matrix, index=pd.Index(classes, name="true"),
                         columns=pd.Index(classes, name="predicted"))
    return frame


def worst_classes(con: duckdb.DuckDBPyConnection, k: int = 5, *, dataset: str | None = None,
                  class_set: str | None = None, variant: str | None = None, split: str | None = None,
                  protocol: str | None = None, latest_only: bool = True) -> pd.DataFrame:
    """The `k` classes with the lowest IoU for every run (classes with undefined IoU skipped).

    Filters as in `leaderboard`.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    return _df(con, f"""
        SELECT name, variant, run_id, class_index, class_name, iou, dice, support, predicted,
               row_number() OVER (PARTITION BY run_id ORDER BY iou, class_index) AS rank
        FROM class_scores
        WHERE iou IS NOT NULL AND {_filters(con, protocol)}
        QUALIFY rank <= $k
        ORDER BY name, variant, run_id, rank
    """, {"k": k, **_filter_params(dataset, class_set, variant, latest_only, split, protocol)})


def family_beats(con: duckdb.DuckDBPyConnection, challenger_arch: str, baseline_arch: str, *,
                 variant: str | None = "plain", latest_only: bool = True) -> pd.DataFrame:
    """Classes where the best challenger run has a higher IoU than the best baseline run.

    A family is the runs whose `arch` matches a regular expression; its best run is the one with
    the highest mIoU per (dataset, class set, split, protocol), so runs are compared only on the same
    data, classes and scoring. `variant` restricts both sides (default the plain models, no TTA);
    None for any. latest_only: choose among the newest run of each model (see `leaderboard`).
    """
    # eval_protocol from schema version 5 on (a read-only connection never migrates an older one).
    keys = "dataset, class_set, split" + (", eval_protocol" if schema_version(con) >= 5 else "")
    same = " AND ".join(f"c.{key} = b.{key}" for key in keys.split(", "))
    return _df(con, f"""
        WITH family AS (
            SELECT run_id, name, {keys}, miou,
                   CASE WHEN regexp_matches(arch, $challenger) THEN 'challenger'
                        WHEN regexp_matches(arch, $baseline) THEN 'baseline' END AS side
            FROM leaderboard
            WHERE arch IS NOT NULL AND ($variant IS NULL OR variant = $variant)
              AND (latest OR NOT $latest_only)
        ),
        best AS (
            SELECT * FROM family WHERE side IS NOT NULL
            QUALIFY row_number() OVER (PARTITION BY {keys}, side
                                       ORDER BY miou DESC NULLS LAST, run_id) = 1
        )
        SELECT c.dataset, c.class_set, pc.class_index, pc.class_name,
               c.name AS challenger_name, c.run_id AS challenger_run_id, pc.iou AS challenger_iou,
               b.name AS baseline_name, b.run_id AS baseline_run_id, pb.iou AS baseline_iou,
               pc.iou - pb.iou AS iou_margin
        FROM best AS c
        JOIN best AS b ON c.side = 'challenger' AND b.side = 'baseline' AND {same}
        JOIN per_class AS pc ON pc.run_id = c.run_id
        JOIN per_class AS pb ON pb.run_id = b.run_id AND pb.class_index = pc.class_index
        WHERE pc.iou > pb.iou
        ORDER BY c.dataset, c.class_set, iou_margin DESC, pc.class_index
    """, {"challenger": challenger_arch, "baseline": baseline_arch, "variant": variant,
          "latest_only": bool(latest_only)})


def deeplab_beats_unet(con: duckdb.DuckDBPyConnection, *, variant: str | None = "plain",
                       latest_only: bool = True) -> pd.DataFrame:
    """Classes where the best DeepLabV3+ run beats the best U-Net run in IoU (same dataset/classes)."""
    return family_beats(con, DEEPLABV3PLUS_ARCH, UNET_ARCH, variant=variant, latest_only=latest_only)


# ---- replicates (schema 3): mean and spread over seeds, and what GAN augmentation changes ------

# Filters over the replicate views, which hold latest runs only; NULL means "any".
_VIEW_FILTERS = """
    ($dataset IS NULL OR dataset = $dataset)
    AND ($class_set IS NULL OR class_set = $class_set)
    AND ($variant IS NULL OR variant = $variant)
"""
_CONFIGURATION_ORDER = ("dataset, class_set, split, variant, arch, weights NULLS FIRST, "
                        "width NULLS FIRST, image_size, batch_size, epochs_planned")


def require_view(con: duckdb.DuckDBPyConnection, name: str) -> None:
    """A clear error for a warehouse written before the view existed (opened read-only, so never
    migrated here)."""
    if not table_exists(con, name):
        raise SchemaError(f"the warehouse (schema version {schema_version(con)}) has no {name!r} view, "
                          f"which schema version 3 adds; run `seglab ingest` (or `dvc repro`) to "
                          "upgrade it")


def latest_runs(con: duckdb.DuckDBPyConnection, dataset: str | None = None,
                class_set: str | None = None, variant: str | None = None) -> pd.DataFrame:
    """The latest run of every model and variant: the leaderboard's columns plus seed,
    batch_size and epochs_planned; per dataset and class set, best mIoU first."""
    return _df(con, """
        SELECT l.*, r.seed, r.batch_size, r.epochs_planned
        FROM leaderboard AS l JOIN runs AS r USING (run_id)
        WHERE l.latest AND ($dataset IS NULL OR l.dataset = $dataset)
          AND ($class_set IS NULL OR l.class_set = $class_set)
          AND ($variant IS NULL OR l.variant = $variant)
        ORDER BY l.dataset, l.class_set, l.split, l.miou DESC NULLS LAST, l.name, l.variant
    """, {"dataset": dataset, "class_set": class_set, "variant": variant})


def constant_prediction(con: duckdb.DuckDBPyConnection, dataset: str | None = None,
                        class_set: str | None = None, variant: str | None = None) -> pd.DataFrame:
    """The floor every model must beat: per evaluated data (dataset, class set, split, protocol and,
    for letterboxed runs, the input size), the mIoU of predicting the most frequent truth class
    everywhere. That class's IoU is its share of the labelled pixels, every other class present in
    truth scores 0, so mIoU = share / classes present (on the default sample: all-background).
    From the latest runs' per-class support; one row per distinct result."""
    require_protocol(con)
    return _df(con, """
        WITH ranked AS (  -- ties go to the lower class index, so the result is one row per run
            SELECT c.run_id, c.dataset, c.class_set, c.split, c.eval_protocol, c.class_name, c.support,
                   sum(c.support) OVER run AS total,
                   sum(CASE WHEN c.support > 0 THEN 1 ELSE 0 END) OVER run AS classes_present,
                   row_number() OVER (run ORDER BY c.support DESC, c.class_index) AS rank
            FROM class_scores AS c
            WHERE c.latest AND ($dataset IS NULL OR c.dataset = $dataset)
              AND ($class_set IS NULL OR c.class_set = $class_set)
              AND ($variant IS NULL OR c.variant = $variant)
            WINDOW run AS (PARTITION BY c.run_id)
        )
        SELECT r.dataset, r.class_set, r.split, r.eval_protocol,
               CASE WHEN r.eval_protocol = 'full' THEN NULL ELSE l.image_size END AS image_size,
               r.class_name, r.support / r.total AS share, r.classes_present,
               r.support / r.total / r.classes_present AS miou, count(*) AS runs
        FROM ranked AS r JOIN leaderboard AS l USING (run_id)
        WHERE r.rank = 1 AND r.total > 0
        GROUP BY ALL
        ORDER BY r.dataset, r.class_set, r.split, r.eval_protocol, image_size NULLS FIRST, miou
    """, {"dataset": dataset, "class_set": class_set, "variant": variant})


def seed_summary(con: duckdb.DuckDBPyConnection, dataset: str | None = None,
                 class_set: str | None = None, variant: str | None = None) -> pd.DataFrame:
    """The ``seed_summary`` view: per configuration, its replicates (models, seeds, n) and the
    mean and sample std of mIoU, mDice and pixel accuracy (std NaN for n = 1); per dataset and
    class set, best mean mIoU first."""
    require_view(con, "seed_summary")
    return _df(con, f"SELECT * FROM seed_summary WHERE {_VIEW_FILTERS} "
                    "ORDER BY dataset, class_set, split, miou_mean DESC NULLS LAST, "
                    f"{_CONFIGURATION_ORDER}, augmenter NULLS FIRST",
               {"dataset": dataset, "class_set": class_set, "variant": variant})


def augmenter_effect(con: duckdb.DuckDBPyConnection, dataset: str | None = None,
                     class_set: str | None = None, variant: str | None = None) -> pd.DataFrame:
    """The ``augmenter_effect`` view: per augmented configuration, the mIoU of the real-only and
    augmented runs and their difference, mean and std over the runs paired by seed."""
    require_view(con, "augmenter_effect")
    return _df(con, f"SELECT * FROM augmenter_effect WHERE {_VIEW_FILTERS} "
                    f"ORDER BY {_CONFIGURATION_ORDER}, augmenter",
               {"dataset": dataset, "class_set": class_set, "variant": variant})


def augmenter_effect_per_class(con: duckdb.DuckDBPyConnection, dataset: str | None = None,
                               class_set: str | None = None, variant: str | None = None) -> pd.DataFrame:
    """The ``augmenter_effect_per_class`` view: per augmented configuration and class, the IoU
    difference (augmented - real-only) over seeds, pairs with an undefined IoU skipped."""
    require_view(con, "augmenter_effect_per_class")
    return _df(con, f"SELECT * FROM augmenter_effect_per_class WHERE {_VIEW_FILTERS} "
                    f"ORDER BY {_CONFIGURATION_ORDER}, augmenter, class_index",
               {"dataset": dataset, "class_set": class_set, "variant": variant})
