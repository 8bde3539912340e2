"""Training augmentation: image and label share one geometry, labels stay labels, colour leaves labels alone."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from seglab.config import AugmentConfig
from seglab.data.augment import Augmentation

# Far-apart colours: each class is recognisable from the image alone.
PALETTE = np.array([[20, 20, 20], [230, 30, 30], [30, 220, 40], [40, 60, 230], [240, 240, 60]], np.float32)
GEOMETRY_ONLY = dict(brightness=0.0, contrast=0.0, saturation=0.0)
COLOUR_ONLY = dict(rotate_deg=0.0, scale=(1.0, 1.0), hflip=False, vflip=False)


def blocks(height: int = 48, width: int = 64, block: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A label of random class blocks (no ignore) and the image whose colour encodes it."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, len(PALETTE), size=(-(-height // block), -(-width // block)))
    label = np.kron(grid, np.ones((block, block), np.int64))[:height, :width].astype(np.int32)
    return PALETTE[label], label


def run(augmentation: Augmentation, image, label, seed) -> tuple[np.ndarray, np.ndarray]:
    out_image, out_label = augmentation(tf.constant(image), tf.constant(label), tf.constant(seed, tf.int64))
    return out_image.numpy(), out_label.numpy()


def uniform_interior(label: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood holds one label value: there bilinear = the region's colour."""
    h, w = label.shape
    padded = np.pad(label, radius, mode="edge")
    same = np.ones_like(label, bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            same &= padded[radius + dy: radius + dy + h, radius + dx: radius + dx + w] == label
    same[:radius], same[-radius:], same[:, :radius], same[:, -radius:] = False, False, False, False
    return same


@pytest.mark.parametrize("seed", [(0, 1), (7, 3), (123, 456), (5, 99)])
def test_geometry_keeps_image_and_label_aligned(seed):
    image, label = blocks()
    augmentation = Augmentation(rotate_deg=30, scale=(0.7, 1.3), hflip=True, vflip=True, **GEOMETRY_ONLY)
    out_image, out_label = run(augmentation, image, label, seed)

    assert out_image.shape == image.shape and out_label.shape == label.shape
    assert out_label.dtype == np.int32
    assert set(np.unique(out_label)) <= set(np.unique(label)) | {255}
    interior = uniform_interior(out_label)
    classes = interior & (out_label != 255)
    fill = interior & (out_label == 255)
    assert classes.sum() > 100  # the check below covers a real share of the image
    # Inside a region the image shows that region's colour: the label moved with the image.
    np.testing.assert_allclose(out_image[classes], PALETTE[out_label[classes]], atol=0.05)
    # Where the label says "came from outside", the image holds the fill value 0.
    np.testing.assert_allclose(out_image[fill], 0.0, atol=0.05)


@pytest.mark.parametrize("axis", [0, 1])
def test_alignment_is_sub_pixel(axis):
    """Coordinates as data: the image's bilinear sample of a ramp is the exact source coordinate, the
    label's nearest sample its rounding, so they agree to 0.5 px wherever both come from inside."""
    height, width = 40, 56
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = (yy, xx)[axis].astype(np.float32)
    image = np.stack([ramp, ramp, ramp], axis=-1)
    label = ramp.astype(np.int32)
    augmentation = Augmentation(rotate_deg=40, scale=(0.6, 1.6), hflip=True, vflip=True, **GEOMETRY_ONLY)
    for seed in range(6):
        out_image, out_label = run(augmentation, image, label, (seed, 17))
        inside = out_label != 255
        # Stay one pixel away from the outside, where bilinear blends in the fill value.
        padded = np.pad(inside, 1, constant_values=False)
        away = np.ones_like(inside)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                away &= padded[1 + dy: 1 + dy + height, 1 + dx: 1 + dx + width]
        assert away.sum() > 0.2 * away.size
        np.testing.assert_array_less(np.abs(out_image[..., 0][away] - out_label[away]), 0.5 + 1e-3)


def test_flip_is_exact_mirror_and_both_outcomes_occur():
    image, label = blocks()
    augmentation = Augmentation(rotate_deg=0, scale=(1.0, 1.0), hflip=True, vflip=False, **GEOMETRY_ONLY)
    outcomes = set()
    for s in range(12):
        out_image, out_label = run(augmentation, image, label, (s, 0))
        if np.array_equal(out_label, label):
            np.testing.assert_array_equal(out_image, image)
            outcomes.add("identity")
        else:
            # Exact at the pixel centres: no resampling blur, no off-by-one shift.
            np.testing.assert_array_equal(out_label, label[:, ::-1])
            np.testing.assert_array_equal(out_image, image[:, ::-1])
            outcomes.add("mirror")
    assert outcomes == {"identity", "mirror"}


def test_shrinking_pads_with_ignore_and_zoom_crops():
    image, label = blocks(64, 64)
    shrink = Augmentation(rotate_deg=0, scale=(0.5, 0.5), hflip=False, vflip=False, **GEOMETRY_ONLY)
    _, out_label = run(shrink, image, label, (1, 2))
    # Content shrinks to half of each side: about 3/4 of the output comes from outside (ignore).
    assert abs((out_label == 255).mean() - 0.75) < 0.05
    zoom = Augmentation(rotate_deg=0, scale=(2.0, 2.0), hflip=False, vflip=False, **GEOMETRY_ONLY)
    _, out_label = run(zoom, image, label, (1, 2))
    assert not (out_label == 255).any()  # a zoom shows a window inside the image: nothing from outside


def test_colour_jitter_changes_image_only():
    image, label = blocks()
    augmentation = Augmentation(brightness=0.3, contrast=0.3, saturation=0.3, **COLOUR_ONLY)
    out_image, out_label = run(augmentation, image, label, (3, 4))
    np.testing.assert_array_equal(out_label, label)
    assert np.abs(out_image - image).max() > 1.0
    assert out_image.min() >= 0.0 and out_image.max() <= 255.0


def test_deterministic_for_a_seed():
    image, label = blocks()
    augmentation = Augmentation(rotate_deg=15, scale=(0.8, 1.2), hflip=True, vflip=True)
    first = run(augmentation, image, label, (11, 12))
    again = run(augmentation, image, label, (11, 12))
    other = run(augmentation, image, label, (11, 13))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    # The same inside a tf.data graph (how make_dataset calls it).
    ds = tf.data.Dataset.from_tensors((image, label)).map(
        lambda i, lab: augmentation(i, lab, tf.constant([11, 12], tf.int64)))
    graph_image, graph_label = next(iter(ds))
    np.testing.assert_allclose(graph_image.numpy(), first[0], atol=1e-3)
    np.testing.assert_array_equal(graph_label.numpy(), first[1])


def test_everything_off_returns_the_pair_unchanged():
    image, label = blocks()
    augmentation = Augmentation(**COLOUR_ONLY, **GEOMETRY_ONLY)
    out_image, out_label = run(augmentation, image, label, (0, 0))
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_label, label)


def test_from_config_uses_params_fields():
    config = AugmentConfig(rotate_deg=10, scale=(0.9, 1.1), hflip=False, vflip=True, brightness=0.1,
                           contrast=0.0, saturation=0.05)
    augmentation = Augmentation.from_config(config)
    assert augmentation == Augmentation(10.0, (0.9, 1.1), False, True, 0.1, 0.0, 0.05)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rotate_deg=200), "rotate_deg"),
    (dict(scale=(1.2, 0.8)), "scale"),
    (dict(scale=(0.0, 1.0)), "scale"),
    (dict(contrast=1.5), "contrast"),
    (dict(brightness=-0.1), "brightness"),
    (dict(hflip="yes"), "hflip"),
])
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Augmentation(**kwargs)


def test_bad_inputs_are_refused():
    augmentation = Augmentation()
    image, label = blocks()
    with pytest.raises(TypeError, match="integer class indices"):
        augmentation(tf.constant(image), tf.constant(label, tf.float32), tf.constant([0, 0], tf.int64))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        augmentation(tf.constant(image), tf.constant(label[None]), tf.constant([0, 0], tf.int64))
