"""MobileNetV2 backbone built layer for layer like torchvision's, so its ImageNet weights convert exactly.

Why not `keras.applications.MobileNetV2`: it pads stride-2 convolutions the TensorFlow way
('same' is asymmetric at even sizes) and uses BatchNorm epsilon 1e-3, while torchvision pads
1 pixel on every side and uses 1e-5; either difference alone changes the logits by whole units.
Here stride-2 3x3 convolutions are `ZeroPadding2D(1)` + 'valid' and BatchNorm epsilon is 1e-5.

Layer names are the contract with the weight converter (`convert_mobilenetv2_state_dict`):
``stem_conv``, ``block{i}_{expand,dw,project}_{conv,bn}`` with ``i`` = torchvision's
``features.{i}`` index (1..17), and for the classifier ``head_conv``, ``head_bn``, ``predictions``.

Shared here with the other hand-built trunks: `make_divisible`, `atrous_plan`, the conv/BN helpers
and the torch -> Keras kernel layouts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import keras
import numpy as np
from PIL import Image

# torchvision's MobileNetV2 was trained on [0, 1] images normalised with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPSILON = 1e-5  # torch's default; keras.applications' 1e-3 visibly shifts the logits
BN_MOMENTUM = 0.9  # Keras convention for torch's momentum=0.1
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
CLASSIFIER_DROPOUT = 0.2
EVAL_CROP_SIZE = 224
EVAL_RESIZE_SHORT_SIDE = 256  # torchvision's ImageNet eval: resize to 256, center-crop 224

# torchvision's inverted residual setting: expand ratio t, channels c, repeats n, first stride s.
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
SUPPORTED_OUTPUT_STRIDES = (8, 16, 32)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10% below `value`.

    The same rule as torchvision's `_make_divisible` and TF EfficientNet's `round_filters`.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return int(rounded)


def atrous_plan(block_strides: Sequence[int], output_stride: int, stem_stride: int = 2) -> list[tuple[int, int]]:
    """(stride, dilation) per block so that no feature map gets coarser than `output_stride`.

    DeepLab's rule: once the running stride has reached `output_stride`, a block that would
    downsample runs at stride 1 instead and every later block dilates by the stride it skipped.
    Kernels are unchanged, so pretrained weights stay valid.
    """
    if output_stride not in SUPPORTED_OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {SUPPORTED_OUTPUT_STRIDES}, got {output_stride!r}")
    plan = []
    current_stride, dilation = stem_stride, 1
    for stride in block_strides:
        if stride > 1 and current_stride >= output_stride:
            plan.append((1, dilation))
            dilation *= stride
        else:
            plan.append((stride, dilation))
            current_stride *= stride
    return plan


def conv_bn(x, filters: int, kernel_size: int, *, name: str, strides: int = 1, padding: str = "same",
            dilation: int = 1, bn_epsilon: float, bn_momentum: float):
    x = keras.layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, dilation_rate=dilation,
                            use_bias=False, name=f"{name}_conv")(x)
    return keras.layers.BatchNormalization(epsilon=bn_epsilon, momentum=bn_momentum, name=f"{name}_bn")(x)


def depthwise_bn(x, kernel_size: int, *, name: str, strides: int, padding: str, dilation: int,
                 bn_epsilon: float, bn_momentum: float):
    x = keras.layers.DepthwiseConv2D(kernel_size, strides=strides, padding=padding, dilation_rate=dilation,
                                     use_bias=False, name=f"{name}_conv")(x)
    return keras.layers.BatchNormalization(epsilon=bn_epsilon, momentum=bn_momentum, name=f"{name}_bn")(x)


def relu6(name: str) -> keras.layers.Layer:
    return keras.layers.ReLU(max_value=6.0, name=name)


@dataclass(frozen=True)
class _Block:
    index: int  # torchvision features.{index}
    expand_ratio: int
    out_channels: int
    stride: int  # nominal stride (before atrous_plan)


def _blocks(width: float) -> list[_Block]:
    blocks, index = [], 1
    for expand_ratio, channels, repeats, first_stride in _INVERTED_RESIDUAL_SETTING:
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            blocks.append(_Block(index, expand_ratio, make_divisible(channels * width), stride))
            index += 1
    return blocks


def torchvision_normalisation(inputs):
    """ImageNet mean/std on [0, 255] RGB, as torchvision's checkpoints expect; other channel counts to [0, 1]."""
    if inputs.shape[-1] == 3:
        return keras.layers.Normalization(
            mean=[255.0 * m for m in IMAGENET_MEAN],
            variance=[(255.0 * s) ** 2 for s in IMAGENET_STD],
            name="normalize",
        )(inputs)
    # Non-RGB input (e.g. extra channels): no ImageNet statistics apply.
    return keras.layers.Rescaling(1.0 / 255.0, name="normalize")(inputs)


