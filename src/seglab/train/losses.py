"""Segmentation losses on logits: sparse cross-entropy, focal, soft Dice and focal + Dice.

All losses take integer label maps ``y_true`` of shape ``(B, H, W)`` (or ``(B, H, W, 1)``) and
logits ``y_pred`` of shape ``(B, H, W, C)``. Logits are cast to float32 before anything else, so a
float16 output under mixed precision still gives a float32 loss computed from a stable
log-softmax. Pixels labelled ``ignore_index`` (255 by convention) count nowhere.

Reduction, precisely (cross-entropy and focal)::

    loss = sum_i w_i * l_i / sum_i w_i
    w_i  = class_weights[y_i] * sample_weight_i   if y_i != ignore_index else 0

where ``i`` runs over every pixel of the batch (one weighted mean over the batch, not a mean of
per-image means) and ``l_i`` is the per-pixel loss. Without class or sample weights this is the
plain mean over non-ignored pixels. A batch whose total weight is 0 (e.g. entirely ignore) gives a
loss of exactly 0 with zero gradients.

Soft Dice is a batch-level quantity: per class ``c`` over all non-ignored pixels of the batch,
``dice_c = (2 * sum p_ic g_ic + smooth) / (sum p_ic + sum g_ic + smooth)`` with softmax
probabilities ``p`` and one-hot truth ``g`` (each pixel weighted by ``sample_weight``), and the loss
is the mean of ``1 - dice_c`` over the classes present in the batch, i.e. present in the truth or
in the argmax prediction of some non-ignored pixel. Classes absent from both are left out: with
``smooth > 0`` they would score a free ``dice = 1`` and dilute the loss of the classes that are
there. ``class_weights`` weight that mean over classes.

Under a `tf.distribute` strategy with N replicas, "the batch" is each replica's share of it: every
replica computes its own loss (Dice over its own pixels, as BatchNorm takes its statistics) divided
by N, as Keras does for its own losses, so that summing the replicas' gradients averages them.

Labels outside ``[0, C)`` that are not ``ignore_index`` are a data error: in eager execution the
loss raises ``ValueError`` naming them; inside a compiled graph, where it cannot raise, the loss
becomes NaN so the run fails loudly (e.g. ``keras.callbacks.TerminateOnNaN``) instead of training
on garbage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

__all__ = [
    "LOSSES",
    "FocalDiceLoss",
    "FocalLoss",
    "SoftDiceLoss",
    "SparseCrossEntropy",
    "get_loss",
]

# Smallest normal float32: keeps (1 - p_t) ** gamma differentiable when p_t rounds to exactly 1
# and gamma < 1 (the derivative of x ** gamma is infinite at x = 0, and inf * 0 is NaN).
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def _scale_for_replicas(value: Any) -> Any:
    """`value` / the number of replicas of the current `tf.distribute` strategy (1: unchanged).

    Keras sums the replicas' gradients, so each replica's loss must be divided by their number;
    `keras.losses.Loss.__call__` does that in its reduction, and a loss that overrides `__call__`
    without reaching it must do it itself, else its gradients count N times.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            value = value * (1.0 / replicas)
    return value


