"""TTA transforms: exact inverses, the right geometry, exact merging for equivariant models."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest

from seglab.evaluate.inference import plain_and_tta
from seglab.evaluate.tta import (
    TRANSFORM_NAMES,
    get_transform,
    probability_model,
    select_transforms,
    tta_model,
)

# What each transform must do to a (B, H, W, C) array, written with NumPy independently.
NUMPY_REFERENCE = {
    "identity": lambda x: x,
    "hflip": lambda x: x[:, :, ::-1],
    "vflip": lambda x: x[:, ::-1],
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
}
NUMPY_INVERSE = {
    "identity": lambda x: x,
    "hflip": lambda x: x[:, :, ::-1],
    "vflip": lambda x: x[:, ::-1],
    "rot90": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 1, axes=(1, 2)),
}


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize("name", TRANSFORM_NAMES)
@pytest.mark.parametrize("shape", [(2, 6, 6, 3), (3, 5, 7, 4)])
def test_transform_is_the_stated_permutation_and_inverts_bitwise(name, shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    transform = get_transform(name)
    applied = _numpy(transform.apply(x))
    np.testing.assert_array_equal(applied, NUMPY_REFERENCE[name](x))
    restored = _numpy(transform.invert(applied))
    assert restored.dtype == x.dtype and restored.shape == x.shape
    assert np.array_equal(restored, x)  # bitwise: pure permutations, no resampling


def _pixelwise_model(size=(16, 16), classes=5, seed=0):
    """A 1x1 convolution: every pixel's logits depend on that pixel alone, so it is equivariant."""
    keras.utils.set_random_seed(seed)
    images = keras.Input((*size, 3))
    logits = keras.layers.Conv2D(classes, 1, kernel_initializer=keras.initializers.RandomNormal(stddev=0.05))(images)
    return keras.Model(images, logits)


def _position_dependent_model(size=(16, 16), classes=5, seed=0):
    """A 3x3 convolution without padding symmetry plus a bias that grows to the right: not equivariant."""
    keras.utils.set_random_seed(seed)
    images = keras.Input((*size, 3))
    features = keras.layers.Conv2D(classes, 3, padding="same")(images / 255.0)
    ramp = np.linspace(0.0, 3.0, size[1], dtype=np.float32)[None, None, :, None]
    logits = features + keras.ops.convert_to_tensor(ramp) * np.arange(classes, dtype=np.float32)
    return keras.Model(images, logits)


def _images(size=(16, 16), batch=3, seed=1):
    return np.random.default_rng(seed).uniform(0, 255, (batch, *size, 3)).astype(np.float32)


def test_equivariant_model_gives_identical_probabilities_with_and_without_tta():
    model = _pixelwise_model()
    x = _images()
    plain = probability_model(model).predict_on_batch(x)
    merged = tta_model(model, TRANSFORM_NAMES).predict_on_batch(x)
    assert np.array_equal(plain, merged)
    np.testing.assert_allclose(plain.sum(axis=-1), 1.0, atol=1e-6)


def test_non_equivariant_model_gives_different_probabilities_equal_to_a_manual_merge():
    model = _position_dependent_model()
    x = _images()
    names = ["identity", "hflip", "vflip", "rot90", "rot270"]
    plain = probability_model(model).predict_on_batch(x)
    merged = tta_model(model, names).predict_on_batch(x)
    assert np.abs(plain - merged).max() > 0.05
    assert not np.array_equal(plain.argmax(-1), merged.argmax(-1))

    # The same merge done by hand: NumPy transforms, softmax, NumPy inverses, plain mean.
    views = []
    for name in names:
        logits = np.asarray(model.predict_on_batch(np.ascontiguousarray(NUMPY_REFERENCE[name](x))), np.float64)
        probabilities = np.exp(logits - logits.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        views.append(NUMPY_INVERSE[name](probabilities))
    np.testing.assert_allclose(merged, np.mean(views, axis=0), atol=2e-6)


def test_quarter_turns_are_skipped_for_non_square_models(caplog):
    model = _pixelwise_model(size=(16, 32))
    with caplog.at_level(logging.WARNING, logger="seglab.evaluate.tta"):
        wrapped = tta_model(model, ["identity", "hflip", "rot90", "rot180", "rot270"])
    assert wrapped.tta_transforms == ["identity", "hflip", "rot180"]
    assert "rot90" in caplog.text and "16x32" in caplog.text
    x = _images(size=(16, 32))
    assert np.array_equal(wrapped.predict_on_batch(x), probability_model(model).predict_on_batch(x))
    with pytest.raises(ValueError, match="16x32"):
        tta_model(model, ["identity", "rot90"], on_non_square="error")


@pytest.mark.parametrize(
    ("names", "message"),
    [([], "at least one"), (["identity", "hflip", "hflip"], "listed twice"), (["identity", "flop"], "unknown TTA")],
)
def test_bad_transform_lists_are_refused(names, message):
    with pytest.raises(ValueError, match=message):
        select_transforms(names, (8, 8))


def test_only_quarter_turns_on_non_square_input_is_an_error():
    with pytest.raises(ValueError, match="non-square"):
        select_transforms(["rot90", "rot270"], (8, 12))


def test_plain_and_tta_share_one_trace_and_match_the_keras_predictors():
    """`plain_and_tta` traces the segmenter once for both predictors and every batch size, and gives
    what probability_model / tta_model give (the TTA's views other than the identity run as one batch:
    equal up to rounding)."""
    model = _position_dependent_model()
    x = _images()
    names = ["identity", "hflip", "vflip", "rot90", "rot270"]
    predictors = plain_and_tta(model, names)
    assert predictors["tta"].tta_transforms == names and predictors["plain"].tta_transforms is None
    np.testing.assert_array_equal(predictors["plain"](x), probability_model(model).predict_on_batch(x))
    np.testing.assert_allclose(predictors["tta"](x), tta_model(model, names).predict_on_batch(x), atol=1e-6)
    # The evaluation hands the TTA the plain probabilities it already has: the same result, bit for bit.
    assert predictors["tta"].base is predictors["plain"]
    np.testing.assert_array_equal(predictors["tta"].given(x, predictors["plain"](x)), predictors["tta"](x))
    predictors["tta"](x[:1])
    predictors["plain"](x[:1])
    assert predictors["plain"].graph.experimental_get_tracing_count() == 1  # the segmenter's only trace
    assert predictors["tta"].graph.experimental_get_tracing_count() == 1

    equivariant = plain_and_tta(_pixelwise_model(), TRANSFORM_NAMES)
    assert np.array_equal(equivariant["plain"](x), equivariant["tta"](x))  # the running mean, bit for bit

    non_square = plain_and_tta(_pixelwise_model(size=(16, 32)), ["identity", "hflip", "rot90"])
    assert non_square["tta"].tta_transforms == ["identity", "hflip"]
