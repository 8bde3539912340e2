"""The warehouse's DuckDB schema: tables, views and the migrations that create them.

Tables (one evaluated variant of a model = one *run*, keyed by ``run_id``):

- ``runs``       one row per run: what was trained (model, arch, backbone, weights), on what
                 (dataset, class set, classes), how (params hash, git revision, sizes, seed),
                 how fast (timings, throughput, latency) and where it came from (source file).
                 ``run_json`` keeps the whole ``run`` object, so fields without a column of their
                 own stay queryable (``run_json->>'$.field'``).
- ``metrics``    run x split x metric -> value (the mean scores: miou, mdice, accuracy, ...).
- ``per_class``  run x class -> IoU, Dice, precision, recall, one-vs-rest accuracy, support
                 (truth pixels) and predicted pixels.
- ``confusion``  run x true class x predicted class -> pixel count. Only non-zero cells are
                 stored (a missing cell is 0); ``runs.num_classes`` gives the matrix size.
- ``history``    run x epoch x metric -> value, the training curves (plain runs only).

Version 2 adds to ``runs`` the GAN augmentation of a run: ``augmenter`` (the GAN whose validated
synthetic data it trained on besides the real data, NULL for none) and ``synthetic_images_used``
(0 when the gate accepted no synthetic sample and the run trained on real data only), backfilled
from ``run_json`` for runs ingested before; ``leaderboard`` gains both columns.

Version 3 adds views over *replicates* (params.yaml entries that differ only in ``seed``), each
over the ``latest`` run of every model (ensembles, which have no arch, left out):

- ``seed_summary``   one row per configuration (dataset, class_set, split, variant, arch, weights,
                     width, augmenter, image_size, batch_size, epochs_planned): ``models`` and
                     ``seeds`` (sorted lists), ``n`` (runs), and mean and sample standard deviation
                     of ``miou``, ``mdice`` and pixel ``accuracy`` (``*_std`` NULL when n = 1).
- ``augmenter_pairs`` every augmented run (``augmenter`` NOT NULL) with the real-only run of the
                     same configuration and seed (runs without a seed are never paired); where
                     several match, the one named like it without ``+<gan>`` wins, then by name.
- ``augmenter_effect`` per augmented configuration: ``n_pairs``, mean/std of the real-only,
                     augmented and paired difference (augmented - real-only) mIoU, over the pairs
                     where both mIoUs are defined, and the mean ``synthetic_images_used``.
- ``augmenter_effect_per_class`` the same per class for IoU; a pair where either IoU is undefined
                     is skipped for that class (``n_pairs`` counts the rest, 0 if none).

Version 4 adds ``synthetic_validation``: one row per validation of a GAN's synthetic batch, keyed
by (gan, params_hash), from the reports ``seglab.warehouse.synthetic`` ingests. It was created
outside the migrations before; a warehouse that has it keeps it.

Version 5 records what an evaluation scored and how, now that any model can be evaluated on any
dataset split (`seglab evaluate NAME --data SHARDS --split SPLIT`) under a chosen protocol
(``evaluate.protocol``): ``runs.dataset`` and ``runs.split`` are the evaluated shards' (as they
always were); ``runs.train_dataset`` is the dataset the model trained on and ``runs.eval_protocol``
``full`` (whole images at their stored resolution, sliding window) or ``letterbox``. Runs ingested
before are backfilled as what they were: their model's own data, letterboxed. ``leaderboard`` and
``class_scores`` gain both columns; ``latest`` is per protocol too, and the replicate views'
configurations include both, so scores under different protocols never mix.

Undefined scores (a class absent from truth and prediction) are NULL, never 0 or 1.

Runs accumulate: a model re-evaluated with other settings gets a new run_id and its earlier run
stays. Views: ``leaderboard`` (one row per run with its headline scores and costs, and ``latest``:
whether it is the newest run of its name and variant on its dataset, class set and split, under its
protocol) and
``class_scores`` (per_class with the run's name, variant, arch, dataset, class set and ``latest``).

Extending the schema: append a `Migration` with the next version to `MIGRATIONS`. Its
statements must be idempotent (``CREATE TABLE IF NOT EXISTS``, ``ALTER TABLE ... ADD COLUMN IF
NOT EXISTS``, ``CREATE OR REPLACE VIEW``); `ensure_schema` applies the ones a warehouse lacks,
each in its own transaction, and records them in ``schema_version``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

__all__ = [
    "MIGRATIONS",
    "READER_LOCK_WAIT_S",
    "LEGACY_PROTOCOL",
    "SCHEMA_VERSION",
    "SYNTHETIC_VALIDATION_TABLE",
    "TABLES",
    "WRITER_LOCK_WAIT_S",
    "Migration",
    "SchemaError",
    "WarehouseError",
    "connect",
    "ensure_schema",
    "schema_version",
    "table_exists",
]


class WarehouseError(RuntimeError):
    """A warehouse that cannot be opened, read or written as asked."""


class SchemaError(WarehouseError):
    """The database is not a seglab warehouse this code can read or upgrade."""


# How long opening the file waits for another connection to let go of it. Readers (the
# dashboard's page reads, the SQL page's snapshot copy) hold it for milliseconds and ingest for
# seconds; a writer waits longer because failing an ingest costs more than a slow page.
WRITER_LOCK_WAIT_S = 10.0
READER_LOCK_WAIT_S = 1.0


def _lock_conflict(read_only: bool, error: duckdb.Error) -> str | None:
    """What holds the file, if `error` says another connection does; None for any other error."""
    if isinstance(error, duckdb.ConnectionException):
        return (f"already open in this process in another mode "
                f"({'read-write' if read_only else 'read-only'}); close that connection first")
    if isinstance(error, duckdb.IOException) and "lock" in str(error).lower():
        return (f"opened by another process ({'writing' if read_only else 'reading or writing'}); "
                "close it (e.g. the dashboard, or a running `seglab ingest`) and retry")
    return None


def connect(path: str | Path, *, read_only: bool = False,
            lock_wait_s: float | None = None) -> duckdb.DuckDBPyConnection:
    """Open the warehouse file; a missing file (read-only) or a lock held elsewhere is a clear error.

    DuckDB lets one process write a database file or several read it, not both at once. While
    another connection holds the file this retries for `lock_wait_s` (default
    `WRITER_LOCK_WAIT_S` or `READER_LOCK_WAIT_S`), then raises WarehouseError naming the file.
    """
    path = Path(path)
    if lock_wait_s is None:
        lock_wait_s = READER_LOCK_WAIT_S if read_only else WRITER_LOCK_WAIT_S
    if read_only and not path.is_file():
        raise WarehouseError(
            f"{path}: no warehouse there; build it with `seglab ingest` (or `dvc repro`) first"
        )
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + lock_wait_s
    pause = 0.02
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as e:
            conflict = _lock_conflict(read_only, e)
            if conflict is None:
                raise WarehouseError(f"{path}: cannot open as a DuckDB database: {e}") from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise WarehouseError(f"{path}: {conflict} (waited {lock_wait_s:g} s): {e}") from None
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.25)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER PRIMARY KEY,
    description VARCHAR NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
)
"""

