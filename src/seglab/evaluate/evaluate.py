"""The `evaluate` stage: a trained model on a dataset split, plain and with test-time augmentation.

`run_evaluate(cfg, name)` reads ``<train.out>/<name>/{model.keras, train.json}`` and the training
curves ``<train.metrics>/<name>/history.csv`` and evaluates the model on ``evaluate.split`` of the
shard root ``evaluate.data`` (by default the val split of the models' own shards), or on the
`data` / `split` it is given (`seglab evaluate NAME --data SHARDS --split SPLIT`). It checks that the
model's classes are the target shards' classes (same names, same order: a model is never scored
against another mapping; the refusal names both lists), then streams the split under
``evaluate.protocol`` (`seglab.evaluate.inference`): `full`, whole images at their stored
resolution by sliding window (`seglab.evaluate.sliding`), or `letterbox`, one thumbnail of the
model's input size per image (padding is label 255, so it never counts). For every image or batch
it runs the plain softmax and the TTA-merged probabilities (`seglab.evaluate.tta`), and adds the
argmax into one streaming confusion matrix per variant (`seglab.evaluate.inference` also says how
speed and latency are measured); every score derives from those
(`seglab.metrics.scores_from_confusion`: macro means over present classes, NaN for undefined ones).

Outputs, written together into one folder (it swaps in at the end): ``<evaluate.out>/<name>/`` for
the target params.yaml names (what `evaluate@<name>` writes and DVC tracks), else
``<evaluate.out>/<name>@<dataset>.<split>/`` (`output_folder`), so evaluating another split never
touches the stage's outputs. Files: ``metrics.json`` (flat numbers for DVC), ``eval.json``
(everything the warehouse ingests: one entry per variant, "plain" and "tta", each naming its
dataset, split and protocol), ``per_class.csv`` (both variants), ``confusion.csv`` and
``confusion.png`` (plain; ``confusion_tta.*`` for TTA), ``predictions.png`` (image / truth / plain
and TTA prediction for the first images; pixels that are not scored are grey everywhere).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seglab.atomic import atomic_dir
from seglab.digest import json_safe
from seglab.evaluate.inference import (
    GRID_IMAGES,
    EvalTarget,
    EvaluationPass,
    VariantResult,
    check_classes,
    eval_dataset,
    eval_target,
    evaluate_predictors,
    load_trained,
    plain_and_tta,
    sliding_window,
)
from seglab.evaluate.sliding import SlidingWindow
from seglab.evaluate.plots import plot_confusion, plot_prediction_grid
from seglab.metrics import METRIC_NAMES
from seglab.records import EvalRecord, utc_now

log = logging.getLogger(__name__)

__all__ = [
    "HEADLINE_METRICS",
    "evaluation_key",
    "flat_metrics",
    "output_folder",
    "protocol_fields",
    "per_class_rows",
    "read_history",
    "run_evaluate",
    "run_id",
    "speed_fields",
    "variant_entry",
    "write_evaluation",
]

PER_CLASS_FIELDS = ("class_index", "class_name", "iou", "dice", "precision", "recall", "accuracy",
                    "support", "predicted")
# metrics.json: the headline means, for `dvc metrics show/diff`.
HEADLINE_METRICS = ("miou", "mdice", "mprecision", "mrecall", "accuracy", "miou_fg", "mdice_fg")


def _dump_json(value: Any) -> str:
    return json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n"


# The evaluation every run had before datasets, splits and protocols could be chosen: the model's
# own val split, letterboxed. Its runs keep the id they always had (`evaluation_key` None).
_ORIGINAL_SPLIT, _ORIGINAL_PROTOCOL = "val", "letterbox"


def evaluation_key(train_dataset: str | None, target: EvalTarget, protocol: str) -> str | None:
    """What a run_id adds for the evaluation: "dataset|split|protocol", or None for the original one
    (the model's own dataset, split val, letterbox), so warehouses built before keep their run ids."""
    if (target.dataset, target.split, protocol) == (train_dataset, _ORIGINAL_SPLIT, _ORIGINAL_PROTOCOL):
        return None
    return f"{target.dataset}|{target.split}|{protocol}"


def run_id(name: str, variant: str, params_hash: str | None, evaluation: str | None = None) -> str:
    """Stable id of one evaluated variant: sha256 of "name|variant|params_hash" (plus "|" and the
    `evaluation_key` where there is one), first 16 hex."""
    key = f"{name}|{variant}|{params_hash or ''}" + (f"|{evaluation}" if evaluation is not None else "")
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def output_folder(cfg: Any, name: str, target: EvalTarget) -> Path:
    """``<evaluate.out>/<name>`` for the target params.yaml names (evaluate.data, evaluate.split),
    else ``<evaluate.out>/<name>@<dataset>.<split>`` (characters other than letters, digits and
    ``_.+-`` in the dataset name become ``_``; a split name has no '.', so the name is unambiguous)."""
    default_data, default_split = Path(cfg.evaluate.data), cfg.evaluate.split
    out = Path(cfg.evaluate.out)
    if target.split == default_split and Path(target.data).resolve() == default_data.resolve():
        return out / name
    dataset = re.sub(r"[^A-Za-z0-9_.+-]", "_", target.dataset) or "_"
    return out / f"{name}@{dataset}.{target.split}"


def protocol_fields(protocol: str, sliding: SlidingWindow | None) -> dict[str, Any]:
    """The eval.json run fields that say how the images were scored."""
    return {
        "eval_protocol": protocol,
        "eval_window": list(sliding.window) if sliding is not None else None,
        "eval_scale": sliding.scale if sliding is not None else None,
        "eval_overlap": sliding.overlap if sliding is not None else None,
    }


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
    images_from: str = "val",
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
                title=f"{title}: first {len(evaluation.grid_images)} {images_from} images (grey: not scored)",
            )
    return out_dir


