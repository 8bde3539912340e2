"""The segmentation model zoo: names -> builders, one `build` entry point, weights handled in one place.

Every model takes float32 RGB images in [0, 255] of the static size it was built for and returns
logits (B, H, W, num_classes) in float32. Weights are size-independent: a model trained at one
size can be rebuilt at another and given the same weights file.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from seglab.digest import sha256_file
from seglab.models import deeplab, unet
from seglab.models.backbones import BACKBONES, ENCODER_LAYER
from seglab.models.weights import WeightsArg, check_imagenet_request, load_imagenet_weights

log = logging.getLogger(__name__)

WEIGHT_KEYWORDS = ("imagenet", "imagenet-offline")


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. `size_multiple(options)`: what H and W must be multiples of."""

    name: str
    description: str
    builder: Callable[..., keras.Model]
    size_multiple: Callable[[Mapping[str, Any]], int]
    backbone: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # accepted extra options and their defaults


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def available() -> list[str]:
    """Names accepted by `build`, sorted."""
    return sorted(_REGISTRY)


def spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}") from None


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_input_shape(model: ModelSpec, input_shape: Sequence[Any], multiple: int) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(_is_integer(s) for s in shape):
        raise ValueError(f"{model.name}: input_shape must be (height, width, channels) as integers, got {shape!r} "
                         "(sizes must be static; rebuild the model for another size, the weights fit any size)")
    height, width, channels = (int(s) for s in shape)
    if channels != 3:
        raise ValueError(f"{model.name}: input must be RGB with 3 channels, got input_shape {shape!r}")
    for axis, size in (("height", height), ("width", width)):
        if size < multiple or size % multiple:
            lower, upper = max(multiple, size // multiple * multiple), max(multiple, math.ceil(size / multiple) * multiple)
            nearest = f"{lower}" if lower == upper else f"{lower} or {upper}"
            raise ValueError(
                f"{model.name}: input {axis} {size} (input_shape {shape!r}) is not a positive multiple of {multiple}, "
                f"the factor this network downsamples by; nearest valid {axis}: {nearest}. Resize, crop or pad "
                "the images to such a size."
            )
    return height, width, channels


def build(
    name: str,
    num_classes: int,
    input_shape: Sequence[int] = (256, 256, 3),
    width: float = 1.0,
    weights: WeightsArg = None,
    **options: Any,
) -> keras.Model:
    """Build registry model `name` (see `available()`).

    num_classes: logits per pixel (>= 1). input_shape: static (H, W, 3); H and W must be multiples of
    the network's total downsampling (16 for unet/attention_unet, 32 for unet_<backbone>, the
    output stride for deeplabv3plus_<backbone>), else ValueError naming the nearest valid sizes.
    width: channel multiplier (> 0; every count rounded to a multiple of 8).
    weights: None (random init) | "imagenet" (Keras' / the checkpoint's download) |
    "imagenet-offline" (the backbones with an offline checkpoint) | path to a Keras ``.weights.h5``
    file saved from the whole segmenter (`model.save_weights`) or from its encoder alone
    (`model.get_layer("encoder").save_weights`): which one is told from the file's contents.
    options: per model, e.g. ``output_stride`` (16 or 8) for deeplabv3plus_*, ``decoder_filters``
    for unet_<backbone>; an option a model does not take is a TypeError listing the ones it takes.
    """
    return _build(name, num_classes, input_shape, width, weights, options)[0]


def build_with_weights(arch: str, num_classes: int, image_size: int, width: float, weights: WeightsArg,
                       options: Mapping[str, Any]) -> tuple[keras.Model, str]:
    """`build` at (image_size, image_size, 3), returning also a record of the weights actually loaded.

    The record is ``"random"`` for none; for ImageNet weights the loader's source and sha256; for a
    file its path, whether it held the whole model or the encoder, and its sha256.
    """
    return _build(arch, num_classes, (image_size, image_size, 3), width, weights, options)


def _build(name: str, num_classes: int, input_shape: Sequence[int], width: float, weights: WeightsArg,
           options: Mapping[str, Any]) -> tuple[keras.Model, str]:
    model_spec = spec(name)
    if not _is_integer(num_classes) or num_classes < 1:
        raise ValueError(f"{name}: num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(width, numbers.Real) or isinstance(width, bool) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"{name}: width must be a positive number, got {width!r}")
    unknown = sorted(set(options) - set(model_spec.options))
    if unknown:
        accepted = ", ".join(f"{k}={v!r}" for k, v in model_spec.options.items()) or "none"
        raise TypeError(f"{name}: unexpected option(s) {', '.join(unknown)}; options it takes: {accepted}")
    resolved = {**model_spec.options, **options}
    shape = _check_input_shape(model_spec, input_shape, model_spec.size_multiple(resolved))
    _check_weights_request(model_spec, weights, width)

    model = model_spec.builder(int(num_classes), shape, width=float(width), **resolved)
    if weights is None:
        log.info("%s: random initialisation (weights=None)", name)
        return model, "random"
    if isinstance(weights, str) and weights in WEIGHT_KEYWORDS:
        loaded = load_imagenet_weights(model.get_layer(ENCODER_LAYER), model_spec.backbone, weights)
        return model, f"{loaded.weights}: {loaded.source}" + (f" (sha256 {loaded.sha256})" if loaded.sha256 else "")
    kind = load_weights_file(model, weights)
    return model, f"file {weights} ({kind} weights, sha256 {sha256_file(Path(weights).expanduser())})"


def _check_weights_request(model_spec: ModelSpec, weights: WeightsArg, width: float) -> None:
    """Fail before building (and before any download) on a weights request that cannot work."""
    if weights is None:
        return
    if isinstance(weights, str) and weights in WEIGHT_KEYWORDS:
        if model_spec.backbone is None:
            raise ValueError(
                f"{model_spec.name}: weights={weights!r} needs a pretrained encoder, and {model_spec.name} has none; "
                f"use weights=None or a .weights.h5 path, or a model with a backbone: "
                f"{', '.join(n for n in available() if _REGISTRY[n].backbone)}"
            )
        if width != 1.0:
            raise ValueError(f"{model_spec.name}: ImageNet weights exist only for width=1.0, got width={width!r}; "
                             "use width=1.0 or weights=None")
        check_imagenet_request(model_spec.backbone, weights)
        return
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"{model_spec.name}: weights must be None, 'imagenet', 'imagenet-offline' or a path, "
                        f"got {weights!r}")


# ------------------------------------------------------------------------------------ weight files


def _file_variable_shapes(path: Path) -> Counter:
    import h5py

    shapes: Counter = Counter()
    try:
        with h5py.File(path, "r") as handle:
            def visit(name: str, item) -> None:
                if isinstance(item, h5py.Dataset) and name.rsplit("/", 2)[-2:-1] == ["vars"]:
                    shapes[tuple(item.shape)] += 1

            handle.visititems(visit)
    except OSError as err:
        raise ValueError(f"weights={str(path)!r}: not a readable HDF5 file ({err})") from err
    return shapes


def _variable_shapes(model: keras.Model) -> Counter:
    return Counter(tuple(v.shape) for v in model.weights)


def load_weights_file(model: keras.Model, path: WeightsArg) -> str:
    """Load a ``.weights.h5`` of the whole `model` or of its ``encoder`` layer; returns which ("model"/"encoder").

    The file's variables (their shapes) are compared with both targets first, so a file meant for
    the other target, another architecture or another width is rejected before anything is
    assigned, with a message saying what was expected.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{model.name}: weights file {str(path)!r} does not exist (weights must be None, "
                                "'imagenet', 'imagenet-offline' or the path of a .weights.h5 file)")
    if not path.name.endswith(".weights.h5"):
        raise ValueError(f"{model.name}: weights file {str(path)!r} must be a Keras '.weights.h5' file, saved with "
                         "model.save_weights(...) from the segmenter or from model.get_layer('encoder')")
    in_file = _file_variable_shapes(path)
    targets: dict[str, keras.Model] = {"model": model}
    if ENCODER_LAYER in {layer.name for layer in model.layers}:
        targets["encoder"] = model.get_layer(ENCODER_LAYER)
    for kind, target in targets.items():
        if _variable_shapes(target) == in_file:
            target.load_weights(path)
            log.info("%s: loaded %s weights from %s", model.name, kind, path)
            return kind
    expected = "; ".join(f"{kind} {target.name!r}: {len(target.weights)} variables"
                         for kind, target in targets.items())
    raise ValueError(
        f"{model.name}: weights file {str(path)!r} ({sum(in_file.values())} variables) fits neither the whole "
        f"model nor its encoder ({expected}); it was saved from another architecture, width or class count"
    )


# ---------------------------------------------------------------------------------------- registry


def _unet_builder(num_classes, input_shape, *, width):
    return unet.unet(num_classes, input_shape, width=width)


def _attention_unet_builder(num_classes, input_shape, *, width):
    return unet.attention_unet(num_classes, input_shape, width=width)


def _backbone_unet_builder(backbone: str):
    def builder(num_classes, input_shape, *, width, decoder_filters):
        return unet.backbone_unet(backbone, num_classes, input_shape, width=width, decoder_filters=decoder_filters)

    return builder


def _deeplab_builder(backbone: str):
    def builder(num_classes, input_shape, *, width, output_stride):
        return deeplab.deeplabv3plus(backbone, num_classes, input_shape, width=width, output_stride=output_stride)

    return builder


def _deeplab_size_multiple(options: Mapping[str, Any]) -> int:
    deeplab.atrous_rates(options["output_stride"])  # validates the stride before it is used as a divisor
    return int(options["output_stride"])


def _backbone_unet_spec(backbone: str) -> ModelSpec:
    return ModelSpec(f"unet_{backbone}", f"U-Net decoder on a {backbone} encoder (output stride 32)",
                     _backbone_unet_builder(backbone), lambda options: 32, backbone=backbone,
                     options={"decoder_filters": unet.BACKBONE_UNET_DECODER_FILTERS})


def _deeplab_spec(backbone: str) -> ModelSpec:
    return ModelSpec(f"deeplabv3plus_{backbone}", f"DeepLabV3+ on a {backbone} encoder (output stride 16 or 8)",
                     _deeplab_builder(backbone), _deeplab_size_multiple, backbone=backbone,
                     options={"output_stride": 16})


# The segmenters a backbone's table entry may name in `architectures`.
BACKBONE_ARCHITECTURES: dict[str, Callable[[str], ModelSpec]] = {
    "unet": _backbone_unet_spec,
    "deeplabv3plus": _deeplab_spec,
}

register(ModelSpec("unet", "the seed's classic U-Net (64-1024 filters, transposed-conv up, concatenated skips)",
                   _unet_builder, lambda options: 16))
register(ModelSpec("attention_unet", "classic U-Net with additive attention gates on every skip (Oktay et al. 2018)",
                   _attention_unet_builder, lambda options: 16))
for _backbone in BACKBONES.values():
    for _architecture in _backbone.architectures:
        register(BACKBONE_ARCHITECTURES[_architecture](_backbone.name))
