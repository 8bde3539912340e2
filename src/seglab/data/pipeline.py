"""tf.data input pipeline: Parquet shards -> batches of (image, label) at the training size.

`make_dataset` streams a split's shard files one row group (64 rows) at a time, so memory holds
only the row groups in flight and the shuffle buffer, never the split. Per element it decodes the
JPEG/PNG payloads with TensorFlow's decoders in a parallel `map`, brings the pair to
`image_size` and calls an optional augmentation hook, then batches and prefetches.

Output: `images` float32 `(B, H, W, 3)`, RGB in [0, 255] (models normalise themselves), and
`labels` int32 `(B, H, W)` with 0 background, 1..C-1 the classes and 255 ignore.

Fitting to the size (`mode`):

- `"crop"` (training default): scale so the image covers the target (times a random factor from
  `scale_range`, default none), then a random crop; where the scaled image is smaller than the
  target (only with a factor < 1) it lands at a random place, padded with 0 (image) / 255 (label).
- `"letterbox"` (evaluation default): scale so the longer side fits the target, keep the aspect
  ratio, pad evenly on both sides: image 0, label 255, so padding never counts in a metric.

`stored_pairs` yields a split's pairs at their stored size instead, unbatched and in order: what the
full-resolution evaluation (`seglab.evaluate.sliding`) scores.

Images are resampled bilinearly (antialiased when shrinking), labels always nearest-neighbour so
classes never mix. Both use half-pixel centres, so image and label stay aligned.

Randomness and determinism: every element gets its own stateless seed pair, drawn from
`tf.data.Dataset.random(seed)`; the random crop and the `augment(image, label, seed)` hook derive
from it (use `tf.image.stateless_*` / `tf.random.stateless_*` ops in the hook). With a fixed `seed`
and `deterministic=True`, two datasets built alike yield identical batches; successive epochs of one
dataset still differ (new shuffle order, new crops), reproducibly. `deterministic=False` lets
parallel stages emit elements out of order for speed, so the order, and which seed meets which
image, can change from run to run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import tensorflow as tf

from seglab.data.classes import IGNORE_INDEX
from seglab.data.payloads import jpeg_problem, png_problem
from seglab.data.shards import open_shard, read_classes, shard_files

log = logging.getLogger(__name__)

Mode = Literal["crop", "letterbox"]
ShardDirs = str | Path | Sequence[str | Path]
AugmentFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]

_REQUIRED_COLUMNS = ("image_id", "image", "label")


@dataclass(frozen=True)
class _RowGroup:
    path: str
    index: int
    first_row: int  # row number of the group's first row within its file, for error messages
    rows: int


@dataclass(frozen=True)
class _SplitIndex:
    files: list[Path]
    classes: list[str]
    row_groups: list[_RowGroup]

    @property
    def rows(self) -> int:
        return sum(g.rows for g in self.row_groups)


def _shard_dirs(shard_dir: ShardDirs) -> list[Path]:
    dirs = [Path(shard_dir)] if isinstance(shard_dir, (str, Path)) else [Path(d) for d in shard_dir]
    if not dirs:
        raise ValueError("shard_dir: expected a folder or a non-empty list of folders")
    return dirs


def _index_split(shard_dir: ShardDirs, split: str) -> _SplitIndex:
    """List a split's files and row groups from their footers; check they agree on the classes."""
    # FileNotFoundError naming the folder when one has no shards, ShardIntegrityError naming the file
    # when a split does not match its manifest
    files = [f for d in _shard_dirs(shard_dir) for f in shard_files(d, split)]
    classes: list[str] | None = None
    groups: list[_RowGroup] = []
    for path in files:
        try:
            meta = open_shard(path).metadata
        except (OSError, ValueError) as e:  # pyarrow: ArrowInvalid (a ValueError) or an OSError
            raise ValueError(f"{path}: not a readable Parquet file: {e}") from None
        file_classes = read_classes(path)
        if classes is None:
            classes = file_classes
        elif file_classes != classes:
            raise ValueError(
                f"{path}: class list {file_classes} differs from {files[0]}'s {classes}; "
                f"all shards of split '{split}' must share one class list"
            )
        missing = [c for c in _REQUIRED_COLUMNS if c not in meta.schema.names]
        if missing:
            raise ValueError(f"{path}: shard lacks column(s) {missing}; expected seglab.data.shards.SHARD_SCHEMA")
        first = 0
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            if n:
                groups.append(_RowGroup(str(path), i, first, n))
            first += n
    assert classes is not None  # shard_files never returns an empty list
    return _SplitIndex(files, classes, groups)