def mobilenetv2_trunk(x, *, width: float, output_stride: int):
    """Stem and the 17 inverted-residual blocks on the normalised image `x`; returns block 17's output.

    `width` scales channels like torchvision's `width_mult` (multiples of 8); `output_stride` 16
    or 8 trades the last one or two downsamplings for dilation.
    """
    blocks = _blocks(width)
    plan = atrous_plan([b.stride for b in blocks], output_stride)
    bn = dict(bn_epsilon=BN_EPSILON, bn_momentum=BN_MOMENTUM)

    x = keras.layers.ZeroPadding2D(1, name="stem_pad")(x)
    x = conv_bn(x, make_divisible(STEM_CHANNELS * width), 3, strides=2, padding="valid", name="stem", **bn)
    x = relu6("stem_relu")(x)

    in_channels = make_divisible(STEM_CHANNELS * width)
    for block, (stride, dilation) in zip(blocks, plan):
        prefix = f"block{block.index}"
        shortcut = x
        hidden = int(round(in_channels * block.expand_ratio))
        if block.expand_ratio != 1:
            x = conv_bn(x, hidden, 1, name=f"{prefix}_expand", **bn)
            x = relu6(f"{prefix}_expand_relu")(x)
        if stride == 2:
            # torch pads 1 on every side; Keras 'same' would pad only bottom/right at even sizes.
            x = keras.layers.ZeroPadding2D(1, name=f"{prefix}_dw_pad")(x)
            x = depthwise_bn(x, 3, strides=2, padding="valid", dilation=1, name=f"{prefix}_dw", **bn)
        else:
            # Stride 1: 'same' pads `dilation` on every side, exactly like torch's padding=dilation.
            x = depthwise_bn(x, 3, strides=1, padding="same", dilation=dilation, name=f"{prefix}_dw", **bn)
        x = relu6(f"{prefix}_dw_relu")(x)
        x = conv_bn(x, block.out_channels, 1, name=f"{prefix}_project", **bn)
        # The residual follows the pretrained topology (nominal stride), not the dilated one.
        if block.stride == 1 and in_channels == block.out_channels:
            x = keras.layers.Add(name=f"{prefix}_add")([shortcut, x])
        in_channels = block.out_channels
    return x


def mobilenetv2_classifier_head(features, *, width: float = 1.0, num_classes: int = 1000,
                                dropout: float = CLASSIFIER_DROPOUT):
    """torchvision's head on c5: 1x1 conv to 1280 + BN + ReLU6, global average pool, dropout, dense logits."""
    x = conv_bn(features, make_divisible(HEAD_CHANNELS * max(1.0, width)), 1, name="head",
                bn_epsilon=BN_EPSILON, bn_momentum=BN_MOMENTUM)
    x = relu6("head_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    return keras.layers.Dense(num_classes, name="predictions")(x)


def check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"preprocess expects one uint8 RGB image of shape (H, W, 3), got {image.dtype} {image.shape}")
    return image


