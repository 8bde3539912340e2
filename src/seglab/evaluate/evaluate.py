"""The `evaluate` stage: a trained model on the validation split, plain and with test-time augmentation.

`run_evaluate(cfg, name)` reads ``<train.out>/<name>/{model.keras, train.json}`` and the training
curves ``<train.metrics>/<name>/history.csv``, checks that the model's classes are the shards'
classes (same names, same order: a model is never scored against another mapping), and streams the
val split letterboxed at the model's input size (padding is label 255, so it never counts). For every
batch it runs the plain softmax and the TTA-merged probabilities (`seglab.evaluate.tta`), and adds
the argmax into one streaming confusion matrix per variant; every score derives from those
(`seglab.metrics.scores_from_confusion`: macro means over present classes, NaN for
undefined ones).

Speed: images/s is the number of val images over the wall time of the model calls (prediction
to host memory included; reading and decoding the shards, which overlap in tf.data's prefetch, not),
after one untimed warm-up call on the first batch that traces the graph. Each predictor is traced
once, for any batch size (`inference_function`), so the latency's batch of one reuses the graph. A
last partial batch is padded to the batch size (one input shape for the kernels); only its real
images are counted.
Latency: one image per call, `evaluate.latency_runs` timed calls after a warm-up, p50/p90 in ms.

Outputs, written together into ``<evaluate.out>/<name>/`` (the folder swaps in at the end):
``metrics.json`` (flat numbers for DVC), ``eval.json`` (everything the warehouse ingests: one entry
per variant, "plain" and "tta"), ``per_class.csv`` (both variants), ``confusion.csv`` and
``confusion.png`` (plain; ``confusion_tta.*`` for TTA), ``predictions.png`` (image / truth / plain
and TTA prediction for the first val images; pixels that are not scored are grey everywhere).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from seglab.atomic import atomic_dir
from seglab.digest import json_safe
from seglab.data.classes import IGNORE_INDEX
from seglab.data.pipeline import classes_of, make_dataset
from seglab.evaluate.plots import plot_confusion, plot_prediction_grid
from seglab.evaluate.tta import probability_model, tta_model
from seglab.metrics import METRIC_NAMES, ConfusionMatrix
from seglab.records import EvalRecord, TrainRecord

log = logging.getLogger(__name__)

__all__ = [
    "EVAL_SPLIT",
    "EvaluationPass",
    "TrainedModel",
    "VariantResult",
    "check_classes",
    "evaluate_predictors",
    "load_trained",
    "measure_latency",
    "per_class_rows",
    "read_history",
    "run_evaluate",
    "run_id",
    "write_evaluation",
]

EVAL_SPLIT = "val"
GRID_IMAGES = 6
PER_CLASS_FIELDS = ("class_index", "class_name", "iou", "dice", "precision", "recall", "accuracy",
                    "support", "predicted")
# metrics.json: the headline means, for `dvc metrics show/diff`.
HEADLINE_METRICS = ("miou", "mdice", "mprecision", "mrecall", "accuracy", "miou_fg", "mdice_fg")


# ------------------------------------------------------------------------------------------ helpers

def _dump_json(value: Any) -> str:
    return json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n"


def run_id(name: str, variant: str, params_hash: str | None) -> str:
    """Stable id of one evaluated variant: sha256 of "name|variant|params_hash", first 16 hex."""
    return hashlib.sha256(f"{name}|{variant}|{params_hash or ''}".encode()).hexdigest()[:16]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_revision() -> str | None:
    """HEAD's commit, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# ----------------------------------------------------------------------------------- trained models

@dataclass
class TrainedModel:
    """A trained model as the train stage left it: the Keras model and its train.json."""

    name: str
    directory: Path
    model: keras.Model
    info: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def image_shape(self) -> tuple[int, int]:
        return int(self.model.input_shape[1]), int(self.model.input_shape[2])


