"""The one place tests build run records: train.json and eval.json, checked by `seglab.records`.

Every record a test writes goes through `TrainRecord` / `EvalRecord`, so a fixture cannot drift from
what the stages write and ingest reads. Also: a shard split holding given label maps.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from seglab.data.classes import ClassSet
from seglab.data.coco import LabelRules, encode_png
from seglab.data.shards import shard_metadata, write_shards
from seglab.records import EvalEntry, EvalRecord, TrainRecord

SCORES = ("iou", "dice", "precision", "recall", "accuracy")


def _undefined_as_none(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def train_record(name: str = "model", *, classes: Sequence[str] = ("background", "object"),
                 **fields: Any) -> dict[str, Any]:
    """A complete train.json as the train stage writes it; `fields` override the defaults."""
    info = {
        "model": name, "arch": "unet", "backbone": None, "weights": None, "weights_loaded": "random",
        "width": 0.25, "image_size": 128, "batch_size": 8, "epochs_planned": 4, "epochs_run": 4,
        "best_epoch": 3, "best_val_miou": 0.5, "seconds_per_epoch": 12.5, "train_seconds": 50.0,
        "train_images_per_second": 9.6, "param_count": 1000, "trainable_param_count": 900,
        "classes": list(classes), "class_set": "voc20", "dataset": "sample", "train_images": 120,
        "val_images": 40, "augmenter": None, "train_data": "data/shards", "synthetic_accepted": None,
        "synthetic_images_used": None, "synthetic_decision": None, "seed": 0,
        "params_hash": hashlib.sha256(name.encode()).hexdigest(), "mixed_precision": "float32",
        "strategy": "OneDeviceStrategy", "replicas": 1, "git_rev": None,
        "created_at": "2025-01-02T03:04:05+00:00", "resumed_from_epoch": 0, "stopped_early": False,
        "output_stride": None, "optimizer": "adam", "loss": "focal_dice", "freeze_encoder_epochs": 0,
        "encoder_lr_multiplier": 1.0, "encoder_batchnorm": "train", "class_weights": None,
    }
    unknown = set(fields) - set(info)
    if unknown:
        raise TypeError(f"train_record: not train.json fields: {sorted(unknown)}")
    return TrainRecord.of(info | fields).to_json()


def write_train_record(path: Path, info: dict[str, Any]) -> Path:
    return TrainRecord.of(info).write(path)


def run_id(name: str, variant: str, params_hash: str | None) -> str:
    """As `seglab.evaluate.evaluate.run_id` (not imported: that pulls in TensorFlow)."""
    return hashlib.sha256(f"{name}|{variant}|{params_hash or ''}".encode()).hexdigest()[:16]


def eval_run(name: str, variant: str = "plain", **fields: Any) -> dict[str, Any]:
    """An eval.json `run`: a train.json's fields plus the evaluation's; `fields` override any."""
    train_fields = {k: v for k, v in fields.items() if k in TrainRecord.model_fields}
    run = train_record(name, **train_fields)
    run |= {"run_id": run_id(name, variant, run["params_hash"]), "name": name, "variant": variant,
            "split": "val", "tta": ["identity", "hflip", "vflip", "rot90", "rot270"] if variant == "tta" else None,
            "eval_images": 40, "images_per_second": 30.0, "latency_ms_p50": 20.0, "latency_ms_p90": 25.5,
            "evaluated_at": "2025-01-02T04:00:00+00:00"}
    return run | {k: v for k, v in fields.items() if k not in train_fields}


def scores_of(matrix: np.ndarray) -> dict[str, Any]:
    """Per-class and mean scores of a confusion matrix (rows truth), NaN where undefined; means over
    the classes present in truth or prediction, as `seglab.metrics` computes them."""
    matrix = np.asarray(matrix, np.int64)
    tp = np.diag(matrix).astype(float)
    support, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    fp, fn, total = predicted - tp, support - tp, matrix.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = {"iou": tp / (tp + fp + fn), "dice": 2 * tp / (2 * tp + fp + fn),
                     "precision": tp / predicted, "recall": tp / support,
                     "accuracy": (total - fp - fn) / total}
    present = (support + predicted) > 0
    means = {f"m{k}": float(np.nanmean(per_class[k][present])) for k in ("iou", "dice", "precision", "recall")}
    means["miou_fg"] = float(np.nanmean(per_class["iou"][1:][present[1:]]))
    means["accuracy"] = float(tp.sum() / total)
    means["pixels"] = int(total)
    return {"per_class": per_class, "support": support, "predicted": predicted, "means": means}


def eval_entry(run: dict[str, Any], confusion: Any = None, *, ious: Sequence[float | None] | None = None,
               metrics: dict[str, Any] | None = None, history: Sequence[dict[str, Any]] = (),
               accuracy_of_absent: Any = "computed") -> dict[str, Any]:
    """One eval.json entry for `run`, checked by `EvalEntry`.

    Either `confusion` (C x C pixel counts, rows the truth: every score derives from it) or `ious`
    (scores given directly: each class's IoU is also its Dice, precision and recall, with 100
    pixels of support and predictions, or none for an undefined IoU). `metrics` overrides the
    means; `accuracy_of_absent` replaces the one-vs-rest accuracy of a class with no pixels (1.0 as
    computed, since every pixel is a true negative; None to call it undefined).
    """
    classes = run["classes"]
    if ious is not None:
        pixels = [0 if iou is None else 100 for iou in ious]
        confusion = np.diag(pixels)
        per_class = [{"class_index": i, "class_name": c, **{k: iou for k in SCORES[:4]},
                      "accuracy": None if iou is None else 0.9, "support": pixels[i], "predicted": pixels[i]}
                     for i, (c, iou) in enumerate(zip(classes, ious, strict=True))]
        means = {}
    else:
        s = scores_of(confusion)
        per_class = [{"class_index": i, "class_name": c,
                      **{k: _undefined_as_none(s["per_class"][k][i]) for k in SCORES},
                      "support": int(s["support"][i]), "predicted": int(s["predicted"][i])}
                     for i, c in enumerate(classes)]
        for row in per_class:
            if accuracy_of_absent != "computed" and row["support"] + row["predicted"] == 0:
                row["accuracy"] = accuracy_of_absent
        means = {k: _undefined_as_none(v) for k, v in s["means"].items()}
    entry = {"run": run, "metrics": means | (metrics or {}), "per_class": per_class,
             "confusion": np.asarray(confusion).tolist(), "history": list(history)}
    return EvalEntry.of(entry).to_json()


def write_eval(path: Path, entries: Sequence[dict[str, Any]]) -> Path:
    """``path`` (an eval.json) holding `entries`, written by `EvalRecord` as the evaluate stage does."""
    return EvalRecord.of({"runs": list(entries)}, source=path).write(path)


def write_label_split(shard_dir: Path, split: str, labels: list[np.ndarray], classes: Sequence[str], *,
                      source: str = "tiny", seed: int = 0) -> list[np.ndarray]:
    """One shard split of noise JPEGs with the given label maps; returns the labels."""
    rng = np.random.default_rng(seed)
    rows = []
    for index, label in enumerate(labels):
        image = rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        counts = np.bincount(label.ravel(), minlength=256)
        rows.append({
            "image_id": 1000 * seed + index, "file_name": f"{split}_{index:03d}.jpg", "split": split,
            "source": source, "height": label.shape[0], "width": label.shape[1],
            "orig_height": label.shape[0], "orig_width": label.shape[1],
            "image": buffer.getvalue(), "label": encode_png(label),
            "class_pixels": [int(c) for c in counts[: len(classes)]], "ignore_pixels": int(counts[255]),
        })
    class_set = ClassSet("custom", tuple(classes), tuple(range(len(classes))))
    write_shards(rows, shard_dir / split, shard_metadata(class_set, split, LabelRules()), max_shard_mb=16)
    return labels
