"""What the three augmenters share: label <-> channel encoding, value scaling, data, losses, grids.

A GAN here always works on (image, label map) pairs, never images alone, because a synthetic
image is only useful to a segmenter together with its exact labels.

Label channels. A label map with classes 0..C-1 and 255 (ignore) becomes C + 1 one-hot channels:
one per class plus a last channel for ignore, so a generator can also say "no class here" (e.g.
the uncertain border between two objects, as real COCO label maps do) and synthetic pixels it
marks that way are left out of a segmenter's loss and metrics. `probabilities_to_labels` maps
the argmax back, the last channel to 255.

Generators output `[image, label_probabilities]`: image `(B, S, S, 3)` in [-1, 1] (tanh) and
`(B, S, S, C + 1)` softmax probabilities. Discriminators see the concatenation
`[image, label channels]`; for generated samples the label channels pass through
`straight_through_one_hot`, so the discriminator sees exact one-hot maps from both sides (it
cannot tell real from fake by the softness of the labels) while the generator still gets the
softmax's gradient.

`GanTrainer` is the `keras.Model` that `fit` drives: it owns the generator, the discriminator,
one optimizer each and loss trackers; the subclasses (dcgan, sagan, pix2pix) write `train_step`.
All its state (both networks, both optimizers) is reached through its attributes, so
`keras.callbacks.BackupAndRestore` saves and restores all of it; the noise stream is keyed on the
generator optimizer's step, so a resumed run continues it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import pyarrow.parquet as pq
from keras import ops
from PIL import Image

from seglab.atomic import atomic_path
from seglab.data.classes import IGNORE_INDEX
from seglab.data.palette import colorize

log = logging.getLogger(__name__)

__all__ = [
    "GanTrainer",
    "bce_discriminator_loss",
    "bce_generator_loss",
    "check_image_size",
    "from_gan_range",
    "gan_dataset",
    "label_channels",
    "label_prior",
    "labels_to_one_hot",
    "level_channels",
    "layouts_from_shards",
    "probabilities_to_labels",
    "render",
    "save_sample_grid",
    "set_label_prior",
    "shard_rows",
    "straight_through_one_hot",
    "to_gan_range",
]


# ------------------------------------------------------------------------------ label channels

def label_channels(num_classes: int) -> int:
    """Channels that encode a label map of `num_classes` classes: one per class + one for ignore."""
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2 (background and at least one class), got {num_classes}")
    return int(num_classes) + 1


def labels_to_one_hot(labels, num_classes: int):
    """Integer label maps (..., H, W) with 0..C-1 and 255 -> float32 one-hot (..., H, W, C + 1).

    Works on NumPy arrays (checked: any other value is an error naming it) and on tensors inside a
    graph (where the input pipeline has already checked the values).
    """
    channels = label_channels(num_classes)
    if isinstance(labels, np.ndarray):
        bad = ~((labels >= 0) & (labels < num_classes) | (labels == IGNORE_INDEX))
        if bad.any():
            values = sorted({int(v) for v in np.unique(labels[bad])})[:10]
            raise ValueError(f"label values {values} are outside 0..{num_classes - 1} and {IGNORE_INDEX} (ignore)")
    labels = ops.cast(labels, "int32")
    labels = ops.where(ops.equal(labels, IGNORE_INDEX), channels - 1, labels)
    return ops.one_hot(labels, channels, dtype="float32")


def probabilities_to_labels(probabilities: np.ndarray) -> np.ndarray:
    """(..., H, W, C + 1) channel scores -> uint8 label maps (..., H, W): argmax, last channel -> 255."""
    probabilities = np.asarray(probabilities)
    if probabilities.ndim < 3 or probabilities.shape[-1] < 3:
        raise ValueError(f"expected (..., H, W, C + 1) label channels with C >= 2, got shape {probabilities.shape}")
    ignore_channel = probabilities.shape[-1] - 1
    labels = np.argmax(probabilities, axis=-1)
    return np.where(labels == ignore_channel, IGNORE_INDEX, labels).astype(np.uint8)


def straight_through_one_hot(probabilities):
    """Forward: the one-hot of the argmax; backward: the gradient of `probabilities` (identity)."""
    hard = ops.one_hot(ops.argmax(probabilities, axis=-1), ops.shape(probabilities)[-1], dtype=probabilities.dtype)
    return probabilities + ops.stop_gradient(hard - probabilities)


# ------------------------------------------------------------------------------------- scaling

def to_gan_range(images):
    """Images in [0, 255] -> [-1, 1], the range of a tanh output."""
    return ops.cast(images, "float32") / 127.5 - 1.0


def from_gan_range(images) -> np.ndarray:
    """[-1, 1] -> uint8 [0, 255] (NumPy), clipping what a generator overshoots."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def level_channels(width: int, level: int, max_multiplier: int = 8) -> int:
    """Channels `level` halvings below full resolution: width x 2^level, at most width x max_multiplier."""
    return int(width) * min(2 ** int(level), max_multiplier)


