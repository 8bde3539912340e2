"""ResNet-50/101 v1 trunks with keras.applications' layout and layer names.

Built here rather than taken from keras.applications because the width multiplier and dilation
(DeepLab's output stride) both need a different graph; the names and weight shapes stay
keras.applications', so its ImageNet weights copy in (`seglab.models.keras_applications`).
"""

from __future__ import annotations

import keras

from seglab.models.mobilenetv2 import atrous_plan, make_divisible

RESNET_BN_EPSILON = 1.001e-5  # keras.applications' ResNet value; its weights were trained with it
RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}  # bottleneck blocks per stage


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


def resnet_trunk(x, *, depth: int, width: float, output_stride: int):
    """Stem and four bottleneck stages on the normalised image `x`; returns the last stage's output."""
    blocks_per_stage = RESNET_DEPTHS[depth]
    # Per block nominal strides after the stride-4 stem: stage conv2 keeps the resolution.
    block_strides = [
        (2 if stage > 0 and block == 0 else 1)
        for stage, count in enumerate(blocks_per_stage)
        for block in range(count)
    ]
    plan = iter(atrous_plan(block_strides, output_stride, stem_stride=4))

    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = _conv_bn(x, make_divisible(64 * width), 7, "conv1", strides=2)
    x = keras.layers.Activation("relu", name="conv1_relu")(x)
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage, count in enumerate(blocks_per_stage):
        filters = make_divisible(64 * 2**stage * width)
        for block in range(count):
            stride, dilation = next(plan)
            x = _bottleneck(x, filters, f"conv{stage + 2}_block{block + 1}", stride=stride, dilation=dilation,
                            project_shortcut=block == 0)
    return x
