"""The inference form (`seglab.models.fold`): every registry model, BatchNorm folded, computes what
it computed; BatchNorms that cannot be folded stay; the result saves and loads like any model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from seglab import models
from seglab.models.fold import fold_batchnorm

SMALL = {"input_shape": (64, 64, 3), "width": 0.125}


def _batchnorms(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]


def _trained_looking(model: keras.Model, seed: int = 0) -> None:
    """Moving statistics and affine parameters far from their initial 0/1, as training leaves them."""
    rng = np.random.default_rng(seed)
    for bn in _batchnorms(model):
        channels = bn.moving_mean.shape[0]
        bn.moving_mean.assign(rng.normal(0.0, 0.5, channels).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.2, 3.0, channels).astype("float32"))
        if bn.scale:
            bn.gamma.assign(rng.uniform(0.5, 1.5, channels).astype("float32"))
        if bn.center:
            bn.beta.assign(rng.normal(0.0, 0.3, channels).astype("float32"))


def _assert_same_function(model: keras.Model, folded: keras.Model, images: np.ndarray) -> None:
    expected = keras.ops.convert_to_numpy(model(images, training=False))
    got = keras.ops.convert_to_numpy(folded(images, training=False))
    assert got.shape == expected.shape and got.dtype == expected.dtype
    # float32 rounding only: the folded kernels multiply once where the original scales after the sum.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max())))


@pytest.mark.parametrize("name", models.available())
def test_every_registry_model_folded_computes_the_same_logits(name):
    keras.utils.set_random_seed(0)
    model = models.build(name, 5, **SMALL)
    _trained_looking(model)
    before = [w.copy() for w in model.get_weights()]
    folded = fold_batchnorm(model)

    images = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    _assert_same_function(model, folded, images)
    assert len(_batchnorms(folded)) < len(_batchnorms(model))  # every model has a conv -> BatchNorm
    assert len(folded.weights) < len(model.weights)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # the original is untouched


def test_only_a_batchnorm_right_after_a_convolution_read_by_it_alone_is_folded(tmp_path):
    inputs = keras.Input((16, 16, 3), name="image")
    a = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="a_conv")(inputs)
    a = keras.layers.BatchNormalization(name="a_bn")(a)                       # folded
    d = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="d_conv")(a)
    d = keras.layers.BatchNormalization(name="d_bn")(d)                       # folded (with its bias)
    shared = keras.layers.Conv2D(16, 1, use_bias=False, name="shared_conv")(d)
    s = keras.layers.BatchNormalization(name="shared_bn")(shared)             # its conv is read twice
    s = keras.layers.Add(name="add")([s, shared])
    r = keras.layers.Conv2D(16, 1, activation="relu", name="relu_conv")(s)
    r = keras.layers.BatchNormalization(name="relu_bn")(r)                    # after an activation
    n = keras.layers.BatchNormalization(name="add_bn")(keras.layers.Add(name="add2")([r, s]))  # after an Add
    out = keras.layers.Conv2D(4, 1, use_bias=False, name="head_conv")(n)
    out = keras.layers.BatchNormalization(name="head_bn")(out)                # the model's output, folded
    model = keras.Model(inputs, out)
    _trained_looking(model, seed=2)

    folded = fold_batchnorm(model)
    assert {bn.name for bn in _batchnorms(folded)} == {"shared_bn", "relu_bn", "add_bn"}
    assert folded.get_layer("a_conv").use_bias and folded.get_layer("head_conv").use_bias
    images = np.random.default_rng(3).normal(size=(3, 16, 16, 3)).astype("float32")
    _assert_same_function(model, folded, images)

    folded.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(images)),
                                  keras.ops.convert_to_numpy(folded(images)))


def test_a_model_without_foldable_batchnorm_is_rebuilt_unchanged():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Dense(4, name="dense")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, x)
    _trained_looking(model, seed=4)
    folded = fold_batchnorm(model)
    assert [layer.name for layer in folded.layers] == [layer.name for layer in model.layers]
    images = np.random.default_rng(5).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(folded(images)), keras.ops.convert_to_numpy(model(images)))
