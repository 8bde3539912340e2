"""Encoders for the segmenters: a backbone name -> a functional Keras model with a feature pyramid.

Every backbone follows one contract (shared with `mobilenetv2.py` and `efficientnet_lite.py`):

- input: float32 RGB in [0, 255], shape (H, W, 3); the backbone normalises inside the model, so
  every segmenter is fed the same raw pixels whatever its encoder;
- outputs: ``[c1, c2, c3, c4, c5]`` at nominal strides 2, 4, 8, 16, 32;
- ``output_stride`` 16 or 8 replaces the last one or two downsamplings by dilation (DeepLab's rule,
  `mobilenetv2.atrous_plan`), so c5 (or c4 and c5) stay at stride 16 (or 8);
- ``width`` scales every channel count (rounded to multiples of 8); ImageNet weights exist for 1.0 only.

ResNet-50/101 and Xception are built here layer by layer with keras.applications' layer names and
weight shapes, not taken from keras.applications: the width multiplier and dilation both need a
different graph, and keras.applications' Xception pads its stem 'valid' (256 -> 127 -> 125), which
would misalign the pyramid levels. Here the Xception stem is 'same'-padded, as in DeepLab's
Xception, so every level is exactly H/stride. ImageNet weights are copied layer by layer from
keras.applications' own model loaded with Keras' own download (identical shapes, since neither
dilation nor padding changes a kernel). Xception's residual 1x1 convolutions are unnamed in
keras.applications; they are matched by their (unique) weight shapes.

Pyramid taps: ResNet: ``conv1_relu``, ``conv{2..5}_block{last}_out``. Xception: the last feature at
each stride before it is downsampled (DeepLab's choice of Xception's low-level feature):
``block2_sepconv2_bn``, ``block3_sepconv2_bn``, ``block4_sepconv2_bn``, ``block13_sepconv2_bn``,
``block14_sepconv2_act`` (128, 256, 728, 1024, 2048 channels at width 1).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras

from seglab.models.efficientnet_lite import efficientnet_lite0_backbone
from seglab.models.mobilenetv2 import atrous_plan, check_input_shape, check_width, make_divisible, mobilenetv2_backbone
from seglab.models.weights import OFFLINE_BACKBONES, LoadedWeights, WeightsUnavailableError, load_backbone_weights

log = logging.getLogger(__name__)

BACKBONES: tuple[str, ...] = ("resnet50", "resnet101", "xception", "mobilenetv2", "efficientnet_lite0")
KERAS_APPLICATIONS_BACKBONES: tuple[str, ...] = ("resnet50", "resnet101", "xception")

RESNET_BN_EPSILON = 1.001e-5  # keras.applications' ResNet value; its weights were trained with it
XCEPTION_BN_EPSILON = 1e-3  # Keras' BatchNormalization default, what keras.applications' Xception uses
_RESNET_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
_XCEPTION_MIDDLE_BLOCKS = 8  # blocks 5..12


@dataclass(frozen=True)
class KerasApplicationsWeights:
    """Where Keras' own ImageNet file for a backbone lives (the no-top variant)."""

    url: str
    md5: str  # keras.applications checks files with these md5 hashes
    application: str  # the keras.applications constructor that reads the file


def _keras_applications_weights() -> dict[str, KerasApplicationsWeights]:
    # The URLs and hashes keras.applications itself downloads, so an existing ~/.keras/models
    # cache is reused and both stay in step with the installed Keras.
    from keras.src.applications import resnet, xception

    def resnet_entry(name: str, application: str) -> KerasApplicationsWeights:
        filename = f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
        return KerasApplicationsWeights(resnet.BASE_WEIGHTS_PATH + filename, resnet.WEIGHTS_HASHES[name][1],
                                        application)

    return {
        "resnet50": resnet_entry("resnet50", "ResNet50"),
        "resnet101": resnet_entry("resnet101", "ResNet101"),
        # keras.applications.Xception hard-codes this md5 next to WEIGHTS_PATH_NO_TOP.
        "xception": KerasApplicationsWeights(xception.WEIGHTS_PATH_NO_TOP, "b0042744bf5b25fce3cb969f33bebb97",
                                             "Xception"),
    }