def classes_of(shard_dir: ShardDirs, split: str) -> list[str]:
    """Class names indexed by label value, checked to be the same in every shard of the split."""
    return _index_split(shard_dir, split).classes


def num_classes_of(shard_dir: ShardDirs, split: str) -> int:
    """Number of label values other than ignore (background included)."""
    return len(classes_of(shard_dir, split))


def _read_row_group(path: bytes, index: np.int64, first_row: np.int64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row group -> (JPEG bytes, PNG bytes, record description) as object arrays.

    A payload TF's decoders would reject raises here, naming the file and row: their own errors
    name neither. (Changes after writing are caught earlier by the manifest; this catches rows
    that were written corrupt.)
    """
    path_str = path.decode()
    table = open_shard(path_str).read_row_group(int(index), columns=list(_REQUIRED_COLUMNS))
    ids = table.column("image_id").to_pylist()
    records = np.array(
        [f"{path_str} row {int(first_row) + i} (image_id {image_id})" for i, image_id in enumerate(ids)], dtype=object
    )
    images = table.column("image").to_numpy(zero_copy_only=False)
    labels = table.column("label").to_numpy(zero_copy_only=False)
    for record, image, label in zip(records, images, labels):
        for what, problem in (("image JPEG", jpeg_problem(image)), ("label PNG", png_problem(label))):
            if problem:
                raise ValueError(f"{record}: {what} is corrupt: {problem}; rebuild the shards (`dvc repro shard`)")
    return images, labels, records


def _decode(jpeg: tf.Tensor, png: tf.Tensor, record: tf.Tensor, num_classes: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Encoded payloads (checked by `_read_row_group`) -> (uint8 (H, W, 3), uint8 (H, W)); a size or
    class mismatch fails naming the record."""
    image = tf.io.decode_jpeg(jpeg, channels=3)
    label = tf.io.decode_png(png, channels=1, dtype=tf.uint8)[..., 0]
    same_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.shape(label)))
    # Values other than ignore must index the shard's class list (catches a mixed-up mapping).
    top = tf.reduce_max(tf.where(tf.equal(label, IGNORE_INDEX), tf.zeros_like(label), label))
    checks = [
        tf.debugging.Assert(same_size, ["image and label sizes differ:", record, tf.shape(image), tf.shape(label)]),
        tf.debugging.Assert(
            tf.less(tf.cast(top, tf.int32), num_classes),
            ["label value", top, f"outside 0..{num_classes - 1} (and 255 ignore):", record],
        ),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(image), tf.identity(label)


# The map functions are plain TensorFlow (their Python branches are on static settings), so they are
# traced without AutoGraph: converting them re-parses their source in every process, about a
# second of a stage's start-up.
graph_only = tf.autograph.experimental.do_not_convert


@graph_only
def _read_rows(path: tf.Tensor, group: tf.Tensor, first_row: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`_read_row_group` as a tf.data map function: (JPEG bytes, PNG bytes, record description) vectors."""
    images, labels, records = tf.numpy_function(
        _read_row_group, [path, group, first_row], [tf.string, tf.string, tf.string], name="read_row_group"
    )
    return tuple(tf.ensure_shape(t, [None]) for t in (images, labels, records))


def _resize_pair(image: tf.Tensor, label: tf.Tensor, size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    image = tf.cast(image, tf.float32)
    # Antialiasing changes only a shrink (upscaling gives the same pixels to ~4e-3) and costs about
    # 3x a plain bilinear resize, so it runs only where some axis shrinks.
    shrinks = tf.reduce_any(size < tf.shape(label))
    image = tf.cond(
        shrinks,
        lambda: tf.image.resize(image, size, method="bilinear", antialias=True),
        lambda: tf.image.resize(image, size, method="bilinear"),
    )
    image = tf.clip_by_value(image, 0.0, 255.0)  # float rounding can overshoot 255 by ~1e-5
    label = tf.image.resize(label[..., None], size, method="nearest")[..., 0]
    return image, label


def _pad_pair(image, label, top, left, height, width):
    """Pad to (height, width) with the pair placed at (top, left): image 0, label ignore."""
    shape = tf.shape(label)
    paddings = [[top, height - shape[0] - top], [left, width - shape[1] - left]]
    image = tf.pad(image, paddings + [[0, 0]], constant_values=0.0)
    label = tf.pad(label, paddings, constant_values=IGNORE_INDEX)
    return image, label


def _crop_axis(size: tf.Tensor, target: int, scale: tf.Tensor, seed: tf.Tensor):
    """Along one axis: (source offset, source length, resized length, padding before it).

    Where the scaled image covers the target, a random source window of `target / scale` pixels
    becomes exactly `target`; where it does not (scale jitter < 1), the whole axis is resized and
    placed at a random offset in the target, the rest being padding.
    """
    n = tf.cast(size, tf.float32)
    covers = n * scale >= target - 0.5  # what rounds to the target counts as covering it
    src_len = tf.where(covers, tf.clip_by_value(tf.cast(tf.round(target / scale), tf.int32), 1, size), size)
    out_len = tf.where(covers, target, tf.clip_by_value(tf.cast(tf.round(n * scale), tf.int32), 1, target))
    # One of the two slacks is always 0, so one draw serves whichever applies.
    src_slack, pad_slack = size - src_len, target - out_len
    draw = tf.random.stateless_uniform([], seed, minval=0, maxval=src_slack + pad_slack + 1, dtype=tf.int32)
    return tf.minimum(draw, src_slack), src_len, out_len, tf.minimum(draw, pad_slack)


def fit_to_size(
    image: tf.Tensor,
    label: tf.Tensor,
    image_size: Sequence[int],
    *,
    mode: Mode,
    seed: tf.Tensor | None = None,
    scale_range: tuple[float, float] = (1.0, 1.0),
) -> tuple[tf.Tensor, tf.Tensor]:
    """Bring one (image (H, W, 3), label (H, W)) pair to `image_size` = (height, width).

    Returns float32 image and uint8 label of exactly that size. `mode` is described in the module
    docstring; `"crop"` needs a stateless `seed` (shape [2]) for its offsets and scale factor.
    """
    target_h, target_w = int(image_size[0]), int(image_size[1])
    shape = tf.shape(label)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    if mode == "letterbox":
        scale = tf.minimum(target_h / h, target_w / w)
        new_h = tf.clip_by_value(tf.cast(tf.round(h * scale), tf.int32), 1, target_h)
        new_w = tf.clip_by_value(tf.cast(tf.round(w * scale), tf.int32), 1, target_w)
        image, label = _resize_pair(image, label, tf.stack([new_h, new_w]))
        image, label = _pad_pair(image, label, (target_h - new_h) // 2, (target_w - new_w) // 2, target_h, target_w)
    elif mode == "crop":
        if seed is None:
            raise ValueError("fit_to_size(mode='crop') needs a stateless seed for its random crop")
        scale_seed, y_seed, x_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        scale = tf.maximum(target_h / h, target_w / w)
        low, high = scale_range
        if (low, high) != (1.0, 1.0):
            scale *= tf.random.stateless_uniform([], scale_seed, minval=low, maxval=high)
        # Crop the source window first and resize only it: what resizing the whole image and then
        # cropping gives (up to sub-pixel placement), for a fraction of the cost.
        y0, src_h, out_h, top = _crop_axis(shape[0], target_h, scale, y_seed)
        x0, src_w, out_w, left = _crop_axis(shape[1], target_w, scale, x_seed)
        image, label = _resize_pair(image[y0 : y0 + src_h, x0 : x0 + src_w], label[y0 : y0 + src_h, x0 : x0 + src_w],
                                    tf.stack([out_h, out_w]))
        image, label = _pad_pair(image, label, top, left, target_h, target_w)
    else:
        raise ValueError(f"mode must be 'crop' or 'letterbox', got {mode!r}")
    return tf.ensure_shape(image, [target_h, target_w, 3]), tf.ensure_shape(label, [target_h, target_w])


def _apply_augment(augment: AugmentFn, image, label, seed, image_size) -> tuple[tf.Tensor, tf.Tensor]:
    """Call the hook; its outputs must keep the (static) shapes and be convertible to our dtypes."""
    out = augment(image, label, seed)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(f"augment must return (image, label), got {type(out).__name__}")
    new_image, new_label = tf.convert_to_tensor(out[0]), tf.convert_to_tensor(out[1])
    expected = {"image": [*image_size, 3], "label": list(image_size)}
    for name, tensor in (("image", new_image), ("label", new_label)):
        if not tensor.shape.is_compatible_with(expected[name]):
            raise ValueError(f"augment changed the {name} shape to {tensor.shape}; expected {expected[name]}")
    if not (new_label.dtype.is_integer):
        raise TypeError(f"augment returned a {new_label.dtype.name} label; labels must stay integer class indices")
    return (
        tf.ensure_shape(tf.cast(new_image, tf.float32), expected["image"]),
        tf.ensure_shape(tf.cast(new_label, tf.int32), expected["label"]),
    )


def _op_seeds(seed: int | None, n: int) -> list[int | None]:
    """Independent per-op seeds derived from one user seed (None stays None: fresh randomness)."""
    if seed is None:
        return [None] * n
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(n, dtype=np.uint32)]


def make_dataset(
    shard_dir: ShardDirs,
    split: str,
    *,
    image_size: Sequence[int] = (256, 256),
    batch_size: int = 8,
    training: bool = False,
    mode: Mode | None = None,
    shuffle: bool | None = None,
    shuffle_buffer: int = 1024,
    scale_range: tuple[float, float] = (1.0, 1.0),
    augment: AugmentFn | None = None,
    seed: int | None = None,
    deterministic: bool = False,
    repeat: bool = False,
    drop_remainder: bool | None = None,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    cache: bool | str = False,
) -> tf.data.Dataset:
    """Batches of (images float32 (B, H, W, 3) in [0, 255], labels int32 (B, H, W)) from shards.

    Args:
        shard_dir, split: reads `<shard_dir>/<split>/part-*.parquet`; `shard_dir` may be a list of
            folders (e.g. real and synthetic shards) read as one split with one class list.
        image_size: (height, width) of every output element.
        training: sets the defaults below for training (shuffle, random crop, full batches).
        mode: "crop" | "letterbox" (module docstring); default "crop" when training, else "letterbox".
        shuffle: shuffle row groups, then elements through a `shuffle_buffer`; default `training`.
        scale_range: random scale factor on top of the covering scale, "crop" mode only.
        augment: `augment(image, label, seed) -> (image, label)` on one element at `image_size`:
            image float32 (H, W, 3), label int32 (H, W), seed int64 [2] for stateless ops. It must
            keep the shapes; results are cast back to float32 / int32.
        seed: makes shuffling, crops and augmentation seeds reproducible (None: fresh each run).
        deterministic: emit elements in a fixed order despite parallelism (needed, with `seed`,
            for reproducible batches); False lets parallel stages reorder for throughput.
        repeat: repeat indefinitely (each pass reshuffled and re-cropped).
        drop_remainder: drop a last partial batch; default `training` (static batch dimension).
        num_parallel_calls: parallelism of row-group reading and of decode/resize/augment.
        cache: True caches decoded pairs in memory (a str: in files with that prefix), before
            shuffling, cropping and augmentation; only for splits that fit.
    """
    image_size = tuple(int(s) for s in image_size)
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be (height, width) with positive sides, got {image_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
    mode = mode or ("crop" if training else "letterbox")
    if mode not in ("crop", "letterbox"):
        raise ValueError(f"mode must be 'crop' or 'letterbox', got {mode!r}")
    low, high = (float(v) for v in scale_range)
    if not 0 < low <= high:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
    if (low, high) != (1.0, 1.0) and mode != "crop":
        raise ValueError("scale_range applies to mode='crop' only")
    shuffle = training if shuffle is None else shuffle
    drop_remainder = training if drop_remainder is None else drop_remainder

    index = _index_split(shard_dir, split)
    if not index.row_groups:
        raise ValueError(f"split '{split}' of {[str(d) for d in _shard_dirs(shard_dir)]}: shards hold no rows")
    num_classes = len(index.classes)
    group_seed, element_seed, random_seed = _op_seeds(seed, 3)
    log.info("%s/%s: %d images in %d files, %d classes, %s mode at %s", shard_dir, split, index.rows,
             len(index.files), num_classes, mode, image_size)

    groups = tf.data.Dataset.from_tensor_slices(
        (
            [g.path for g in index.row_groups],
            np.array([g.index for g in index.row_groups], np.int64),
            np.array([g.first_row for g in index.row_groups], np.int64),
        )
    )
    if shuffle:
        groups = groups.shuffle(len(index.row_groups), seed=group_seed, reshuffle_each_iteration=True)

    ds = groups.map(_read_rows, num_parallel_calls=num_parallel_calls, deterministic=deterministic).unbatch()

    decoded = cache is not False
    if decoded:
        ds = ds.map(
            graph_only(lambda jpeg, png, record: (*_decode(jpeg, png, record, num_classes), record)),
            num_parallel_calls=num_parallel_calls,
            deterministic=deterministic,
        )
        ds = ds.cache("" if cache is True else str(cache))
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=element_seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    # One seed pair per element, from a stream that continues across epochs.
    seeds = tf.data.Dataset.random(seed=random_seed, rerandomize_each_iteration=True).batch(2)
    ds = tf.data.Dataset.zip(ds, seeds)

    @graph_only
    def prepare(element, element_seed_pair):
        if decoded:
            image, label, _ = element
        else:
            image, label = _decode(*element, num_classes)
        fit_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(element_seed_pair, 2))
        image, label = fit_to_size(image, label, image_size, mode=mode, seed=fit_seed, scale_range=(low, high))
        label = tf.cast(label, tf.int32)
        if augment is not None:
            image, label = _apply_augment(augment, image, label, augment_seed, image_size)
        return image, label

    ds = ds.map(prepare, num_parallel_calls=num_parallel_calls, deterministic=deterministic)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(deterministic))


def stored_pairs(shard_dir: ShardDirs, split: str, *, num_parallel_calls: int = tf.data.AUTOTUNE) -> tf.data.Dataset:
    """A split's pairs at their stored size, in shard order: (image uint8 (H, W, 3), label uint8 (H, W)).

    No resizing, padding, batching or randomness: what full-resolution evaluation scores
    (`seglab.evaluate.sliding`). Payloads are checked and decoded as `make_dataset` does.
    """
    index = _index_split(shard_dir, split)
    if not index.row_groups:
        raise ValueError(f"split '{split}' of {[str(d) for d in _shard_dirs(shard_dir)]}: shards hold no rows")
    num_classes = len(index.classes)
    log.info("%s/%s: %d images in %d files, %d classes, at their stored size", shard_dir, split, index.rows,
             len(index.files), num_classes)
    groups = tf.data.Dataset.from_tensor_slices(
        (
            [g.path for g in index.row_groups],
            np.array([g.index for g in index.row_groups], np.int64),
            np.array([g.first_row for g in index.row_groups], np.int64),
        )
    )
    ds = groups.map(_read_rows, num_parallel_calls=num_parallel_calls, deterministic=True).unbatch()
    ds = ds.map(graph_only(lambda jpeg, png, record: _decode(jpeg, png, record, num_classes)),
                num_parallel_calls=num_parallel_calls, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(deterministic=True))


def _options(deterministic: bool) -> tf.data.Options:
    """The pipelines' options: element order as asked, and no autotuning thread.

    tf.data's autotuner re-optimises in a background thread whose sleep doubles up to 60 s, and an
    iterator's destructor waits for that sleep to end (TensorFlow 2.21): at the end of a training's
    `fit` this held some stages for up to a minute (benchmarks/README.md, "The stall after fit").
    Without it, AUTOTUNE parallelism is the number of cores and prefetch buffers grow on demand.
    """
    options = tf.data.Options()
    options.deterministic = deterministic
    options.autotune.enabled = False
    return options