_V1_RUNS = """
CREATE TABLE IF NOT EXISTS runs (
    run_id                  VARCHAR PRIMARY KEY,  -- sha256(name + variant + params_hash)[:16]
    name                    VARCHAR NOT NULL,     -- params.yaml model name, or 'ensemble'
    variant                 VARCHAR NOT NULL,     -- plain | tta | ensemble
    split                   VARCHAR NOT NULL,     -- the evaluated split
    model                   VARCHAR,
    arch                    VARCHAR,              -- seglab.models registry name
    backbone                VARCHAR,
    weights                 VARCHAR,              -- requested: imagenet | imagenet-offline | path | NULL
    weights_loaded          VARCHAR,              -- what was actually loaded ('random' for none)
    members                 VARCHAR[],            -- ensemble: member model names
    member_weights          DOUBLE[],             -- ensemble: their weights in the mean
    params_hash             VARCHAR,
    git_rev                 VARCHAR,
    dataset                 VARCHAR NOT NULL,     -- the shards' source
    class_set               VARCHAR NOT NULL,     -- all80 | voc20 | JSON list of names
    classes                 VARCHAR[] NOT NULL,   -- class names by index
    num_classes             INTEGER NOT NULL,
    image_size              INTEGER,
    batch_size              INTEGER,
    width                   DOUBLE,
    epochs_planned          INTEGER,
    epochs_run              INTEGER,
    best_epoch              INTEGER,
    best_val_miou           DOUBLE,
    seconds_per_epoch       DOUBLE,
    train_seconds           DOUBLE,
    train_images_per_second DOUBLE,
    param_count             BIGINT,
    trainable_param_count   BIGINT,
    train_images            INTEGER,
    val_images              INTEGER,
    seed                    BIGINT,
    mixed_precision         VARCHAR,
    strategy                VARCHAR,
    replicas                INTEGER,
    tta                     VARCHAR[],            -- TTA transforms merged (variant 'tta')
    eval_images             INTEGER,              -- images of the split evaluated
    images_per_second       DOUBLE,               -- evaluation throughput
    latency_ms_p50          DOUBLE,
    latency_ms_p90          DOUBLE,
    created_at              TIMESTAMPTZ,          -- when training finished
    evaluated_at            TIMESTAMPTZ,
    source_file             VARCHAR NOT NULL,     -- the eval.json it was ingested from
    source_sha256           VARCHAR NOT NULL,
    ingested_at             TIMESTAMPTZ NOT NULL,
    run_json                JSON NOT NULL         -- the whole `run` object as ingested
)
"""

