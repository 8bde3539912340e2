"""What every dashboard page shares: where the data is, cached warehouse reads, empty states.

Settings, first found wins: command line (``streamlit run dashboards/app.py -- --warehouse PATH
--eval-dir DIR --gan-dir DIR --models-dir DIR``), environment (``SEGLAB_WAREHOUSE``,
``SEGLAB_EVAL_DIR``, ``SEGLAB_GAN_DIR``, ``SEGLAB_MODELS_DIR``), params.yaml (``warehouse.path``,
``evaluate.out``, ``train.out``, relative to the repo root), built-in defaults under ``data/``.

Caching. The warehouse is never held open between reads: DuckDB lets one process write a file or
others read it, not both, so a connection kept open by the dashboard would make ``seglab ingest``
(``dvc repro``) fail while the dashboard runs. Each read opens the file read-only, queries and
closes (a few ms), and its result is cached with ``st.cache_data`` keyed by the file's
(mtime, size) stamp: a re-ingest changes the stamp, so the next rerun reads the new data, and the
TTL bounds how long unused results stay in memory. The SQL page's queries, which may run for
seconds, read a private snapshot of the file instead (`seglab.warehouse.sql_sandbox`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import altair as alt
import duckdb
import pandas as pd
import streamlit as st

from seglab.config import ConfigError, load_config
from seglab.warehouse import dashboard_queries as dq
from seglab.warehouse import queries
from seglab.warehouse.schema import SchemaError, WarehouseError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WAREHOUSE = Path("data/warehouse.duckdb")
DEFAULT_EVAL_DIR = Path("data/eval")
DEFAULT_GAN_DIR = Path("data/gan")
DEFAULT_MODELS_DIR = Path("data/models")
GAN_NAMES = ("dcgan", "sagan", "pix2pix")
CACHE_TTL_S = 600
SQL_CACHE_TTL_S = 120
# What one chart draws at most, whatever the warehouse holds (the tables list everything): a
# Vega chart of thousands of rows takes the browser tens of seconds and the page a screen per run.
CHART_RUNS = 30
# What one run picker offers at most (the best by mIoU that match its filter): a selectbox of
# thousands of runs takes the browser seconds per view and no one scrolls it.
PICKER_RUNS = 50

BUILD_HINT = (
    "Build it from the repo root with `dvc repro` (trains and evaluates every model in "
    "params.yaml, then `seglab ingest` fills the warehouse), or for one model: "
    "`dvc repro evaluate@unet` then `seglab ingest`."
)

# Column labels and formats shared by the tables.
METRIC_LABELS = {
    "miou": "mIoU", "mdice": "mean Dice", "accuracy": "pixel accuracy",
    "mprecision": "mean precision", "mrecall": "mean recall", "miou_fg": "mIoU (fg)",
}
PER_CLASS_LABELS = {"iou": "IoU", "dice": "Dice", "precision": "Precision", "recall": "Recall",
                    "accuracy": "Accuracy (one-vs-rest)"}


@dataclass(frozen=True)
class Settings:
    warehouse: Path
    eval_dir: Path
    gan_dir: Path
    models_dir: Path  # trained models, <models_dir>/<name>/{model.keras, train.json}: the runs page predicts with them
    params_error: str | None = None  # params.yaml could not be read: defaults were used


def _from_repo(path: Path) -> Path:
    return path if path.is_absolute() else REPO_ROOT / path


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--warehouse")
    parser.add_argument("--eval-dir")
    parser.add_argument("--gan-dir")
    parser.add_argument("--models-dir")
    # Unknown arguments are someone else's (e.g. pytest's when AppTest runs the app).
    args, _ = parser.parse_known_args(argv)
    return args


def load_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Where the warehouse, the evaluation / GAN artefacts and the trained models are (module doc)."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    warehouse, eval_dir, models_dir, params_error = DEFAULT_WAREHOUSE, DEFAULT_EVAL_DIR, DEFAULT_MODELS_DIR, None
    try:
        cfg = load_config(REPO_ROOT / "params.yaml")
        warehouse, eval_dir, models_dir = Path(cfg.warehouse.path), Path(cfg.evaluate.out), Path(cfg.train.out)
    except ConfigError as e:
        params_error = str(e)

    def pick(arg: str | None, env_name: str, default: Path) -> Path:
        if arg:
            return Path(arg).expanduser().resolve()
        if env.get(env_name):
            return Path(env[env_name]).expanduser().resolve()
        return _from_repo(default)

    return Settings(
        warehouse=pick(args.warehouse, "SEGLAB_WAREHOUSE", warehouse),
        eval_dir=pick(args.eval_dir, "SEGLAB_EVAL_DIR", eval_dir),
        gan_dir=pick(args.gan_dir, "SEGLAB_GAN_DIR", DEFAULT_GAN_DIR),
        models_dir=pick(args.models_dir, "SEGLAB_MODELS_DIR", models_dir),
        params_error=params_error,
    )


def settings() -> Settings:
    # Computed per script run (cheap), so a changed environment or params.yaml shows up.
    return load_settings()


def warehouse_stamp(path: Path) -> tuple[int, ...] | None:
    """(mtime_ns, size) of the file and of its write-ahead log; None if the file is missing."""
    try:
        main = path.stat()
    except FileNotFoundError:
        return None
    stamp = (main.st_mtime_ns, main.st_size)
    wal = path.with_name(path.name + ".wal")
    with contextlib.suppress(FileNotFoundError):
        wal_stat = wal.stat()
        stamp += (wal_stat.st_mtime_ns, wal_stat.st_size)
    return stamp


@contextlib.contextmanager
def read_only(path: str | Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection cut off from files and network, closed on exit."""
    con = queries.connect_read_only(path)
    try:
        yield dq.harden(con)
    finally:
        con.close()


