"""Segmentation metrics from one streaming confusion matrix, in NumPy and as a Keras metric.

The confusion matrix ``cm`` has rows = truth and columns = prediction; ``cm[t, p]`` counts the
pixels of true class ``t`` predicted as ``p``. Pixels whose truth is ``ignore_index`` (255 by
convention) are not counted. From it, per class ``c``::

    TP = cm[c, c]   FP = column sum - TP   FN = row sum - TP
    iou       = TP / (TP + FP + FN)
    dice      = 2 TP / (2 TP + FP + FN)        (= F1)
    precision = TP / (TP + FP)
    recall    = TP / (TP + FN)

A ratio whose denominator is 0 is NaN ("undefined"), never 0 or 1. So a class absent from both
truth and prediction is NaN everywhere; a class predicted but absent from the truth has recall NaN
and iou = dice = precision = 0; a class in the truth but never predicted has precision NaN and
iou = dice = recall = 0.

Averaging: ``miou``, ``mdice``, ``mprecision``, ``mrecall`` are macro means (every class counts
the same, whatever its pixel count) over the *present* classes, those with at least one pixel in
the truth or the prediction, skipping NaN values; background (class 0) is included. ``miou_fg``
and ``mdice_fg`` are the same means without the background class: class 0, unless class names are
given and the first is not "background" (a label-map dataset such as CamVid, whose class 0 is sky,
has no background class, so there they equal ``miou`` / ``mdice``). ``accuracy`` is the pixel accuracy
trace(cm) / sum(cm), a micro average. Any of them is NaN when nothing was counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from seglab.data.classes import BACKGROUND

__all__ = [
    "METRIC_NAMES",
    "ConfusionMatrix",
    "StreamingSegmentationMetric",
    "confusion_matrix",
    "scores_from_confusion",
    "segmentation_scores",
]

# Names of the scalar scores, shared by scores_from_confusion and StreamingSegmentationMetric.
METRIC_NAMES = ("miou", "mdice", "mprecision", "mrecall", "miou_fg", "mdice_fg", "accuracy")

# How many offending label values an error message lists.
_MAX_LISTED_VALUES = 20


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an int; got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    return int(num_classes)


def _check_ignore_index(ignore_index: int | None) -> int | None:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise ValueError(f"ignore_index must be an int or None; got {ignore_index!r}")
    return int(ignore_index)


def _as_labels(array: np.ndarray, what: str) -> np.ndarray:
    """Integer labels as int64; floats are accepted only when they hold whole numbers."""
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64, copy=False)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"{what} must hold integer class labels; got non-integral floats")
        return array.astype(np.int64)
    raise ValueError(f"{what} must be an integer label array; got dtype {array.dtype}")


def _standardize(y_true: Any, y_pred: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (truth labels, predicted labels) as int64 arrays of the same shape.

    ``y_pred`` is either a label map shaped like ``y_true`` or scores (probabilities or logits)
    with one more, last axis of size ``num_classes``, reduced by argmax. A trailing axis of 1 on
    ``y_true`` (and on a label ``y_pred``) is dropped.
    """
    truth = np.asarray(y_true)
    prediction = np.asarray(y_pred)
    if truth.ndim == prediction.ndim and truth.ndim > 0 and truth.shape[-1] == 1:
        truth = truth[..., 0]
        if prediction.shape[-1] == 1:
            prediction = prediction[..., 0]
    if prediction.ndim == truth.ndim + 1:
        if prediction.shape[-1] != num_classes:
            raise ValueError(
                f"y_pred scores must have a last axis of num_classes={num_classes}; "
                f"got y_pred {prediction.shape} for y_true {truth.shape}"
            )
        if np.issubdtype(prediction.dtype, np.floating) and not np.all(np.isfinite(prediction)):
            raise ValueError("y_pred scores hold NaN or infinite values; argmax would be arbitrary")
        prediction = np.argmax(prediction, axis=-1)
    if prediction.shape != truth.shape:
        raise ValueError(
            f"y_pred must be labels shaped like y_true {truth.shape} or scores shaped "
            f"{(*truth.shape, num_classes)}; got {prediction.shape}"
        )
    return _as_labels(truth, "y_true"), _as_labels(prediction, "y_pred")