IMAGENET_WEIGHTS: dict[str, KerasApplicationsWeights] = _keras_applications_weights()


@keras.saving.register_keras_serializable(package="seglab")
class ImagenetPreprocessing(keras.layers.Layer):
    """keras.applications' `preprocess_input` as a layer, so the model itself takes [0, 255] RGB.

    mode "caffe" (ResNet: RGB -> BGR, minus the ImageNet mean) or "tf" (Xception: to [-1, 1]).
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "tf", "torch"):
            raise ValueError(f"ImagenetPreprocessing: mode must be 'caffe', 'tf' or 'torch', got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        return keras.applications.imagenet_utils.preprocess_input(inputs, data_format="channels_last",
                                                                  mode=self.mode)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def _check_rgb(input_shape: Sequence[int | None], backbone: str) -> tuple[int | None, int | None, int]:
    height, width, channels = check_input_shape(input_shape, backbone)
    if channels != 3:
        raise ValueError(f"{backbone}: input must be RGB (3 channels) for its ImageNet normalisation, "
                         f"got input_shape {tuple(input_shape)!r}")
    return height, width, channels


# ------------------------------------------------------------------------------------------ ResNet


def _conv_bn(x, filters: int, kernel_size: int, name: str, *, strides: int = 1, dilation: int = 1,
             padding: str = "valid"):
    x = keras.layers.Conv2D(filters, kernel_size, strides=strides, dilation_rate=dilation, padding=padding,
                            name=f"{name}_conv")(x)
    return keras.layers.BatchNormalization(epsilon=RESNET_BN_EPSILON, name=f"{name}_bn")(x)


def _bottleneck(x, filters: int, name: str, *, stride: int, dilation: int, project_shortcut: bool):
    """keras.applications' `residual_block_v1`, with the 3x3 convolution optionally dilated."""
    if project_shortcut:
        shortcut = _conv_bn(x, 4 * filters, 1, f"{name}_0", strides=stride)
    else:
        shortcut = x
    x = _conv_bn(x, filters, 1, f"{name}_1", strides=stride)
    x = keras.layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = _conv_bn(x, filters, 3, f"{name}_2", dilation=dilation, padding="same")
    x = keras.layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = _conv_bn(x, 4 * filters, 1, f"{name}_3")
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def resnet_backbone(
    input_shape: Sequence[int | None],
    *,
    depth: int = 50,
    width: float = 1.0,
    output_stride: int = 32,
    name: str = "encoder",
) -> keras.Model:
    """ResNet-50/101 v1 (keras.applications' layout and layer names) with a 5-level pyramid."""
    backbone = f"resnet{depth}"
    if backbone not in _RESNET_DEPTHS:
        raise ValueError(f"resnet_backbone: depth must be 50 or 101, got {depth!r}")
    check_width(width, backbone)
    height, width_px, channels = _check_rgb(input_shape, backbone)
    blocks_per_stage = _RESNET_DEPTHS[backbone]
    # Per block nominal strides after the stride-4 stem: stage conv2 keeps the resolution.
    block_strides = [
        (2 if stage > 0 and block == 0 else 1)
        for stage, count in enumerate(blocks_per_stage)
        for block in range(count)
    ]
    plan = iter(atrous_plan(block_strides, output_stride, stem_stride=4))

    inputs = keras.Input(shape=(height, width_px, channels), name="image")
    x = ImagenetPreprocessing("caffe", name="preprocess")(inputs)
    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = _conv_bn(x, make_divisible(64 * width), 7, "conv1", strides=2)
    c1 = keras.layers.Activation("relu", name="conv1_relu")(x)
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(c1)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)

    features = [c1]
    for stage, count in enumerate(blocks_per_stage):
        filters = make_divisible(64 * 2**stage * width)
        for block in range(count):
            stride, dilation = next(plan)
            x = _bottleneck(x, filters, f"conv{stage + 2}_block{block + 1}", stride=stride, dilation=dilation,
                            project_shortcut=block == 0)
        features.append(x)
    return keras.Model(inputs, features, name=name)