_V1_METRICS = """
CREATE TABLE IF NOT EXISTS metrics (
    run_id VARCHAR NOT NULL,
    split  VARCHAR NOT NULL,
    metric VARCHAR NOT NULL,
    value  DOUBLE,              -- NULL: undefined (nothing counted)
    PRIMARY KEY (run_id, split, metric)
)
"""

_V1_PER_CLASS = """
CREATE TABLE IF NOT EXISTS per_class (
    run_id      VARCHAR NOT NULL,
    class_index INTEGER NOT NULL,
    class_name  VARCHAR NOT NULL,
    iou         DOUBLE,
    dice        DOUBLE,
    precision   DOUBLE,
    recall      DOUBLE,
    accuracy    DOUBLE,         -- one-vs-rest pixel accuracy (TP + TN) / N
    support     BIGINT NOT NULL, -- truth pixels of the class
    predicted   BIGINT NOT NULL, -- pixels predicted as the class
    PRIMARY KEY (run_id, class_index)
)
"""

_V1_CONFUSION = """
CREATE TABLE IF NOT EXISTS confusion (
    run_id     VARCHAR NOT NULL,
    true_index INTEGER NOT NULL,
    pred_index INTEGER NOT NULL,
    count      BIGINT NOT NULL,  -- only non-zero cells are stored
    PRIMARY KEY (run_id, true_index, pred_index)
)
"""

_V1_HISTORY = """
CREATE TABLE IF NOT EXISTS history (
    run_id VARCHAR NOT NULL,
    epoch  INTEGER NOT NULL,
    metric VARCHAR NOT NULL,
    value  DOUBLE,
    PRIMARY KEY (run_id, epoch, metric)
)
"""

# The leaderboard view's parts; each schema version's view adds its columns between them.
_LEADERBOARD_HEAD = """
CREATE OR REPLACE VIEW leaderboard AS
WITH scores AS (
    SELECT run_id, split,
           max(value) FILTER (WHERE metric = 'miou')       AS miou,
           max(value) FILTER (WHERE metric = 'mdice')      AS mdice,
           max(value) FILTER (WHERE metric = 'mprecision') AS mprecision,
           max(value) FILTER (WHERE metric = 'mrecall')    AS mrecall,
           max(value) FILTER (WHERE metric = 'miou_fg')    AS miou_fg,
           max(value) FILTER (WHERE metric = 'accuracy')   AS accuracy
    FROM metrics
    GROUP BY run_id, split
)
SELECT r.run_id, r.name, r.variant, r.model, r.arch, r.backbone, r.weights, r.weights_loaded,
       r.dataset, r.class_set, r.split,
       s.miou, s.mdice, s.mprecision, s.mrecall, s.miou_fg, s.accuracy,
       r.param_count, r.seconds_per_epoch, r.train_seconds, r.images_per_second,
       r.latency_ms_p50, r.latency_ms_p90, r.image_size, r.width, r.epochs_run, r.best_epoch,
       r.params_hash, r.git_rev, r.evaluated_at,
"""
_LEADERBOARD_TAIL = """
       -- The newest run of this model and variant on this data; older ones are kept as history.
       row_number() OVER (PARTITION BY r.name, r.variant, r.dataset, r.class_set, r.split
                          ORDER BY r.evaluated_at DESC NULLS LAST, r.ingested_at DESC, r.run_id) = 1
           AS latest
FROM runs AS r
LEFT JOIN scores AS s ON s.run_id = r.run_id AND s.split = r.split
"""