# ---- cached reads: every function takes (path, stamp) first so a re-ingest invalidates it ----

_cache = st.cache_data(ttl=CACHE_TTL_S, max_entries=256, show_spinner=False)


@_cache
def load_run_count(path: str, stamp: tuple[int, ...]) -> int:
    with read_only(path) as con:
        return dq.count_runs(con)


@_cache
def load_leaderboard(path: str, stamp: tuple[int, ...]) -> pd.DataFrame:
    with read_only(path) as con:
        return queries.leaderboard(con)


@_cache
def load_constant_prediction(path: str, stamp: tuple[int, ...]) -> pd.DataFrame:
    with read_only(path) as con:
        try:
            return queries.constant_prediction(con)
        except SchemaError:  # a warehouse from before schema 5, never migrated by a reader: no floor line
            return pd.DataFrame()


def constant_prediction_caption(floors: pd.DataFrame, scopes: pd.DataFrame) -> str | None:
    """The floor line under a table of runs scored on `scopes` (dataset, split and, where known,
    eval_protocol): what predicting the most frequent class everywhere scores there."""
    keys = [c for c in ("dataset", "split", "eval_protocol") if c in scopes.columns and c in floors.columns]
    shown = floors.merge(scopes[keys].drop_duplicates(), on=keys) if keys else floors.iloc[0:0]
    if shown.empty:
        return None
    parts = []
    for row in shown.head(6).itertuples(index=False):
        where = " / ".join(str(getattr(row, k)) for k in keys)
        size = "" if pd.isna(row.image_size) else f" at {int(row.image_size)} px"
        parts.append(f"{where}{size}: “{row.class_name}” everywhere, mIoU {row.miou:.3f}")
    more = f"; {len(shown) - 6} more" if len(shown) > 6 else ""
    return ("Floor, the most frequent class predicted everywhere (a model at it learnt only the class "
            "frequencies): " + "; ".join(parts) + more + ".")


@_cache
def load_board_rows(path: str, stamp: tuple[int, ...], *, search: str | None = None, limit: int | None = None,
                    name: str | None = None, run_id: str | None = None, variant: str | None = None,
                    latest_only: bool = True, dataset: str | None = None, class_set: str | None = None,
                    split: str | None = None, protocol: str | None = None) -> pd.DataFrame:
    """Some of the leaderboard's rows, chosen and limited in DuckDB (`queries.leaderboard`)."""
    with read_only(path) as con:
        return queries.leaderboard(con, dataset, class_set, variant, split=split, protocol=protocol,
                                   latest_only=latest_only, name=name, run_id=run_id, search=search, limit=limit)


def best_runs(wh: Any, search: str, **filters: Any) -> tuple[pd.DataFrame, bool]:
    """What a run picker offers: the best `PICKER_RUNS` runs matching `search` and `filters`
    (`load_board_rows`), chosen in DuckDB, and whether more match."""
    rows = load_board_rows(wh.path, wh.stamp, search=search or None, limit=PICKER_RUNS + 1, **filters)
    return rows.head(PICKER_RUNS), len(rows) > PICKER_RUNS


def picker_caption(offered: int, more: bool, search: str, within: str = "") -> str:
    """The caption under a run picker (`best_runs`); `within` names what it picks from."""
    matching = f" matching “{search}”" if search else ""
    return (f"The best {PICKER_RUNS} runs{matching}{within} by mIoU; more match: type in the filter to find them."
            if more else f"{offered} runs{matching}{within}, best mIoU first.")


@_cache
def load_per_class_matrix(path: str, stamp: tuple[int, ...], metric: str, dataset: str | None,
                          class_set: str | None, split: str | None = None, protocol: str | None = None,
                          variants: tuple[str, ...] | None = None, top: int | None = None) -> pd.DataFrame:
    with read_only(path) as con:
        return queries.per_class_matrix(con, metric, dataset=dataset, class_set=class_set, split=split,
                                        protocol=protocol, variants=variants, top=top)


