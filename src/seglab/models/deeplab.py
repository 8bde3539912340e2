"""DeepLabV3+ (Chen et al. 2018) on any backbone from `seglab.models.backbones`.

Encoder (one nested layer named ``encoder``) at output stride 16 or 8 -> ASPP on c5: a 1x1 conv,
three 3x3 atrous convs (rates 6, 12, 18 at output stride 16, doubled at 8), and image pooling
(global average -> 1x1 conv -> broadcast back), concatenated and projected by a 1x1 conv (256
channels at width 1, dropout 0.1 as in the reference implementation). Decoder: the ASPP output
bilinearly upsampled to stride 4, concatenated with c2 projected to 48 channels by a 1x1 conv,
two 3x3 convs (256), a 1x1 conv to logits, bilinear upsampling x4 to the input size. Every conv
is followed by BatchNorm and ReLU. Input float32 RGB [0, 255]; logits (B, H, W, classes) in float32.

The atrous convs are `AtrousConv2D`: at small inputs (the CPU profile's 64 px gives a 4x4 map at
stride 16) a rate at least the map's size leaves only the centre tap on real pixels; the layer then
skips the taps that only ever read padding, with the same 3x3 kernel and the same output.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from seglab.models.backbones import build_backbone
from seglab.models.unet import conv_bn_relu, scaled

DEEPLAB_OUTPUT_STRIDES = (16, 8)
ASPP_RATES_AT_STRIDE_16 = (6, 12, 18)
ASPP_FILTERS = 256
LOW_LEVEL_FILTERS = 48
DECODER_FILTERS = 256
ASPP_DROPOUT = 0.1


def atrous_rates(output_stride: int) -> tuple[int, int, int]:
    """ASPP rates scaled to the output stride: (6, 12, 18) at 16, (12, 24, 36) at 8."""
    if output_stride not in DEEPLAB_OUTPUT_STRIDES:
        raise ValueError(f"DeepLabV3+: output_stride must be one of {DEEPLAB_OUTPUT_STRIDES}, got {output_stride!r}")
    factor = 16 // output_stride
    return tuple(rate * factor for rate in ASPP_RATES_AT_STRIDE_16)


@keras.saving.register_keras_serializable(package="seglab")
class AtrousConv2D(keras.layers.Conv2D):
    """A dilated 'same' Conv2D that leaves out the kernel taps which can only read padding.

    With stride 1 and 'same' padding, tap j (j = -k//2 .. k//2 along an axis) of output pixel i reads
    input pixel i + j * rate; it reads a real pixel for some i only if |j| * rate < the axis length.
    The other taps always multiply zeros, so dropping them changes neither the output nor any
    gradient, while TensorFlow's dilated conv on CPU pays for the whole padded window (timings in
    benchmarks/README.md). The kernel keeps its full shape, so weights and parameter counts do not
    depend on the input size.
    """

    def convolution_op(self, inputs, kernel):
        if self.padding != "same" or tuple(self.strides) != (1, 1) or self.data_format != "channels_last":
            return super().convolution_op(inputs, kernel)
        dilation = list(self.dilation_rate)
        for axis in (0, 1):
            size, taps, rate = inputs.shape[1 + axis], kernel.shape[axis], dilation[axis]
            if size is None or rate == 1:
                continue
            centre = taps // 2
            reach = min(centre, (size - 1) // rate)  # the farthest tap that can read a real pixel
            if reach < centre:
                index = [slice(None)] * 4
                index[axis] = slice(centre - reach, centre + reach + 1)
                kernel = kernel[tuple(index)]
                if reach == 0:
                    dilation[axis] = 1
        return ops.conv(inputs, kernel, strides=self.strides, padding=self.padding, dilation_rate=tuple(dilation),
                        data_format=self.data_format)


def aspp(x, filters: int, rates: Sequence[int]):
    """Atrous spatial pyramid pooling on a feature map with static spatial size."""
    height, width = x.shape[1], x.shape[2]
    branches = [conv_bn_relu(x, filters, "aspp_1x1", kernel_size=1)]
    for rate in rates:
        branches.append(conv_bn_relu(x, filters, f"aspp_rate{rate}", dilation=rate, conv=AtrousConv2D))
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(x)
    pooled = conv_bn_relu(pooled, filters, "aspp_pool_1x1", kernel_size=1)
    # A 1x1 map upsampled by the feature size is a broadcast: every pixel gets the image context.
    branches.append(keras.layers.UpSampling2D((height, width), name="aspp_pool_broadcast")(pooled))
    x = keras.layers.Concatenate(name="aspp_concat")(branches)
    x = conv_bn_relu(x, filters, "aspp_project", kernel_size=1)
    return keras.layers.Dropout(ASPP_DROPOUT, name="aspp_dropout")(x)


def deeplabv3plus(
    backbone: str,
    num_classes: int,
    input_shape: Sequence[int],
    *,
    width: float = 1.0,
    output_stride: int = 16,
    name: str | None = None,
) -> keras.Model:
    """DeepLabV3+ with `backbone`. H and W must be multiples of `output_stride`."""
    rates = atrous_rates(output_stride)
    encoder = build_backbone(backbone, input_shape, width=width, output_stride=output_stride, name="encoder")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    _, c2, _, _, c5 = encoder(inputs)

    x = aspp(c5, scaled(ASPP_FILTERS, width), rates)
    x = keras.layers.UpSampling2D(output_stride // 4, interpolation="bilinear", name="decoder_upsample")(x)
    low_level = conv_bn_relu(c2, scaled(LOW_LEVEL_FILTERS, width), "decoder_low_level", kernel_size=1)
    x = keras.layers.Concatenate(name="decoder_concat")([x, low_level])
    x = conv_bn_relu(x, scaled(DECODER_FILTERS, width), "decoder_conv1")
    x = conv_bn_relu(x, scaled(DECODER_FILTERS, width), "decoder_conv2")
    x = keras.layers.Conv2D(num_classes, 1, name="decoder_classifier")(x)
    x = keras.layers.UpSampling2D(4, interpolation="bilinear", name="decoder_upsample_output")(x)
    return keras.Model(inputs, _float32_logits(x), name=name or f"deeplabv3plus_{backbone}")


def _float32_logits(x):
    # The 1x1 classifier runs at stride 4 (cheaper, as in the paper); only the float32 cast remains.
    return keras.layers.Activation("linear", dtype="float32", name="logits")(x)

