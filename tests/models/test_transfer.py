"""Transfer-learning controls: freezing (BatchNorm in inference mode), unfreezing after N epochs,
and the encoder learning-rate multiplier, checked by what actually moves after a step.

Most tests use a tiny segmenter with the same structure as the registry's (an encoder nested as a
layer named "encoder") so the real graph-mode train step stays fast; one test uses a registry model.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from seglab import models
from seglab.models.transfer import (
    EncoderLROptimizer,
    UnfreezeEncoder,
    build_optimizer,
    encoder_lr_optimizer,
    freeze_encoder,
    get_encoder,
    set_encoder_trainable,
    unfreeze_encoder,
)
from seglab.train.optimizers import FusedAdamW

LR = 1e-2


def tiny_segmenter(num_classes: int = 3) -> keras.Model:
    image = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="enc_conv")(image)
    x = keras.layers.BatchNormalization(name="enc_bn")(x)
    encoder = keras.Model(image, keras.layers.Activation("relu", name="enc_relu")(x), name="encoder")
    inputs = keras.Input((16, 16, 3))
    y = keras.layers.Conv2D(num_classes, 1, name="decoder_conv")(encoder(inputs))
    return keras.Model(inputs, keras.layers.Activation("linear", dtype="float32", name="logits")(y), name="tiny")


@pytest.fixture()
def batch():
    rng = np.random.default_rng(0)
    return (rng.uniform(0, 255, (4, 16, 16, 3)).astype("float32"),
            rng.integers(0, 3, (4, 16, 16)).astype("int32"))


def _compile(model, optimizer, **kwargs):
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), **kwargs)


def _snapshot(layer) -> dict[str, np.ndarray]:
    return {v.path: v.numpy().copy() for v in layer.weights}


def _max_change(before: dict, after: dict) -> dict[str, float]:
    return {path: float(np.abs(after[path] - before[path]).max()) for path in before}


def _adam():
    # On its first step Adam moves every weight by exactly lr (m_hat / sqrt(v_hat) = sign(g));
    # a tiny epsilon keeps that exact, so the step size measures the learning rate applied.
    return keras.optimizers.Adam(LR, epsilon=1e-12)


def test_frozen_encoder_does_not_move_and_its_batchnorm_runs_in_inference_mode(batch):
    keras.utils.set_random_seed(0)
    model = tiny_segmenter()
    freeze_encoder(model)
    _compile(model, _adam())
    encoder = get_encoder(model)
    # Inference mode: a training-mode forward pass uses the moving statistics, not the batch's.
    np.testing.assert_allclose(np.asarray(model(batch[0], training=True)), np.asarray(model(batch[0], training=False)),
                               rtol=1e-6)
    encoder_before, decoder_before = _snapshot(encoder), _snapshot(model.get_layer("decoder_conv"))
    model.train_on_batch(*batch)
    assert all(change == 0.0 for change in _max_change(encoder_before, _snapshot(encoder)).values())
    assert all(change > 0 for change in _max_change(decoder_before, _snapshot(model.get_layer("decoder_conv"))).values())


def _trained_frozen_then_unfrozen(batch, **unfreeze_options) -> keras.Model:
    """A compiled model trained one step with its encoder frozen, then unfrozen."""
    keras.utils.set_random_seed(0)
    model = tiny_segmenter()
    freeze_encoder(model)
    _compile(model, encoder_lr_optimizer(model, _adam()))
    model.train_on_batch(*batch)
    unfreeze_encoder(model, **unfreeze_options)
    return model


def test_unfreezing_a_compiled_model_trains_the_encoder_and_its_batchnorm(batch):
    model = _trained_frozen_then_unfrozen(batch)
    before = _snapshot(get_encoder(model))
    model.train_on_batch(*batch)
    changes = _max_change(before, _snapshot(get_encoder(model)))
    assert all(change > 0 for change in changes.values()), changes  # kernels, gammas and moving statistics


def test_unfreezing_with_frozen_batchnorm_trains_the_encoder_but_keeps_its_statistics(batch):
    model = _trained_frozen_then_unfrozen(batch, train_batchnorm=False)
    bn = get_encoder(model).get_layer("enc_bn")
    assert get_encoder(model).trainable and not bn.trainable
    before = _snapshot(get_encoder(model))
    model.train_on_batch(*batch)
    changes = _max_change(before, _snapshot(get_encoder(model)))
    bn_paths = {v.path for v in bn.weights}
    assert bn_paths and all(changes[path] == 0.0 for path in bn_paths), changes  # gamma, beta, moving stats
    assert all(change > 0 for path, change in changes.items() if path not in bn_paths), changes
    # Inference mode: a training-mode forward pass gives what inference gives.
    np.testing.assert_allclose(np.asarray(model(batch[0], training=True)), np.asarray(model(batch[0], training=False)),
                               rtol=1e-6)


def test_unfreezing_with_an_optimizer_built_without_the_encoder_is_refused(batch):
    model = tiny_segmenter()
    freeze_encoder(model)
    _compile(model, keras.optimizers.Adam(LR))
    model.train_on_batch(*batch)
    with pytest.raises(RuntimeError, match="encoder_lr_optimizer"):
        unfreeze_encoder(model)
    assert get_encoder(model).trainable is False  # left as it was


@pytest.mark.parametrize("multiplier", [0.1, 0.0, 2.0])
def test_encoder_learning_rate_multiplier_scales_the_encoder_updates(batch, multiplier):
    keras.utils.set_random_seed(0)
    model = tiny_segmenter()
    _compile(model, encoder_lr_optimizer(model, _adam(), multiplier))
    encoder_before, decoder_before = _snapshot(get_encoder(model)), _snapshot(model.get_layer("decoder_conv"))
    model.train_on_batch(*batch)
    encoder_changes = _max_change(encoder_before, _snapshot(get_encoder(model)))
    for path in ("enc_conv/kernel", "enc_bn/gamma", "enc_bn/beta"):
        np.testing.assert_allclose(encoder_changes[path], LR * multiplier, rtol=1e-3, atol=1e-9)
    for change in _max_change(decoder_before, _snapshot(model.get_layer("decoder_conv"))).values():
        np.testing.assert_allclose(change, LR, rtol=1e-3)


def test_learning_rate_changes_and_schedules_reach_the_encoder():
    model = tiny_segmenter()
    optimizer = encoder_lr_optimizer(model, keras.optimizers.Adam(LR), 0.25)
    optimizer.learning_rate = 0.4  # what ReduceLROnPlateau and LearningRateScheduler do
    assert float(optimizer.decoder_optimizer.learning_rate) == pytest.approx(0.4)
    assert float(optimizer.encoder_optimizer.learning_rate) == pytest.approx(0.1)

    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=1, decay_rate=0.5)
    scheduled = encoder_lr_optimizer(model, keras.optimizers.SGD(schedule), 0.1)
    scheduled.decoder_optimizer.iterations.assign(3)  # the global step drives the encoder's rate too
    assert float(scheduled.learning_rate) == pytest.approx(0.125)
    assert float(scheduled.encoder_optimizer.learning_rate) == pytest.approx(0.0125)


def test_unfreeze_callback_trains_the_encoder_only_from_the_given_epoch(batch):
    keras.utils.set_random_seed(0)
    model = tiny_segmenter()
    _compile(model, encoder_lr_optimizer(model, _adam(), 0.5))
    encoder = get_encoder(model)
    images, labels = batch
    start = _snapshot(encoder)
    model.fit(images, labels, batch_size=2, epochs=2, verbose=0, callbacks=[UnfreezeEncoder(2)])
    assert encoder.trainable is False
    assert all(change == 0.0 for change in _max_change(start, _snapshot(encoder)).values())
    # Resuming past the unfreeze epoch: the encoder trains from the first resumed epoch.
    model.fit(images, labels, batch_size=2, epochs=3, initial_epoch=2, verbose=0, callbacks=[UnfreezeEncoder(2)])
    assert encoder.trainable is True
    assert all(change > 0 for change in _max_change(start, _snapshot(encoder)).values())


def _counting_traces(model: keras.Model) -> list:
    """Make `model` record each trace of its train step (Keras calls `train_step` only while tracing)."""
    traces = []
    train_step = model.train_step

    def counted(data):
        traces.append(1)
        return train_step(data)

    model.train_step = counted
    return traces


@pytest.mark.parametrize("adamw", [keras.optimizers.AdamW, FusedAdamW])
def test_holding_the_encoder_keeps_it_bit_identical_and_releasing_starts_a_fresh_optimizer(batch, adamw):
    """A held encoder (AdamW: weight decay included) moves by exactly 0 while the decoder trains; after
    the release the encoder's optimizer state is what it was when built, and the first released step
    moves each encoder weight by exactly lr x multiplier (Adam's first step: a step counter that went
    on while held would change the bias correction, hence the step)."""
    keras.utils.set_random_seed(0)
    model = tiny_segmenter()
    set_encoder_trainable(model, True, train_batchnorm=False)
    optimizer = encoder_lr_optimizer(model, adamw(LR, weight_decay=0.5, epsilon=1e-12), 0.5)
    _compile(model, optimizer)
    build_optimizer(model)
    fresh = [v.numpy().copy() for v in optimizer.encoder_optimizer.variables]
    optimizer.hold_encoder()
    assert optimizer.encoder_held
    encoder, decoder = get_encoder(model), model.get_layer("decoder_conv")
    encoder_before, decoder_before = _snapshot(encoder), _snapshot(decoder)
    for _ in range(3):
        model.train_on_batch(*batch)
    assert all(change == 0.0 for change in _max_change(encoder_before, _snapshot(encoder)).values())
    assert all(change > 0 for change in _max_change(decoder_before, _snapshot(decoder)).values())
    assert int(optimizer.encoder_optimizer.iterations) == 3  # counted, hence the reset below

    optimizer.release_encoder()
    assert not optimizer.encoder_held
    for variable, value in zip(optimizer.encoder_optimizer.variables, fresh):
        np.testing.assert_array_equal(variable.numpy(), value)
    model.train_on_batch(*batch)
    # AdamW decays first (w x weight_decay x lr), then takes Adam's first step, of exactly lr: the
    # encoder's rate is LR x 0.5.
    encoder_lr = LR * 0.5
    kernel_before = encoder_before["enc_conv/kernel"]
    step = encoder.get_layer("enc_conv").kernel.numpy() - kernel_before + kernel_before * 0.5 * encoder_lr
    np.testing.assert_allclose(np.abs(step), encoder_lr, rtol=1e-3)
    bn_after = _snapshot(encoder.get_layer("enc_bn"))
    assert all(np.array_equal(bn_after[path], encoder_before[path]) for path in bn_after)  # BatchNorm frozen


def test_unfreeze_callback_holding_the_encoder_traces_the_train_step_once(batch):
    keras.utils.set_random_seed(0)
    model = tiny_segmenter()
    freeze_encoder(model)  # the callback makes it trainable (BatchNorm frozen) before the first step
    _compile(model, encoder_lr_optimizer(model, _adam(), 0.5))
    traces = _counting_traces(model)
    encoder = get_encoder(model)
    images, labels = batch
    start = _snapshot(encoder)
    snapshots = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: snapshots.append(_snapshot(encoder)))
    model.fit(images, labels, batch_size=2, epochs=3, verbose=0,
              callbacks=[UnfreezeEncoder(2, train_batchnorm=False), record])
    assert len(traces) == 1
    assert encoder.trainable and not encoder.get_layer("enc_bn").trainable
    for held in snapshots[:2]:
        assert all(change == 0.0 for change in _max_change(start, held).values())
    changes = _max_change(snapshots[1], snapshots[2])
    assert changes["enc_conv/kernel"] > 0
    assert all(changes[v.path] == 0.0 for v in encoder.get_layer("enc_bn").weights)  # BatchNorm stays frozen

    plain = tiny_segmenter()
    _compile(plain, _adam())
    with pytest.raises(ValueError, match="encoder_lr_optimizer"):  # holding needs the two-optimizer wrapper
        plain.fit(images, labels, epochs=1, verbose=0, callbacks=[UnfreezeEncoder(1, train_batchnorm=False)])


def test_holding_then_releasing_trains_as_a_frozen_then_unfrozen_encoder(batch):
    """The held path gives the weights the trainable-flag path gives (frozen, then unfrozen with a
    freshly built encoder optimizer), BatchNorm frozen in both."""
    weights = []
    for hold in (True, False):
        keras.utils.set_random_seed(0)
        model = tiny_segmenter()
        if hold:
            set_encoder_trainable(model, True, train_batchnorm=False)
        else:
            freeze_encoder(model)
        optimizer = encoder_lr_optimizer(model, keras.optimizers.AdamW(LR, weight_decay=0.1), 0.5)
        _compile(model, optimizer)
        build_optimizer(model)
        if hold:
            optimizer.hold_encoder()
        for _ in range(2):
            model.train_on_batch(*batch)
        if hold:
            optimizer.release_encoder()
        else:
            unfreeze_encoder(model, train_batchnorm=False)
            build_optimizer(model)
        for _ in range(3):
            model.train_on_batch(*batch)
        weights.append([w.numpy() for w in model.weights])
    for held, unfrozen in zip(*weights):
        np.testing.assert_allclose(held, unfrozen, rtol=1e-6, atol=1e-7)


def test_held_encoder_gradients_count_in_no_global_norm():
    model = tiny_segmenter()
    set_encoder_trainable(model, True, train_batchnorm=False)
    optimizer = encoder_lr_optimizer(model, keras.optimizers.SGD(1.0, global_clipnorm=1.0))
    optimizer.build(model.trainable_variables)
    optimizer.hold_encoder()
    decoder_vars = model.get_layer("decoder_conv").trainable_variables
    grads = [keras.ops.full(v.shape, 10.0) for v in model.trainable_variables]
    before = [v.numpy().copy() for v in decoder_vars]
    optimizer.apply(grads, model.trainable_variables)
    step = np.sqrt(sum(np.sum((v.numpy() - b) ** 2) for v, b in zip(decoder_vars, before)))
    assert step == pytest.approx(1.0, rel=1e-4)  # the decoder alone takes the whole unit step


def test_unfreeze_callback_rejects_models_without_an_encoder_before_training(batch):
    model = models.build("unet", 3, (16, 16, 3), width=0.125)
    _compile(model, keras.optimizers.Adam(LR))
    with pytest.raises(ValueError, match="has no layer named 'encoder'"):
        model.fit(np.zeros((2, 16, 16, 3), "float32"), np.zeros((2, 16, 16), "int32"), epochs=1, verbose=0,
                  callbacks=[UnfreezeEncoder(1)])
    with pytest.raises(ValueError, match="epoch must be"):
        UnfreezeEncoder(-1)


def test_encoder_lr_optimizer_survives_save_and_load(batch, tmp_path):
    keras.utils.set_random_seed(0)
    model = tiny_segmenter()
    freeze_encoder(model)
    _compile(model, encoder_lr_optimizer(model, _adam(), 0.1))
    model.train_on_batch(*batch)
    unfreeze_encoder(model)
    model.train_on_batch(*batch)
    path = tmp_path / "model.keras"
    model.save(path)

    loaded = keras.models.load_model(path)
    optimizer = loaded.optimizer
    assert isinstance(optimizer, EncoderLROptimizer) and optimizer.encoder_lr_multiplier == 0.1
    assert int(optimizer.iterations) == 2 and int(optimizer.encoder_optimizer.iterations) == 1
    assert len(optimizer.variables) == len(model.optimizer.variables)
    for saved, restored in zip(model.optimizer.variables, optimizer.variables):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())
    assert np.isfinite(loaded.train_on_batch(*batch))


def test_encoder_lr_optimizer_under_mixed_precision(batch):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = tiny_segmenter()
        _compile(model, encoder_lr_optimizer(model, keras.optimizers.Adam(LR), 0.1))
        before = _snapshot(model)
        for _ in range(3):  # the loss scale may skip a first step with float16 overflow
            assert np.isfinite(model.train_on_batch(*batch))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, EncoderLROptimizer)
    changes = _max_change(before, _snapshot(model))
    assert changes["enc_conv/kernel"] > 0 and changes["decoder_conv/kernel"] > 0


def test_global_clipnorm_applies_across_both_groups():
    model = tiny_segmenter()
    optimizer = encoder_lr_optimizer(model, keras.optimizers.SGD(1.0, global_clipnorm=1.0))
    optimizer.build(model.trainable_variables)
    grads = [keras.ops.full(v.shape, 10.0) for v in model.trainable_variables]
    before = [v.numpy().copy() for v in model.trainable_variables]
    optimizer.apply(grads, model.trainable_variables)
    step = np.sqrt(sum(np.sum((v.numpy() - b) ** 2) for v, b in zip(model.trainable_variables, before)))
    assert step == pytest.approx(1.0, rel=1e-4)  # one norm over encoder and decoder together


def test_registry_model_freezes_and_trains_with_encoder_multiplier():
    keras.utils.set_random_seed(0)
    model = models.build("deeplabv3plus_mobilenetv2", 4, (32, 32, 3), width=0.125)
    freeze_encoder(model)
    _compile(model, encoder_lr_optimizer(model, _adam(), 0.1), run_eagerly=True)
    rng = np.random.default_rng(0)
    images, labels = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32"), rng.integers(0, 4, (2, 32, 32))
    encoder_before = _snapshot(get_encoder(model))
    model.train_on_batch(images, labels)
    assert all(change == 0.0 for change in _max_change(encoder_before, _snapshot(get_encoder(model))).values())
    unfreeze_encoder(model)
    model.train_on_batch(images, labels)
    changes = _max_change(encoder_before, _snapshot(get_encoder(model)))
    kernel_changes = [change for path, change in changes.items() if path.endswith("kernel")]
    assert kernel_changes and max(kernel_changes) == pytest.approx(LR * 0.1, rel=1e-3)


def test_models_without_an_encoder_say_so():
    with pytest.raises(ValueError, match="unet_<backbone>, deeplabv3plus_<backbone>"):
        freeze_encoder(models.build("attention_unet", 3, (16, 16, 3), width=0.125))
    with pytest.raises(ValueError, match="encoder_lr_multiplier"):
        EncoderLROptimizer(keras.optimizers.Adam(), -1.0)
    with pytest.raises(ValueError, match="bind"):
        EncoderLROptimizer(keras.optimizers.Adam()).build(tiny_segmenter().trainable_variables)