_V1_LEADERBOARD = _LEADERBOARD_HEAD + _LEADERBOARD_TAIL

_V1_CLASS_SCORES = """
CREATE OR REPLACE VIEW class_scores AS
SELECT l.name, l.variant, l.arch, l.dataset, l.class_set, l.split, l.latest, p.*
FROM per_class AS p
JOIN leaderboard AS l USING (run_id)
"""

_V2_RUNS_AUGMENTER = (
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS augmenter VARCHAR",
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS synthetic_images_used INTEGER",
    # Runs ingested before the columns existed kept these fields in run_json only.
    """
    UPDATE runs
    SET augmenter = coalesce(augmenter, nullif(run_json->>'$.augmenter', '')),
        synthetic_images_used = coalesce(synthetic_images_used,
                                         TRY_CAST(run_json->>'$.synthetic_images_used' AS INTEGER))
    WHERE augmenter IS NULL OR synthetic_images_used IS NULL
    """,
)

# V1's leaderboard plus the augmentation columns (before `latest`, which stays last).
_V2_LEADERBOARD = _LEADERBOARD_HEAD + "       r.augmenter, r.synthetic_images_used,\n" + _LEADERBOARD_TAIL

# The latest run of every model (not the ensemble: it has no arch) with the settings that make
# up a configuration; `split` is a key too, since scores on different splits never mix. Version 5
# adds the training data and the protocol (`_V5_*`): the same templates, more key columns.
def _latest_model_runs(keys: str) -> str:
    return f"""
    SELECT l.run_id, l.name, {keys}l.dataset, l.class_set, l.split, l.variant, l.arch, l.weights,
           l.width, l.augmenter, l.image_size, r.batch_size, r.epochs_planned, r.seed,
           l.miou, l.mdice, l.accuracy, l.synthetic_images_used
    FROM leaderboard AS l JOIN runs AS r USING (run_id)
    WHERE l.latest AND l.arch IS NOT NULL
"""


def _seed_summary(latest_model_runs: str, configuration: str) -> str:
    return f"""
CREATE OR REPLACE VIEW seed_summary AS
WITH latest_model_runs AS ({latest_model_runs})
SELECT {configuration},
       list(name ORDER BY name) AS models,
       list(seed ORDER BY seed) AS seeds,
       count(*)                 AS n,
       avg(miou)  AS miou_mean,  stddev_samp(miou)  AS miou_std,
       avg(mdice) AS mdice_mean, stddev_samp(mdice) AS mdice_std,
       avg(accuracy) AS accuracy_mean, stddev_samp(accuracy) AS accuracy_std
FROM latest_model_runs
GROUP BY {configuration}
"""