def run_evaluate(cfg: Any, name: str, *, data: str | Path | None = None, split: str | None = None,
                 grid_images: int = GRID_IMAGES) -> dict:
    """The `evaluate@<name>` stage, or `seglab evaluate NAME [--data SHARDS] [--split SPLIT]`: see the
    module doc. `data` / `split` default to evaluate.data / evaluate.split. Returns the metrics.json
    numbers, the target and the folder."""
    cfg.model(name)  # a clear error for a name params.yaml does not list
    trained = load_trained(cfg.train.out, name)
    target = eval_target(cfg.evaluate.data if data is None else data, cfg.evaluate.split if split is None else split)
    check_classes(trained.classes, target.classes, str(trained.directory / "train.json"), target.describe())
    history = read_history(Path(cfg.train.metrics) / name / "history.csv")
    out_dir = output_folder(cfg, name, target)

    protocol = cfg.evaluate.protocol
    sliding = sliding_window(cfg, trained.image_shape)
    predictors = plain_and_tta(trained.model, cfg.evaluate.tta)
    tta = predictors["tta"]
    log.info("evaluating %s on %s (%d images), %s protocol%s, TTA %s", name, target.describe(), target.images,
             protocol, f" {sliding.describe()}" if sliding else f" at {trained.image_shape}", tta.tta_transforms)
    evaluation = evaluate_predictors(
        predictors, eval_dataset(cfg, target, trained.image_shape, sliding), target.classes,
        latency_runs=cfg.evaluate.latency_runs, grid_images=grid_images, sliding=sliding,
    )

    evaluated_at = utc_now()
    params_hash = trained.info.get("params_hash")
    train_dataset = trained.info.get("dataset")
    evaluation_id = evaluation_key(train_dataset, target, protocol)
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
            "run_id": run_id(name, variant, params_hash, evaluation_id),
            "name": name,
            "variant": variant,
            # What was scored: `dataset` is the evaluated shards' (train.json's moves to train_dataset).
            "dataset": target.dataset,
            "train_dataset": train_dataset,
            "split": target.split,
            "eval_data": str(target.data),
            **protocol_fields(protocol, sliding),
            "tta": tta.tta_transforms if variant == "tta" else None,
            "eval_images": evaluation.images,
            **speed_fields(result),
            "evaluated_at": evaluated_at,
        }
        entries.append(variant_entry(run, scores, history if variant == "plain" else []))
        metrics |= flat_metrics(scores, result, prefix)

    title = name if out_dir.name == name else f"{name} on {target.dataset} {target.split}"
    write_evaluation(out_dir, entries, metrics, evaluation, target.classes, title=title, images_from=target.split)
    log.info("%s: mIoU %.4f (TTA %.4f), %.1f images/s (TTA %.1f) -> %s", name, metrics["miou"],
             metrics["tta_miou"], metrics["images_per_second"], metrics["tta_images_per_second"], out_dir)
    return {"model": name, "dataset": target.dataset, "split": target.split, "protocol": protocol,
            "out": str(out_dir), **json_safe(metrics)}