def preprocess_torchvision(image: np.ndarray) -> np.ndarray:
    """torchvision's eval transform: bilinear (antialiased) resize of the short side to 256, center crop 224.

    Returns a (1, 224, 224, 3) float32 batch in [0, 255]; the model normalises.
    """
    image = check_image(image)
    height, width = image.shape[:2]
    # torchvision keeps the short side exact and truncates the long one.
    if height <= width:
        size = (int(EVAL_RESIZE_SHORT_SIDE * width / height), EVAL_RESIZE_SHORT_SIDE)
    else:
        size = (EVAL_RESIZE_SHORT_SIDE, int(EVAL_RESIZE_SHORT_SIDE * height / width))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), dtype=np.float32)
    top = int(round((resized.shape[0] - EVAL_CROP_SIZE) / 2.0))
    left = int(round((resized.shape[1] - EVAL_CROP_SIZE) / 2.0))
    return resized[None, top : top + EVAL_CROP_SIZE, left : left + EVAL_CROP_SIZE]


# ---------------------------------------------------------------- weight conversion (torch -> Keras)

HEAD_LAYERS = ("head_conv", "head_bn", "predictions")


def torch_conv_kernel(weight: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))  # OIHW -> HWIO


def torch_depthwise_kernel(weight: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(weight.transpose(2, 3, 0, 1))  # (C, 1, H, W) -> (H, W, C, 1)


def torch_batchnorm(state: Mapping[str, np.ndarray], key: str) -> list[np.ndarray]:
    # Keras' BatchNormalization weight order.
    return [state[f"{key}.weight"], state[f"{key}.bias"], state[f"{key}.running_mean"], state[f"{key}.running_var"]]


def convert_mobilenetv2_state_dict(
    state: Mapping[str, np.ndarray], source: str = "state dict"
) -> dict[str, list[np.ndarray]]:
    """torchvision MobileNetV2 state dict (numpy arrays) -> {Keras layer name: weights in Keras order}.

    Includes the classifier head (`HEAD_LAYERS`); a backbone simply has no such layers.
    """
    try:
        converted: dict[str, list[np.ndarray]] = {
            "stem_conv": [torch_conv_kernel(state["features.0.0.weight"])],
            "stem_bn": torch_batchnorm(state, "features.0.1"),
        }
        for block in _blocks(1.0):
            key, prefix = f"features.{block.index}.conv", f"block{block.index}"
            if block.expand_ratio == 1:
                dw, project, project_bn = f"{key}.0", f"{key}.1", f"{key}.2"
            else:
                converted[f"{prefix}_expand_conv"] = [torch_conv_kernel(state[f"{key}.0.0.weight"])]
                converted[f"{prefix}_expand_bn"] = torch_batchnorm(state, f"{key}.0.1")
                dw, project, project_bn = f"{key}.1", f"{key}.2", f"{key}.3"
            converted[f"{prefix}_dw_conv"] = [torch_depthwise_kernel(state[f"{dw}.0.weight"])]
            converted[f"{prefix}_dw_bn"] = torch_batchnorm(state, f"{dw}.1")
            converted[f"{prefix}_project_conv"] = [torch_conv_kernel(state[f"{project}.weight"])]
            converted[f"{prefix}_project_bn"] = torch_batchnorm(state, project_bn)
        converted["head_conv"] = [torch_conv_kernel(state["features.18.0.weight"])]
        converted["head_bn"] = torch_batchnorm(state, "features.18.1")
        converted["predictions"] = [np.ascontiguousarray(state["classifier.1.weight"].T), state["classifier.1.bias"]]
    except KeyError as missing:
        raise ValueError(
            f"{source}: no tensor {missing.args[0]!r}; expected torchvision's MobileNetV2 layout "
            "(features.0 ... features.18, classifier.1)"
        ) from None
    return converted
