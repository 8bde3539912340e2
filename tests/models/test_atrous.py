"""AtrousConv2D (DeepLabV3+'s ASPP): the same outputs and gradients as a plain dilated Conv2D."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from seglab.models.deeplab import AtrousConv2D


def _pair(rate: int, kernel_size: int, shape) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    keras.utils.set_random_seed(0)
    atrous = AtrousConv2D(6, kernel_size, padding="same", dilation_rate=rate, use_bias=True)
    plain = keras.layers.Conv2D(6, kernel_size, padding="same", dilation_rate=rate, use_bias=True)
    atrous.build(shape)
    plain.build(shape)
    weights = [np.random.default_rng(1).normal(size=w.shape).astype("float32") for w in atrous.get_weights()]
    atrous.set_weights(weights)
    plain.set_weights(weights)
    return atrous, plain


# (height, width, rate, kernel): every tap live, only the centre live, one axis each, a 5x5 kernel
# whose outer ring is dead while its inner ring is not, and a 1x1 map.
@pytest.mark.parametrize("height,width,rate,kernel_size",
                         [(8, 8, 2, 3), (4, 4, 6, 3), (4, 9, 6, 3), (9, 4, 6, 3), (7, 7, 3, 5), (1, 1, 2, 3)])
def test_outputs_and_gradients_match_a_plain_dilated_conv(height, width, rate, kernel_size):
    shape = (2, height, width, 5)
    atrous, plain = _pair(rate, kernel_size, shape)
    x = tf.constant(np.random.default_rng(2).normal(size=shape).astype("float32"))
    grads = []
    for layer in (atrous, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x)))
        grads.append(tape.gradient(loss, [x, *layer.trainable_variables]))
    np.testing.assert_allclose(np.asarray(atrous(x)), np.asarray(plain(x)), rtol=1e-5, atol=1e-5)
    for a, p in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(p), rtol=1e-4, atol=1e-4)


def test_kernel_shape_and_saving_do_not_depend_on_the_input_size(tmp_path):
    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, AtrousConv2D(2, 3, padding="same", dilation_rate=12, name="aspp")(inputs))
    assert model.get_layer("aspp").kernel.shape == (3, 3, 3, 2)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(0).normal(size=(1, 4, 4, 3)).astype("float32")
    assert isinstance(loaded.get_layer("aspp"), AtrousConv2D)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