# ---------------------------------------------------------------------------------------- Xception


def _sepconv_bn(x, filters: int, name: str, *, dilation: int = 1):
    x = keras.layers.SeparableConv2D(filters, 3, padding="same", dilation_rate=dilation, use_bias=False,
                                     name=name)(x)
    return keras.layers.BatchNormalization(epsilon=XCEPTION_BN_EPSILON, name=f"{name}_bn")(x)


def _xception_downsampling_block(x, index: int, filters: tuple[int, int], *, stride: int, dilation: int,
                                 first_activation: bool):
    """Entry/exit flow block: two separable convs, 3x3 max-pool, strided 1x1 residual projection.

    Returns (block output, the second separable conv's BN output = the feature before pooling).
    """
    prefix = f"block{index}"
    residual = keras.layers.Conv2D(filters[1], 1, strides=stride, padding="same", use_bias=False,
                                   name=f"{prefix}_residual_conv")(x)
    residual = keras.layers.BatchNormalization(epsilon=XCEPTION_BN_EPSILON, name=f"{prefix}_residual_bn")(residual)
    if first_activation:
        x = keras.layers.Activation("relu", name=f"{prefix}_sepconv1_act")(x)
    x = _sepconv_bn(x, filters[0], f"{prefix}_sepconv1", dilation=dilation)
    x = keras.layers.Activation("relu", name=f"{prefix}_sepconv2_act")(x)
    tap = _sepconv_bn(x, filters[1], f"{prefix}_sepconv2", dilation=dilation)
    x = keras.layers.MaxPooling2D(3, strides=stride, padding="same", name=f"{prefix}_pool")(tap)
    return keras.layers.Add(name=f"{prefix}_add")([x, residual]), tap


def xception_backbone(
    input_shape: Sequence[int | None],
    *,
    width: float = 1.0,
    output_stride: int = 32,
    name: str = "encoder",
) -> keras.Model:
    """Xception (keras.applications' layout and layer names, 'same'-padded stem) with a 5-level pyramid."""
    check_width(width, "xception")
    height, width_px, channels = _check_rgb(input_shape, "xception")

    def ch(n: int) -> int:
        return make_divisible(n * width)

    # Nominal strides of blocks 2..14 after the stride-2 stem; blocks 5..12 and 14 keep resolution.
    block_strides = [2, 2, 2] + [1] * _XCEPTION_MIDDLE_BLOCKS + [2, 1]
    plan = dict(zip(range(2, 15), atrous_plan(block_strides, output_stride, stem_stride=2)))

    inputs = keras.Input(shape=(height, width_px, channels), name="image")
    x = ImagenetPreprocessing("tf", name="preprocess")(inputs)
    x = keras.layers.Conv2D(ch(32), 3, strides=2, padding="same", use_bias=False, name="block1_conv1")(x)
    x = keras.layers.BatchNormalization(epsilon=XCEPTION_BN_EPSILON, name="block1_conv1_bn")(x)
    x = keras.layers.Activation("relu", name="block1_conv1_act")(x)
    x = keras.layers.Conv2D(ch(64), 3, padding="same", use_bias=False, name="block1_conv2")(x)
    x = keras.layers.BatchNormalization(epsilon=XCEPTION_BN_EPSILON, name="block1_conv2_bn")(x)
    x = keras.layers.Activation("relu", name="block1_conv2_act")(x)

    taps = []
    for index, filters in ((2, (128, 128)), (3, (256, 256)), (4, (728, 728))):
        stride, dilation = plan[index]
        x, tap = _xception_downsampling_block(x, index, (ch(filters[0]), ch(filters[1])), stride=stride,
                                              dilation=dilation, first_activation=index > 2)
        taps.append(tap)

    for index in range(5, 5 + _XCEPTION_MIDDLE_BLOCKS):
        _, dilation = plan[index]
        residual = x
        for conv in (1, 2, 3):
            x = keras.layers.Activation("relu", name=f"block{index}_sepconv{conv}_act")(x)
            x = _sepconv_bn(x, ch(728), f"block{index}_sepconv{conv}", dilation=dilation)
        x = keras.layers.Add(name=f"block{index}_add")([x, residual])

    stride, dilation = plan[13]
    x, tap = _xception_downsampling_block(x, 13, (ch(728), ch(1024)), stride=stride, dilation=dilation,
                                          first_activation=True)
    taps.append(tap)

    _, dilation = plan[14]
    x = _sepconv_bn(x, ch(1536), "block14_sepconv1", dilation=dilation)
    x = keras.layers.Activation("relu", name="block14_sepconv1_act")(x)
    x = _sepconv_bn(x, ch(2048), "block14_sepconv2", dilation=dilation)
    c5 = keras.layers.Activation("relu", name="block14_sepconv2_act")(x)
    return keras.Model(inputs, [*taps, c5], name=name)