# Same configuration but for the augmenter, same seed: the runs differ only in the training data.
def _augmenter_pairs(latest_model_runs: str, keys: str, same_keys: str) -> str:
    return f"""
CREATE OR REPLACE VIEW augmenter_pairs AS
WITH latest_model_runs AS ({latest_model_runs})
SELECT {keys}a.dataset, a.class_set, a.split, a.variant, a.arch, a.weights, a.width, a.image_size,
       a.batch_size, a.epochs_planned, a.augmenter, a.seed,
       a.run_id AS augmented_run_id, a.name AS augmented_name, a.miou AS augmented_miou,
       a.synthetic_images_used,
       b.run_id AS base_run_id, b.name AS base_name, b.miou AS base_miou,
       a.miou - b.miou AS delta_miou
FROM latest_model_runs AS a
JOIN latest_model_runs AS b
  ON a.augmenter IS NOT NULL AND b.augmenter IS NULL AND a.seed = b.seed
 AND a.dataset = b.dataset AND a.class_set = b.class_set AND a.split = b.split{same_keys}
 AND a.variant = b.variant AND a.arch = b.arch
 AND a.weights IS NOT DISTINCT FROM b.weights AND a.width IS NOT DISTINCT FROM b.width
 AND a.image_size IS NOT DISTINCT FROM b.image_size
 AND a.batch_size IS NOT DISTINCT FROM b.batch_size
 AND a.epochs_planned IS NOT DISTINCT FROM b.epochs_planned
-- Duplicate real-only entries (same configuration and seed): prefer the one `<model>+<gan>` is
-- named after, so each augmented run is counted once.
QUALIFY row_number() OVER (PARTITION BY a.run_id
                           ORDER BY (b.name = regexp_replace(a.name, '\\+[^+]*$', '')) DESC,
                                    b.name, b.run_id) = 1
"""


# Every statistic over the same pairs: those where both scores are defined.
def _augmenter_effect(pair_group: str) -> str:
    return f"""
CREATE OR REPLACE VIEW augmenter_effect AS
SELECT {pair_group},
       count(delta_miou) AS n_pairs,
       list(seed ORDER BY seed) FILTER (WHERE delta_miou IS NOT NULL) AS seeds,
       avg(base_miou) FILTER (WHERE delta_miou IS NOT NULL)              AS base_miou_mean,
       stddev_samp(base_miou) FILTER (WHERE delta_miou IS NOT NULL)      AS base_miou_std,
       avg(augmented_miou) FILTER (WHERE delta_miou IS NOT NULL)         AS augmented_miou_mean,
       stddev_samp(augmented_miou) FILTER (WHERE delta_miou IS NOT NULL) AS augmented_miou_std,
       avg(delta_miou)         AS delta_miou_mean,
       stddev_samp(delta_miou) AS delta_miou_std,
       avg(synthetic_images_used) FILTER (WHERE delta_miou IS NOT NULL)  AS synthetic_images_used
FROM augmenter_pairs
GROUP BY {pair_group}
"""


def _augmenter_effect_per_class(pair_group: str) -> str:
    return f"""
CREATE OR REPLACE VIEW augmenter_effect_per_class AS
WITH class_pairs AS (
    SELECT p.*, pa.class_index, pa.class_name, pb.iou AS base_iou, pa.iou AS augmented_iou,
           pa.iou - pb.iou AS delta_iou  -- NULL when either is undefined: skipped below
    FROM augmenter_pairs AS p
    JOIN per_class AS pa ON pa.run_id = p.augmented_run_id
    JOIN per_class AS pb ON pb.run_id = p.base_run_id
                        AND pb.class_index = pa.class_index AND pb.class_name = pa.class_name
)
SELECT {pair_group}, class_index, class_name,
       count(delta_iou) AS n_pairs,
       avg(base_iou) FILTER (WHERE delta_iou IS NOT NULL)              AS base_iou_mean,
       stddev_samp(base_iou) FILTER (WHERE delta_iou IS NOT NULL)      AS base_iou_std,
       avg(augmented_iou) FILTER (WHERE delta_iou IS NOT NULL)         AS augmented_iou_mean,
       stddev_samp(augmented_iou) FILTER (WHERE delta_iou IS NOT NULL) AS augmented_iou_std,
       avg(delta_iou)         AS delta_iou_mean,
       stddev_samp(delta_iou) AS delta_iou_std
FROM class_pairs
GROUP BY {pair_group}, class_index, class_name
"""


_V3_LATEST_MODEL_RUNS = _latest_model_runs("")
_V3_CONFIGURATION = ("dataset, class_set, split, variant, arch, weights, width, augmenter, "
                     "image_size, batch_size, epochs_planned")
_V3_SEED_SUMMARY = _seed_summary(_V3_LATEST_MODEL_RUNS, _V3_CONFIGURATION)
_V3_AUGMENTER_PAIRS = _augmenter_pairs(_V3_LATEST_MODEL_RUNS, "", "")
_V3_PAIR_GROUP = ("dataset, class_set, split, variant, arch, weights, width, image_size, "
                  "batch_size, epochs_planned, augmenter")