def _executing_eagerly() -> bool:
    """Whether tensors are concrete here, so a data error can be raised instead of traced."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    # torch and numpy always run eagerly; under jax we cannot tell cheaply, so rely on NaN.
    return backend in ("torch", "numpy")


def _validate_class_weights(class_weights: Sequence[float] | None) -> list[float] | None:
    if class_weights is None:
        return None
    weights = np.asarray(class_weights, dtype=np.float64)
    if weights.ndim != 1 or weights.size == 0:
        raise ValueError(
            f"class_weights must be a non-empty 1-D sequence (one weight per class); "
            f"got shape {weights.shape}"
        )
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(
            f"class_weights must be finite, non-negative and not all zero; got {weights.tolist()}"
        )
    return [float(w) for w in weights]


def _validate_ignore_index(ignore_index: int | None) -> int | None:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise ValueError(f"ignore_index must be an int or None; got {ignore_index!r}")
    return int(ignore_index)


def _non_negative_float(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value}")
    return value


def _standardize(y_true: Any, y_pred: Any) -> tuple[Any, Any, int]:
    """Return (int32 labels (B, H, W), float32 logits (B, H, W, C), C)."""
    logits = ops.cast(ops.convert_to_tensor(y_pred), "float32")
    labels = ops.convert_to_tensor(y_true)
    pred_rank, true_rank = len(logits.shape), len(labels.shape)
    if true_rank == pred_rank and labels.shape[-1] == 1:
        labels = ops.squeeze(labels, axis=-1)
    elif true_rank != pred_rank - 1:
        raise ValueError(
            f"y_true must be a label map shaped like y_pred without its class axis "
            f"(optionally with a trailing axis of 1); got y_true {tuple(labels.shape)} "
            f"for y_pred {tuple(logits.shape)}"
        )
    num_classes = logits.shape[-1]
    if num_classes is None:
        raise ValueError("y_pred needs a static class axis (last dimension) to compute the loss")
    return ops.cast(labels, "int32"), logits, int(num_classes)


def _label_masks(labels: Any, num_classes: int, ignore_index: int | None) -> tuple[Any, Any, Any]:
    """Return (counted, out_of_range, safe_labels); safe labels index a class everywhere.

    ``counted`` marks pixels that are not ignore_index, ``out_of_range`` the non-ignored pixels
    whose label is no class. Ignored and out-of-range pixels get label 0 in ``safe_labels`` so
    every gather stays in bounds (their contribution is masked afterwards).
    """
    if ignore_index is None:
        counted = ops.ones_like(labels, dtype="bool")
    else:
        counted = ops.not_equal(labels, ignore_index)
    out_of_range = ops.logical_and(
        counted, ops.logical_or(ops.less(labels, 0), ops.greater_equal(labels, num_classes))
    )
    if _executing_eagerly():
        bad = ops.convert_to_numpy(out_of_range)
        if bad.any():
            values = np.unique(ops.convert_to_numpy(labels)[bad])
            raise ValueError(
                f"y_true holds label(s) {values[:20].tolist()} outside [0, {num_classes}) that "
                f"are not ignore_index={ignore_index} ({int(bad.sum())} pixels)"
            )
    in_class_range = ops.logical_and(counted, ops.logical_not(out_of_range))
    safe_labels = ops.where(in_class_range, labels, ops.zeros_like(labels))
    return counted, out_of_range, safe_labels


def _broadcast_sample_weight(sample_weight: Any, labels: Any) -> Any:
    """Sample weight as float32 broadcastable to the (B, H, W) labels: per image or per pixel."""
    weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
    label_rank, weight_rank = len(labels.shape), len(weight.shape)
    if weight_rank == label_rank + 1 and weight.shape[-1] == 1:
        weight = ops.squeeze(weight, axis=-1)
    elif weight_rank == 1 and label_rank > 1:
        # One weight per image of the batch.
        weight = ops.reshape(weight, (-1,) + (1,) * (label_rank - 1))
    elif weight_rank not in (0, label_rank):
        raise ValueError(
            f"sample_weight must be a scalar, one weight per image (B,) or per pixel "
            f"{tuple(labels.shape)}; got shape {tuple(weight.shape)}"
        )
    return weight


def _class_weight_tensor(class_weights: list[float] | None, num_classes: int) -> Any:
    if class_weights is None:
        return None
    if len(class_weights) != num_classes:
        raise ValueError(
            f"class_weights has {len(class_weights)} entries but y_pred has {num_classes} classes"
        )
    return ops.convert_to_tensor(class_weights, dtype="float32")


class _PixelwiseSegmentationLoss(keras.losses.Loss):
    """Shared ignore/class-weight handling for losses defined per pixel (CE, focal).

    ``call`` returns the per-pixel loss map (0 on ignored pixels, NaN on out-of-range labels);
    ``__call__`` turns ignore mask, class weights and ``sample_weight`` into one pixel weight and
    lets Keras reduce with ``"mean_with_sample_weight"``: sum(w * l) / sum(w), 0 when sum(w) = 0.
    """

    def __init__(
        self,
        ignore_index: int | None = 255,
        class_weights: Sequence[float] | None = None,
        name: str | None = None,
    ) -> None:
        # float32 regardless of the global policy: the loss must not be computed in float16.
        super().__init__(name=name, reduction="mean_with_sample_weight", dtype="float32")
        self.ignore_index = _validate_ignore_index(ignore_index)
        self.class_weights = _validate_class_weights(class_weights)

    def pixel_weights(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        """The weight w_i of every pixel in the reduction (0 where ignored)."""
        labels, _, num_classes = _standardize(y_true, y_pred)
        counted, _, safe_labels = _label_masks(labels, num_classes, self.ignore_index)
        weights = ops.cast(counted, "float32")
        class_weights = _class_weight_tensor(self.class_weights, num_classes)
        if class_weights is not None:
            weights = weights * ops.take(class_weights, safe_labels)
        if sample_weight is not None:
            weights = weights * _broadcast_sample_weight(sample_weight, labels)
        return weights

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        weights = self.pixel_weights(y_true, y_pred, sample_weight)
        return super().__call__(y_true, y_pred, sample_weight=weights)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        labels, logits, num_classes = _standardize(y_true, y_pred)
        counted, out_of_range, safe_labels = _label_masks(labels, num_classes, self.ignore_index)
        log_probs = ops.log_softmax(logits, axis=-1)
        log_p_true = ops.squeeze(
            ops.take_along_axis(log_probs, ops.expand_dims(safe_labels, -1), axis=-1), axis=-1
        )
        per_pixel = self._pixel_loss(log_p_true, safe_labels, num_classes)
        per_pixel = ops.where(counted, per_pixel, ops.zeros_like(per_pixel))
        return ops.where(out_of_range, ops.full_like(per_pixel, np.nan), per_pixel)

    def _pixel_loss(self, log_p_true: Any, labels: Any, num_classes: int) -> Any:
        """Per-pixel loss from log p(true class) and the (in-range) labels."""
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ignore_index": self.ignore_index,
            "class_weights": self.class_weights,
        }


@keras.saving.register_keras_serializable(package="seglab")
class SparseCrossEntropy(_PixelwiseSegmentationLoss):
    """Per-pixel cross-entropy ``-log softmax(z)_y`` on logits, ignore- and class-weight-aware."""

    def __init__(
        self,
        ignore_index: int | None = 255,
        class_weights: Sequence[float] | None = None,
        name: str = "sparse_cross_entropy",
    ) -> None:
        super().__init__(ignore_index=ignore_index, class_weights=class_weights, name=name)

    def _pixel_loss(self, log_p_true: Any, labels: Any, num_classes: int) -> Any:
        return -log_p_true


@keras.saving.register_keras_serializable(package="seglab")
class FocalLoss(_PixelwiseSegmentationLoss):
    """Per-pixel focal loss ``FL = -alpha_t (1 - p_t) ** gamma * log p_t`` (Lin et al., 2017).

    ``log p_t`` comes from log-softmax and ``1 - p_t`` from ``-expm1(log p_t)``, both accurate when
    ``p_t`` is near 1. ``gamma = 0`` and ``alpha = None`` give exactly the cross-entropy.

    ``alpha``: ``None`` (alpha_t = 1); a float in [0, 1], used as in RetinaNet with class 0 as the
    background: alpha for foreground pixels, 1 - alpha for background pixels; or one value per
    class. Unlike ``class_weights``, alpha scales the per-pixel terms without entering the
    normaliser sum(w).
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        ignore_index: int | None = 255,
        class_weights: Sequence[float] | None = None,
        name: str = "focal_loss",
    ) -> None:
        super().__init__(ignore_index=ignore_index, class_weights=class_weights, name=name)
        self.gamma = _non_negative_float("gamma", gamma)
        self.alpha = self._validate_alpha(alpha)

    @staticmethod
    def _validate_alpha(alpha: float | Sequence[float] | None) -> float | list[float] | None:
        if alpha is None:
            return None
        if np.ndim(alpha) == 0:
            value = float(alpha)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"a scalar focal alpha must lie in [0, 1]; got {value}")
            return value
        values = np.asarray(alpha, dtype=np.float64)
        if values.ndim != 1 or not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError(
                f"focal alpha per class must be a 1-D sequence of finite values >= 0; got {alpha!r}"
            )
        return [float(v) for v in values]

    def _alpha_t(self, labels: Any, num_classes: int) -> Any:
        if isinstance(self.alpha, float):
            is_background = ops.equal(labels, 0)
            return ops.where(is_background, 1.0 - self.alpha, self.alpha)
        if len(self.alpha) != num_classes:
            raise ValueError(
                f"focal alpha has {len(self.alpha)} entries but y_pred has {num_classes} classes"
            )
        return ops.take(ops.convert_to_tensor(self.alpha, dtype="float32"), labels)

    def _pixel_loss(self, log_p_true: Any, labels: Any, num_classes: int) -> Any:
        one_minus_p_true = ops.maximum(-ops.expm1(log_p_true), _FLOAT32_TINY)
        loss = -ops.power(one_minus_p_true, self.gamma) * log_p_true
        if self.alpha is not None:
            loss = self._alpha_t(labels, num_classes) * loss
        return loss

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "gamma": self.gamma, "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="seglab")
class SoftDiceLoss(keras.losses.Loss):
    """Multi-class soft Dice loss over the batch, averaged over present classes (module doc)."""

    def __init__(
        self,
        smooth: float = 1.0,
        ignore_index: int | None = 255,
        class_weights: Sequence[float] | None = None,
        name: str = "soft_dice_loss",
    ) -> None:
        super().__init__(name=name, reduction="sum_over_batch_size", dtype="float32")
        self.smooth = _non_negative_float("smooth", smooth)
        self.ignore_index = _validate_ignore_index(ignore_index)
        self.class_weights = _validate_class_weights(class_weights)

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        # Dice is already one number per batch; sample_weight weights the pixels inside it.
        with keras.name_scope(self.name):
            return _scale_for_replicas(self._dice_loss(y_true, y_pred, sample_weight))

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return self._dice_loss(y_true, y_pred, None)

    def per_class_dice(
        self, y_true: Any, y_pred: Any, sample_weight: Any = None
    ) -> tuple[Any, Any]:
        """Return (soft dice per class (C,), present-class mask (C,)) for the batch."""
        labels, logits, num_classes = _standardize(y_true, y_pred)
        counted, out_of_range, safe_labels = _label_masks(labels, num_classes, self.ignore_index)
        pixel_weights = ops.cast(counted, "float32")
        if sample_weight is not None:
            pixel_weights = pixel_weights * _broadcast_sample_weight(sample_weight, labels)
        pixel_weights = ops.expand_dims(pixel_weights, -1)

        probs = ops.softmax(logits, axis=-1)
        truth = ops.one_hot(safe_labels, num_classes, dtype="float32")
        hard_prediction = ops.one_hot(ops.argmax(logits, axis=-1), num_classes, dtype="float32")
        batch_axes = tuple(range(len(logits.shape) - 1))

        intersection = ops.sum(probs * truth * pixel_weights, axis=batch_axes)
        truth_mass = ops.sum(truth * pixel_weights, axis=batch_axes)
        prob_mass = ops.sum(probs * pixel_weights, axis=batch_axes)
        predicted_mass = ops.sum(hard_prediction * pixel_weights, axis=batch_axes)

        dice = (2.0 * intersection + self.smooth) / (truth_mass + prob_mass + self.smooth)
        present = ops.logical_or(ops.greater(truth_mass, 0.0), ops.greater(predicted_mass, 0.0))
        # Out-of-range labels poison the result (see module doc).
        dice = dice + ops.where(ops.any(out_of_range), np.nan, 0.0)
        return dice, present

    def _dice_loss(self, y_true: Any, y_pred: Any, sample_weight: Any) -> Any:
        dice, present = self.per_class_dice(y_true, y_pred, sample_weight)
        num_classes = int(dice.shape[0])
        class_weights = _class_weight_tensor(self.class_weights, num_classes)
        term_weights = ops.cast(present, "float32")
        if class_weights is not None:
            term_weights = term_weights * class_weights
        # divide_no_nan: no present class (all pixels ignored) -> loss 0, gradients 0.
        return ops.divide_no_nan(ops.sum(term_weights * (1.0 - dice)), ops.sum(term_weights))

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "smooth": self.smooth,
            "ignore_index": self.ignore_index,
            "class_weights": self.class_weights,
        }


