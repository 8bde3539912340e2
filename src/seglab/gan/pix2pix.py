"""pix2pix (Isola et al. 2017) with an appearance input: label map + real context -> image, so every
synthetic image comes with exact labels.

Why the appearance input. The embedded sample's backgrounds (stripes, lattices, gradients, grass and
sky) and object colours are drawn at random per image, not from the layout, so a generator that
sees the layout alone regresses to their mean: a blurred bluish-grey ground with coloured blobs
(KID 0.50-0.69 against a calibrated bound of 0.14, docs/synthetic-validation.md). Here the
generator is told what the image looks like where the layout does not decide it, as SPADE/SEAN-style
generators take a style input:

    appearance (B, S, S, 7) = [context RGB (3), hole (1), region colours RGB (3)]

- hole: 1 wherever the layout *or* a second layout has an object (any class > 0, or ignore), 0 on
  their common background. context: an image's pixels outside the hole, 0 inside. The generator
  paints the hole (objects where the layout has them, background elsewhere) and keeps the context:
  its output is `hole x generated + (1 - hole) x context`.
- region colours: for each label channel of the layout but background, one RGB colour painted over
  that channel's pixels (0 elsewhere), the mean colour of such a region in a real image.

Training (`Pix2PixTrainer.train_step`, all in the graph): the context is the real image itself, the
second layout another image's of the batch (so the generator also learns to fill background-only
holes with background), the colours the image's own per-channel region means; L1 and PatchGAN
judge the composite. Synthesis (`synthesis_inputs`): a layout (real, transformed or recombined,
`make_layouts`) is rendered into the background of *another* random real training image, whose
own objects are the second layout (they become holes the generator fills with background, so its
labels stay exact), with region colours drawn per class from the real training images' regions
(`colour_bank`). So a synthetic pair is a new layout on a real background it never had, with
object colours from other images: new image/label pairs, not copies.

Generator: a U-Net on [layout one-hot (C + 1 channels: classes + ignore), appearance]. Encoder:
4x4 stride-2 convs (BatchNorm except the first, LeakyReLU 0.2) down to 4x4; decoder: 4x4 stride-2
transposed convs (BatchNorm, ReLU, dropout 0.5 on the two deepest) each concatenated with the
encoder map of the same size; a last transposed conv to 3 tanh channels, composited into the
context (`HoleComposite`). It returns `[image, layout]`: the label output is the conditioning
layout passed through unchanged, so the pair's label map is the requested layout exactly (the
same two outputs as the noise generators, so synthesis treats all three alike).

Discriminator: PatchGAN on the concatenated (image, layout) — 4x4 convs, `patch_layers` of them
with stride 2, then one stride-1 conv and a stride-1 conv to one logit per patch, so it judges
local realism of the image *given* the layout. Loss: D: BCE(real patches -> 1, fake -> 0) / 2;
G: BCE(fake -> 1) + `l1_weight` x mean |image - real image| (the L1 term carries the low
frequencies, the adversarial term the texture). Adam(beta_1 0.5); learning rates from params.

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
    labels_to_one_hot,
    level_channels,
    to_gan_range,
)

__all__ = [
    "APPEARANCE_CHANNELS",
    "HoleComposite",
    "LAYOUT_KINDS",
    "Pix2PixTrainer",
    "appearance",
    "build_discriminator",
    "build_generator",
    "colour_bank",
    "make_layouts",
    "paste_objects",
    "region_colours",
    "synthesis_inputs",
    "transform_layout",
]

_INIT = keras.initializers.RandomNormal(stddev=0.02)
_BN_MOMENTUM = 0.9
LAYOUT_KINDS = ("real", "transformed", "recombined")
APPEARANCE_CHANNELS = 7  # context RGB, hole, region colours RGB


# ----------------------------------------------------------------------------------- appearance

def appearance(layout, second_layout, context, colours):
    """The generator's appearance input (module docstring), from tensors or arrays.

    layout, second_layout: one-hot (B, S, S, C + 1); context: images (B, S, S, 3) in [-1, 1];
    colours: (B, C + 1, 3) in [-1, 1], one per label channel (the background's is not used).
    Returns (B, S, S, 7): context outside the hole, the hole, the region-colour map.
    """
    layout, second_layout = ops.cast(layout, "float32"), ops.cast(second_layout, "float32")
    keep = layout[..., :1] * second_layout[..., :1]  # background in both layouts
    objects = ops.concatenate([ops.zeros_like(layout[..., :1]), layout[..., 1:]], axis=-1)
    colour_map = ops.einsum("bhwc,bcd->bhwd", objects, ops.cast(colours, "float32"))
    return ops.concatenate([ops.cast(context, "float32") * keep, 1.0 - keep, colour_map], axis=-1)


def region_colours(images, layout):
    """Mean colour of each label channel's pixels per image: images (B, S, S, 3), one-hot (B, S, S, C + 1)
    -> (B, C + 1, 3) (0 for a channel the image lacks)."""
    layout = ops.cast(layout, "float32")
    sums = ops.einsum("bhwc,bhwd->bcd", layout, ops.cast(images, "float32"))
    counts = ops.sum(layout, axis=(1, 2))[..., None]
    return sums / ops.maximum(counts, 1.0)


def colour_bank(images: np.ndarray, labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Per label channel (classes, then ignore), the mean colours ([-1, 1], (n, 3)) of that channel's
    region in each real image that has it: what synthesis draws object colours from."""
    one_hot = np.asarray(labels_to_one_hot(np.asarray(labels), num_classes))
    means = np.asarray(region_colours(np.asarray(to_gan_range(images)), one_hot))
    present = one_hot.sum(axis=(1, 2)) > 0
    return [means[present[:, c], c] for c in range(label_channels(num_classes))]


def synthesis_inputs(layouts: np.ndarray, real_images: np.ndarray, real_labels: np.ndarray,
                     rng: np.random.Generator, *, num_classes: int,
                     bank: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Generator inputs `[layout one-hot, appearance]` to render `layouts` (uint8 (N, S, S)) and the
    index of the real image whose background each one gets.

    Each layout goes into the background of a real training image drawn at random (`real_images`
    uint8 (M, S, S, 3) with `real_labels`; that image's objects become holes filled as background),
    each of its label channels gets the colour of one region of that channel drawn at random from
    `bank` (default: `colour_bank` of the real pairs).
    """
    layouts = np.asarray(layouts)
    if len(real_images) != len(real_labels) or len(real_images) == 0:
        raise ValueError(f"synthesis_inputs needs real images with their labels, got {len(real_images)} images "
                         f"and {len(real_labels)} label maps")
    bank = colour_bank(real_images, real_labels, num_classes) if bank is None else bank
    fallback = np.concatenate([b for b in bank[1:] if len(b)] or [np.zeros((1, 3), np.float32)]).mean(axis=0)
    styles = rng.integers(len(real_images), size=len(layouts))
    channels = label_channels(num_classes)
    colours = np.zeros((len(layouts), channels, 3), np.float32)
    for i, layout in enumerate(layouts):
        values = np.unique(layout)
        for c in np.where(values == 255, channels - 1, values).astype(int):
            if c == 0:
                continue
            colours[i, c] = bank[c][rng.integers(len(bank[c]))] if len(bank[c]) else fallback
    one_hot = np.asarray(labels_to_one_hot(layouts, num_classes))
    style_one_hot = np.asarray(labels_to_one_hot(np.asarray(real_labels)[styles], num_classes))
    context = np.asarray(to_gan_range(np.asarray(real_images)[styles]))
    return [one_hot, np.asarray(appearance(one_hot, style_one_hot, context, colours))], styles


@keras.saving.register_keras_serializable(package="seglab")
class HoleComposite(layers.Layer):
    """[generated (B, S, S, 3), appearance (B, S, S, 7)] -> hole x generated + (1 - hole) x context."""

    def call(self, inputs):
        generated, cond = inputs
        hole = cond[..., 3:4]
        return hole * generated + (1.0 - hole) * cond[..., :3]

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]


# ---------------------------------------------------------------------------------- networks

def build_generator(num_classes: int, image_size: int = 64, *, width: int = 16, dropout: float = 0.5,
                    name: str = "pix2pix_generator") -> keras.Model:
    """[layout one-hot (B, S, S, C + 1), appearance (B, S, S, 7)] -> [image (B, S, S, 3) in [-1, 1],
    the layout unchanged]."""
    size = check_image_size(image_size)
    downsamplings = int(math.log2(size)) - 2
    layout = keras.Input((size, size, label_channels(num_classes)), name="layout")
    cond = keras.Input((size, size, APPEARANCE_CHANNELS), name="appearance")
    skips = []
    x = layers.Concatenate(name="inputs")([layout, cond])
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
    generated = layers.Conv2DTranspose(3, 4, strides=2, padding="same", activation="tanh", kernel_initializer=_INIT,
                                       name="generated")(x)
    image = HoleComposite(name="image")([generated, cond])
    label = layers.Identity(name="label")(layout)
    return keras.Model([layout, cond], [image, label], name=name)


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
    """One D and one G update per (layout, real image) batch; G's loss is adversarial + weighted L1.

    The appearance input is built from the batch itself (module docstring): context = the real
    image, second layout = the next image's in the batch, colours = the image's region means.
    """

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
        cond = appearance(layouts, ops.roll(layouts, 1, axis=0), images, region_colours(images, layouts))
        with tf.GradientTape(persistent=True) as tape:  # one tape for both updates (see dcgan)
            fake_image, _ = self.generator([layouts, cond], training=True)
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