_V3_AUGMENTER_EFFECT = _augmenter_effect(_V3_PAIR_GROUP)
_V3_AUGMENTER_EFFECT_PER_CLASS = _augmenter_effect_per_class(_V3_PAIR_GROUP)

# The synthetic-data gate's figures, one row per validation report (`seglab.warehouse.synthetic`).
# Warehouses from before version 4 may hold this table already (then made outside the migrations,
# with these columns): IF NOT EXISTS keeps it and its rows.
_V4_SYNTHETIC_VALIDATION = """
CREATE TABLE IF NOT EXISTS synthetic_validation (
    gan                      VARCHAR NOT NULL,   -- params.yaml GAN name (dcgan, sagan, pix2pix, ...)
    params_hash              VARCHAR NOT NULL,   -- sha256(settings + synthetic and real shard digests)[:16]
    generator                VARCHAR,            -- generator column of the shards (comma-joined if several)
    generator_seed           BIGINT,             -- NULL when the shards mix seeds
    validated_at             TIMESTAMPTZ NOT NULL,
    images                   INTEGER NOT NULL,
    accepted                 INTEGER NOT NULL,
    rejected                 INTEGER NOT NULL,
    rejected_per_image       INTEGER NOT NULL,   -- excluded by a per-image rule
    rejected_by_batch        INTEGER NOT NULL,   -- passed those, then rejected with the whole batch
    rejected_by_rule         JSON NOT NULL,      -- rule -> samples rejected by it
    success                  BOOLEAN NOT NULL,   -- at least one sample accepted (training uses synthetic data)
    batch_success            BOOLEAN NOT NULL,   -- every batch rule held
    decision                 VARCHAR NOT NULL,
    diversity                DOUBLE,             -- mean pairwise RMS distance, pixels in [0, 1]
    real_diversity           DOUBLE,
    kid_mean                 DOUBLE,
    kid_std                  DOUBLE,
    kid_max                  DOUBLE,
    channel_mean_delta_r     DOUBLE,             -- synthetic - real, [0, 255] units
    channel_mean_delta_g     DOUBLE,
    channel_mean_delta_b     DOUBLE,
    channel_std_delta_r      DOUBLE,
    channel_std_delta_g      DOUBLE,
    channel_std_delta_b      DOUBLE,
    resolution               INTEGER,            -- side both sets were compared at
    feature_size             INTEGER,            -- MobileNetV2 input side
    real_images              INTEGER,            -- real reference images
    source_file              VARCHAR NOT NULL,   -- the summary.json ingested
    ingested_at              TIMESTAMPTZ NOT NULL,
    summary                  JSON NOT NULL,
    PRIMARY KEY (gan, params_hash)
)
"""

# Version 5: an evaluation names what it scored and how (`seglab evaluate --data --split`,
# `evaluate.protocol`). `runs.dataset` and `runs.split` were always the evaluated shards'; a run may
# now score a model on another dataset than it trained on (`train_dataset`) and under another protocol
# (`eval_protocol`: full | letterbox). Runs ingested before scored their model's own val split
# letterboxed, and are backfilled so.
LEGACY_PROTOCOL = "letterbox"

_V5_RUNS_EVALUATION = (
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS train_dataset VARCHAR",
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS eval_protocol VARCHAR",
    f"""
    UPDATE runs
    SET train_dataset = coalesce(train_dataset, nullif(run_json->>'$.train_dataset', ''), dataset),
        eval_protocol = coalesce(eval_protocol, nullif(run_json->>'$.eval_protocol', ''), '{LEGACY_PROTOCOL}')
    WHERE train_dataset IS NULL OR eval_protocol IS NULL
    """,
)

# Scores under different protocols never mix, like scores on different splits: `latest` is per
# protocol too.
_V5_LEADERBOARD = (_LEADERBOARD_HEAD
                   + "       r.augmenter, r.synthetic_images_used, r.train_dataset, r.eval_protocol,\n"
                   + _LEADERBOARD_TAIL.replace("r.class_set, r.split\n", "r.class_set, r.split, r.eval_protocol\n"))

