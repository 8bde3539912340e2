"""U-Net family: the seed's classic U-Net, the attention U-Net, and U-Net decoders on pretrained encoders.

All models take float32 RGB in [0, 255] (normalised inside the model) and return per-pixel logits
(B, H, W, num_classes) in float32, also under a mixed-precision policy.

- `unet`: Ronneberger et al. as in the seed: per level two 3x3 conv (with bias) + BatchNorm + ReLU,
  64 -> 1024 filters, 2x2 max-pool down, 2x2 transposed conv up, skip concatenated before the
  convs, 1x1 conv to logits. 31,061,147 parameters at width 1, 3 input channels, 91 classes.
- `attention_unet`: the same with an additive attention gate (Oktay et al. 2018) on every skip,
  gated by the coarser decoder feature.
- `backbone_unet`: the U-Net decoder (transposed conv up, concatenate, two conv-BN-ReLU) on the
  ``[c1..c5]`` pyramid of a backbone from `seglab.models.backbones`, nested as one layer named
  ``encoder``; a last up-step brings c1's stride 2 back to full resolution.

Decoder layer names start with ``decoder_`` (or ``down``/``up``/``bottleneck`` for the plain U-Nets)
so they never collide with an encoder's layer names.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from seglab.models.backbones import build_backbone
from seglab.models.mobilenetv2 import make_divisible

UNET_FILTERS = (64, 128, 256, 512, 1024)
BACKBONE_UNET_DECODER_FILTERS = (256, 128, 64, 32, 16)


def scaled(channels: int, width: float) -> int:
    """`channels` x `width`, rounded to a multiple of 8 (at least 8), the rule every seglab model uses."""
    return make_divisible(channels * width)


def conv_bn_relu(x, filters: int, name: str, *, kernel_size: int = 3, dilation: int = 1, use_bias: bool = False,
                 conv: type[keras.layers.Conv2D] = keras.layers.Conv2D):
    x = conv(filters, kernel_size, padding="same", dilation_rate=dilation, use_bias=use_bias, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


def double_conv(x, filters: int, name: str, *, use_bias: bool = False):
    x = conv_bn_relu(x, filters, f"{name}_1", use_bias=use_bias)
    return conv_bn_relu(x, filters, f"{name}_2", use_bias=use_bias)


def logits_head(x, num_classes: int):
    """1x1 conv to class logits, then a float32 identity so logits leave the model in float32
    even when the layers compute in float16 (mixed precision)."""
    x = keras.layers.Conv2D(num_classes, 1, name="logits_conv")(x)
    return keras.layers.Activation("linear", dtype="float32", name="logits")(x)


def _image_input(input_shape: Sequence[int]) -> keras.KerasTensor:
    return keras.Input(shape=tuple(input_shape), name="image")


def _attention_gate(skip, gating, name: str):
    """Additive attention gate (Oktay et al. 2018, "Attention U-Net", Fig. 2).

    theta(skip) is strided down to the gating signal's resolution, added to phi(gating), ReLU,
    psi -> one sigmoid coefficient per pixel, resampled back up and multiplied into the skip,
    then W (1x1 conv + BN) on the gated skip.
    """
    skip_channels = skip.shape[-1]
    inter_channels = max(1, skip_channels // 2)
    theta = keras.layers.Conv2D(inter_channels, 2, strides=2, use_bias=False, name=f"{name}_theta")(skip)
    phi = keras.layers.Conv2D(inter_channels, 1, name=f"{name}_phi")(gating)
    q = keras.layers.Add(name=f"{name}_add")([theta, phi])
    q = keras.layers.Activation("relu", name=f"{name}_relu")(q)
    psi = keras.layers.Conv2D(1, 1, activation="sigmoid", name=f"{name}_psi")(q)
    alpha = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_resample")(psi)
    gated = keras.layers.Multiply(name=f"{name}_multiply")([skip, alpha])
    gated = keras.layers.Conv2D(skip_channels, 1, name=f"{name}_w_conv")(gated)
    return keras.layers.BatchNormalization(name=f"{name}_w_bn")(gated)


def _classic_unet(num_classes: int, input_shape: Sequence[int], *, width: float, attention: bool,
                  name: str) -> keras.Model:
    filters = [scaled(f, width) for f in UNET_FILTERS]
    inputs = _image_input(input_shape)
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)

    skips = []
    for level, level_filters in enumerate(filters[:-1], start=1):
        x = double_conv(x, level_filters, f"down{level}", use_bias=True)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
    x = double_conv(x, filters[-1], "bottleneck", use_bias=True)

    for level in range(len(skips), 0, -1):
        skip = skips[level - 1]
        if attention:
            skip = _attention_gate(skip, x, f"up{level}_gate")
        x = keras.layers.Conv2DTranspose(filters[level - 1], 2, strides=2, name=f"up{level}_transpose")(x)
        x = keras.layers.Concatenate(name=f"up{level}_concat")([skip, x])
        x = double_conv(x, filters[level - 1], f"up{level}", use_bias=True)
    return keras.Model(inputs, logits_head(x, num_classes), name=name)


def unet(num_classes: int, input_shape: Sequence[int], *, width: float = 1.0, name: str = "unet") -> keras.Model:
    """The seed's classic U-Net. H and W must be multiples of 16 (four 2x2 poolings)."""
    return _classic_unet(num_classes, input_shape, width=width, attention=False, name=name)


def attention_unet(num_classes: int, input_shape: Sequence[int], *, width: float = 1.0,
                   name: str = "attention_unet") -> keras.Model:
    """The classic U-Net with an additive attention gate on every skip. H, W multiples of 16."""
    return _classic_unet(num_classes, input_shape, width=width, attention=True, name=name)


def backbone_unet(
    backbone: str,
    num_classes: int,
    input_shape: Sequence[int],
    *,
    width: float = 1.0,
    decoder_filters: Sequence[int] = BACKBONE_UNET_DECODER_FILTERS,
    name: str | None = None,
) -> keras.Model:
    """U-Net decoder on `backbone`'s pyramid (output stride 32). H and W must be multiples of 32.

    `decoder_filters`: channels of the five up-steps (to strides 16, 8, 4, 2, 1) at width 1.
    """
    if len(decoder_filters) != 5:
        raise ValueError(f"decoder_filters must give 5 channel counts (strides 16, 8, 4, 2, 1), "
                         f"got {tuple(decoder_filters)!r}")
    filters = [scaled(f, width) for f in decoder_filters]
    encoder = build_backbone(backbone, input_shape, width=width, output_stride=32, name="encoder")
    inputs = _image_input(input_shape)
    c1, c2, c3, c4, c5 = encoder(inputs)

    x = c5
    for step, (skip, step_filters) in enumerate(zip((c4, c3, c2, c1, None), filters), start=1):
        x = keras.layers.Conv2DTranspose(step_filters, 2, strides=2, name=f"decoder_up{step}_transpose")(x)
        if skip is not None:
            x = keras.layers.Concatenate(name=f"decoder_up{step}_concat")([skip, x])
        x = double_conv(x, step_filters, f"decoder_up{step}")
    return keras.Model(inputs, logits_head(x, num_classes), name=name or f"unet_{backbone}")
