"""SAGAN (Zhang et al. 2019) generating an image and its label map jointly.

What makes it SAGAN rather than a DCGAN with an extra layer:

- `SelfAttention` blocks in both networks at `attention_resolution`: every position attends to all
  others (query/key 1x1 convs at C/8 channels, value at C/2, projected back to C), and the result
  is added through a learned scalar gate: `x + gamma * attention(x)`, with `gamma` initialised
  at 0, so each block starts as the identity and the network learns how much non-local evidence
  to mix in;
- spectral normalisation (`keras.layers.SpectralNormalization`, through `SpectralNorm` below) on
  every convolution and dense layer of both networks, attention projections included;
- the hinge loss: D minimises E[relu(1 - D(real))] + E[relu(1 + D(fake))], G minimises -E[D(fake)];
- two time-scale update rule: Adam(beta_1 0, beta_2 0.9), the discriminator's learning rate 4x
  the generator's (set by the training settings).

Generator: z -> SN Dense to 4x4 -> [nearest upsample, SN 3x3 conv, BatchNorm, ReLU] per doubling
-> heads: tanh image (3 channels), softmax label (C + 1 channels, classes + ignore; argmax at the
end). Discriminator: [SN 4x4 stride-2 conv, LeakyReLU 0.1] per halving on the concatenated
(image, label channels), an SN 3x3 conv at 4x4, global average pooling, an SN dense logit.

Keras' `SpectralNormalization` divides the wrapped kernel by its largest singular value (one power
iteration per training call, the estimate carried across steps) and stores the normalised kernel,
so the layer's weights always have spectral norm ~1 after training steps and inference uses them
as they are.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import layers, ops

from seglab.gan.common import check_image_size, label_channels, level_channels, set_label_prior
from seglab.gan.dcgan import DCGANTrainer

__all__ = [
    "SAGANTrainer",
    "SelfAttention",
    "SpectralNorm",
    "build_discriminator",
    "build_generator",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
]

_BN_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="seglab")
class SpectralNorm(layers.SpectralNormalization):
    """Keras' `SpectralNormalization` with its all-zero-kernel guard as a select instead of a cond.

    Same normalisation (`normalized_weights`, one power iteration per training call). Keras
    guards an all-zero kernel with `ops.cond`; under the persistent GradientTape of a GAN step
    TensorFlow wraps every cond in a function for higher-order gradients, which cost ~0.8 s of
    tracing per layer call (about 20 s for SAGAN's step). `ops.where` keeps the guard without it.
    """

    def call(self, inputs, training=False):
        if training:
            new_vector_u, new_kernel = self.normalized_weights()
            degenerate = ops.all(ops.equal(self.kernel.value, 0))  # sigma 0: keep the weights
            self.vector_u.assign(ops.where(degenerate, self.vector_u.value, new_vector_u))
            self.kernel.assign(ops.where(degenerate, self.kernel.value, new_kernel))
        return ops.cast(self.layer(inputs), inputs.dtype)


def _sn(layer: keras.layers.Layer) -> keras.layers.Layer:
    return SpectralNorm(layer, name=f"sn_{layer.name}")


@keras.saving.register_keras_serializable(package="seglab")
class SelfAttention(layers.Layer):
    """Non-local self-attention over all H x W positions with a zero-initialised output gate.

    Args:
        key_ratio: query/key channels = channels // key_ratio (SAGAN: 8).
        value_ratio: value channels = channels // value_ratio (BigGAN's SAGAN block: 2).
        spectral_norm: wrap the four 1x1 projections in SpectralNormalization.
    """

    def __init__(self, key_ratio: int = 8, value_ratio: int = 2, spectral_norm: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.key_ratio = int(key_ratio)
        self.value_ratio = int(value_ratio)
        self.spectral_norm = bool(spectral_norm)

    def _projection(self, channels: int, name: str, input_shape) -> keras.layers.Layer:
        layer = layers.Conv2D(channels, 1, use_bias=False, name=name)
        if self.spectral_norm:
            layer = SpectralNorm(layer, name=f"sn_{name}")
        layer.build(input_shape)
        return layer

    def build(self, input_shape):
        channels = int(input_shape[-1])
        key_channels, value_channels = channels // self.key_ratio, channels // self.value_ratio
        if key_channels < 1 or value_channels < 1:
            raise ValueError(f"SelfAttention needs >= {max(self.key_ratio, self.value_ratio)} channels, got {channels}")
        self.query = self._projection(key_channels, "query", input_shape)
        self.key = self._projection(key_channels, "key", input_shape)
        self.value = self._projection(value_channels, "value", input_shape)
        self.output_projection = self._projection(channels, "output", (*input_shape[:-1], value_channels))
        # The gate: 0 at the start, so the block is exactly the identity until training opens it.
        self.gamma = self.add_weight(shape=(), initializer="zeros", trainable=True, name="gamma")
        super().build(input_shape)

    def attention_map(self, inputs, training=False):
        """(B, H*W, H*W) attention weights: row i is how position i spreads over all positions."""
        shape = ops.shape(inputs)
        positions = shape[1] * shape[2]
        query = ops.reshape(self.query(inputs, training=training), (shape[0], positions, -1))
        key = ops.reshape(self.key(inputs, training=training), (shape[0], positions, -1))
        return ops.softmax(ops.matmul(query, ops.transpose(key, (0, 2, 1))), axis=-1)

    def call(self, inputs, training=False):
        shape = ops.shape(inputs)
        attention = self.attention_map(inputs, training=training)
        value = ops.reshape(self.value(inputs, training=training), (shape[0], shape[1] * shape[2], -1))
        attended = ops.reshape(ops.matmul(attention, value), (shape[0], shape[1], shape[2], -1))
        return inputs + self.gamma * self.output_projection(attended, training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "key_ratio": self.key_ratio, "value_ratio": self.value_ratio,
                "spectral_norm": self.spectral_norm}


def _attention_resolution(image_size: int, attention_resolution: int | None) -> int:
    resolution = max(4, image_size // 4) if attention_resolution is None else int(attention_resolution)
    if resolution not in [2 ** k for k in range(2, int(math.log2(image_size)) + 1)]:
        raise ValueError(f"attention_resolution must be a power of two in 4..{image_size}, got {attention_resolution}")
    return resolution


def build_generator(num_classes: int, image_size: int = 64, *, latent_dim: int = 64, width: int = 16,
                    attention_resolution: int | None = None, label_prior: np.ndarray | None = None,
                    name: str = "sagan_generator") -> keras.Model:
    """z (B, latent_dim) -> [image (B, S, S, 3) in [-1, 1], label probabilities (B, S, S, C + 1)].

    `attention_resolution` (default S/4) is the feature-map side where the self-attention block
    sits; `label_prior` as in `seglab.gan.dcgan.build_generator`.
    """
    size = check_image_size(image_size)
    attend_at = _attention_resolution(size, attention_resolution)
    upsamplings = int(math.log2(size)) - 2
    z = keras.Input((latent_dim,), name="z")
    channels = level_channels(width, upsamplings)
    x = _sn(layers.Dense(4 * 4 * channels, name="project"))(z)
    x = layers.Reshape((4, 4, channels))(x)
    resolution = 4
    for i in range(upsamplings):
        x = layers.UpSampling2D(2, interpolation="nearest")(x)
        resolution *= 2
        x = _sn(layers.Conv2D(level_channels(width, upsamplings - 1 - i), 3, padding="same", use_bias=False,
                              name=f"up{i}"))(x)
        x = layers.BatchNormalization(momentum=_BN_MOMENTUM, name=f"up{i}_bn")(x)
        x = layers.ReLU()(x)
        if resolution == attend_at:
            x = SelfAttention(name="attention")(x)
    image = _sn(layers.Conv2D(3, 3, padding="same", name="image_conv"))(x)
    image = layers.Activation("tanh", name="image")(image)
    label = SpectralNorm(layers.Conv2D(label_channels(num_classes), 3, padding="same", name="label_conv"),
                         name="label_logits")(x)
    label = layers.Softmax(name="label")(label)
    generator = keras.Model(z, [image, label], name=name)
    set_label_prior(generator, label_prior)
    return generator


def build_discriminator(num_classes: int, image_size: int = 64, *, width: int = 16,
                        attention_resolution: int | None = None, name: str = "sagan_discriminator") -> keras.Model:
    """(B, S, S, 3 + C + 1) image and label channels -> (B, 1) logit (unbounded, for the hinge loss)."""
    size = check_image_size(image_size)
    attend_at = _attention_resolution(size, attention_resolution)
    downsamplings = int(math.log2(size)) - 2
    inputs = keras.Input((size, size, 3 + label_channels(num_classes)), name="image_and_label")
    x = inputs
    resolution = size
    for i in range(downsamplings):
        x = _sn(layers.Conv2D(level_channels(width, i), 4, strides=2, padding="same", name=f"down{i}"))(x)
        x = layers.LeakyReLU(0.1)(x)
        resolution //= 2
        if resolution == attend_at:
            x = SelfAttention(name="attention")(x)
    x = _sn(layers.Conv2D(level_channels(width, downsamplings), 3, padding="same", name="top"))(x)
    x = layers.LeakyReLU(0.1)(x)
    x = layers.GlobalAveragePooling2D()(x)
    logit = _sn(layers.Dense(1, name="logit"))(x)
    return keras.Model(inputs, logit, name=name)


def hinge_discriminator_loss(real_logits, fake_logits):
    """mean(relu(1 - D(real))) + mean(relu(1 + D(fake))): zero once real >= 1 and fake <= -1."""
    return ops.mean(ops.relu(1.0 - real_logits)) + ops.mean(ops.relu(1.0 + fake_logits))


def hinge_generator_loss(fake_logits):
    """-mean(D(fake)): the generator raises the critic's score of its samples."""
    return -ops.mean(fake_logits)


class SAGANTrainer(DCGANTrainer):
    """DCGAN's step (one D and one G update per batch) with the hinge loss."""

    def adversarial_losses(self, real_logits, fake_logits):
        return hinge_discriminator_loss(real_logits, fake_logits), hinge_generator_loss(fake_logits)