_V5_CLASS_SCORES = """
CREATE OR REPLACE VIEW class_scores AS
SELECT l.name, l.variant, l.arch, l.dataset, l.class_set, l.split, l.eval_protocol, l.train_dataset, l.latest, p.*
FROM per_class AS p
JOIN leaderboard AS l USING (run_id)
"""

_V5_LATEST_MODEL_RUNS = _latest_model_runs("l.train_dataset, l.eval_protocol, ")
_V5_CONFIGURATION = "train_dataset, " + _V3_CONFIGURATION.replace("split, ", "split, eval_protocol, ")
_V5_PAIR_GROUP = "train_dataset, " + _V3_PAIR_GROUP.replace("split, ", "split, eval_protocol, ")
_V5_REPLICATE_VIEWS = (
    _seed_summary(_V5_LATEST_MODEL_RUNS, _V5_CONFIGURATION),
    _augmenter_pairs(_V5_LATEST_MODEL_RUNS, "a.train_dataset, a.eval_protocol, ",
                     "\n AND a.eval_protocol = b.eval_protocol AND a.train_dataset IS NOT DISTINCT FROM b.train_dataset"),
    _augmenter_effect(_V5_PAIR_GROUP),
    _augmenter_effect_per_class(_V5_PAIR_GROUP),
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "runs, metrics, per_class, confusion, history; leaderboard and class_scores views",
        (_V1_RUNS, _V1_METRICS, _V1_PER_CLASS, _V1_CONFUSION, _V1_HISTORY, _V1_LEADERBOARD,
         _V1_CLASS_SCORES),
    ),
    Migration(
        2,
        "runs.augmenter and runs.synthetic_images_used (GAN-augmented training), in leaderboard too",
        (*_V2_RUNS_AUGMENTER, _V2_LEADERBOARD),
    ),
    Migration(
        3,
        "seed_summary, augmenter_pairs, augmenter_effect and augmenter_effect_per_class views "
        "(mean and std over seed replicates)",
        (_V3_SEED_SUMMARY, _V3_AUGMENTER_PAIRS, _V3_AUGMENTER_EFFECT,
         _V3_AUGMENTER_EFFECT_PER_CLASS),
    ),
    Migration(4, "synthetic_validation: the GAN gate's validation reports", (_V4_SYNTHETIC_VALIDATION,)),
    Migration(
        5,
        "runs.train_dataset and runs.eval_protocol (evaluations on any dataset split, full or letterbox), "
        "in the views too; latest and the replicate configurations per protocol",
        (*_V5_RUNS_EVALUATION, _V5_LEADERBOARD, _V5_CLASS_SCORES, *_V5_REPLICATE_VIEWS),
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version

SYNTHETIC_VALIDATION_TABLE = "synthetic_validation"

# Tables holding one run's rows, children first: what replacing a run deletes.
TABLES = ("metrics", "per_class", "confusion", "history", "runs")


def table_exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    """Whether a table or view called `name` is in the warehouse's main schema."""
    # fetchall, not fetchone: DuckDB refuses other work on a connection with an unfinished result.
    rows = con.execute(
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_schema = current_schema() AND table_name = ?", [name]
    ).fetchall()
    return bool(rows[0][0])


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The highest migration applied to this database; 0 for an empty one."""
    if not table_exists(con, "schema_version"):
        return 0
    version = con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0]
    return int(version or 0)


def ensure_schema(con: duckdb.DuckDBPyConnection) -> int:
    """Bring the database up to `SCHEMA_VERSION`; returns that version.

    Each missing migration runs in its own transaction, so a kill leaves the database at the
    last complete version. A database written by newer code (a higher version) is refused
    rather than written with a schema this code does not know.
    """
    current = schema_version(con)
    if current > SCHEMA_VERSION:
        raise SchemaError(
            f"the warehouse has schema version {current}, newer than this seglab's "
            f"{SCHEMA_VERSION}; upgrade seglab or rebuild the warehouse with `seglab ingest`"
        )
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        con.begin()
        try:
            con.execute(_VERSION_TABLE)
            for statement in migration.statements:
                con.execute(statement)
            con.execute(
                "INSERT INTO schema_version (version, description) VALUES (?, ?)",
                [migration.version, migration.description],
            )
            con.commit()
        except BaseException:
            con.rollback()
            raise
        current = migration.version
    return current