def check_image_size(image_size: int, *, minimum: int = 16) -> int:
    """GAN sizes are powers of two (the networks halve/double the resolution per block)."""
    size = int(image_size)
    if size < minimum or size & (size - 1):
        raise ValueError(f"GAN image_size must be a power of two >= {minimum}, got {image_size}")
    return size


# ---------------------------------------------------------------------------------------- data

def shard_rows(shard_dir: str | Path, split: str) -> int:
    """Number of images in a split's shards (from the Parquet footers, no payload read)."""
    from seglab.data.shards import shard_files

    return sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(shard_dir, split))


def gan_dataset(
    shard_dir: str | Path,
    split: str,
    *,
    image_size: int,
    batch_size: int,
    seed: int,
    hflip: bool = True,
):
    """Batches of (images in [-1, 1] (B, S, S, 3), label one-hot (B, S, S, C + 1)) for GAN training.

    Returns `(dataset, classes, rows)`. Each epoch sees every training image once as a random
    square crop of the image scaled to cover the GAN size (the same covering crop the segmenters
    train on), flipped horizontally at random; only full batches, so the step shape is static.
    Decoded pairs are cached in memory: GAN training sets are small and are read every epoch.
    """
    import tensorflow as tf

    from seglab.data.augment import Augmentation
    from seglab.data.pipeline import classes_of, graph_only, make_dataset

    rows = shard_rows(shard_dir, split)
    if rows < batch_size:
        raise ValueError(
            f"{Path(shard_dir) / split}: {rows} images, fewer than one GAN batch ({batch_size}); "
            "lower gan.batch_size or add data")
    classes = classes_of(shard_dir, split)
    flip = Augmentation(rotate_deg=0.0, scale=(1.0, 1.0), hflip=hflip, vflip=False,
                        brightness=0.0, contrast=0.0, saturation=0.0)
    dataset = make_dataset(
        shard_dir, split, image_size=(image_size, image_size), batch_size=batch_size, training=True,
        augment=flip if hflip else None, seed=seed, deterministic=True, cache=True)
    num_classes = len(classes)
    # Full batches only, so the epoch length is known; telling tf.data lets Keras size its epochs.
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(rows // batch_size))
    dataset = dataset.map(graph_only(lambda images, labels: (to_gan_range(images), labels_to_one_hot(labels, num_classes))),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE), classes, rows


def layouts_from_shards(shard_dir: str | Path, split: str, *, image_size: int, seed: int,
                        limit: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Real (images uint8 (N, S, S, 3), label maps uint8 (N, S, S), classes) at the GAN size.

    Each image is scaled to cover the square and cropped at a place drawn from `seed`, in shard
    order, so the same call always returns the same pairs (fixed layouts for sample grids, the
    real layouts pix2pix renders).
    """
    from seglab.data.pipeline import classes_of, make_dataset

    classes = classes_of(shard_dir, split)
    dataset = make_dataset(shard_dir, split, image_size=(image_size, image_size), batch_size=64, training=False,
                           mode="crop", shuffle=False, seed=seed, deterministic=True)
    images, labels = [], []
    count = 0
    for batch_images, batch_labels in dataset:
        images.append(np.clip(np.round(batch_images.numpy()), 0, 255).astype(np.uint8))
        labels.append(batch_labels.numpy().astype(np.uint8))
        count += len(labels[-1])
        if limit is not None and count >= limit:
            break
    images_array, labels_array = np.concatenate(images), np.concatenate(labels)
    if limit is not None:
        images_array, labels_array = images_array[:limit], labels_array[:limit]
    return images_array, labels_array, classes


def label_prior(shard_dir: str | Path, split: str, *, smoothing: float = 1.0) -> np.ndarray:
    """Share of pixels per label channel (classes, then ignore) over a split, from `class_pixels`.

    Generators start their label logits at log(prior): an untrained generator then paints the
    dominant class (background) everywhere, a layout real data also has, instead of the
    per-pixel noise of a uniform softmax, which a discriminator rejects at once and which
    leaves the generator no useful gradient (observed: the discriminator wins within ~100 steps
    and the generator collapses). `smoothing` pixels are added per channel so no class gets -inf.
    """
    from seglab.data.stats import pixel_counts

    counted = pixel_counts(shard_dir, split)
    if counted.images == 0:
        raise ValueError(f"{Path(shard_dir) / split}: no class_pixels to derive a label prior from")
    counts = np.append(counted.classes, counted.ignore).astype(np.float64)
    counts += smoothing
    return counts / counts.sum()


def set_label_prior(generator: keras.Model, prior: np.ndarray | None, layer: str = "label_logits") -> None:
    """Set the bias of the generator's label-logit layer to log(prior) (None: leave it at zero)."""
    if prior is None:
        return
    prior = np.asarray(prior, dtype=np.float64)
    target = generator.get_layer(layer)
    conv = getattr(target, "layer", target)  # a SpectralNormalization wrapper holds the conv
    if conv.bias is None or tuple(conv.bias.shape) != prior.shape:
        raise ValueError(f"label prior has {prior.shape[0]} channels; {generator.name}/{layer} has "
                         f"{None if conv.bias is None else tuple(conv.bias.shape)}")
    if (prior <= 0).any() or not np.isclose(prior.sum(), 1.0):
        raise ValueError("label prior must be positive shares summing to 1")
    conv.bias.assign(np.log(prior).astype(np.float32))


# -------------------------------------------------------------------------------------- losses

def bce_discriminator_loss(real_logits, fake_logits):
    """Standard GAN discriminator loss: -log D(real) - log(1 - D(fake)), from logits, averaged."""
    real = ops.mean(ops.softplus(-real_logits))  # -log(sigmoid(x)) = softplus(-x)
    fake = ops.mean(ops.softplus(fake_logits))   # -log(1 - sigmoid(x)) = softplus(x)
    return real + fake


def bce_generator_loss(fake_logits):
    """Non-saturating generator loss -log D(fake) (stronger gradients early than log(1 - D))."""
    return ops.mean(ops.softplus(-fake_logits))


# ------------------------------------------------------------------------------------- trainer

class GanTrainer(keras.Model):
    """`fit`-driven adversarial training of `generator` against `discriminator`.

    Subclasses implement `train_step(data)` with `data = (images in [-1, 1], label one-hot)` and
    record their losses through `self.track(name=value, ...)`; the names in `loss_names` become
    the columns of the training history.
    """

    loss_names: tuple[str, ...] = ("d_loss", "g_loss")

    def __init__(self, generator: keras.Model, discriminator: keras.Model, *, num_classes: int, seed: int = 0,
                 **kwargs):
        super().__init__(**kwargs)
        self.generator = generator
        self.discriminator = discriminator
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.trackers = {name: keras.metrics.Mean(name=name) for name in self.loss_names}
        self.g_optimizer: keras.optimizers.Optimizer | None = None
        self.d_optimizer: keras.optimizers.Optimizer | None = None
        self.built = True  # the two networks are built functional models

    def compile(self, g_optimizer: keras.optimizers.Optimizer, d_optimizer: keras.optimizers.Optimizer, **kwargs):
        # No `optimizer` for keras.Model itself: each network has its own, built now so that a
        # backup can be loaded into them before the first step.
        super().compile(optimizer=None, **kwargs)
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        g_optimizer.build(self.generator.trainable_variables)
        d_optimizer.build(self.discriminator.trainable_variables)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def track(self, **values) -> dict:
        for name, value in values.items():
            self.trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def call(self, inputs, training=False):
        return self.generator(inputs, training=training)

    def noise_seed(self):
        """Stateless seed pair for this step's random draws: (seed, generator step).

        Derived from the generator optimizer's step counter, which the backup saves, so a resumed
        run continues the noise stream where the killed one stopped instead of replaying it.
        """
        import tensorflow as tf

        return tf.stack([tf.constant(self.seed, tf.int64), tf.cast(self.g_optimizer.iterations, tf.int64)])

    def apply(self, optimizer, tape, loss, network: keras.Model) -> None:
        variables = network.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))


