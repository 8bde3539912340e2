"""tf.data pipeline: shapes, label values, padding, image/label alignment, determinism, streaming."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from seglab.data.classes import ClassSet
from seglab.data.coco import LabelRules, encode_png
from seglab.data.pipeline import classes_of, fit_to_size, make_dataset, num_classes_of, stored_pairs
from seglab.data.shards import shard_files, shard_metadata, write_manifest, write_shards
from seglab.data.shard_stage import build_shards

COCO_MINI = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "coco-mini").resolve()
requires_coco_mini = pytest.mark.skipif(
    not (COCO_MINI / "annotations" / "instances_val2017.json").is_file(),
    reason=f"real COCO subset not found at {COCO_MINI}",
)

CLASSES = ("background", "cat", "dog", "car")
# Far-apart colours so that JPEG error never makes one class's colour look like another's.
PALETTE = np.array([[0, 0, 0], [230, 30, 30], [30, 220, 40], [40, 60, 230]], np.uint8)


def jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def row(image_id: int, image: np.ndarray, label: np.ndarray, split: str = "train", image_bytes: bytes | None = None):
    h, w = label.shape
    counts = np.bincount(label.ravel(), minlength=256)
    return {
        "image_id": image_id, "file_name": f"{image_id:06d}.jpg", "split": split, "source": "synthetic-test",
        "height": h, "width": w, "orig_height": h, "orig_width": w,
        "image": jpeg(image) if image_bytes is None else image_bytes, "label": encode_png(label),
        "class_pixels": [int(c) for c in counts[: len(CLASSES)]], "ignore_pixels": int(counts[255]),
    }


def write_split(shard_dir: Path, rows: list[dict], split: str = "train", classes=CLASSES, max_shard_mb: float = 16.0):
    class_set = ClassSet("custom", tuple(classes), tuple(range(len(classes))))
    return write_shards(rows, shard_dir / split, shard_metadata(class_set, split, LabelRules()), max_shard_mb)


def blocks_label(h: int, w: int, rng: np.random.Generator, block: int = 16) -> np.ndarray:
    """Random class per block, with some ignore blocks: a label whose every region is easy to find."""
    grid = rng.choice([0, 1, 2, 3, 255], size=(-(-h // block), -(-w // block)), p=[0.3, 0.2, 0.2, 0.2, 0.1])
    return np.kron(grid, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)


def coloured(label: np.ndarray) -> np.ndarray:
    """The image whose colour encodes the label (ignore drawn white)."""
    image = np.full((*label.shape, 3), 255, np.uint8)
    known = label != 255
    image[known] = PALETTE[label[known]]
    return image


@pytest.fixture
def colour_shards(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i, (h, w) in enumerate([(64, 96), (96, 64), (50, 70), (120, 120), (40, 200), (64, 64)]):
        label = blocks_label(h, w, rng)
        rows.append(row(i, coloured(label), label))
    write_split(tmp_path, rows)
    return tmp_path


def as_numpy(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


def assert_aligned(images: np.ndarray, labels: np.ndarray) -> int:
    """Every label pixel whose 5x5 neighbourhood is one class shows that class's colour; returns count.

    Two pixels from any class edge the resampling kernels (at most 1.8 px wide here) no longer mix
    colours, so a colour mismatch there means the label moved against the image.
    """
    checked = 0
    for image, label in zip(images, labels):
        padded = np.pad(label, 2, constant_values=-1)  # pixels at the crop border are never interior
        window = np.stack([padded[dy : dy + label.shape[0], dx : dx + label.shape[1]] for dy in range(5) for dx in range(5)])
        interior = (window == label).all(axis=0) & (label != 255)
        colours = image[interior]
        expected = PALETTE[label[interior]].astype(np.float32)
        assert np.abs(colours - expected).max() < 40, "image and label are misaligned"
        checked += int(interior.sum())
    return checked


def test_shapes_dtypes_and_label_values(colour_shards):
    for training in (True, False):
        ds = make_dataset(colour_shards, "train", image_size=(48, 40), batch_size=4, training=training, seed=0)
        batches = as_numpy(ds)
        assert ds.element_spec[0].dtype == tf.float32 and ds.element_spec[1].dtype == tf.int32
        sizes = [len(x) for x, _ in batches]
        # training drops the partial batch so the batch dimension is static
        assert sizes == ([4] if training else [4, 2])
        for x, y in batches:
            assert x.shape[1:] == (48, 40, 3) and y.shape[1:] == (48, 40)
            assert x.min() >= 0.0 and x.max() <= 255.0
            assert set(np.unique(y)) <= {0, 1, 2, 3, 255}
    assert classes_of(colour_shards, "train") == list(CLASSES)
    assert num_classes_of(colour_shards, "train") == 4


def test_crop_and_letterbox_keep_image_and_label_aligned(colour_shards):
    for kwargs in (
        dict(training=True),
        dict(training=True, scale_range=(0.5, 1.8)),
        dict(training=False),
        dict(training=False, image_size=(37, 91)),
    ):
        kwargs.setdefault("image_size", (56, 56))
        for x, y in as_numpy(make_dataset(colour_shards, "train", batch_size=3, seed=3, **kwargs)):
            assert assert_aligned(x, y) > 0.05 * y.size, kwargs  # plenty of pixels were checked


def test_letterbox_pads_label_with_ignore_and_image_with_zero(tmp_path):
    label = np.ones((40, 80), np.uint8)  # wide image, no ignore pixels of its own
    write_split(tmp_path, [row(0, coloured(label), label)])
    (x, y), = as_numpy(make_dataset(tmp_path, "train", image_size=(64, 64)))
    # 40x80 -> 32x64, centred: rows 0..15 and 48..63 are padding
    assert (y[0, :16] == 255).all() and (y[0, 48:] == 255).all()
    assert (x[0, :16] == 0).all() and (x[0, 48:] == 0).all()
    assert (y[0, 16:48] == 1).all()


def test_crop_covers_target_and_scale_jitter_pads_with_ignore():
    label = tf.constant(np.arange(64 * 64).reshape(64, 64) % 3, tf.uint8)
    image = tf.cast(tf.stack([label * 50] * 3, axis=-1), tf.uint8)
    seed = tf.constant([1, 2], tf.int64)
    # same size as the target: the crop is the identity
    out_image, out_label = fit_to_size(image, label, (64, 64), mode="crop", seed=seed)
    np.testing.assert_array_equal(out_label.numpy(), label.numpy())
    np.testing.assert_allclose(out_image.numpy(), image.numpy().astype(np.float32), atol=1e-3)
    # a factor 0.5 shrinks it to 32x32: the rest is padding (label 255, image 0)
    out_image, out_label = fit_to_size(image, label, (64, 64), mode="crop", seed=seed, scale_range=(0.5, 0.5))
    valid = out_label.numpy() != 255
    rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
    assert valid.sum() == 32 * 32 and len(rows) == len(cols) == 32  # one 32x32 block, placed at random
    assert (out_image.numpy()[~valid] == 0).all()
    placements = set()
    for k in range(8):
        _, jittered = fit_to_size(image, label, (64, 64), mode="crop", seed=tf.constant([k, 0], tf.int64),
                                  scale_range=(0.5, 0.5))
        placements.add(tuple(np.argwhere(jittered.numpy() != 255)[0]))
    assert len(placements) > 1
    with pytest.raises(ValueError, match="seed"):
        fit_to_size(image, label, (64, 64), mode="crop")


def test_deterministic_with_same_seed_and_different_with_another(colour_shards):
    def run(seed):
        ds = make_dataset(colour_shards, "train", image_size=(32, 32), batch_size=2, training=True, seed=seed,
                          deterministic=True, scale_range=(0.7, 1.3), shuffle_buffer=8)
        return as_numpy(ds) + as_numpy(ds)  # two epochs

    first, again, other = run(7), run(7), run(8)
    for (xa, ya), (xb, yb) in zip(first, again):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(first, other))
    # successive epochs of one dataset are reshuffled / re-cropped
    n = len(first) // 2
    assert any(not np.array_equal(first[i][0], first[n + i][0]) for i in range(n))


def test_pipelines_run_without_tf_data_s_autotuning_thread(colour_shards):
    # Its sleep (up to 60 s) held the training iterator's destructor after fit (benchmarks/README.md).
    for ds in (make_dataset(colour_shards, "train", image_size=(32, 32), batch_size=2, training=True, seed=0,
                            deterministic=True),
               make_dataset(colour_shards, "train", image_size=(32, 32), batch_size=2),
               stored_pairs(colour_shards, "train")):
        assert ds.options().autotune.enabled is False
        assert len(as_numpy(ds.take(1))) == 1


def test_augment_hook_is_called_with_a_seed_and_its_output_used(colour_shards):
    seen_seed_shapes = []

    def augment(image, label, seed):
        seen_seed_shapes.append(seed.shape)
        flip = tf.random.stateless_uniform([], seed) < 0.5
        image = tf.where(flip, tf.reverse(image, [1]), image)
        label = tf.where(flip, tf.reverse(label, [1]), label)
        return image * 0.5, label  # the halving shows the output is used

    def run(fn):
        return as_numpy(make_dataset(colour_shards, "train", image_size=(40, 40), batch_size=6, seed=5,
                                     deterministic=True, augment=fn))

    (plain_x, plain_y), = run(None)
    (aug_x, aug_y), = run(augment)
    assert seen_seed_shapes and all(s == (2,) for s in seen_seed_shapes)
    flipped = [not np.array_equal(a, p) for a, p in zip(aug_y, plain_y)]
    assert any(flipped) and not all(flipped)  # a seeded coin per element
    for i, was_flipped in enumerate(flipped):
        expected_x = plain_x[i][:, ::-1] if was_flipped else plain_x[i]
        expected_y = plain_y[i][:, ::-1] if was_flipped else plain_y[i]
        np.testing.assert_allclose(aug_x[i], expected_x * 0.5, atol=1e-4)
        np.testing.assert_array_equal(aug_y[i], expected_y)

    with pytest.raises(ValueError, match="augment changed the image shape"):
        make_dataset(colour_shards, "train", image_size=(40, 40), augment=lambda im, lb, s: (im[:20], lb))
    with pytest.raises(TypeError, match="label"):
        make_dataset(colour_shards, "train", image_size=(40, 40), augment=lambda im, lb, s: (im, tf.cast(lb, tf.float32)))


def id_image(i: int) -> np.ndarray:
    """A flat 16x16 image whose colour spells the id (survives JPEG and any resize)."""
    return np.broadcast_to(np.array([(i % 16) * 16, (i // 16) * 16, 128], np.uint8), (16, 16, 3)).copy()


def decode_ids(images: np.ndarray) -> list[int]:
    centre = images[:, 8, 8]
    return [int(round(r / 16)) + 16 * int(round(g / 16)) for r, g, _ in centre]


def test_streams_many_files_and_row_groups_in_order_or_shuffled(tmp_path):
    n = 150
    rows = [row(i, id_image(i), np.full((16, 16), i % 4, np.uint8)) for i in range(n)]
    row_bytes = np.mean([len(r["image"]) + len(r["label"]) for r in rows])
    files = write_split(tmp_path, rows, max_shard_mb=70 * row_bytes / 2**20)  # ~70 rows a file: 2 row groups each
    assert len(files) >= 3 and max(f["rows"] for f in files) > 64
    assert len(shard_files(tmp_path, "train")) == len(files)

    ordered = [x for x, _ in as_numpy(make_dataset(tmp_path, "train", image_size=(16, 16), batch_size=32,
                                                   deterministic=True))]
    ids = decode_ids(np.concatenate(ordered))
    assert ids == list(range(n))  # evaluation keeps shard order

    ds = make_dataset(tmp_path, "train", image_size=(16, 16), batch_size=32, training=True, drop_remainder=False, seed=1)
    for _ in range(2):
        shuffled = decode_ids(np.concatenate([x for x, _ in as_numpy(ds)]))
        assert sorted(shuffled) == list(range(n)) and shuffled != list(range(n))

    repeated = make_dataset(tmp_path, "train", image_size=(16, 16), batch_size=32, training=True, repeat=True, seed=1)
    assert len(as_numpy(repeated.take(12))) == 12  # 384 elements > 2 epochs


def test_reads_several_shard_folders_as_one_split(tmp_path):
    real, synthetic = tmp_path / "real", tmp_path / "synthetic"
    write_split(real, [row(i, id_image(i), np.full((16, 16), 1, np.uint8)) for i in range(5)])
    write_split(synthetic, [row(i, id_image(i), np.full((16, 16), 2, np.uint8)) for i in range(5, 12)])
    batches = as_numpy(make_dataset([real, synthetic], "train", image_size=(16, 16), batch_size=4, deterministic=True))
    assert decode_ids(np.concatenate([x for x, _ in batches])) == list(range(12))
    assert classes_of([real, synthetic], "train") == list(CLASSES)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_dataset([real, tmp_path / "nowhere"], "train")


def test_cache_gives_the_same_batches(colour_shards, tmp_path):
    kwargs = dict(image_size=(32, 32), batch_size=3, training=True, seed=2, deterministic=True)
    plain = as_numpy(make_dataset(colour_shards, "train", **kwargs))
    for cache in (True, str(tmp_path / "cache")):
        ds = make_dataset(colour_shards, "train", cache=cache, **kwargs)
        cached = as_numpy(ds)
        assert len(cached) == len(plain)
        for (xa, ya), (xb, yb) in zip(plain, cached):
            np.testing.assert_array_equal(ya, yb)
            np.testing.assert_allclose(xa, xb, atol=1e-4)
        assert len(as_numpy(ds)) == len(plain)  # second epoch served from the cache


def test_errors_name_the_problem(tmp_path, colour_shards):
    with pytest.raises(FileNotFoundError, match="no shards"):
        make_dataset(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="mode"):
        make_dataset(colour_shards, "train", mode="stretch")
    with pytest.raises(ValueError, match="image_size"):
        make_dataset(colour_shards, "train", image_size=(0, 32))
    with pytest.raises(ValueError, match="scale_range"):
        make_dataset(colour_shards, "train", scale_range=(0.5, 2.0))  # evaluation letterboxes

    # a second file with another class list
    label = np.zeros((8, 8), np.uint8)
    mixed = tmp_path / "mixed"
    write_split(mixed, [row(0, coloured(label), label)])
    other = mixed / "other"
    write_split(other, [row(1, coloured(label), label)], classes=("background", "cat"))
    (other / "train" / "part-00000.parquet").rename(mixed / "train" / "part-00001.parquet")
    write_manifest(mixed / "train")  # as if written so: the manifest vouches for what is there
    with pytest.raises(ValueError, match=r"part-00001.parquet: class list .* differs"):
        make_dataset(mixed, "train")
    with pytest.raises(ValueError, match="differs"):
        classes_of(mixed, "train")

    # payloads that are not what the schema promises fail naming the row
    bad = tmp_path / "bad"
    write_split(bad, [row(0, coloured(label), label), row(41, coloured(label), label, image_bytes=b"not a jpeg")])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"row 1 \(image_id 41\): image JPEG is corrupt: not a"):
        as_numpy(make_dataset(bad, "train", image_size=(8, 8)))

    out_of_range = tmp_path / "range"
    write_split(out_of_range, [row(7, coloured(label), np.full((8, 8), 9, np.uint8))])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"label value.*outside 0..3.*image_id 7"):
        as_numpy(make_dataset(out_of_range, "train", image_size=(8, 8)))


@pytest.mark.coco_mini
@requires_coco_mini
def test_coco_mini_shards_read_at_training_and_evaluation_size(tmp_path):
    report = build_shards(COCO_MINI, tmp_path / "shards", splits={"val": "val2017"}, class_set="voc20")
    images = report["splits"]["val"]["images"]
    num_classes = num_classes_of(tmp_path / "shards", "val")
    assert num_classes == 21

    evaluation = as_numpy(make_dataset(tmp_path / "shards", "val", image_size=(256, 256), batch_size=16))
    assert sum(len(x) for x, _ in evaluation) == images
    values = set(np.unique(np.concatenate([y for _, y in evaluation])))
    assert values <= set(range(num_classes)) | {255} and len(values - {0, 255}) >= 5
    # COCO images are not square, so letterboxing pads every one of them with ignore
    assert all((y == 255).any() for _, ys in evaluation for y in ys)

    training = make_dataset(tmp_path / "shards", "val", image_size=(256, 256), batch_size=16, training=True, seed=0)
    x, y = next(iter(training))
    assert x.shape == (16, 256, 256, 3) and y.shape == (16, 256, 256)
    assert 0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 255
    assert set(np.unique(y.numpy())) <= set(range(num_classes)) | {255}
