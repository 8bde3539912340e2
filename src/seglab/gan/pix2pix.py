"""pix2pix (Isola et al. 2017): label map -> image, so every synthetic image comes with exact labels.

Generator: a U-Net on the one-hot layout (C + 1 channels: classes + ignore). Encoder: 4x4 stride-2
convs (BatchNorm except the first, LeakyReLU 0.2) down to 4x4; decoder: 4x4 stride-2 transposed
convs (BatchNorm, ReLU, dropout 0.5 on the two deepest) each concatenated with the encoder map of
the same size; a last transposed conv to 3 tanh channels. It returns `[image, layout]`: the
label output is the conditioning layout passed through unchanged, so the pair's label map is the
requested layout exactly (the same two outputs as the noise generators, so synthesis treats all
three alike).

Discriminator: PatchGAN on the concatenated (image, layout) — 4x4 convs, `patch_layers` of them
with stride 2, then one stride-1 conv and a stride-1 conv to one logit per patch, so it judges
local realism of the image *given* the layout. Loss: D: BCE(real patches -> 1, fake -> 0) / 2;
G: BCE(fake -> 1) + `l1_weight` x mean |image - real image| (the L1 term carries the low
frequencies, the adversarial term the texture). Adam(2e-4, beta_1 0.5).

Layouts for synthesis (`make_layouts`): real training label maps, geometrically transformed ones
(flip / rotate / zoom with the project's `Augmentation`; pixels from outside the map become 255,
ignore) and recombined ones (objects — connected regions of one class — cut from one label map and
pasted, optionally mirrored and moved, into another). Each layout is a label map by construction,
so the rendered image's labels are exact.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from seglab.data.classes import IGNORE_INDEX
from seglab.gan.common import (
    GanTrainer,
    bce_discriminator_loss,
    bce_generator_loss,
    check_image_size,
    label_channels,
    level_channels,
)

__all__ = [
    "LAYOUT_KINDS",
    "Pix2PixTrainer",
    "build_discriminator",
    "build_generator",
    "make_layouts",
    "paste_objects",
    "transform_layout",
]

_INIT = keras.initializers.RandomNormal(stddev=0.02)
_BN_MOMENTUM = 0.9
LAYOUT_KINDS = ("real", "transformed", "recombined")


def build_generator(num_classes: int, image_size: int = 64, *, width: int = 16, dropout: float = 0.5,
                    name: str = "pix2pix_generator") -> keras.Model:
    """layout one-hot (B, S, S, C + 1) -> [image (B, S, S, 3) in [-1, 1], the layout unchanged]."""
    size = check_image_size(image_size)
    downsamplings = int(math.log2(size)) - 2
    layout = keras.Input((size, size, label_channels(num_classes)), name="layout")
    skips = []
    x = layout
    for i in range(downsamplings):
        x = layers.Conv2D(level_channels(width, i), 4, strides=2, padding="same", use_bias=i == 0,
                          kernel_initializer=_INIT, name=f"down{i}")(x)
        if i > 0:
            x = layers.BatchNormalization(momentum=_BN_MOMENTUM, name=f"down{i}_bn")(x)
        x = layers.LeakyReLU(0.2)(x)
        skips.append(x)
    for i, skip in enumerate(reversed(skips[:-1])):
        level = downsamplings - 2 - i
        x = layers.Conv2DTranspose(level_channels(width, level), 4, strides=2, padding="same", use_bias=False,
                                   kernel_initializer=_INIT, name=f"up{i}")(x)
        x = layers.BatchNormalization(momentum=_BN_MOMENTUM, name=f"up{i}_bn")(x)
        if i < 2 and dropout > 0:  # pix2pix's noise: dropout in the deepest decoder blocks
            x = layers.Dropout(dropout, name=f"up{i}_dropout")(x)
        x = layers.ReLU()(x)
        x = layers.Concatenate(name=f"skip{i}")([x, skip])
    image = layers.Conv2DTranspose(3, 4, strides=2, padding="same", activation="tanh", kernel_initializer=_INIT,
                                   name="image")(x)
    label = layers.Identity(name="label")(layout)
    return keras.Model(layout, [image, label], name=name)


def default_patch_layers(image_size: int) -> int:
    """Stride-2 layers of the PatchGAN: 2 at 64 px (34 px patches), 3 from 128 px (pix2pix's 70 px)."""
    return min(3, max(1, int(math.log2(image_size)) - 4))


def build_discriminator(num_classes: int, image_size: int = 64, *, width: int = 16, patch_layers: int | None = None,
                        name: str = "pix2pix_discriminator") -> keras.Model:
    """(B, S, S, 3 + C + 1) image and layout -> (B, P, P, 1) patch logits."""
    size = check_image_size(image_size)
    patch_layers = default_patch_layers(size) if patch_layers is None else int(patch_layers)
    if not 1 <= patch_layers <= int(math.log2(size)) - 2:
        raise ValueError(f"patch_layers must be in 1..{int(math.log2(size)) - 2} at image_size {size}, got {patch_layers}")
    inputs = keras.Input((size, size, 3 + label_channels(num_classes)), name="image_and_label")
    x = inputs
    for i in range(patch_layers):
        x = layers.Conv2D(level_channels(width, i), 4, strides=2, padding="same", use_bias=i == 0,
                          kernel_initializer=_INIT, name=f"down{i}")(x)
        if i > 0:
            x = layers.BatchNormalization(momentum=_BN_MOMENTUM, name=f"down{i}_bn")(x)
        x = layers.LeakyReLU(0.2)(x)
    x = layers.Conv2D(level_channels(width, patch_layers), 4, padding="same", use_bias=False,
                      kernel_initializer=_INIT, name="patch_features")(x)
    x = layers.BatchNormalization(momentum=_BN_MOMENTUM, name="patch_features_bn")(x)
    x = layers.LeakyReLU(0.2)(x)
    logits = layers.Conv2D(1, 4, padding="same", kernel_initializer=_INIT, name="patch_logits")(x)
    return keras.Model(inputs, logits, name=name)


class Pix2PixTrainer(GanTrainer):
    """One D and one G update per (layout, real image) batch; G's loss is adversarial + weighted L1."""

    loss_names = ("d_loss", "g_loss", "g_adversarial", "l1", "d_real", "d_fake")

    def __init__(self, generator: keras.Model, discriminator: keras.Model, *, num_classes: int,
                 l1_weight: float = 100.0, seed: int = 0, **kwargs):
        super().__init__(generator, discriminator, num_classes=num_classes, seed=seed, **kwargs)
        if l1_weight < 0:
            raise ValueError(f"l1_weight must be >= 0, got {l1_weight}")
        self.l1_weight = float(l1_weight)

    def train_step(self, data):
        images, layouts = data
        real = ops.concatenate([images, layouts], axis=-1)
        with tf.GradientTape(persistent=True) as tape:  # one tape for both updates (see dcgan)
            fake_image, _ = self.generator(layouts, training=True)
            fake = ops.concatenate([fake_image, layouts], axis=-1)
            real_logits = self.discriminator(real, training=True)
            fake_logits = self.discriminator(fake, training=True)
            d_loss = 0.5 * bce_discriminator_loss(real_logits, fake_logits)
            g_adversarial = bce_generator_loss(fake_logits)
            l1 = ops.mean(ops.abs(images - fake_image))
            g_loss = g_adversarial + self.l1_weight * l1
        self.apply(self.d_optimizer, tape, d_loss, self.discriminator)
        self.apply(self.g_optimizer, tape, g_loss, self.generator)
        del tape
        return self.track(d_loss=d_loss, g_loss=g_loss, g_adversarial=g_adversarial, l1=l1,
                          d_real=ops.mean(real_logits), d_fake=ops.mean(fake_logits))


# -------------------------------------------------------------------------------------- layouts

def transform_layout(label: np.ndarray, seed: Sequence[int], *, rotate_deg: float = 10.0,
                     scale: tuple[float, float] = (1.0, 1.3), hflip: bool = True) -> np.ndarray:
    """One random flip / rotation / zoom of a label map (nearest; pixels from outside -> 255)."""
    from seglab.data.augment import Augmentation

    geometry = Augmentation(rotate_deg=rotate_deg, scale=scale, hflip=hflip, vflip=False,
                            brightness=0.0, contrast=0.0, saturation=0.0)
    label = np.asarray(label)
    placeholder = tf.zeros((*label.shape, 3), tf.float32)  # the warp moves an image with the label
    _, warped = geometry.warp(placeholder, tf.convert_to_tensor(label.astype(np.int32)),
                              tf.constant(seed, tf.int64))
    return warped.numpy().astype(np.uint8)


def _objects(label: np.ndarray, num_classes: int, min_pixels: int) -> list[tuple[int, np.ndarray]]:
    """Connected regions of one class (not background, not ignore) with at least `min_pixels` pixels."""
    from scipy import ndimage

    found = []
    for value in np.unique(label):
        if value == 0 or value == IGNORE_INDEX or value >= num_classes:
            continue
        components, count = ndimage.label(label == value)
        for index in range(1, count + 1):
            mask = components == index
            if mask.sum() >= min_pixels:
                found.append((int(value), mask))
    return found


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move a mask by (dy, dx); what leaves the frame is dropped (no wrap-around)."""
    height, width = mask.shape
    moved = np.zeros_like(mask)
    src_y, dst_y = slice(max(0, -dy), min(height, height - dy)), slice(max(0, dy), min(height, height + dy))
    src_x, dst_x = slice(max(0, -dx), min(width, width - dx)), slice(max(0, dx), min(width, width + dx))
    moved[dst_y, dst_x] = mask[src_y, src_x]
    return moved


def paste_objects(base: np.ndarray, donor: np.ndarray, rng: np.random.Generator, *, num_classes: int,
                  max_objects: int = 2, min_share: float = 0.01) -> np.ndarray:
    """Paste up to `max_objects` objects of `donor` into a copy of `base` (mirrored / moved at random).

    An object is a connected region of one class covering at least `min_share` of the map. It is
    mirrored with probability 1/2 and moved by up to a quarter of the side; the pasted pixels take
    its class, in front of whatever `base` had there. A donor without objects leaves `base` as is.
    """
    base, donor = np.asarray(base), np.asarray(donor)
    if base.shape != donor.shape or base.ndim != 2:
        raise ValueError(f"paste_objects needs two (H, W) label maps of one size, got {base.shape} and {donor.shape}")
    height, width = base.shape
    objects = _objects(donor, num_classes, max(1, int(min_share * height * width)))
    out = base.copy()
    if not objects:
        return out
    chosen = rng.choice(len(objects), size=min(max_objects, len(objects)), replace=False)
    for index in sorted(int(i) for i in chosen):
        value, mask = objects[index]
        if rng.random() < 0.5:
            mask = mask[:, ::-1]
        dy = int(rng.integers(-(height // 4), height // 4 + 1))
        dx = int(rng.integers(-(width // 4), width // 4 + 1))
        out[_shift(mask, dy, dx)] = value
    return out


def make_layouts(real_labels: np.ndarray, count: int, rng: np.random.Generator, *, num_classes: int,
                 mix: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[np.ndarray, list[str]]:
    """`count` layouts (uint8 (count, S, S)) drawn from real label maps, and the kind of each.

    `mix` weighs the kinds in `LAYOUT_KINDS` (real, transformed, recombined); weights are
    normalised, and a zero weight leaves a kind out.
    """
    real_labels = np.asarray(real_labels)
    if real_labels.ndim != 3 or len(real_labels) == 0:
        raise ValueError(f"make_layouts needs real label maps (N, S, S) with N >= 1, got shape {real_labels.shape}")
    weights = np.asarray(mix, dtype=np.float64)
    if weights.shape != (len(LAYOUT_KINDS),) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"layout mix must be {len(LAYOUT_KINDS)} non-negative weights for {LAYOUT_KINDS} "
                         f"with a positive sum, got {list(mix)}")
    kinds = rng.choice(len(LAYOUT_KINDS), size=count, p=weights / weights.sum())
    layouts, names = [], []
    for kind in kinds:
        base = real_labels[int(rng.integers(len(real_labels)))]
        if LAYOUT_KINDS[kind] == "real":
            layout = base.copy()
        elif LAYOUT_KINDS[kind] == "transformed":
            layout = transform_layout(base, rng.integers(0, 2 ** 31 - 1, size=2))
        else:
            donor = real_labels[int(rng.integers(len(real_labels)))]
            layout = paste_objects(base, donor, rng, num_classes=num_classes)
        layouts.append(layout.astype(np.uint8))
        names.append(LAYOUT_KINDS[kind])
    return np.stack(layouts), names
