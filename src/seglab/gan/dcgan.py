"""DCGAN (Radford et al. 2016) generating an image and its label map jointly.

Generator: noise z -> Dense to a 4x4 map -> transposed-conv blocks (BatchNorm, ReLU) doubling the
resolution and halving the channels -> a last stride-2 transposed conv per output, reaching the
image size: tanh for the 3 image channels, softmax for the C + 1 label channels (classes +
ignore; argmax at the end).
Discriminator: strided 4x4 convs with LeakyReLU 0.2 down to 4x4, dropout 0.3, one logit, on the
concatenated (image, label channels). Unlike the paper's, it has no BatchNorm: with the 22 label
channels a BatchNorm discriminator overpowered the generator within ~100 steps at CPU scale
(d_loss ~0.05, the generator collapsed to one pattern), where this one stayed balanced
(d_loss ~0.9 after 450 steps of batch 8 on the default sample). Non-saturating BCE loss, Adam(beta_1 0.5).
The generator's label logits start at the log of the training data's class shares
(`seglab.gan.common.label_prior`).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from seglab.gan.common import (
    GanTrainer,
    bce_discriminator_loss,
    bce_generator_loss,
    check_image_size,
    label_channels,
    level_channels,
    set_label_prior,
    straight_through_one_hot,
)

__all__ = ["DCGANTrainer", "build_discriminator", "build_generator"]

# DCGAN's initialisation: N(0, 0.02) weights; BatchNorm momentum lowered from Keras' 0.99 so the
# inference statistics follow a generator that changes quickly over a few hundred steps.
_INIT = keras.initializers.RandomNormal(stddev=0.02)
_BN_MOMENTUM = 0.9


def build_generator(num_classes: int, image_size: int = 64, *, latent_dim: int = 64, width: int = 16,
                    label_prior: np.ndarray | None = None, name: str = "dcgan_generator") -> keras.Model:
    """z (B, latent_dim) -> [image (B, S, S, 3) in [-1, 1], label probabilities (B, S, S, C + 1)].

    `label_prior`: pixel shares of the C + 1 label channels; the label logits start at their log
    (see `seglab.gan.common.label_prior`).
    """
    size = check_image_size(image_size)
    upsamplings = int(math.log2(size)) - 2  # 4x4 -> size
    z = keras.Input((latent_dim,), name="z")
    x = layers.Dense(4 * 4 * level_channels(width, upsamplings), use_bias=False, kernel_initializer=_INIT,
                     name="project")(z)
    x = layers.Reshape((4, 4, level_channels(width, upsamplings)))(x)
    x = layers.BatchNormalization(momentum=_BN_MOMENTUM, name="project_bn")(x)
    x = layers.ReLU()(x)
    for i in range(upsamplings - 1):
        channels = level_channels(width, upsamplings - 2 - i)
        x = layers.Conv2DTranspose(channels, 4, strides=2, padding="same", use_bias=False, kernel_initializer=_INIT,
                                   name=f"up{i}")(x)
        x = layers.BatchNormalization(momentum=_BN_MOMENTUM, name=f"up{i}_bn")(x)
        x = layers.ReLU()(x)
    # DCGAN's last layer is the transposed conv that reaches the image size, without BatchNorm;
    # here it has one head per output.
    image = layers.Conv2DTranspose(3, 4, strides=2, padding="same", activation="tanh", kernel_initializer=_INIT,
                                   name="image")(x)
    label = layers.Conv2DTranspose(label_channels(num_classes), 4, strides=2, padding="same",
                                   kernel_initializer=_INIT, name="label_logits")(x)
    label = layers.Softmax(name="label")(label)
    generator = keras.Model(z, [image, label], name=name)
    set_label_prior(generator, label_prior)
    return generator


def build_discriminator(num_classes: int, image_size: int = 64, *, width: int = 16,
                        name: str = "dcgan_discriminator") -> keras.Model:
    """(B, S, S, 3 + C + 1) image and label channels -> (B, 1) logit."""
    size = check_image_size(image_size)
    downsamplings = int(math.log2(size)) - 2
    inputs = keras.Input((size, size, 3 + label_channels(num_classes)), name="image_and_label")
    x = inputs
    for i in range(downsamplings):
        x = layers.Conv2D(level_channels(width, i), 4, strides=2, padding="same", kernel_initializer=_INIT,
                          name=f"down{i}")(x)
        x = layers.LeakyReLU(0.2)(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.3, name="dropout")(x)
    logit = layers.Dense(1, kernel_initializer=_INIT, name="logit")(x)
    return keras.Model(inputs, logit, name=name)


class DCGANTrainer(GanTrainer):
    """One discriminator and one generator update per batch, both from one generator pass."""

    loss_names = ("d_loss", "g_loss", "d_real", "d_fake")

    def __init__(self, generator: keras.Model, discriminator: keras.Model, *, num_classes: int, latent_dim: int,
                 seed: int = 0, **kwargs):
        super().__init__(generator, discriminator, num_classes=num_classes, seed=seed, **kwargs)
        self.latent_dim = int(latent_dim)

    def adversarial_losses(self, real_logits, fake_logits):
        return bce_discriminator_loss(real_logits, fake_logits), bce_generator_loss(fake_logits)

    def train_step(self, data):
        images, one_hot = data
        real = ops.concatenate([images, one_hot], axis=-1)
        z = tf.random.stateless_normal((ops.shape(images)[0], self.latent_dim), seed=self.noise_seed())
        # One forward pass serves both updates: the generator's gradient is taken against the
        # discriminator as it was before this step's update (as in the TensorFlow DCGAN tutorial).
        # One persistent tape rather than two nested ones: two tapes make TensorFlow wrap every
        # cond (SpectralNormalization has one) for higher-order gradients, which multiplies the
        # tracing time.
        with tf.GradientTape(persistent=True) as tape:
            fake_image, fake_probabilities = self.generator(z, training=True)
            fake = ops.concatenate([fake_image, straight_through_one_hot(fake_probabilities)], axis=-1)
            real_logits = self.discriminator(real, training=True)
            fake_logits = self.discriminator(fake, training=True)
            d_loss, g_loss = self.adversarial_losses(real_logits, fake_logits)
        self.apply(self.d_optimizer, tape, d_loss, self.discriminator)
        self.apply(self.g_optimizer, tape, g_loss, self.generator)
        del tape
        return self.track(d_loss=d_loss, g_loss=g_loss, d_real=ops.mean(real_logits), d_fake=ops.mean(fake_logits))
