"""GAN networks and their parts: shapes, label encoding, self-attention gate, spectral norm, losses, layouts."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from seglab.gan import common, dcgan, pix2pix, sagan

NUM_CLASSES = 4  # background + 3 classes -> 5 label channels
SIZE = 32


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def random_labels(rng, shape, num_classes=NUM_CLASSES):
    labels = rng.integers(0, num_classes, shape).astype(np.uint8)
    labels[rng.random(shape) < 0.1] = 255
    return labels


# ------------------------------------------------------------------------------ label channels

def test_one_hot_round_trip_keeps_classes_and_ignore():
    labels = random_labels(np.random.default_rng(0), (2, 8, 8))
    one_hot = np.asarray(common.labels_to_one_hot(labels, NUM_CLASSES))
    assert one_hot.shape == (2, 8, 8, NUM_CLASSES + 1)
    assert np.all(one_hot.sum(-1) == 1)
    assert np.all(one_hot[..., -1][labels == 255] == 1)  # ignore has its own channel
    np.testing.assert_array_equal(common.probabilities_to_labels(one_hot), labels)


def test_one_hot_rejects_values_outside_the_class_set():
    labels = np.zeros((4, 4), np.uint8)
    labels[0, 0] = 7
    with pytest.raises(ValueError, match=r"label values \[7\] are outside 0..3"):
        common.labels_to_one_hot(labels, NUM_CLASSES)


def test_straight_through_one_hot_is_hard_forward_and_identity_backward():
    probabilities = tf.nn.softmax(tf.random.stateless_normal((3, 5), seed=(1, 2)))
    weights = tf.random.stateless_normal((3, 5), seed=(3, 4))
    with tf.GradientTape() as tape:
        tape.watch(probabilities)
        hard = common.straight_through_one_hot(probabilities)
        loss = tf.reduce_sum(weights * hard)
    np.testing.assert_array_equal(hard.numpy(), tf.one_hot(tf.argmax(probabilities, -1), 5).numpy())
    np.testing.assert_allclose(tape.gradient(loss, probabilities).numpy(), weights.numpy(), rtol=1e-6)


def test_gan_range_round_trip():
    images = np.arange(256, dtype=np.float32).reshape(1, 16, 16, 1)
    scaled = np.asarray(common.to_gan_range(images))
    assert scaled.min() == -1.0 and scaled.max() == 1.0
    np.testing.assert_array_equal(common.from_gan_range(scaled), images.astype(np.uint8))
    assert common.from_gan_range(np.array([1.5, -2.0])).tolist() == [255, 0]  # clipped


@pytest.mark.parametrize("size", [12, 48, 8])
def test_image_size_must_be_a_power_of_two(size):
    with pytest.raises(ValueError, match="power of two"):
        common.check_image_size(size)


def test_label_prior_from_shards(tiny_shards):
    from seglab.data.shards import read_split

    prior = common.label_prior(tiny_shards, "train")
    table = read_split(tiny_shards, "train", columns=["class_pixels", "ignore_pixels"])
    counts = np.append(np.sum(table.column("class_pixels").to_pylist(), axis=0),
                       np.sum(table.column("ignore_pixels").to_pylist())) + 1.0
    np.testing.assert_allclose(prior, counts / counts.sum())
    assert prior.argmax() == 0  # background dominates


# --------------------------------------------------------------------------- noise generators

@pytest.mark.parametrize("module", [dcgan, sagan], ids=["dcgan", "sagan"])
def test_noise_generator_and_discriminator_shapes(module):
    generator = module.build_generator(NUM_CLASSES, SIZE, latent_dim=16, width=8)
    discriminator = module.build_discriminator(NUM_CLASSES, SIZE, width=8)
    z = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    image, probabilities = generator(z, training=False)
    assert image.shape == (3, SIZE, SIZE, 3) and probabilities.shape == (3, SIZE, SIZE, NUM_CLASSES + 1)
    assert np.all(np.abs(image.numpy()) <= 1.0)
    np.testing.assert_allclose(probabilities.numpy().sum(-1), 1.0, atol=1e-5)
    images, labels = common.render(generator, z, batch_size=2)
    assert images.dtype == np.uint8 and images.shape == (3, SIZE, SIZE, 3)
    assert labels.dtype == np.uint8 and labels.shape == (3, SIZE, SIZE)
    assert set(np.unique(labels)) <= set(range(NUM_CLASSES)) | {255}
    logits = discriminator(np.concatenate([image, probabilities], -1))
    assert logits.shape == (3, 1)


@pytest.mark.parametrize("module", [dcgan, sagan], ids=["dcgan", "sagan"])
def test_label_prior_makes_an_untrained_generator_paint_the_dominant_class(module):
    prior = np.array([0.7, 0.1, 0.1, 0.05, 0.05])
    generator = module.build_generator(NUM_CLASSES, SIZE, latent_dim=16, width=8, label_prior=prior)
    _, labels = common.render(generator, np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32))
    assert (labels == 0).mean() > 0.95
    with pytest.raises(ValueError, match="label prior has 3 channels"):
        common.set_label_prior(generator, np.array([0.5, 0.25, 0.25]))


# ------------------------------------------------------------------------------------- SAGAN

def test_self_attention_gate_starts_at_zero_so_the_block_is_the_identity():
    layer = sagan.SelfAttention()
    x = tf.random.stateless_normal((2, 8, 8, 16), seed=(0, 1))
    y = layer(x, training=True)
    assert float(layer.gamma.numpy()) == 0.0 and layer.gamma.trainable
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    attention = layer.attention_map(x).numpy()
    assert attention.shape == (2, 64, 64)
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
    layer.gamma.assign(1.0)  # once the gate opens, attention changes the features
    assert not np.allclose(layer(x).numpy(), x.numpy())


def test_sagan_generator_starts_with_identity_attention():
    generator = sagan.build_generator(NUM_CLASSES, SIZE, latent_dim=16, width=8)
    attention = generator.get_layer("attention")
    assert attention.output.shape[1] == SIZE // 4  # default place: a quarter of the image side
    probe = keras.Model(generator.input, [attention.input, attention.output])
    before, after = probe(np.ones((1, 16), np.float32))
    np.testing.assert_array_equal(before.numpy(), after.numpy())


@pytest.mark.parametrize("builder", [sagan.build_generator, sagan.build_discriminator], ids=["generator", "discriminator"])
def test_every_sagan_weight_layer_is_spectrally_normalised(builder):
    model = builder(NUM_CLASSES, SIZE, width=8)
    wrapped, bare = [], []

    def visit(layer):
        if isinstance(layer, keras.layers.SpectralNormalization):
            wrapped.append(layer.layer.name)
            return
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            bare.append(layer.name)
        for child in getattr(layer, "_layers", []):  # inside SelfAttention
            visit(child)

    for layer in model.layers:
        visit(layer)
    assert not bare, f"weight layers without spectral norm: {bare}"
    assert {"query", "key", "value", "output"} <= set(wrapped)  # attention projections included
    assert len(wrapped) >= 6


def test_spectral_norm_brings_the_largest_singular_value_to_one():
    layer = sagan.SpectralNorm(keras.layers.Conv2D(6, 3, kernel_initializer=keras.initializers.RandomNormal(stddev=1.0)))
    x = tf.ones((1, 5, 5, 4))
    layer(x)  # build
    assert np.linalg.svd(layer.kernel.numpy().reshape(-1, 6), compute_uv=False)[0] > 3
    for _ in range(30):
        layer(x, training=True)
    sigma = np.linalg.svd(layer.kernel.numpy().reshape(-1, 6), compute_uv=False)[0]
    assert sigma == pytest.approx(1.0, abs=0.02)
    frozen = layer.kernel.numpy().copy()
    layer(x, training=False)  # inference uses the stored normalised kernel as it is
    np.testing.assert_array_equal(layer.kernel.numpy(), frozen)


def test_spectral_norm_leaves_an_all_zero_kernel_alone():
    layer = sagan.SpectralNorm(keras.layers.Dense(3, kernel_initializer="zeros"))
    out = layer(tf.ones((2, 4)), training=True)
    assert np.all(np.isfinite(out.numpy())) and np.all(layer.kernel.numpy() == 0)


def test_hinge_losses_on_known_inputs():
    real = np.array([2.0, 0.5, -1.0], np.float32)
    fake = np.array([-2.0, 0.0, 1.5], np.float32)
    # D: mean(relu(1 - real)) = (0 + 0.5 + 2) / 3, mean(relu(1 + fake)) = (0 + 1 + 2.5) / 3
    assert float(sagan.hinge_discriminator_loss(real, fake)) == pytest.approx(2.0)
    assert float(sagan.hinge_generator_loss(fake)) == pytest.approx(1 / 6)
    # Confident and right: no loss at all, unlike BCE.
    assert float(sagan.hinge_discriminator_loss(np.array([1.0, 3.0]), np.array([-1.0, -5.0]))) == 0.0


def test_bce_losses_on_known_inputs():
    zero = np.zeros(4, np.float32)
    assert float(common.bce_discriminator_loss(zero, zero)) == pytest.approx(2 * np.log(2), rel=1e-6)
    assert float(common.bce_generator_loss(np.array([np.log(3.0)], np.float32))) == pytest.approx(-np.log(0.75))


def test_sagan_generator_survives_save_and_load(tmp_path):
    generator = sagan.build_generator(NUM_CLASSES, SIZE, latent_dim=16, width=8, label_prior=np.full(5, 0.2))
    generator.get_layer("attention").gamma.assign(0.5)
    path = tmp_path / "generator.keras"
    generator.save(path)
    loaded = keras.models.load_model(path, compile=False)
    z = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    for a, b in zip(generator(z), loaded(z)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------ pix2pix

def _real_pairs(count=4, seed=7):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8), random_labels(rng, (count, SIZE, SIZE))


def test_pix2pix_generator_returns_its_conditioning_layout_exactly():
    generator = pix2pix.build_generator(NUM_CLASSES, SIZE, width=8)
    layouts = random_labels(np.random.default_rng(2), (3, SIZE, SIZE))
    real_images, real_labels = _real_pairs()
    inputs, _ = pix2pix.synthesis_inputs(layouts, real_images, real_labels, np.random.default_rng(0),
                                         num_classes=NUM_CLASSES)
    images, labels = common.render(generator, inputs)
    np.testing.assert_array_equal(labels, layouts)
    assert images.shape == (3, SIZE, SIZE, 3)
    # The image does depend on the layout (the U-Net reads it).
    other, _ = pix2pix.synthesis_inputs(np.roll(layouts, 5, axis=2), real_images, real_labels,
                                        np.random.default_rng(0), num_classes=NUM_CLASSES)
    assert not np.array_equal(common.render(generator, other)[0], images)


def test_appearance_holes_context_and_region_colours():
    layout = np.zeros((1, 4, 4), np.uint8)
    layout[0, 0, :2] = 1
    layout[0, 3, 3] = 255
    second = np.zeros((1, 4, 4), np.uint8)
    second[0, 1, 0] = 2
    context = np.linspace(-1, 1, 48, dtype=np.float32).reshape(1, 4, 4, 3)
    colours = np.zeros((1, NUM_CLASSES + 1, 3), np.float32)
    colours[0, 1] = (0.5, 0.0, -0.5)
    colours[0, NUM_CLASSES] = (1.0, 1.0, 1.0)  # the ignore channel
    colours[0, 0] = (9.0, 9.0, 9.0)           # background: never painted
    cond = np.asarray(pix2pix.appearance(common.labels_to_one_hot(layout, NUM_CLASSES),
                                         common.labels_to_one_hot(second, NUM_CLASSES), context, colours))
    assert cond.shape == (1, 4, 4, pix2pix.APPEARANCE_CHANNELS)
    hole = np.zeros((4, 4), bool)
    hole[0, :2] = hole[3, 3] = hole[1, 0] = True  # objects of either layout
    np.testing.assert_array_equal(cond[0, ..., 3], hole.astype(np.float32))
    np.testing.assert_allclose(cond[0, ~hole, :3], context[0, ~hole])
    assert not cond[0, hole, :3].any()
    np.testing.assert_allclose(cond[0, 0, 0, 4:], (0.5, 0.0, -0.5))
    np.testing.assert_allclose(cond[0, 3, 3, 4:], (1.0, 1.0, 1.0))
    assert not cond[0, 1, 0, 4:].any() and not cond[0, 2, 2, 4:].any()  # the second layout's object: no colour

    images = np.zeros((1, 4, 4, 3), np.float32)
    images[0, 0, 0] = (1.0, 0.0, 0.0)
    images[0, 0, 1] = (0.0, 0.0, 1.0)
    means = np.asarray(pix2pix.region_colours(images, common.labels_to_one_hot(layout, NUM_CLASSES)))
    np.testing.assert_allclose(means[0, 1], (0.5, 0.0, 0.5))
    np.testing.assert_allclose(means[0, 2], 0.0)  # a class the image lacks


def test_pix2pix_keeps_the_real_background_outside_the_holes_and_survives_save_and_load(tmp_path):
    generator = pix2pix.build_generator(NUM_CLASSES, SIZE, width=8)
    real_images, real_labels = _real_pairs()
    layouts = random_labels(np.random.default_rng(3), (3, SIZE, SIZE))
    layouts[layouts == 255] = 0
    layouts[:, :, SIZE // 2:] = 0  # objects on the left half only
    real_labels[:, :, SIZE // 2:] = 0
    inputs, styles = pix2pix.synthesis_inputs(layouts, real_images, real_labels, np.random.default_rng(1),
                                              num_classes=NUM_CLASSES)
    images, _ = common.render(generator, inputs)
    # The right half is background in both the layout and the lent image: that image's pixels, exactly.
    np.testing.assert_array_equal(images[:, :, SIZE // 2:], real_images[styles][:, :, SIZE // 2:])
    path = tmp_path / "pix2pix.keras"
    generator.save(path)
    loaded = keras.models.load_model(path, compile=False)
    for a, b in zip(generator(inputs), loaded(inputs)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_colour_bank_draws_each_class_colour_from_real_regions():
    real_images, real_labels = _real_pairs(count=6)
    bank = pix2pix.colour_bank(real_images, real_labels, NUM_CLASSES)
    assert len(bank) == NUM_CLASSES + 1
    layouts = np.full((5, SIZE, SIZE), 2, np.uint8)
    layouts[:, :4] = 0
    (_, cond), _ = pix2pix.synthesis_inputs(layouts, real_images, real_labels, np.random.default_rng(0),
                                            num_classes=NUM_CLASSES, bank=bank)
    for colour in cond[:, 10, 10, 4:]:
        assert any(np.allclose(colour, entry, atol=1e-5) for entry in bank[2])
    assert not cond[:, 0, 0, 4:].any()  # background gets no region colour


def test_patchgan_outputs_one_logit_per_patch():
    discriminator = pix2pix.build_discriminator(NUM_CLASSES, 64, width=8)
    assert pix2pix.default_patch_layers(64) == 2 and pix2pix.default_patch_layers(256) == 3
    logits = discriminator(np.zeros((2, 64, 64, 3 + NUM_CLASSES + 1), np.float32))
    assert logits.shape == (2, 16, 16, 1)
    with pytest.raises(ValueError, match="patch_layers must be in 1..4"):
        pix2pix.build_discriminator(NUM_CLASSES, 64, patch_layers=5)


def test_transformed_layout_takes_only_existing_values_or_ignore():
    label = random_labels(np.random.default_rng(3), (SIZE, SIZE))
    label[label == 3] = 1  # class 3 absent from the source
    for seed in range(5):
        out = pix2pix.transform_layout(label, (seed, 7), rotate_deg=20, scale=(1.0, 1.3))
        assert out.shape == label.shape and out.dtype == np.uint8
        assert set(np.unique(out)) <= set(np.unique(label)) | {255}
    flipped = pix2pix.transform_layout(label, (0, 0), rotate_deg=0, scale=(1.0, 1.0), hflip=False)
    np.testing.assert_array_equal(flipped, label)  # no geometry: unchanged


def test_paste_objects_moves_whole_objects_of_the_donor_into_the_base():
    base = np.zeros((SIZE, SIZE), np.uint8)
    base[:, :4] = 2
    donor = np.zeros((SIZE, SIZE), np.uint8)
    donor[10:18, 10:18] = 3  # one 64 px object
    donor[0, 0] = 1           # a speck below min_share: never pasted
    out = pix2pix.paste_objects(base, donor, np.random.default_rng(0), num_classes=NUM_CLASSES, min_share=0.02)
    assert (out == 3).sum() == 64 and (out == 1).sum() == 0
    changed = out != base
    assert np.all(out[changed] == 3)  # only pasted pixels differ from the base
    empty = pix2pix.paste_objects(base, np.zeros_like(donor), np.random.default_rng(0), num_classes=NUM_CLASSES)
    np.testing.assert_array_equal(empty, base)


def test_make_layouts_mix_and_determinism():
    reals = np.stack([random_labels(np.random.default_rng(i), (SIZE, SIZE)) for i in range(4)])
    only_real, kinds = pix2pix.make_layouts(reals, 6, np.random.default_rng(0), num_classes=NUM_CLASSES, mix=(1, 0, 0))
    assert kinds == ["real"] * 6
    assert all(any(np.array_equal(layout, r) for r in reals) for layout in only_real)
    a, kinds_a = pix2pix.make_layouts(reals, 12, np.random.default_rng(5), num_classes=NUM_CLASSES)
    b, kinds_b = pix2pix.make_layouts(reals, 12, np.random.default_rng(5), num_classes=NUM_CLASSES)
    np.testing.assert_array_equal(a, b)
    assert kinds_a == kinds_b and set(kinds_a) <= set(pix2pix.LAYOUT_KINDS)
    with pytest.raises(ValueError, match="layout mix must be 3 non-negative weights"):
        pix2pix.make_layouts(reals, 2, np.random.default_rng(0), num_classes=NUM_CLASSES, mix=(1, -1, 0))


# ------------------------------------------------------------------------------- sample grids

def test_sample_grid_places_image_and_colourised_label_side_by_side(tmp_path):
    from PIL import Image

    from seglab.data.palette import colorize

    images = np.full((3, 8, 8, 3), 200, np.uint8)
    labels = np.zeros((3, 8, 8), np.uint8)
    labels[:, :4] = 1
    labels[0, 0, 0] = 255
    path = common.save_sample_grid(tmp_path / "grid.png", images, labels, pairs_per_row=2, zoom=1, gap=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * (8 + 2) + 2, 2 * (2 * 8 + 2 + 4) + 2, 3)
    np.testing.assert_array_equal(grid[2:10, 2:10], images[0])
    np.testing.assert_array_equal(grid[2:10, 12:20], colorize(labels[0]))
    with pytest.raises(ValueError, match="expected images"):
        common.save_sample_grid(tmp_path / "bad.png", images, labels[:, :4])