# ------------------------------------------------------------------------------ using generators

def render(generator: keras.Model, inputs: np.ndarray | Sequence[np.ndarray], *,
           batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Run a generator in inference mode: inputs -> (images uint8 (N, S, S, 3), labels uint8 (N, S, S)).

    `inputs`: one array, or a list of arrays of one length for a generator with several inputs
    (pix2pix: layout and appearance)."""
    several = isinstance(inputs, (list, tuple))
    count = len(inputs[0]) if several else len(inputs)
    images, labels = [], []
    for start in range(0, count, batch_size):
        batch = [x[start:start + batch_size] for x in inputs] if several else inputs[start:start + batch_size]
        image, probabilities = generator(batch, training=False)
        images.append(from_gan_range(ops.convert_to_numpy(image)))
        labels.append(probabilities_to_labels(ops.convert_to_numpy(probabilities)))
    if not images:
        raise ValueError("render: no inputs")
    return np.concatenate(images), np.concatenate(labels)


def save_sample_grid(path: str | Path, images: np.ndarray, labels: np.ndarray, *, pairs_per_row: int = 4,
                     zoom: int = 2, gap: int = 2) -> Path:
    """Write a PNG grid of (image | colourised label) pairs, `pairs_per_row` pairs a row, atomically.

    Tiles are enlarged `zoom` times (nearest, so pixels stay visible at GAN sizes); labels use the
    evaluation palette (background black, ignore grey).
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] != 3 or labels.shape != images.shape[:3]:
        raise ValueError(f"expected images (N, H, W, 3) and labels (N, H, W), got {images.shape} and {labels.shape}")
    count, height, width = labels.shape
    if count == 0:
        raise ValueError("save_sample_grid: no samples")
    rows = -(-count // pairs_per_row)
    tile_h, tile_w = height * zoom, width * zoom
    pair_w = 2 * tile_w + gap
    canvas = np.full((rows * (tile_h + gap) + gap, pairs_per_row * (pair_w + 2 * gap) + gap, 3), 255, np.uint8)
    for index in range(count):
        top = gap + (index // pairs_per_row) * (tile_h + gap)
        left = gap + (index % pairs_per_row) * (pair_w + 2 * gap)
        image = np.repeat(np.repeat(images[index], zoom, 0), zoom, 1)
        label = np.repeat(np.repeat(colorize(labels[index]), zoom, 0), zoom, 1)
        canvas[top:top + tile_h, left:left + tile_w] = image
        canvas[top:top + tile_h, left + tile_w + gap:left + pair_w] = label
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return path


def describe_labels(labels: np.ndarray, classes: Sequence[str]) -> dict:
    """Share of pixels per class name (and ignore) over a batch of label maps; for logs/reports."""
    counts = np.bincount(np.asarray(labels).ravel(), minlength=256)
    total = max(int(counts.sum()), 1)
    shares = {name: counts[i] / total for i, name in enumerate(classes) if counts[i]}
    if counts[IGNORE_INDEX]:
        shares["ignore"] = counts[IGNORE_INDEX] / total
    return {k: round(float(v), 4) for k, v in shares.items()}
