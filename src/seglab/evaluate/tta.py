"""Test-time augmentation: transforms that know how to undo themselves on the prediction (ttach-style).

Each `Transform` maps an image batch (B, H, W, C) to a transformed batch (`apply`) and maps the
model's per-pixel output on that batch back to the original geometry (`invert`). All of them are
pure index permutations (flips and quarter turns), so ``invert(apply(x))`` is ``x`` bit for bit and
no resampling ever blurs a prediction.

`tta_model(model, names)` wraps a segmenter (float32 logits) into a Keras model that returns the
merged probabilities: for every transform, softmax of the float32 logits of the transformed batch,
inverted, then averaged. The average is a running mean (``m += (p - m) / k``) rather than a sum
divided by the count: for an equivariant model all the inverted ``p`` are identical and the running
mean returns them unchanged, bit for bit, where ``(p + p + p) / 3`` may be off by an ulp and flip a
tied argmax. ``tta_model(model, ["identity"])`` is the plain softmax of the model, so plain and TTA
evaluation share one code path.

Quarter turns (``rot90``, ``rot270``) swap height and width. Our models are built for a static
input size and evaluation letterboxes into squares, so they apply as they are; for a model with a
non-square input they cannot run, and are skipped with a logged warning (``on_non_square="skip"``,
the default) or refused (``"error"``). ``rot180`` and the flips work at any size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import keras
from keras import ops

log = logging.getLogger(__name__)

__all__ = ["TRANSFORM_NAMES", "Transform", "get_transform", "select_transforms", "tta_model", "probability_model"]

# The spatial axes of a channels-last batch (B, H, W, C).
_HEIGHT, _WIDTH = 1, 2


@dataclass(frozen=True)
class Transform:
    """One invertible geometric transform of channels-last batches (B, H, W, C)."""

    name: str
    forward: Callable[[Any], Any]
    inverse: Callable[[Any], Any]
    swaps_height_width: bool = False

    def apply(self, images: Any) -> Any:
        """Transform a batch (B, H, W, C) of images."""
        return self.forward(images)

    def invert(self, outputs: Any) -> Any:
        """Map a per-pixel output (B, H', W', C) computed on `apply(images)` back onto `images`."""
        return self.inverse(outputs)


def _identity(x: Any) -> Any:
    return x


def _flip(axis: int) -> Callable[[Any], Any]:
    return lambda x: ops.flip(x, axis=axis)


def _swap_height_width(x: Any) -> Any:
    return ops.transpose(x, (0, _WIDTH, _HEIGHT, 3))


# Quarter turns counter-clockwise in the (H, W) plane, like numpy.rot90(x, k, axes=(1, 2)), written as
# a transpose and flips: keras.ops.rot90 (Keras 3.15, TensorFlow backend) returns wrong values for
# k >= 2 on non-square inputs.
def _rot90(x: Any) -> Any:
    return ops.flip(_swap_height_width(x), axis=_HEIGHT)


def _rot180(x: Any) -> Any:
    return ops.flip(ops.flip(x, axis=_HEIGHT), axis=_WIDTH)


def _rot270(x: Any) -> Any:
    return ops.flip(_swap_height_width(x), axis=_WIDTH)


_TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        Transform("identity", _identity, _identity),
        Transform("hflip", _flip(_WIDTH), _flip(_WIDTH)),
        Transform("vflip", _flip(_HEIGHT), _flip(_HEIGHT)),
        Transform("rot90", _rot90, _rot270, swaps_height_width=True),
        Transform("rot180", _rot180, _rot180),
        Transform("rot270", _rot270, _rot90, swaps_height_width=True),
    )
}
TRANSFORM_NAMES = tuple(_TRANSFORMS)


def get_transform(name: str) -> Transform:
    try:
        return _TRANSFORMS[name]
    except KeyError:
        raise ValueError(f"unknown TTA transform {name!r}; expected one of {list(TRANSFORM_NAMES)}") from None


def select_transforms(
    names: Sequence[str],
    image_shape: Sequence[int] | None = None,
    on_non_square: Literal["skip", "error"] = "skip",
) -> list[Transform]:
    """The transforms named in `names`, in order, checked against an (H, W[, C]) input shape.

    Duplicates are refused (they would silently weight one view twice). Transforms that swap height
    and width are skipped with a warning (or refused with ``on_non_square="error"``) when H != W.
    """
    names = list(names)
    if not names:
        raise ValueError("TTA needs at least one transform (e.g. ['identity'])")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"TTA transforms listed twice: {duplicates}; each view must count once in the mean")
    transforms = [get_transform(n) for n in names]
    if on_non_square not in ("skip", "error"):
        raise ValueError(f"on_non_square must be 'skip' or 'error', got {on_non_square!r}")
    if image_shape is None or int(image_shape[0]) == int(image_shape[1]):
        return transforms
    height, width = int(image_shape[0]), int(image_shape[1])
    swapping = [t.name for t in transforms if t.swaps_height_width]
    if swapping and on_non_square == "error":
        raise ValueError(
            f"TTA transforms {swapping} turn the {height}x{width} input into {width}x{height}, which a model "
            "built for a static non-square size cannot take; use square inputs or drop them"
        )
    if swapping:
        log.warning("TTA: skipping %s: they need a square input and the model takes %dx%d", swapping, height, width)
    kept = [t for t in transforms if not t.swaps_height_width]
    if not kept:
        raise ValueError(f"no TTA transform of {names} applies to a non-square {height}x{width} input")
    return kept


def _static_image_shape(model: keras.Model) -> tuple[int, int, int]:
    shape = tuple(model.input_shape)
    if len(shape) != 4 or any(s is None for s in shape[1:]):
        raise ValueError(f"{model.name}: expected a model with a static (None, H, W, C) input, got {shape}")
    return int(shape[1]), int(shape[2]), int(shape[3])


def tta_model(
    model: keras.Model,
    names: Sequence[str] = ("identity", "hflip", "vflip", "rot90", "rot270"),
    on_non_square: Literal["skip", "error"] = "skip",
) -> keras.Model:
    """A Keras model: images (B, H, W, 3) -> TTA-merged probabilities (B, H, W, C), float32.

    `model` returns logits of any float dtype (cast to float32 before the softmax). The names of
    the transforms actually used are in the returned model's ``tta_transforms`` attribute.
    """
    image_shape = _static_image_shape(model)
    transforms = select_transforms(names, image_shape, on_non_square)
    images = keras.Input(shape=image_shape, name="images")
    merged = None
    for count, transform in enumerate(transforms, start=1):
        logits = model(transform.apply(images), training=False)
        probabilities = transform.invert(ops.softmax(ops.cast(logits, "float32"), axis=-1))
        merged = probabilities if merged is None else merged + (probabilities - merged) / float(count)
    suffix = "probabilities" if [t.name for t in transforms] == ["identity"] else "tta"
    wrapped = keras.Model(images, merged, name=f"{model.name}_{suffix}")
    wrapped.tta_transforms = [t.name for t in transforms]
    return wrapped


def probability_model(model: keras.Model) -> keras.Model:
    """The plain softmax of `model` (TTA with the identity only), for comparison with TTA."""
    return tta_model(model, ["identity"])