@_cache
def load_comparison(path: str, stamp: tuple[int, ...], run_a: str, run_b: str) -> pd.DataFrame:
    with read_only(path) as con:
        return queries.compare_runs(con, run_a, run_b)


@_cache
def load_history(path: str, stamp: tuple[int, ...], run_id: str) -> pd.DataFrame:
    with read_only(path) as con:
        return queries.history(con, run_id)


@_cache
def load_confusion(path: str, stamp: tuple[int, ...], run_id: str) -> pd.DataFrame:
    with read_only(path) as con:
        return queries.confusion(con, run_id)


@_cache
def load_run_details(path: str, stamp: tuple[int, ...], run_id: str) -> dict[str, Any]:
    with read_only(path) as con:
        return dq.run_details(con, run_id)


@_cache
def load_synthetic_validation(path: str, stamp: tuple[int, ...]) -> pd.DataFrame | None:
    with read_only(path) as con:
        return dq.synthetic_validation(con)


@_cache
def load_augmenter_effects(path: str, stamp: tuple[int, ...], metric: str, pairs: int | None = None) -> pd.DataFrame:
    with read_only(path) as con:
        return dq.augmenter_effects(con, metric, pairs=pairs)


@_cache
def load_augmenter_effect_summary(path: str, stamp: tuple[int, ...], metric: str) -> pd.DataFrame:
    with read_only(path) as con:
        return dq.augmenter_effect_summary(con, metric)


@_cache
def load_schema(path: str, stamp: tuple[int, ...]) -> pd.DataFrame:
    with read_only(path) as con:
        return dq.warehouse_columns(con)


@st.cache_data(ttl=SQL_CACHE_TTL_S, max_entries=32, show_spinner=False)
def load_sql(path: str, stamp: tuple[int, ...], sql: str, limits: dq.SqlLimits) -> dq.SqlResult:
    # On a private snapshot of the warehouse, so a long query does not keep `seglab ingest` out.
    # Refusals and errors raise, and Streamlit does not cache a raised exception.
    return dq.run_sql(path, sql, limits)


@dataclass(frozen=True)
class Warehouse:
    """A warehouse that exists and holds runs: what the pages pass to the loaders."""

    path: str
    stamp: tuple[int, ...]
    runs: int


@dataclass(frozen=True)
class WarehouseProblem:
    severity: str  # the st function that shows it: info | warning | error
    message: str


def check_warehouse(cfg: Settings) -> Warehouse | WarehouseProblem:
    """The readable warehouse with runs, or what is wrong with it and what to run."""
    stamp = warehouse_stamp(cfg.warehouse)
    if stamp is None:
        return WarehouseProblem("info", f"No warehouse at `{cfg.warehouse}` yet. {BUILD_HINT}")
    try:
        runs = load_run_count(str(cfg.warehouse), stamp)
    except WarehouseError as e:
        if "another process" in str(e):
            return WarehouseProblem("warning", f"The warehouse is being written right now "
                                               f"(`seglab ingest`?): {e}. Reload this page when "
                                               "it has finished.")
        return WarehouseProblem("error", f"Cannot read the warehouse: {e}")
    if runs == 0:
        return WarehouseProblem("info", f"The warehouse `{cfg.warehouse}` holds no runs yet. "
                                        f"{BUILD_HINT}")
    return Warehouse(str(cfg.warehouse), stamp, runs)


def require_warehouse(cfg: Settings) -> Warehouse:
    """The warehouse, or the reason there is none (with what to run) and the page stops."""
    found = check_warehouse(cfg)
    if isinstance(found, WarehouseProblem):
        getattr(st, found.severity)(found.message)
        st.stop()
    return found


def show_error(error: Exception) -> None:
    st.error(f"{type(error).__name__}: {error}")


# ---- labels and choices ----------------------------------------------------------------------


def run_labels(board: pd.DataFrame) -> dict[str, str]:
    """run_id -> 'name · variant'; where that is ambiguous, then the evaluated dataset and split,
    then the protocol, then a run-id prefix, each only as far as needed."""
    labels = board["name"].astype(str) + " · " + board["variant"].astype(str)
    extras = []
    if {"dataset", "split"} <= set(board.columns):
        extras.append(board["dataset"].astype(str) + " " + board["split"].astype(str))
    if "eval_protocol" in board.columns:
        extras.append(board["eval_protocol"].astype(str))
    extras.append(board["run_id"].str[:8])
    for extra in extras:
        ambiguous = labels.duplicated(keep=False)
        if not ambiguous.any():
            break
        labels = labels.where(~ambiguous, labels + " · " + extra)
    return dict(zip(board["run_id"], labels))


