"""The fused Adam/AdamW update: Keras' numbers up to rounding, one op per variable, saved and loaded
like Keras' optimizers."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from seglab.train.optimizers import FusedAdam, FusedAdamW

SHAPES = [(3, 3, 4, 8), (8,), (5, 2)]


def _variables(seed: int = 0) -> list[keras.Variable]:
    rng = np.random.default_rng(seed)
    return [keras.Variable(rng.normal(size=shape).astype("float32"), name=f"w{i}")
            for i, shape in enumerate(SHAPES)]


def _gradients(step: int) -> list[np.ndarray]:
    rng = np.random.default_rng(100 + step)
    return [rng.normal(scale=10.0 ** rng.integers(-3, 2), size=shape).astype("float32")
            for shape in SHAPES]


def _train(optimizer: keras.optimizers.Optimizer, steps: int = 6) -> tuple[list, list]:
    variables = _variables()
    apply = tf.function(lambda grads: optimizer.apply(grads, variables))  # traced, as in fit
    for step in range(steps):
        apply([tf.constant(g) for g in _gradients(step)])
    return [v.numpy() for v in variables], [v.numpy() for v in optimizer.variables]


def _schedule():
    return keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=8, warmup_target=3e-2, warmup_steps=2)


@pytest.mark.parametrize(("fused", "keras_class", "kwargs"), [
    (FusedAdam, keras.optimizers.Adam, {}),
    (FusedAdam, keras.optimizers.Adam, {"beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-3}),
    (FusedAdamW, keras.optimizers.AdamW, {"weight_decay": 0.1}),
    (FusedAdam, keras.optimizers.Adam, {"amsgrad": True}),
])
def test_fused_update_follows_keras_adam(fused, keras_class, kwargs):
    fused_weights, fused_state = _train(fused(learning_rate=_schedule(), **kwargs))
    keras_weights, keras_state = _train(keras_class(learning_rate=_schedule(), **kwargs))
    initial = [v.numpy() for v in _variables()]
    for got, want, start in zip(fused_weights, keras_weights, initial):
        assert np.abs(want - start).min() > 1e-4  # every weight really moved
        np.testing.assert_allclose(got - start, want - start, rtol=1e-4, atol=1e-6)  # float32 rounding only
    for got, want in zip(fused_state, keras_state):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)


def _traced_ops(optimizer) -> list[str]:
    variables = _variables()
    grads = [tf.constant(g) for g in _gradients(0)]
    optimizer.build(variables)
    graph = tf.function(lambda: optimizer.apply(grads, variables)).get_concrete_function().graph
    return [op.type for op in graph.get_operations()]


def test_fused_update_is_one_kernel_per_variable_and_a_fraction_of_keras_ops():
    fused = _traced_ops(FusedAdam(1e-3))
    plain = _traced_ops(keras.optimizers.Adam(1e-3))
    assert fused.count("ResourceApplyAdam") == 3
    assert "ResourceApplyAdam" not in plain
    assert len(fused) < 0.6 * len(plain)


def test_fused_optimizers_save_and_load_with_their_state(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer=FusedAdamW(1e-2, weight_decay=0.01), loss="mse")
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 2), "float32")
    model.fit(x, y, epochs=2, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert type(loaded.optimizer) is FusedAdamW and loaded.optimizer.weight_decay == pytest.approx(0.01)
    for saved, restored in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())
    config = keras.optimizers.serialize(FusedAdam(3e-3, beta_1=0.8))
    assert type(keras.optimizers.deserialize(config)) is FusedAdam