@keras.saving.register_keras_serializable(package="seglab")
class FocalDiceLoss(keras.losses.Loss):
    """``focal_weight * FocalLoss + dice_weight * SoftDiceLoss``: seglab's default training loss.

    The focal term is computed per pixel and reduced as in the module doc (not from an already
    reduced cross-entropy); the Dice term is the batch soft Dice. Both share ``ignore_index`` and
    ``class_weights``.
    """

    def __init__(
        self,
        focal_weight: float = 1.0,
        dice_weight: float = 1.0,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        smooth: float = 1.0,
        ignore_index: int | None = 255,
        class_weights: Sequence[float] | None = None,
        name: str = "focal_dice_loss",
    ) -> None:
        super().__init__(name=name, reduction="sum_over_batch_size", dtype="float32")
        self.focal_weight = _non_negative_float("focal_weight", focal_weight)
        self.dice_weight = _non_negative_float("dice_weight", dice_weight)
        if self.focal_weight == 0 and self.dice_weight == 0:
            raise ValueError("focal_weight and dice_weight cannot both be 0")
        self.focal = FocalLoss(
            gamma=gamma,
            alpha=alpha,
            ignore_index=ignore_index,
            class_weights=class_weights,
            name=f"{name}_focal",
        )
        self.dice = SoftDiceLoss(
            smooth=smooth,
            ignore_index=ignore_index,
            class_weights=class_weights,
            name=f"{name}_dice",
        )

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        with keras.name_scope(self.name):
            return self.focal_weight * self.focal(
                y_true, y_pred, sample_weight
            ) + self.dice_weight * self.dice(y_true, y_pred, sample_weight)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return self(y_true, y_pred)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "focal_weight": self.focal_weight,
            "dice_weight": self.dice_weight,
            "gamma": self.focal.gamma,
            "alpha": self.focal.alpha,
            "smooth": self.dice.smooth,
            "ignore_index": self.focal.ignore_index,
            "class_weights": self.focal.class_weights,
        }


LOSSES: dict[str, type[keras.losses.Loss]] = {
    "ce": SparseCrossEntropy,
    "focal": FocalLoss,
    "dice": SoftDiceLoss,
    "focal_dice": FocalDiceLoss,
}


def get_loss(name: str, **kwargs: Any) -> keras.losses.Loss:
    """Build a loss by its params name: ``"ce" | "focal" | "dice" | "focal_dice"``.

    ``kwargs`` go to the loss constructor (e.g. ``ignore_index``, ``class_weights``, ``gamma``).
    """
    try:
        loss_class = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}") from None
    try:
        return loss_class(**kwargs)
    except TypeError as error:
        raise ValueError(
            f"bad arguments for loss {name!r} ({loss_class.__name__}): {error}"
        ) from error