# ---------------------------------------------------------------------------------------- dispatch


def build_backbone(
    backbone: str,
    input_shape: Sequence[int | None],
    *,
    width: float = 1.0,
    output_stride: int = 32,
    name: str = "encoder",
) -> keras.Model:
    """The encoder named `backbone` (one of `BACKBONES`): RGB [0, 255] in, ``[c1, ..., c5]`` out."""
    if backbone in _RESNET_DEPTHS:
        return resnet_backbone(input_shape, depth=int(backbone[len("resnet"):]), width=width,
                               output_stride=output_stride, name=name)
    if backbone == "xception":
        return xception_backbone(input_shape, width=width, output_stride=output_stride, name=name)
    if backbone == "mobilenetv2":
        return mobilenetv2_backbone(input_shape, width=width, output_stride=output_stride, name=name)
    if backbone == "efficientnet_lite0":
        return efficientnet_lite0_backbone(input_shape, width=width, output_stride=output_stride, name=name)
    raise ValueError(f"unknown backbone {backbone!r}; available: {', '.join(BACKBONES)}")


# ----------------------------------------------------------------------------------------- weights


def _weights_signature(layer: keras.layers.Layer) -> tuple:
    return (type(layer).__name__, tuple(tuple(w.shape) for w in layer.weights))


def copy_keras_applications_weights(reference: keras.Model, encoder: keras.Model, backbone: str) -> int:
    """Copy every weight of keras.applications' `reference` model into our `encoder`; returns layers copied.

    Layers are matched by name; the rest (Xception's unnamed residual layers, ours
    ``block*_residual_*``) by their weight shapes, which must then be unique. Every weighted layer
    on both sides must find its counterpart, so a silent partial load is impossible.
    """
    ours = [layer for layer in encoder.layers if layer.weights]
    theirs = {layer.name: layer for layer in reference.layers if layer.weights}
    pairs = [(layer, theirs[layer.name]) for layer in ours if layer.name in theirs]
    unmatched_ours = [layer for layer in ours if layer.name not in theirs]
    matched_names = {layer.name for layer in ours}
    by_signature: dict[tuple, list[keras.layers.Layer]] = {}
    for layer in theirs.values():
        if layer.name not in matched_names:
            by_signature.setdefault(_weights_signature(layer), []).append(layer)

    problems: list[str] = []
    for layer in unmatched_ours:
        candidates = by_signature.pop(_weights_signature(layer), [])
        if len(candidates) == 1:
            pairs.append((layer, candidates[0]))
        else:
            problems.append(f"encoder layer {layer.name} {_weights_signature(layer)[1]}: "
                            f"{len(candidates)} candidates in keras.applications' {reference.name}")
    problems += [f"pretrained layer {layer.name} {signature[1]} unused"
                 for signature, layers in by_signature.items() for layer in layers]
    for ours_layer, their_layer in pairs:
        if _weights_signature(ours_layer)[1] != _weights_signature(their_layer)[1]:
            problems.append(f"{ours_layer.name}: encoder {_weights_signature(ours_layer)[1]} vs "
                            f"pretrained {_weights_signature(their_layer)[1]}")
    if problems:
        raise ValueError(
            f"ImageNet {backbone} weights do not fit encoder {encoder.name!r} ({len(problems)} problems, first: "
            f"{problems[0]}). ImageNet weights exist only for width=1.0 and 3-channel RGB input: build with "
            "width=1.0, or use weights=None."
        )
    for ours_layer, their_layer in pairs:
        ours_layer.set_weights(their_layer.get_weights())
    return len(pairs)


