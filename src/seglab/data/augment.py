"""Training augmentation for (image, label) pairs: one random geometry for both, colour for the image.

`Augmentation` is the `augment(image, label, seed)` hook of `seglab.data.pipeline.make_dataset`:
it runs on one element at the training size (image float32 (H, W, 3) in [0, 255], label int32
(H, W), 255 = ignore) with a stateless int64 [2] seed, so a fixed dataset seed gives the same
augmented batches on every run.

Geometry (image and label share one transform, applied in a single resampling pass):

- rotation by an angle drawn from [-rotate_deg, +rotate_deg] about the image centre;
- scale by a factor drawn from `scale` (> 1 zooms in, < 1 shrinks the content);
- a random shift ("crop/pad"): up to the slack the scale leaves, |scale - 1| x size / 2 per
  axis, so a zoom shows a random window of the image and a shrink lands at a random place;
- horizontal / vertical flips, each with probability 1/2 when enabled.

The transform is one `ImageProjectiveTransformV3` call per tensor: bilinear for the image (fill
0), nearest-neighbour for the label (fill 255), so a label only takes values it had or 255 and
pixels that came from outside the image are ignored by the loss and metrics. Both are sampled at
the same pixel centres, so image and label stay aligned.

Colour (image only, before the geometry so the fill stays 0): brightness shift drawn from
[-brightness, +brightness] x 255, then contrast and saturation factors drawn from
[1 - contrast, 1 + contrast] and [1 - saturation, 1 + saturation]; the result is clipped to
[0, 255]. Labels are never touched by colour jitter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from seglab.data.classes import IGNORE_INDEX

__all__ = ["Augmentation"]

_IMAGE_FILL = 0.0


@dataclass(frozen=True)
class Augmentation:
    """Random geometry (shared) and colour jitter (image only); see the module doc.

    Set a field to 0 / False (and `scale` to (1, 1)) to switch that part off; with everything off
    the pair is returned unchanged.
    """

    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.8, 1.2)
    hflip: bool = True
    vflip: bool = False
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2

    def __post_init__(self) -> None:
        def number(name: str, low: float, high: float) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high:
                raise ValueError(f"Augmentation.{name} must be a number in [{low}, {high}], got {value!r}")

        number("rotate_deg", 0, 180)
        number("brightness", 0, 1)
        # A factor range [1 - x, 1 + x] must stay non-negative for contrast and saturation.
        number("contrast", 0, 1)
        number("saturation", 0, 1)
        try:
            low, high = (float(v) for v in self.scale)
        except (TypeError, ValueError):
            raise ValueError(f"Augmentation.scale must be (low, high), got {self.scale!r}") from None
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise ValueError(f"Augmentation.scale must be (low, high) with 0 < low <= high, got {self.scale!r}")
        object.__setattr__(self, "scale", (low, high))
        for name in ("hflip", "vflip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Augmentation.{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, config: Any) -> Augmentation:
        """From `cfg.train.augment` (seglab.config.AugmentConfig) or any object with the same fields."""
        return cls(
            rotate_deg=float(config.rotate_deg),
            scale=tuple(config.scale),
            hflip=bool(config.hflip),
            vflip=bool(config.vflip),
            brightness=float(config.brightness),
            contrast=float(config.contrast),
            saturation=float(config.saturation),
        )

    @property
    def has_geometry(self) -> bool:
        return self.rotate_deg > 0 or self.scale != (1.0, 1.0) or self.hflip or self.vflip

    @property
    def has_colour(self) -> bool:
        return self.brightness > 0 or self.contrast > 0 or self.saturation > 0

    def __call__(self, image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.convert_to_tensor(image, tf.float32)
        label = tf.convert_to_tensor(label)
        if image.shape.rank != 3 or image.shape[-1] != 3:
            raise ValueError(f"Augmentation: image must be (H, W, 3), got shape {image.shape}")
        if label.shape.rank != 2:
            raise ValueError(f"Augmentation: label must be (H, W), got shape {label.shape}")
        if not label.dtype.is_integer:
            raise TypeError(f"Augmentation: label must hold integer class indices, got {label.dtype.name}")
        colour_seed, geometry_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        if self.has_colour:
            image = self.jitter_colour(image, colour_seed)
        if self.has_geometry:
            image, label = self.warp(image, label, geometry_seed)
        return image, label

    # ------------------------------------------------------------------------------------ colour

    def jitter_colour(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Brightness, contrast, saturation on an image in [0, 255]; returns it clipped to [0, 255]."""
        brightness_seed, contrast_seed, saturation_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        # tf.image's colour ops are defined for [0, 1] floats.
        image = image / 255.0
        if self.brightness > 0:
            image = tf.image.stateless_random_brightness(image, self.brightness, brightness_seed)
        if self.contrast > 0:
            image = tf.image.stateless_random_contrast(image, 1.0 - self.contrast, 1.0 + self.contrast, contrast_seed)
        if self.saturation > 0:
            # Saturation is undefined outside [0, 1] (HSV); clip what brightness/contrast pushed out.
            image = tf.image.stateless_random_saturation(
                tf.clip_by_value(image, 0.0, 1.0), 1.0 - self.saturation, 1.0 + self.saturation, saturation_seed)
        return tf.clip_by_value(image, 0.0, 1.0) * 255.0

    # ---------------------------------------------------------------------------------- geometry

    def transform(self, seed: tf.Tensor, height: int | tf.Tensor, width: int | tf.Tensor) -> tf.Tensor:
        """The random output -> input pixel map as the 8 projective coefficients (float32 [8]).

        With centre c, flips F = diag(+-1, +-1), rotation R(theta), scale s and shift t, a source
        point p goes to c + t + s R(theta) F (p - c); the inverse, which the resampler needs, is
        p = c + F R(-theta) (q - c - t) / s for each output pixel q.
        """
        angle_seed, scale_seed, shift_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
        h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
        theta = tf.random.stateless_uniform([], angle_seed, -self.rotate_deg, self.rotate_deg) * (math.pi / 180.0)
        low, high = self.scale
        s = tf.random.stateless_uniform([], scale_seed, low, high) if high > low else tf.constant(low)
        # Shift within the slack the scale leaves: a zoomed image's crop window, a shrunk image's place.
        slack = tf.abs(s - 1.0) / 2.0 * tf.stack([w, h])
        tx, ty = tf.unstack(tf.random.stateless_uniform([2], shift_seed, -1.0, 1.0) * slack)
        coin = tf.random.stateless_uniform([2], flip_seed) < 0.5
        fx = -1.0 if self.hflip else 1.0
        fy = -1.0 if self.vflip else 1.0
        fx = tf.where(coin[0], fx, 1.0)
        fy = tf.where(coin[1], fy, 1.0)
        cos, sin = tf.cos(theta), tf.sin(theta)
        # M = F R(-theta) / s
        m00, m01 = fx * cos / s, fx * sin / s
        m10, m11 = -fy * sin / s, fy * cos / s
        cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
        # p = M q + (c - M (c + t))
        qx, qy = cx + tx, cy + ty
        b0 = cx - (m00 * qx + m01 * qy)
        b1 = cy - (m10 * qx + m11 * qy)
        return tf.stack([m00, m01, b0, m10, m11, b1, 0.0, 0.0])

    def warp(self, image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Apply one random transform to both: image bilinear (fill 0), label nearest (fill 255)."""
        shape = tf.shape(label)
        transform = self.transform(seed, shape[0], shape[1])[None]
        warped_image = tf.raw_ops.ImageProjectiveTransformV3(
            images=image[None], transforms=transform, output_shape=shape, fill_value=_IMAGE_FILL,
            interpolation="BILINEAR", fill_mode="CONSTANT")[0]
        warped_label = tf.raw_ops.ImageProjectiveTransformV3(
            images=label[None, ..., None], transforms=transform, output_shape=shape,
            fill_value=float(IGNORE_INDEX), interpolation="NEAREST", fill_mode="CONSTANT")[0, ..., 0]
        return tf.ensure_shape(warped_image, image.shape), tf.ensure_shape(warped_label, label.shape)
