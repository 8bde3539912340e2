"""Xception trunk: keras.applications' Xception layer for layer, on the image zero-padded by 3 pixels.

keras.applications' Xception convolves its stem 'valid' (256 -> 127 -> 125), which would misalign
the pyramid levels DeepLab needs at exactly H/stride. Padding the normalised image by 3 pixels on
every side (zero = mid-grey) and keeping keras.applications' two 'valid' stem convolutions gives
ceil(H/2) after the stem for any H, every later level at ceil(H/stride), and a grid centred on the
input pixels (stem output k sits on pixel 2k). Everything after the padding is keras.applications'
graph unchanged, so the encoder computes exactly ``keras.applications.Xception(include_top=False)``
of the padded image, and its ImageNet weights are the real pretrained features here, not an
approximation. (Re-padding the stem 'same' instead, as an earlier version did, keeps the kernels but
moves the stride-2 sampling grid by a pixel: a different function of the image.) Output stride
16/8 replaces the last downsamplings by dilation, DeepLab's way; weight shapes do not change.
"""

from __future__ import annotations

import keras

from seglab.models.mobilenetv2 import atrous_plan, make_divisible

XCEPTION_BN_EPSILON = 1e-3  # Keras' BatchNormalization default, what keras.applications' Xception uses
XCEPTION_INPUT_PADDING = 3  # pixels of zeros around the normalised image: two 'valid' 3x3 convs then give ceil(H/2)
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

    x = keras.layers.ZeroPadding2D(XCEPTION_INPUT_PADDING, name="block1_pad")(x)
    x = keras.layers.Conv2D(ch(32), 3, strides=2, padding="valid", use_bias=False, name="block1_conv1")(x)
    x = keras.layers.BatchNormalization(epsilon=XCEPTION_BN_EPSILON, name="block1_conv1_bn")(x)
    x = keras.layers.Activation("relu", name="block1_conv1_act")(x)
    x = keras.layers.Conv2D(ch(64), 3, padding="valid", use_bias=False, name="block1_conv2")(x)
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