def _register_custom_objects() -> None:
    # Importing these registers seglab's serialisable layers with Keras, so load_model finds them.
    # Training saves an uncompiled inference view and it is loaded with compile=False, so no loss,
    # metric or optimizer (seglab.train's) is ever deserialised here.
    import seglab.models.registry  # noqa: F401
    import seglab.models.transfer  # noqa: F401


def load_trained(models_dir: str | Path, name: str) -> TrainedModel:
    """Load ``<models_dir>/<name>/{model.keras, train.json}`` (a `TrainRecord`) and check they agree."""
    directory = Path(models_dir) / name
    info_path, model_path = directory / "train.json", directory / "model.keras"
    for path in (info_path, model_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; train the model first (`seglab train {name}`)")
    info = TrainRecord.load(info_path).to_json()  # RecordError (a ValueError) names file and field
    classes = info["classes"]

    _register_custom_objects()
    try:
        # The optimizer and loss are training state; evaluation needs the forward pass only.
        model = keras.models.load_model(model_path, compile=False)
    except Exception as e:  # Keras raises assorted types for a corrupt or foreign file
        raise ValueError(f"{model_path}: cannot be loaded as a Keras model: {type(e).__name__}: {e}") from e

    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[3] != 3 or shape[1] is None or shape[2] is None:
        raise ValueError(f"{model_path}: expected an RGB input of static size (None, H, W, 3), got {shape}")
    outputs = model.output_shape[-1]
    if outputs != len(classes):
        raise ValueError(
            f"{model_path}: the model outputs {outputs} classes but {info_path} lists {len(classes)}; "
            "the two files are not from the same training run"
        )
    size = info["image_size"]
    expected = [size, size] if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else None
    if expected != [shape[1], shape[2]]:
        raise ValueError(
            f"{info_path}: image_size {size!r} does not match the model's input {shape[1]}x{shape[2]} in {model_path}"
        )
    return TrainedModel(name=name, directory=directory, model=model, info=info)


def check_classes(expected: Sequence[str], found: Sequence[str], expected_from: str, found_from: str) -> None:
    """Refuse to score a model against another class mapping: same names in the same order."""
    expected, found = list(expected), list(found)
    if expected == found:
        return
    if len(expected) != len(found):
        detail = f"{len(expected)} classes vs {len(found)}"
    else:
        index = next(i for i, (a, b) in enumerate(zip(expected, found)) if a != b)
        detail = f"label {index} is {expected[index]!r} in one and {found[index]!r} in the other"
    raise ValueError(
        f"class mismatch: {expected_from} has classes {expected} but {found_from} has {found} ({detail}); "
        "scores against another label mapping would be meaningless: retrain on these shards or evaluate "
        "on the shards the model was trained with"
    )


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """history.csv as rows of numbers (epoch an int; empty or NaN cells None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: training history not found; the train stage writes it (`seglab train`)")
    rows = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "epoch" not in reader.fieldnames:
            raise ValueError(f"{path}: expected a CSV header with an 'epoch' column, got {reader.fieldnames}")
        for line, record in enumerate(reader, start=2):
            row: dict[str, Any] = {}
            for column, text in record.items():
                text = (text or "").strip()
                try:
                    value = float(text) if text else None
                except ValueError:
                    raise ValueError(f"{path} line {line}, column {column!r}: expected a number, got {text!r}") from None
                if column == "epoch":
                    if value is None or not value.is_integer():
                        raise ValueError(f"{path} line {line}: epoch must be a whole number, got {text!r}")
                    value = int(value)
                elif value is not None and not math.isfinite(value):
                    value = None
                row[column] = value
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------- the evaluation pass

@dataclass
class VariantResult:
    """What one predictor (plain, TTA, ensemble) accumulated over the split."""

    variant: str
    confusion: ConfusionMatrix
    predict_seconds: float = 0.0
    # Process CPU time (all threads) during the same calls: unlike wall time it hardly moves when other
    # jobs share the cores. It includes whatever tf.data prefetching ran meanwhile (small next to a model).
    predict_cpu_seconds: float = 0.0
    timed_images: int = 0
    latency_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    grid_predictions: list[np.ndarray] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.timed_images / self.predict_seconds if self.predict_seconds > 0 else float("nan")

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000.0 * self.predict_cpu_seconds / self.timed_images if self.timed_images else float("nan")

    def latency_percentile(self, q: float) -> float:
        return float(np.percentile(self.latency_ms, q)) if self.latency_ms.size else float("nan")


@dataclass
class EvaluationPass:
    """The results of every predictor over one pass of the split, and the images for the grid."""

    results: dict[str, VariantResult]
    images: int
    grid_images: list[np.ndarray]
    grid_truths: list[np.ndarray]


def _check_finite(probabilities: np.ndarray, variant: str, batch_index: int) -> None:
    if not np.all(np.isfinite(probabilities)):
        raise ValueError(f"{variant}: the model produced NaN or infinite probabilities on val batch {batch_index}; "
                         "the checkpoint is broken (diverged training?)")


def inference_function(predictor: keras.Model, image_shape: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
    """`predictor` in inference mode as one graph for batches of any size of `image_shape` images.

    `predict_on_batch` traces a graph per input shape: the evaluation batch and the latency's batch
    of one would each be traced, for the plain and the TTA model, and tracing takes most of an
    evaluate stage's time at the CPU profile.
    """
    spec = tf.TensorSpec((None, *image_shape), tf.float32)
    graph = tf.function(lambda images: predictor(images, training=False), input_signature=[spec])
    return lambda images: graph(tf.convert_to_tensor(images, tf.float32)).numpy()


def evaluate_predictors(
    predictors: Mapping[str, keras.Model],
    dataset: Any,
    class_names: Sequence[str],
    *,
    latency_runs: int = 20,
    grid_images: int = GRID_IMAGES,
) -> EvaluationPass:
    """Run every predictor (images -> probabilities (B, H, W, C)) over `dataset` of (images, labels).

    Returns per predictor the confusion matrix, its throughput and latency (module doc) and its
    label maps for the first `grid_images` images (not-scored pixels set to 255).
    """
    if not predictors:
        raise ValueError("evaluate_predictors needs at least one predictor")
    num_classes = len(class_names)
    results = {variant: VariantResult(variant, ConfusionMatrix(num_classes, IGNORE_INDEX, class_names))
               for variant in predictors}
    grid_inputs: list[np.ndarray] = []
    grid_truths: list[np.ndarray] = []
    batch_size = None
    images_seen = 0
    first_image = None
    calls: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    for batch_index, (images, labels) in enumerate(dataset):
        images, labels = np.asarray(images, np.float32), np.asarray(labels)
        real = images.shape[0]
        if batch_size is None:
            batch_size = real
            first_image = images[:1].copy()
            calls = {variant: inference_function(predictor, images.shape[1:]) for variant, predictor in predictors.items()}
            for call in calls.values():  # warm-up: tracing is not inference time
                call(images)
        if real < batch_size:  # pad to the traced batch shape; the padding is dropped below
            images = np.concatenate([images, np.zeros((batch_size - real, *images.shape[1:]), images.dtype)])
        scored = labels != IGNORE_INDEX
        take = max(0, min(grid_images - len(grid_inputs), real))
        grid_inputs += [images[i].astype(np.uint8) for i in range(take)]
        grid_truths += [labels[i].astype(np.uint8) for i in range(take)]
        for variant, call in calls.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            probabilities = call(images)
            results[variant].predict_seconds += time.perf_counter() - start
            results[variant].predict_cpu_seconds += time.process_time() - cpu_start
            _check_finite(probabilities[:real], variant, batch_index)
            results[variant].timed_images += real
            predicted = np.argmax(probabilities[:real], axis=-1)
            results[variant].confusion.update(labels, predicted)
            shown = np.where(scored, predicted, IGNORE_INDEX).astype(np.uint8)
            results[variant].grid_predictions += [shown[i] for i in range(take)]
        images_seen += real
    if images_seen == 0:
        raise ValueError("the evaluation dataset yielded no images")

    for variant, call in calls.items():
        results[variant].latency_ms = measure_latency(call, first_image, latency_runs)
    return EvaluationPass(results, images_seen, grid_inputs, grid_truths)


def measure_latency(predict: Callable[[np.ndarray], Any], image_batch: np.ndarray, runs: int) -> np.ndarray:
    """Milliseconds of `runs` single-image calls of `predict` after one untimed warm-up call."""
    if runs < 1:
        raise ValueError(f"latency runs must be >= 1, got {runs}")
    single = np.asarray(image_batch[:1], np.float32)
    predict(single)
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(single)
        timings.append((time.perf_counter() - start) * 1000.0)
    return np.asarray(timings)


# ------------------------------------------------------------------------------------------ outputs

def per_class_rows(scores: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per class with IoU, Dice, precision, recall, one-vs-rest accuracy and pixel counts.

    accuracy = (TP + TN) / N over all counted pixels N: how often the binary "is it class c?"
    decision is right. NaN scores (absent classes) stay NaN.
    """
    matrix = np.asarray(scores["confusion_matrix"], np.int64)
    total = int(matrix.sum())
    true_positive = np.diag(matrix)
    false_positive = matrix.sum(axis=0) - true_positive
    false_negative = matrix.sum(axis=1) - true_positive
    true_negative = total - true_positive - false_positive - false_negative
    rows = []
    for index, name in enumerate(scores["class_names"]):
        rows.append({
            "class_index": index,
            "class_name": name,
            "iou": float(scores["iou"][index]),
            "dice": float(scores["dice"][index]),
            "precision": float(scores["precision"][index]),
            "recall": float(scores["recall"][index]),
            "accuracy": (true_positive[index] + true_negative[index]) / total if total else float("nan"),
            "support": int(scores["support"][index]),
            "predicted": int(scores["predicted"][index]),
        })
    return rows


def variant_entry(run: Mapping[str, Any], scores: Mapping[str, Any], history: list[dict[str, Any]]) -> dict:
    """One eval.json entry: run, mean metrics, per-class scores, confusion matrix, history."""
    return {
        "run": dict(run),
        "metrics": {name: scores[name] for name in METRIC_NAMES} | {"pixels": scores["pixels"]},
        "per_class": per_class_rows(scores),
        "confusion": np.asarray(scores["confusion_matrix"]).tolist(),
        "history": history,
    }


def speed_fields(result: VariantResult) -> dict[str, float]:
    return {
        "images_per_second": result.images_per_second,
        "latency_ms_p50": result.latency_percentile(50),
        "latency_ms_p90": result.latency_percentile(90),
    }


def flat_metrics(scores: Mapping[str, Any], result: VariantResult, prefix: str = "") -> dict[str, float]:
    """metrics.json numbers of one variant, keys prefixed (e.g. "tta_")."""
    values = {name: scores[name] for name in HEADLINE_METRICS} | speed_fields(result)
    return {f"{prefix}{key}": value for key, value in values.items()}


def _confusion_csv(matrix: np.ndarray, class_names: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true \\ predicted", *class_names])
    for name, row in zip(class_names, np.asarray(matrix).tolist()):
        writer.writerow([name, *row])
    return buffer.getvalue()


def _per_class_csv(entries: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["variant", *PER_CLASS_FIELDS], lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        for row in entry["per_class"]:
            # Undefined scores as empty cells, like history.csv, not as the text "nan".
            writer.writerow({"variant": entry["run"]["variant"], **{k: json_safe(v) for k, v in row.items()}})
    return buffer.getvalue()


def write_evaluation(
    out_dir: str | Path,
    entries: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any],
    evaluation: EvaluationPass,
    class_names: Sequence[str],
    title: str,
) -> Path:
    """Write the contract files into `out_dir` in one atomic folder swap.

    The first entry is the primary variant: its confusion goes to ``confusion.{csv,png}``, the
    others' to ``confusion_<variant>.{csv,png}``.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "metrics.json").write_text(_dump_json(metrics))
        EvalRecord.of({"runs": list(entries)}, source=out_dir / "eval.json").write(tmp / "eval.json")
        (tmp / "per_class.csv").write_text(_per_class_csv(entries))
        for position, entry in enumerate(entries):
            variant = entry["run"]["variant"]
            stem = "confusion" if position == 0 else f"confusion_{variant}"
            matrix = np.asarray(entry["confusion"], np.int64)
            (tmp / f"{stem}.csv").write_text(_confusion_csv(matrix, class_names))
            plot_confusion(matrix, class_names, tmp / f"{stem}.png",
                           title=f"{title} ({variant}): confusion, % of each true class's pixels")
        if evaluation.grid_images:
            plot_prediction_grid(
                evaluation.grid_images,
                evaluation.grid_truths,
                {variant: result.grid_predictions for variant, result in evaluation.results.items()},
                class_names,
                tmp / "predictions.png",
                title=f"{title}: first {len(evaluation.grid_images)} val images (grey: not scored)",
            )
    return out_dir


def eval_dataset(cfg: Any, split: str, image_shape: tuple[int, int]) -> Any:
    return make_dataset(
        cfg.shard.out, split,
        image_size=image_shape,
        batch_size=cfg.evaluate.batch_size,
        training=False,  # letterbox, no shuffle, keep the last partial batch
        seed=cfg.seed,
        deterministic=True,
    )


def run_evaluate(cfg: Any, name: str, *, split: str = EVAL_SPLIT, grid_images: int = GRID_IMAGES) -> dict:
    """The `evaluate@<name>` stage: see the module doc. Returns the metrics.json numbers and the folder."""
    cfg.model(name)  # a clear error for a name params.yaml does not list
    trained = load_trained(cfg.train.out, name)
    shard_classes = classes_of(cfg.shard.out, split)
    check_classes(trained.classes, shard_classes, str(trained.directory / "train.json"),
                  f"the '{split}' shards in {cfg.shard.out}")
    history = read_history(Path(cfg.train.metrics) / name / "history.csv")

    tta = tta_model(trained.model, cfg.evaluate.tta)
    predictors = {"plain": probability_model(trained.model), "tta": tta}
    log.info("evaluating %s on %s/%s at %s, TTA %s", name, cfg.shard.out, split, trained.image_shape,
             tta.tta_transforms)
    evaluation = evaluate_predictors(
        predictors, eval_dataset(cfg, split, trained.image_shape), shard_classes,
        latency_runs=cfg.evaluate.latency_runs, grid_images=grid_images,
    )

    evaluated_at = utc_now()
    params_hash = trained.info.get("params_hash")
    entries, metrics = [], {}
    for variant, prefix in (("plain", ""), ("tta", "tta_")):
        result = evaluation.results[variant]
        scores = result.confusion.result()
        run = {
            **trained.info,
            # Always present (null: trained on real data only by design), so the warehouse and the
            # dashboard's augmenter view can tell `<model>+<gan>` runs from their baselines.
            "augmenter": trained.info.get("augmenter"),
            "synthetic_images_used": trained.info.get("synthetic_images_used"),
            "run_id": run_id(name, variant, params_hash),
            "name": name,
            "variant": variant,
            "split": split,
            "tta": tta.tta_transforms if variant == "tta" else None,
            "eval_images": evaluation.images,
            **speed_fields(result),
            "evaluated_at": evaluated_at,
        }
        entries.append(variant_entry(run, scores, history if variant == "plain" else []))
        metrics |= flat_metrics(scores, result, prefix)

    out_dir = Path(cfg.evaluate.out) / name
    write_evaluation(out_dir, entries, metrics, evaluation, shard_classes, title=name)
    log.info("%s: mIoU %.4f (TTA %.4f), %.1f images/s (TTA %.1f) -> %s", name, metrics["miou"],
             metrics["tta_miou"], metrics["images_per_second"], metrics["tta_images_per_second"], out_dir)
    return {"model": name, "out": str(out_dir), **json_safe(metrics)}
