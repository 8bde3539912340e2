"""Xception trunk with keras.applications' layout and layer names, and a 'same'-padded stem.

keras.applications' Xception pads its stem 'valid' (256 -> 127 -> 125), which would misalign the
pyramid levels; DeepLab's Xception pads 'same', so every level is exactly H/stride. Kernels are
unchanged, so keras.applications' ImageNet weights still copy in.
"""

from __future__ import annotations

import keras

from seglab.models.mobilenetv2 import atrous_plan, make_divisible

XCEPTION_BN_EPSILON = 1e-3  # Keras' BatchNormalization default, what keras.applications' Xception uses
_MIDDLE_BLOCKS = 8  # blocks 5..12


def _sepconv_bn(x, filters: int, name: str, *, dilation: int = 1):
    x = keras.layers.SeparableConv2D(filters, 3, padding="same", dilation_rate=dilation, use_bias=False,
                                     name=name)(x)
    return keras.layers.BatchNormalization(epsilon=XCEPTION_BN_EPSILON, name=f"{name}_bn")(x)


def _downsampling_block(x, index: int, filters: tuple[int, int], *, stride: int, dilation: int,
                        first_activation: bool):
    """Entry/exit flow block: two separable convs, 3x3 max-pool, strided 1x1 residual projection."""
    prefix = f"block{index}"
    residual = keras.layers.Conv2D(filters[1], 1, strides=stride, padding="same", use_bias=False,
                                   name=f"{prefix}_residual_conv")(x)
    residual = keras.layers.BatchNormalization(epsilon=XCEPTION_BN_EPSILON, name=f"{prefix}_residual_bn")(residual)
    if first_activation:
        x = keras.layers.Activation("relu", name=f"{prefix}_sepconv1_act")(x)
    x = _sepconv_bn(x, filters[0], f"{prefix}_sepconv1", dilation=dilation)
    x = keras.layers.Activation("relu", name=f"{prefix}_sepconv2_act")(x)
    x = _sepconv_bn(x, filters[1], f"{prefix}_sepconv2", dilation=dilation)
    x = keras.layers.MaxPooling2D(3, strides=stride, padding="same", name=f"{prefix}_pool")(x)
    return keras.layers.Add(name=f"{prefix}_add")([x, residual])


def xception_trunk(x, *, width: float, output_stride: int):
    """Entry, middle and exit flow on the normalised image `x`; returns the last activation."""
    def ch(n: int) -> int:
        return make_divisible(n * width)

    # Nominal strides of blocks 2..14 after the stride-2 stem; blocks 5..12 and 14 keep resolution.
    block_strides = [2, 2, 2] + [1] * _MIDDLE_BLOCKS + [2, 1]
    plan = dict(zip(range(2, 15), atrous_plan(block_strides, output_stride, stem_stride=2)))

    x = keras.layers.Conv2D(ch(32), 3, strides=2, padding="same", use_bias=False, name="block1_conv1")(x)
    x = keras.layers.BatchNormalization(epsilon=XCEPTION_BN_EPSILON, name="block1_conv1_bn")(x)
    x = keras.layers.Activation("relu", name="block1_conv1_act")(x)
    x = keras.layers.Conv2D(ch(64), 3, padding="same", use_bias=False, name="block1_conv2")(x)
    x = keras.layers.BatchNormalization(epsilon=XCEPTION_BN_EPSILON, name="block1_conv2_bn")(x)
    x = keras.layers.Activation("relu", name="block1_conv2_act")(x)

    for index, filters in ((2, (128, 128)), (3, (256, 256)), (4, (728, 728))):
        stride, dilation = plan[index]
        x = _downsampling_block(x, index, (ch(filters[0]), ch(filters[1])), stride=stride, dilation=dilation,
                                first_activation=index > 2)

    for index in range(5, 5 + _MIDDLE_BLOCKS):
        _, dilation = plan[index]
        residual = x
        for conv in (1, 2, 3):
            x = keras.layers.Activation("relu", name=f"block{index}_sepconv{conv}_act")(x)
            x = _sepconv_bn(x, ch(728), f"block{index}_sepconv{conv}", dilation=dilation)
        x = keras.layers.Add(name=f"block{index}_add")([x, residual])

    stride, dilation = plan[13]
    x = _downsampling_block(x, 13, (ch(728), ch(1024)), stride=stride, dilation=dilation, first_activation=True)

    _, dilation = plan[14]
    x = _sepconv_bn(x, ch(1536), "block14_sepconv1", dilation=dilation)
    x = keras.layers.Activation("relu", name="block14_sepconv1_act")(x)
    x = _sepconv_bn(x, ch(2048), "block14_sepconv2", dilation=dilation)
    return keras.layers.Activation("relu", name="block14_sepconv2_act")(x)
