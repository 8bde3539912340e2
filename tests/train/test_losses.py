"""Segmentation losses: hand-computed values, an explicit NumPy reference, ignore handling, class
and sample weights, focal/CE consistency, mixed precision, gradients and serialisation."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from seglab.train.losses import (
    FocalDiceLoss,
    FocalLoss,
    SoftDiceLoss,
    SparseCrossEntropy,
    get_loss,
)

LN3 = math.log(3.0)

# One image, 2 x 2 pixels, 2 classes. softmax([ln 3, 0]) = [0.75, 0.25] exactly.
#   pixel (0,0): label 0, p_true = 0.75
#   pixel (0,1): label 1, p_true = 0.25
#   pixel (1,0): ignored (huge logits must not matter)
#   pixel (1,1): label 0, logits [0, 0], p_true = 0.5
HAND_LABELS = np.array([[[0, 1], [255, 0]]], dtype=np.uint8)
HAND_LOGITS = np.array([[[[LN3, 0.0], [LN3, 0.0]], [[500.0, -500.0], [0.0, 0.0]]]], np.float32)
P_TRUE = np.array([0.75, 0.25, 0.5])

ALL_LOSSES = [
    pytest.param(lambda: SparseCrossEntropy(), id="ce"),
    pytest.param(lambda: FocalLoss(gamma=2.0), id="focal"),
    pytest.param(lambda: SoftDiceLoss(), id="dice"),
    pytest.param(lambda: FocalDiceLoss(), id="focal_dice"),
]


def value(loss, labels, logits, sample_weight=None) -> float:
    return float(keras.ops.convert_to_numpy(loss(labels, logits, sample_weight)))


def random_batch(seed, shape=(2, 6, 7), num_classes=4, ignore_share=0.2):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=shape).astype(np.int32)
    labels[rng.random(shape) < ignore_share] = 255
    logits = (2.0 * rng.normal(size=(*shape, num_classes))).astype(np.float32)
    return labels, logits


def log_softmax(logits):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def reference_focal(
    labels, logits, gamma, alpha_per_class=None, class_weights=None, pixel_weights=None
):
    """Direct NumPy transcription of sum_i w_i FL_i / sum_i w_i (gamma = 0, no alpha: CE)."""
    counted = labels != 255
    safe = np.where(counted, labels, 0)
    log_p = np.take_along_axis(log_softmax(logits), safe[..., None], -1)[..., 0]
    per_pixel = -((1.0 - np.exp(log_p)) ** gamma) * log_p
    if alpha_per_class is not None:
        per_pixel = np.asarray(alpha_per_class)[safe] * per_pixel
    weights = counted.astype(np.float64)
    if class_weights is not None:
        weights = weights * np.asarray(class_weights)[safe]
    if pixel_weights is not None:
        weights = weights * pixel_weights
    return float((weights * per_pixel).sum() / weights.sum())


def reference_dice(labels, logits, smooth, class_weights=None):
    counted = (labels != 255)[..., None].astype(np.float64)
    num_classes = logits.shape[-1]
    log_p = log_softmax(logits)
    probs = np.exp(log_p)
    truth = np.eye(num_classes)[np.where(labels != 255, labels, 0)]
    hard = np.eye(num_classes)[logits.argmax(-1)]
    axes = tuple(range(labels.ndim))
    intersection = (probs * truth * counted).sum(axes)
    denominator = ((probs + truth) * counted).sum(axes)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    present = ((truth * counted).sum(axes) > 0) | ((hard * counted).sum(axes) > 0)
    weights = present * (
        np.ones(num_classes) if class_weights is None else np.asarray(class_weights)
    )
    return float((weights * (1 - dice)).sum() / weights.sum())


# --- known values --------------------------------------------------------------------------


def test_cross_entropy_hand_computed():
    expected = -(math.log(0.75) + math.log(0.25) + math.log(0.5)) / 3
    assert value(SparseCrossEntropy(), HAND_LABELS, HAND_LOGITS) == pytest.approx(
        expected, rel=1e-6
    )


def test_cross_entropy_class_weights_hand_computed():
    # Weighted mean: the class weight enters numerator and normaliser.
    expected = -(1 * math.log(0.75) + 3 * math.log(0.25) + 1 * math.log(0.5)) / (1 + 3 + 1)
    loss = SparseCrossEntropy(class_weights=[1.0, 3.0])
    assert value(loss, HAND_LABELS, HAND_LOGITS) == pytest.approx(expected, rel=1e-6)


def test_focal_hand_computed_with_and_without_alpha():
    terms = -((1 - P_TRUE) ** 2) * np.log(P_TRUE)
    assert value(FocalLoss(gamma=2.0), HAND_LABELS, HAND_LOGITS) == pytest.approx(
        terms.mean(), rel=1e-6
    )
    # Scalar alpha: 0.25 on the foreground pixel (label 1), 0.75 on the background ones.
    alpha_t = np.array([0.75, 0.25, 0.75])
    assert value(FocalLoss(gamma=2.0, alpha=0.25), HAND_LABELS, HAND_LOGITS) == pytest.approx(
        (alpha_t * terms).mean(), rel=1e-6
    )


def test_soft_dice_hand_computed_and_absent_class_left_out():
    # Third class has probability 0 everywhere, never in truth nor argmax: it must not count.
    labels = np.array([[[0, 1]]])
    logits = np.array([[[[LN3, 0.0, -1e4], [LN3, 0.0, -1e4]]]], np.float32)
    # class 0: I = 0.75, sum p = 1.5, sum g = 1 -> (1.5 + 1) / (2.5 + 1) = 5/7
    # class 1: I = 0.25, sum p = 0.5, sum g = 1 -> (0.5 + 1) / (1.5 + 1) = 3/5
    expected = 1 - (5 / 7 + 3 / 5) / 2
    assert value(SoftDiceLoss(smooth=1.0), labels, logits) == pytest.approx(expected, rel=1e-6)
    # A class only predicted (argmax) but absent from the truth does count:
    # class 0: I = 0.75 + 0.25, sum p = 1, sum g = 2 -> (2 + 1) / (3 + 1) = 3/4
    # class 1: I = 0, sum p = 1, sum g = 0 -> 1 / (1 + 1) = 1/2
    predicted_only = np.array([[[[LN3, 0.0], [0.0, LN3]]]], np.float32)
    assert value(SoftDiceLoss(smooth=1.0), np.array([[[0, 0]]]), predicted_only) == pytest.approx(
        1 - (3 / 4 + 1 / 2) / 2, rel=1e-6
    )
    # Class weights weight the mean over classes.
    weighted = (1 * (1 - 5 / 7) + 3 * (1 - 3 / 5)) / 4
    loss = SoftDiceLoss(smooth=1.0, class_weights=[1.0, 3.0, 5.0])
    assert value(loss, labels, logits) == pytest.approx(weighted, rel=1e-6)


def test_focal_dice_is_the_weighted_sum():
    labels, logits = random_batch(3)
    combined = FocalDiceLoss(focal_weight=0.7, dice_weight=1.3, gamma=1.5, smooth=0.5)
    expected = 0.7 * reference_focal(labels, logits, 1.5) + 1.3 * reference_dice(
        labels, logits, 0.5
    )
    assert value(combined, labels, logits) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_match_numpy_reference_on_random_batches(seed):
    labels, logits = random_batch(seed)
    class_weights = [0.5, 1.0, 2.0, 4.0]
    alpha = [0.1, 0.2, 0.3, 0.4]
    pixel_weights = np.random.default_rng(seed + 10).random(labels.shape).astype(np.float32)
    cases = [
        (SparseCrossEntropy(), reference_focal(labels, logits, 0.0)),
        (
            SparseCrossEntropy(class_weights=class_weights),
            reference_focal(labels, logits, 0.0, class_weights=class_weights),
        ),
        (FocalLoss(gamma=2.0), reference_focal(labels, logits, 2.0)),
        (
            FocalLoss(gamma=0.5, alpha=alpha, class_weights=class_weights),
            reference_focal(labels, logits, 0.5, alpha, class_weights),
        ),
        (SoftDiceLoss(smooth=1.0), reference_dice(labels, logits, 1.0)),
        (
            SoftDiceLoss(smooth=0.0, class_weights=class_weights),
            reference_dice(labels, logits, 0.0, class_weights),
        ),
    ]
    for loss, expected in cases:
        assert value(loss, labels, logits) == pytest.approx(expected, rel=1e-5), loss.name
    weighted = FocalLoss(gamma=2.0, class_weights=class_weights)
    assert value(weighted, labels, logits, sample_weight=pixel_weights) == pytest.approx(
        reference_focal(
            labels, logits, 2.0, class_weights=class_weights, pixel_weights=pixel_weights
        ),
        rel=1e-5,
    )


def test_focal_with_gamma_zero_equals_cross_entropy():
    labels, logits = random_batch(4)
    for class_weights in (None, [1.0, 2.0, 3.0, 4.0]):
        focal = value(FocalLoss(gamma=0.0, class_weights=class_weights), labels, logits)
        ce = value(SparseCrossEntropy(class_weights=class_weights), labels, logits)
        assert focal == ce


# --- ignore, weights, degenerate batches ------------------------------------------------------


@pytest.mark.parametrize("make_loss", ALL_LOSSES)
def test_ignored_pixels_do_not_change_the_loss(make_loss):
    labels, logits = random_batch(5)
    loss = make_loss()
    reference = value(loss, labels, logits)
    scrambled = logits.copy()
    scrambled[labels == 255] = np.random.default_rng(6).normal(
        scale=50.0, size=scrambled[labels == 255].shape
    )
    assert value(loss, labels, scrambled) == pytest.approx(reference, rel=1e-6)
    # Ignoring the last column equals dropping it.
    ignored = labels.copy()
    ignored[..., -1] = 255
    assert value(loss, ignored, logits) == pytest.approx(
        value(loss, labels[..., :-1], logits[..., :-1, :]), rel=1e-6
    )
    # A zero pixel weight acts exactly like ignore; channel axis on labels is accepted.
    weight = (ignored != 255).astype(np.float32)
    assert value(loss, labels[..., None], logits, sample_weight=weight) == pytest.approx(
        value(loss, ignored, logits), rel=1e-6
    )


@pytest.mark.parametrize("make_loss", ALL_LOSSES)
def test_all_ignored_batch_gives_zero_loss_and_zero_gradients(make_loss):
    loss = make_loss()
    labels = tf.fill((2, 3, 4), 255)
    logits = tf.constant(np.random.default_rng(7).normal(size=(2, 3, 4, 3)), tf.float32)

    @tf.function
    def loss_and_gradient(labels, logits):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            result = loss(labels, logits)
        return result, tape.gradient(result, logits)

    for run in (loss_and_gradient, loss_and_gradient.python_function):
        result, gradient = run(labels, logits)
        assert float(result) == 0.0
        np.testing.assert_array_equal(gradient.numpy(), 0.0)


@pytest.mark.parametrize("make_loss", ALL_LOSSES)
def test_gradients_finite_for_saturated_logits(make_loss):
    labels, logits = random_batch(8)
    logits = logits * 1e4  # p_t rounds to exactly 0 or 1
    logits = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        result = make_loss()(labels, logits)
    gradient = tape.gradient(result, logits)
    assert np.isfinite(float(result))
    assert np.all(np.isfinite(gradient.numpy()))


def test_focal_gradient_finite_with_gamma_below_one_at_certainty():
    logits = tf.constant([[[[1e4, 0.0], [0.0, 0.0]]]])
    with tf.GradientTape() as tape:
        tape.watch(logits)
        result = FocalLoss(gamma=0.3)(np.array([[[0, 1]]]), logits)
    assert np.all(np.isfinite(tape.gradient(result, logits).numpy()))


def test_per_image_sample_weight():
    labels, logits = random_batch(9)
    loss = SparseCrossEntropy()
    assert value(loss, labels, logits, sample_weight=np.array([0.0, 1.0])) == pytest.approx(
        value(loss, labels[1:], logits[1:]), rel=1e-6
    )


# --- mixed precision and dtypes ---------------------------------------------------------------


@pytest.mark.parametrize("make_loss", ALL_LOSSES)
def test_float16_logits_give_finite_float32_loss(make_loss):
    labels, logits = random_batch(10)
    loss = make_loss()
    half = logits.astype(np.float16)
    result = loss(labels.astype(np.uint8), half)
    assert keras.backend.standardize_dtype(result.dtype) == "float32"
    assert float(result) == pytest.approx(value(loss, labels, half.astype(np.float32)), rel=1e-6)
    # Logits near float16's maximum would overflow a float16 softmax; ours is float32.
    extreme = np.where(logits > 0, 60000.0, -60000.0).astype(np.float16)
    assert np.isfinite(float(loss(labels, extreme)))


def test_training_under_mixed_precision_and_reload(tmp_path):
    keras.utils.set_random_seed(0)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        inputs = keras.Input((8, 8, 3))
        features = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
        # Like the project's models: float16 compute, last layer float32 logits.
        logits = keras.layers.Conv2D(3, 1, dtype="float32")(features)
        model = keras.Model(inputs, logits)
        loss = FocalDiceLoss(class_weights=[0.5, 1.0, 2.0], gamma=2.0)
        # XLA as Keras uses by default on GPUs.
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss, jit_compile=True)
        rng = np.random.default_rng(0)
        images = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
        labels = rng.integers(0, 3, size=(4, 8, 8)).astype(np.uint8)
        labels[:, :2] = 255
        history = model.fit(images, labels, batch_size=2, epochs=3, verbose=0).history["loss"]
        assert all(np.isfinite(history)) and history[-1] < history[0]
        path = tmp_path / "model.keras"
        model.save(path)
        reloaded = keras.saving.load_model(path)
        assert isinstance(reloaded.loss, FocalDiceLoss)
        assert reloaded.loss.get_config() == loss.get_config()
        assert reloaded.evaluate(images, labels, verbose=0) == pytest.approx(
            model.evaluate(images, labels, verbose=0), rel=1e-5
        )
    finally:
        keras.config.set_dtype_policy(previous_policy)


# --- bad input, construction, serialisation --------------------------------------------------


@pytest.mark.parametrize("make_loss", ALL_LOSSES)
def test_out_of_range_labels_raise_eagerly_and_poison_graphs(make_loss):
    loss = make_loss()
    labels = np.array([[[0, 7], [9, 255]]])
    logits = np.zeros((1, 2, 2, 3), np.float32)
    with pytest.raises(ValueError, match=r"label\(s\) \[7, 9\] outside \[0, 3\)"):
        loss(labels, logits)
    assert np.isnan(float(tf.function(loss)(tf.constant(labels), tf.constant(logits))))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="class_weights must be finite, non-negative"):
        SparseCrossEntropy(class_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="class_weights has 2 entries but y_pred has 3 classes"):
        SparseCrossEntropy(class_weights=[1.0, 1.0])(np.zeros((1, 2, 2)), np.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match=r"scalar focal alpha must lie in \[0, 1\]"):
        FocalLoss(alpha=1.5)
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        FocalLoss(gamma=-1.0)
    with pytest.raises(ValueError, match="cannot both be 0"):
        FocalDiceLoss(focal_weight=0.0, dice_weight=0.0)
    with pytest.raises(ValueError, match="y_true must be a label map"):
        SparseCrossEntropy()(np.zeros((1, 2)), np.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match="sample_weight must be"):
        SparseCrossEntropy()(np.zeros((1, 2, 2)), np.zeros((1, 2, 2, 3)), np.ones((1, 2)))


def test_get_loss_by_name():
    assert isinstance(get_loss("ce"), SparseCrossEntropy)
    focal = get_loss("focal", gamma=1.0, alpha=0.25)
    assert isinstance(focal, FocalLoss) and focal.gamma == 1.0 and focal.alpha == 0.25
    assert isinstance(get_loss("dice", smooth=0.0), SoftDiceLoss)
    combined = get_loss("focal_dice", ignore_index=None, class_weights=[1, 2])
    assert isinstance(combined, FocalDiceLoss) and combined.focal.ignore_index is None
    with pytest.raises(ValueError, match=r"unknown loss 'iou'; expected one of \['ce', 'dice'"):
        get_loss("iou")
    with pytest.raises(ValueError, match="bad arguments for loss 'ce'"):
        get_loss("ce", gamma=2.0)


@pytest.mark.parametrize(
    "loss",
    [
        SparseCrossEntropy(class_weights=[1.0, 2.0]),
        FocalLoss(gamma=1.5, alpha=[0.2, 0.8], ignore_index=0),
        SoftDiceLoss(smooth=0.5, ignore_index=None),
        FocalDiceLoss(
            focal_weight=2.0, dice_weight=0.5, gamma=1.0, alpha=0.25, class_weights=[1, 3]
        ),
    ],
    ids=lambda loss: type(loss).__name__,
)
def test_serialisation_round_trip(loss):
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
    labels, logits = random_batch(11, num_classes=2)
    if loss.get_config().get("ignore_index") != 255:
        labels = np.where(labels == 255, 1, labels)
    assert value(restored, labels, logits) == value(loss, labels, logits)
