"""Which appearance input lets pix2pix pass the synthetic gate on the embedded sample (docs/synthetic-validation.md).

Trains one pix2pix variant for `--steps` steps (batch 8, 64 px, width 16, Adam(lr, 0.5), L1 weight 100,
the PatchGAN of seglab.gan.pix2pix) on the training shards' fixed 64 px crops with random flips,
renders 120 layouts (`make_layouts`, mix 1:1:1) and prints one JSON line: the gate's figures for
them, computed as `validate_synthetic` does (MobileNetV2 features at 224 px, k-NN realism with
k = 3 against the training reference, KID of all and of the realistic ones, the calibrated
kid_max = 4 x q95 of the val images' per-subset KID). Variants (`--mode`):

    none       the layout alone (pix2pix as it was before the appearance input)
    thumb      + an 8x8 colour thumbnail of a real image (its own when training, another's when rendering)
    context    + that image's background with holes where either layout has objects, and the hole mask
    colours    context + per-class region colours (seglab.gan.pix2pix's appearance input, the default)

Run from the repository root after `seglab sample && seglab shard`:
`python benchmarks/pix2pix_appearance.py --mode colours --steps 200`.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from seglab.gan import pix2pix
from seglab.gan.common import (
    bce_discriminator_loss,
    bce_generator_loss,
    from_gan_range,
    label_channels,
    labels_to_one_hot,
    layouts_from_shards,
    level_channels,
    save_sample_grid,
    to_gan_range,
)
from seglab.gan.figures import (
    compare_form,
    kernel_inception_distance,
    kid_subset_values,
    knn_radii,
    mobilenetv2_features,
    real_images_from_shards,
    realism_scores,
)

SIZE, BATCH, COUNT = 64, 8, 120
EXTRA = {"none": 0, "thumb": 3, "context": 4, "colours": 7}


def thumbnail(images: np.ndarray, cells: int = 8) -> np.ndarray:
    x = images.astype(np.float32).reshape(len(images), cells, SIZE // cells, cells, SIZE // cells, 3).mean((2, 4))
    return np.repeat(np.repeat(x, SIZE // cells, 1), SIZE // cells, 2) / 127.5 - 1.0


def condition(mode, layouts, second, style_images, colours, num_classes) -> np.ndarray:
    """The generator input: layout one-hot (+ the variant's appearance channels)."""
    one_hot = np.asarray(labels_to_one_hot(layouts, num_classes))
    if mode == "none":
        return one_hot
    if mode == "thumb":
        return np.concatenate([one_hot, thumbnail(style_images)], -1)
    cond = np.asarray(pix2pix.appearance(one_hot, np.asarray(labels_to_one_hot(second, num_classes)),
                                         np.asarray(to_gan_range(style_images)), colours))
    return np.concatenate([one_hot, cond if mode == "colours" else cond[..., :4]], -1)


def build_generator(channels: int, width: int = 16) -> keras.Model:
    """seglab.gan.pix2pix's U-Net on `channels` input channels (raw tanh output; composited outside)."""
    down, init = int(math.log2(SIZE)) - 2, keras.initializers.RandomNormal(stddev=0.02)
    inputs = keras.Input((SIZE, SIZE, channels))
    x, skips = inputs, []
    for i in range(down):
        x = layers.Conv2D(level_channels(width, i), 4, strides=2, padding="same", use_bias=i == 0,
                          kernel_initializer=init)(x)
        x = layers.LeakyReLU(0.2)(layers.BatchNormalization(momentum=0.9)(x) if i else x)
        skips.append(x)
    for i, skip in enumerate(reversed(skips[:-1])):
        x = layers.Conv2DTranspose(level_channels(width, down - 2 - i), 4, strides=2, padding="same", use_bias=False,
                                   kernel_initializer=init)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.ReLU()(layers.Dropout(0.5)(x) if i < 2 else x)
        x = layers.Concatenate()([x, skip])
    return keras.Model(inputs, layers.Conv2DTranspose(3, 4, strides=2, padding="same", activation="tanh",
                                                      kernel_initializer=init)(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(EXTRA), default="colours")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--grid", help="write a grid of the first 16 pairs here (PNG)")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    images, labels, classes = layouts_from_shards("data/shards", "train", image_size=SIZE, seed=0)
    num_classes = len(classes)
    channels = label_channels(num_classes)
    generator = build_generator(channels + EXTRA[args.mode])
    discriminator = pix2pix.build_discriminator(num_classes, SIZE, width=16)
    g_opt, d_opt = (keras.optimizers.Adam(args.lr, beta_1=0.5) for _ in range(2))
    composite = args.mode in ("context", "colours")

    @tf.function
    def step(real, cond, layout):
        with tf.GradientTape(persistent=True) as tape:
            fake = generator(cond, training=True)
            if composite:
                hole = cond[..., channels + 3:channels + 4]
                fake = fake * hole + cond[..., channels:channels + 3] * (1.0 - hole)
            real_logits = discriminator(tf.concat([real, layout], -1), training=True)
            fake_logits = discriminator(tf.concat([fake, layout], -1), training=True)
            d_loss = 0.5 * bce_discriminator_loss(real_logits, fake_logits)
            g_loss = bce_generator_loss(fake_logits) + 100.0 * tf.reduce_mean(tf.abs(real - fake))
        for loss, net, opt in ((g_loss, generator, g_opt), (d_loss, discriminator, d_opt)):
            opt.apply_gradients(zip(tape.gradient(loss, net.trainable_variables), net.trainable_variables))

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(args.steps):
        batch = rng.choice(len(images), BATCH, replace=False)
        im, lb = images[batch].copy(), labels[batch].copy()
        flip = rng.random(BATCH) < 0.5
        im[flip], lb[flip] = im[flip, :, ::-1], lb[flip, :, ::-1]
        colours = np.asarray(pix2pix.region_colours(np.asarray(to_gan_range(im)), labels_to_one_hot(lb, num_classes)))
        cond = condition(args.mode, lb, np.roll(lb, 1, axis=0), im, colours, num_classes)
        step(tf.constant(np.asarray(to_gan_range(im))), tf.constant(cond, tf.float32),
             tf.constant(np.asarray(labels_to_one_hot(lb, num_classes))))
    train_seconds = time.perf_counter() - started

    rng = np.random.default_rng(1)
    layouts, _ = pix2pix.make_layouts(labels, COUNT, rng, num_classes=num_classes)
    # As seglab.gan.pix2pix renders: into another real image's background, colours from the colour bank.
    (one_hot, appearance), styles = pix2pix.synthesis_inputs(layouts, images, labels, rng, num_classes=num_classes)
    extra = {"none": appearance[..., :0], "thumb": thumbnail(images[styles]), "context": appearance[..., :4],
             "colours": appearance}[args.mode]
    cond = np.concatenate([one_hot, extra], -1)
    out = generator.predict(cond, batch_size=32, verbose=0)
    if composite:
        hole = cond[..., channels + 3:channels + 4]
        out = out * hole + cond[..., channels:channels + 3] * (1.0 - hole)
    synthetic = from_gan_range(out)
    if args.grid:
        save_sample_grid(args.grid, synthetic[:16], layouts[:16])

    def features(batch):
        return mobilenetv2_features(np.stack([compare_form(im, SIZE, 224) for im in batch]))

    train = features(real_images_from_shards("data/shards", "train", max_images=500)[0])
    val = features(real_images_from_shards("data/shards", "val", max_images=500)[0])
    synthetic_features = features(synthetic)
    radii = knn_radii(train, 3)
    realistic = realism_scores(synthetic_features, train, radii) >= 1
    result = {"mode": args.mode, "steps": args.steps, "lr": args.lr, "train_seconds": round(train_seconds, 1),
              "kid_all": kernel_inception_distance(synthetic_features, train, subsets=100, subset_size=100)[0],
              "realistic": int(realistic.sum()), "images": COUNT,
              "val_realistic_share": float((realism_scores(val, train, radii) >= 1).mean())}
    if realistic.sum() >= 2:
        result["kid_realistic"] = kernel_inception_distance(synthetic_features[realistic], train, subsets=100,
                                                            subset_size=100)[0]
        subset = min(100, int(realistic.sum()), len(train), len(val))
        result["kid_max"] = 4 * float(np.quantile(kid_subset_values(val, train, subsets=100, subset_size=subset), 0.95))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