def choose_one(label: str, options: list[str], *, key: str, help: str | None = None) -> str | None:
    """A selectbox when there is a choice to make; the only option silently otherwise."""
    options = [o for o in options if o is not None]
    if not options:
        return None
    if len(options) == 1:
        st.caption(f"{label}: **{options[0]}**")
        return options[0]
    return st.selectbox(label, options, key=key, help=help)


def eval_command(details: dict[str, Any]) -> str:
    """The command that evaluates this run again: its dvc.yaml stage, or, for a run on another split
    (written to ``<name>@<dataset>.<split>/`` by `seglab evaluate NAME --data --split`), that command."""
    name = str(details["name"])
    if details.get("variant") == "ensemble":
        return "dvc repro ensemble"
    if Path(str(details.get("source_file") or "")).parent.name.startswith(f"{name}@"):
        return f"seglab evaluate {name} --data <the shards of {details['dataset']}> --split {details['split']}"
    return f"dvc repro evaluate@{name}"


# ---- artefact files --------------------------------------------------------------------------


def confusion_png(variant: str) -> str:
    """The file name of a run's confusion heatmap in its evaluation folder. The evaluation writes its
    first variant's as confusion.png and the others' as confusion_<variant>.png
    (`seglab.evaluate.evaluate.write_evaluation`): an `evaluate@` folder holds plain then tta, the
    ensemble's its one variant."""
    return "confusion.png" if variant in ("plain", "ensemble") else f"confusion_{variant}.png"


def artifact_file(details: dict[str, Any], eval_dir: Path, filename: str) -> tuple[Path | None, list[Path]]:
    """The run's evaluation artefact (e.g. predictions.png) and the places looked.

    First beside the eval.json the run was ingested from, then in the folder of that name under
    `eval_dir` (the warehouse may have been built elsewhere): ``<name>/`` for the stage's own
    evaluation, ``<name>@<dataset>.<split>/`` for another split's, which must not show the former's
    figures. ``<eval_dir>/<name>/`` where the run names no file.
    """
    candidates: list[Path] = []
    if details.get("source_file"):
        source_folder = Path(details["source_file"]).parent
        candidates += [source_folder / filename, eval_dir / source_folder.name / filename]
    else:
        candidates.append(eval_dir / str(details["name"]) / filename)
    candidates = list(dict.fromkeys(candidates))
    for candidate in candidates:
        if candidate.is_file():
            return candidate, candidates
    return None, candidates


def gan_samples(gan_dir: Path) -> dict[str, list[Path]]:
    """GAN name -> its sample grids (``<gan_dir>/<gan>/samples/*.png``), sorted by file name."""
    found: dict[str, list[Path]] = {}
    if not gan_dir.is_dir():
        return found
    for folder in sorted(p for p in gan_dir.iterdir() if p.is_dir()):
        images = sorted((folder / "samples").glob("*.png"))
        if images:
            found[folder.name] = images
    return found


# ---- charts ----------------------------------------------------------------------------------


def heatmap(long: pd.DataFrame, *, x: str, y: str, value: str, x_order: list[str],
            y_order: list[str], title: str, domain: tuple[float, float] | None = (0.0, 1.0),
            diverging: bool = False, annotate: bool = True, tooltip: list[str] | None = None) -> alt.Chart:
    """An altair rect heatmap with an optional value label in each cell."""
    if diverging:
        limit = float(long[value].abs().max()) if long[value].notna().any() else 1.0
        scale = alt.Scale(scheme="redblue", domain=[-limit or -1.0, limit or 1.0])
    else:
        scale = alt.Scale(scheme="viridis", domain=list(domain)) if domain else alt.Scale(scheme="viridis")
    cell = 24 if len(x_order) <= 30 else 16
    base = alt.Chart(long).encode(
        x=alt.X(f"{x}:N", sort=x_order, title=None, axis=alt.Axis(labelAngle=-45, labelLimit=160)),
        y=alt.Y(f"{y}:N", sort=y_order, title=None, axis=alt.Axis(labelLimit=360)),
    )
    rects = base.mark_rect().encode(
        color=alt.Color(f"{value}:Q", scale=scale, title=title),
        tooltip=tooltip or [y, x, alt.Tooltip(f"{value}:Q", format=".3f")],
    )
    chart = rects
    if annotate and len(x_order) * len(y_order) <= 600:
        # Undefined cells stay blank rather than reading "null".
        text = base.transform_filter(f"isValid(datum['{value}'])").mark_text(fontSize=10).encode(
            text=alt.Text(f"{value}:Q", format=".2f"),
            color=alt.value("white") if not diverging else alt.value("black"),
        )
        chart = rects + text
    # A fixed step per row and column keeps cells readable whatever the number of runs.
    return chart.properties(height=alt.Step(cell), width=alt.Step(max(cell, 44)), title=title)