def _out_of_range_error(what: str, values: np.ndarray, num_classes: int, extra: str) -> ValueError:
    offending = np.unique(values)
    listed = offending[:_MAX_LISTED_VALUES].tolist()
    more = f" and {offending.size - len(listed)} more" if offending.size > len(listed) else ""
    return ValueError(
        f"{what} holds label(s) {listed}{more} outside [0, {num_classes}){extra} "
        f"({values.size} pixels)"
    )


def confusion_matrix(
    y_true: Any, y_pred: Any, num_classes: int, ignore_index: int | None = 255
) -> np.ndarray:
    """Confusion matrix (C, C) int64: rows = truth, columns = prediction, ignore not counted.

    ``y_pred`` may be labels shaped like ``y_true`` or scores with a last axis of C (argmax).
    Truth labels outside [0, C) that are not ``ignore_index``, and predicted labels outside
    [0, C) on counted pixels, raise ValueError naming the values.
    """
    num_classes = _check_num_classes(num_classes)
    ignore_index = _check_ignore_index(ignore_index)
    truth, prediction = _standardize(y_true, y_pred, num_classes)
    truth, prediction = truth.ravel(), prediction.ravel()
    if ignore_index is not None:
        counted = truth != ignore_index
        truth, prediction = truth[counted], prediction[counted]

    bad_truth = (truth < 0) | (truth >= num_classes)
    if bad_truth.any():
        extra = f" that are not ignore_index={ignore_index}" if ignore_index is not None else ""
        raise _out_of_range_error("y_true", truth[bad_truth], num_classes, extra)
    bad_prediction = (prediction < 0) | (prediction >= num_classes)
    if bad_prediction.any():
        raise _out_of_range_error(
            "y_pred", prediction[bad_prediction], num_classes, " on non-ignored pixels"
        )

    flat_index = truth * num_classes + prediction
    counts = np.bincount(flat_index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0."""
    numerator = numerator.astype(np.float64)
    denominator = denominator.astype(np.float64)
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _masked_nanmean(values: np.ndarray, mask: np.ndarray) -> float:
    """Mean of values[mask] ignoring NaN; NaN (without a warning) when nothing is left."""
    selected = values[mask & ~np.isnan(values)]
    return float(selected.mean()) if selected.size else float("nan")


def scores_from_confusion(cm: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """All scores from a (C, C) confusion matrix (rows = truth); see the module doc.

    Returns a dict with per-class float64 arrays ``iou``, ``dice``, ``precision``, ``recall``,
    int64 arrays ``support`` (truth pixels) and ``predicted`` (predicted pixels), bool array
    ``present``; floats ``accuracy``, ``miou``, ``mdice``, ``mprecision``, ``mrecall``,
    ``miou_fg``, ``mdice_fg``; int ``pixels``; ``class_names`` (list of str, default the
    indices) and ``confusion_matrix`` (the int64 matrix itself).
    """
    matrix = np.asarray(cm)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"confusion matrix must be square (C, C) with C >= 1; got {matrix.shape}")
    if not (np.issubdtype(matrix.dtype, np.integer) or np.all(matrix == np.round(matrix))):
        raise ValueError("confusion matrix must hold whole pixel counts")
    if np.any(matrix < 0):
        raise ValueError("confusion matrix holds negative counts")
    matrix = matrix.astype(np.int64)
    num_classes = matrix.shape[0]
    if class_names is None:
        names = [str(index) for index in range(num_classes)]
    else:
        names = [str(name) for name in class_names]
        if len(names) != num_classes:
            raise ValueError(
                f"class_names has {len(names)} names for a {num_classes}-class confusion matrix"
            )

    true_positive = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    false_positive = predicted - true_positive
    false_negative = support - true_positive
    present = (support + predicted) > 0
    foreground = present.copy()
    foreground[0] = class_names is not None and names[0] != BACKGROUND

    iou = _safe_ratio(true_positive, true_positive + false_positive + false_negative)
    dice = _safe_ratio(2 * true_positive, 2 * true_positive + false_positive + false_negative)
    precision = _safe_ratio(true_positive, true_positive + false_positive)
    recall = _safe_ratio(true_positive, true_positive + false_negative)
    pixels = int(matrix.sum())

    return {
        "class_names": names,
        "confusion_matrix": matrix,
        "pixels": pixels,
        "support": support,
        "predicted": predicted,
        "present": present,
        "iou": iou,
        "dice": dice,
        "precision": precision,
        "recall": recall,
        "accuracy": float(true_positive.sum() / pixels) if pixels else float("nan"),
        "miou": _masked_nanmean(iou, present),
        "mdice": _masked_nanmean(dice, present),
        "mprecision": _masked_nanmean(precision, present),
        "mrecall": _masked_nanmean(recall, present),
        "miou_fg": _masked_nanmean(iou, foreground),
        "mdice_fg": _masked_nanmean(dice, foreground),
    }


def segmentation_scores(
    y_true: Any,
    y_pred: Any,
    num_classes: int,
    ignore_index: int | None = 255,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Scores of one set of predictions: ``scores_from_confusion(confusion_matrix(...))``."""
    return scores_from_confusion(
        confusion_matrix(y_true, y_pred, num_classes, ignore_index), class_names
    )


class ConfusionMatrix:
    """Streaming confusion-matrix accumulator for evaluation over many batches or workers.

    >>> cm = ConfusionMatrix(num_classes=21)
    >>> for labels, logits in batches:      # doctest: +SKIP
    ...     cm.update(labels, logits)
    >>> cm.result()["miou"]                 # doctest: +SKIP
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_index = _check_ignore_index(ignore_index)
        self.class_names = None if class_names is None else [str(name) for name in class_names]
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names for num_classes={self.num_classes}"
            )
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, y_true: Any, y_pred: Any) -> ConfusionMatrix:
        """Add a batch (labels, and labels or scores); returns self."""
        self.matrix += confusion_matrix(y_true, y_pred, self.num_classes, self.ignore_index)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another accumulator's counts (e.g. from another worker); returns self."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge a ConfusionMatrix; got {type(other).__name__}")
        mismatches = [
            f"{field}: {getattr(self, field)!r} != {getattr(other, field)!r}"
            for field in ("num_classes", "ignore_index", "class_names")
            if getattr(self, field) != getattr(other, field)
            and not (field == "class_names" and None in (self.class_names, other.class_names))
        ]
        if mismatches:
            raise ValueError(
                f"cannot merge confusion matrices that differ in {'; '.join(mismatches)}"
            )
        self.matrix += other.matrix
        return self

    def result(self) -> dict[str, Any]:
        """All scores of what was accumulated (see ``scores_from_confusion``)."""
        return scores_from_confusion(self.matrix.copy(), self.class_names)

    def reset(self) -> None:
        self.matrix[...] = 0


def _nan_like(values: Any) -> Any:
    return ops.full_like(values, np.nan)


def _keras_safe_ratio(numerator: Any, denominator: Any) -> Any:
    nonzero = ops.not_equal(denominator, 0.0)
    # Dividing by 1 where the denominator is 0 keeps the unused branch finite.
    quotient = numerator / ops.where(nonzero, denominator, ops.ones_like(denominator))
    return ops.where(nonzero, quotient, _nan_like(quotient))


def _keras_masked_nanmean(values: Any, mask: Any) -> Any:
    keep = ops.logical_and(mask, ops.logical_not(ops.isnan(values)))
    count = ops.sum(ops.cast(keep, values.dtype))
    total = ops.sum(ops.where(keep, values, ops.zeros_like(values)))
    return ops.where(count > 0, total / ops.maximum(count, 1.0), np.nan)


@keras.saving.register_keras_serializable(package="seglab")
class StreamingSegmentationMetric(keras.metrics.Metric):
    """One score of the streaming confusion matrix as a Keras metric (for ``model.compile``).

    ``metric`` is one of ``METRIC_NAMES``; its definition and averaging are those of
    ``scores_from_confusion`` (module doc), and the state is the exact int64 (C, C) confusion
    matrix, so the number equals the NumPy path's (computed in float64, returned as ``dtype``).
    ``y_pred`` are logits/probabilities (B, H, W, C) (argmax) or labels shaped like ``y_true``.
    ``sample_weight``, if given, acts as a mask: pixels with weight 0 are not counted.

    Inside a compiled graph a bad label cannot raise: non-ignored pixels whose truth or
    prediction lies outside [0, C) are counted in ``invalid_pixels`` instead, ``result()`` is NaN
    while there are any, and ``scores()`` raises.
    """

    def __init__(
        self,
        num_classes: int,
        metric: str = "miou",
        ignore_index: int | None = 255,
        name: str | None = None,
        dtype: Any = None,
    ) -> None:
        if metric not in METRIC_NAMES:
            raise ValueError(
                f"unknown segmentation metric {metric!r}; expected one of {METRIC_NAMES}"
            )
        super().__init__(name=name or metric, dtype=dtype)
        self.num_classes = _check_num_classes(num_classes)
        self.metric = metric
        self.ignore_index = _check_ignore_index(ignore_index)
        # int64 counts stay exact far beyond float32's 2**24 pixels per cell.
        self.confusion = self.add_variable(
            shape=(self.num_classes, self.num_classes),
            initializer="zeros",
            dtype="int64",
            name="confusion_matrix",
        )
        self.invalid_pixels = self.add_variable(
            shape=(), initializer="zeros", dtype="int64", name="invalid_pixels"
        )

    def _labels(self, y_true: Any, y_pred: Any) -> tuple[Any, Any]:
        truth = ops.convert_to_tensor(y_true)
        prediction = ops.convert_to_tensor(y_pred)
        if len(truth.shape) == len(prediction.shape) and truth.shape[-1] == 1:
            truth = ops.squeeze(truth, axis=-1)
            if prediction.shape[-1] == 1:
                prediction = ops.squeeze(prediction, axis=-1)
        if len(prediction.shape) == len(truth.shape) + 1:
            if prediction.shape[-1] != self.num_classes:
                raise ValueError(
                    f"y_pred scores must have a last axis of num_classes={self.num_classes}; "
                    f"got y_pred {tuple(prediction.shape)} for y_true {tuple(truth.shape)}"
                )
            prediction = ops.argmax(prediction, axis=-1)
        elif len(prediction.shape) != len(truth.shape):
            raise ValueError(
                f"y_pred must be labels shaped like y_true {tuple(truth.shape)} or scores with "
                f"a last axis of {self.num_classes}; got {tuple(prediction.shape)}"
            )
        return ops.cast(truth, "int32"), ops.cast(prediction, "int32")

    @staticmethod
    def _weight_mask(sample_weight: Any, truth: Any) -> Any:
        """Pixels with a non-zero weight; weights per image (B,) or per pixel."""
        weight = ops.convert_to_tensor(sample_weight)
        truth_rank, weight_rank = len(truth.shape), len(weight.shape)
        if weight_rank == truth_rank + 1 and weight.shape[-1] == 1:
            weight = ops.squeeze(weight, axis=-1)
        elif weight_rank == 1 and truth_rank > 1:
            weight = ops.reshape(weight, (-1,) + (1,) * (truth_rank - 1))
        elif weight_rank not in (0, truth_rank):
            raise ValueError(
                f"sample_weight must be a scalar, one weight per image (B,) or per pixel "
                f"{tuple(truth.shape)}; got shape {tuple(weight.shape)}"
            )
        return ops.broadcast_to(ops.not_equal(weight, 0), ops.shape(truth))

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        truth, prediction = self._labels(y_true, y_pred)
        num_classes = self.num_classes
        if self.ignore_index is None:
            counted = ops.ones_like(truth, dtype="bool")
        else:
            counted = ops.not_equal(truth, self.ignore_index)
        if sample_weight is not None:
            counted = ops.logical_and(counted, self._weight_mask(sample_weight, truth))
        truth, prediction, counted = (ops.reshape(x, (-1,)) for x in (truth, prediction, counted))
        in_range = ops.logical_and(
            ops.logical_and(ops.greater_equal(truth, 0), ops.less(truth, num_classes)),
            ops.logical_and(ops.greater_equal(prediction, 0), ops.less(prediction, num_classes)),
        )
        valid = ops.logical_and(counted, in_range)
        invalid = ops.logical_and(counted, ops.logical_not(in_range))
        # Pixels that are not counted go to one extra bin, dropped after the sum. A segment sum
        # rather than ops.bincount: TensorFlow's bincount has no XLA kernel, and Keras compiles
        # the train step with XLA by default on GPUs.
        flat_index = ops.where(valid, truth * num_classes + prediction, num_classes * num_classes)
        counts = ops.segment_sum(
            ops.ones_like(flat_index), flat_index, num_segments=num_classes * num_classes + 1
        )
        counts = ops.reshape(counts[: num_classes * num_classes], (num_classes, num_classes))
        self.confusion.assign_add(ops.cast(counts, "int64"))
        self.invalid_pixels.assign_add(ops.sum(ops.cast(invalid, "int64")))

    def result(self) -> Any:
        matrix = ops.cast(self.confusion, "float64")
        true_positive = ops.diagonal(matrix)
        support = ops.sum(matrix, axis=1)
        predicted = ops.sum(matrix, axis=0)
        false_positive = predicted - true_positive
        false_negative = support - true_positive
        present = ops.greater(support + predicted, 0.0)

        if self.metric == "accuracy":
            pixels = ops.sum(matrix)
            value = _keras_safe_ratio(ops.sum(true_positive), pixels)
        else:
            if self.metric in ("miou", "miou_fg"):
                per_class = _keras_safe_ratio(
                    true_positive, true_positive + false_positive + false_negative
                )
            elif self.metric in ("mdice", "mdice_fg"):
                per_class = _keras_safe_ratio(
                    2.0 * true_positive, 2.0 * true_positive + false_positive + false_negative
                )
            elif self.metric == "mprecision":
                per_class = _keras_safe_ratio(true_positive, true_positive + false_positive)
            else:  # mrecall
                per_class = _keras_safe_ratio(true_positive, true_positive + false_negative)
            if self.metric.endswith("_fg"):
                not_background = ops.greater(ops.arange(self.num_classes), 0)
                present = ops.logical_and(present, not_background)
            value = _keras_masked_nanmean(per_class, present)
        value = ops.where(ops.greater(self.invalid_pixels, 0), np.nan, value)
        return ops.cast(value, self.dtype)

    def confusion_matrix(self) -> np.ndarray:
        """The accumulated (C, C) int64 matrix as NumPy (eager only)."""
        return np.asarray(ops.convert_to_numpy(self.confusion), dtype=np.int64)

    def scores(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """All scores of the accumulated matrix (``scores_from_confusion``); raises on bad input."""
        invalid = int(ops.convert_to_numpy(self.invalid_pixels))
        if invalid:
            raise ValueError(
                f"{invalid} non-ignored pixels had a truth or predicted label outside "
                f"[0, {self.num_classes}); the confusion matrix is incomplete"
            )
        return scores_from_confusion(self.confusion_matrix(), class_names)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "metric": self.metric,
            "ignore_index": self.ignore_index,
        }