def _sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_keras_applications_imagenet(encoder: keras.Model, backbone: str, *,
                                      cache_dir: str | os.PathLike | None) -> LoadedWeights:
    source = IMAGENET_WEIGHTS[backbone]
    filename = source.url.rsplit("/", 1)[-1]
    try:
        local_file = keras.utils.get_file(filename, origin=source.url, file_hash=source.md5, hash_algorithm="md5",
                                          cache_subdir="models",
                                          cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as err:  # get_file raises bare Exception for network errors, ValueError for a bad hash
        raise WeightsUnavailableError(
            f"weights='imagenet' for {backbone}: could not download Keras' ImageNet weights from {source.url} "
            f"({type(err).__name__}: {err}). Offline alternatives: put that file at "
            f"{Path(cache_dir or os.environ.get('KERAS_HOME', '~/.keras')).expanduser() / 'models' / filename}, pass "
            f"weights='<path to a .weights.h5 of this encoder or segmenter>', use weights=None "
            f"(random initialisation), or a backbone with offline ImageNet weights "
            f"(weights='imagenet-offline': {', '.join(OFFLINE_BACKBONES)})."
        ) from err
    application = getattr(keras.applications, source.application)
    # Weights do not depend on the input size; any spatial size keeps the reference model cheap to build.
    reference = application(include_top=False, weights=local_file, input_shape=(None, None, 3))
    copied = copy_keras_applications_weights(reference, encoder, backbone)
    del reference
    description = f"keras.applications {source.application} ImageNet ({source.url}, md5 {source.md5})"
    log.info("%s in model %r: loaded %s into %d layers", backbone, encoder.name, description, copied)
    return LoadedWeights(backbone, "imagenet", description, _sha256_file(local_file),
                         copied, False)


def load_imagenet_weights(encoder: keras.Model, backbone: str, weights: str | None, *,
                          cache_dir: str | os.PathLike | None = None) -> LoadedWeights:
    """Pretrained ImageNet weights into a backbone built by `build_backbone(backbone, ...)`.

    `weights`: None (random, logged) | "imagenet" (Keras' download for resnet50/resnet101/xception,
    `seglab.models.weights` for the offline-capable backbones) | "imagenet-offline" (mobilenetv2 and
    efficientnet_lite0 only). Local weight files are handled by `seglab.models.build`.
    Never falls back to random weights: every failure raises, naming the alternatives.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; available: {', '.join(BACKBONES)}")
    if backbone in OFFLINE_BACKBONES:
        return load_backbone_weights(encoder, backbone, weights, cache_dir=cache_dir)
    if weights is None:
        log.info("%s in model %r: random initialisation (weights=None)", backbone, encoder.name)
        return LoadedWeights(backbone, "none", "random initialisation", None, 0, False)
    if weights == "imagenet-offline":
        raise ValueError(
            f"weights='imagenet-offline' exists only for {', '.join(OFFLINE_BACKBONES)} (no package ships "
            f"{backbone} weights); for {backbone} use weights='imagenet' (Keras' download, needs the network: "
            f"{IMAGENET_WEIGHTS[backbone].url}), a path to a .weights.h5 file, or weights=None"
        )
    if weights == "imagenet":
        return _load_keras_applications_imagenet(encoder, backbone, cache_dir=cache_dir)
    raise ValueError(f"{backbone}: weights must be None, 'imagenet' or 'imagenet-offline' here, got {weights!r}")

