"""Confusion-matrix metrics: hand-computed cases, scikit-learn as an independent reference,
NaN semantics, streaming, and the Keras metric against the NumPy path."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from sklearn import metrics as skm

from seglab.metrics import (
    METRIC_NAMES,
    ConfusionMatrix,
    StreamingSegmentationMetric,
    confusion_matrix,
    scores_from_confusion,
    segmentation_scores,
)

NAN = np.nan

# Truth / prediction for a hand-computed case, 5 classes:
# class 0: 1 hit, 1 missed (as 1), 1 false alarm (truth 2)
# class 1: 2 hits, 1 false alarm (truth 0), 1 missed (predicted 4)
# class 2: in truth once, never predicted -> precision NaN
# class 3: absent from truth and prediction -> NaN everywhere, left out of every mean
# class 4: predicted once, absent from truth -> recall NaN, iou = dice = precision = 0
HAND_TRUTH = np.array([[0, 0, 1, 1], [1, 2, 255, 255]], dtype=np.uint8)
HAND_PRED = np.array([[0, 1, 1, 1], [4, 0, 3, 2]], dtype=np.int64)
HAND_CM = np.array(
    [
        [1, 1, 0, 0, 0],
        [0, 2, 0, 0, 1],
        [1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
)


def random_case(seed: int, num_classes: int = 6, shape=(3, 17, 19)):
    """Random labels with ~10 % ignore, class 1 never in truth, class 4 never anywhere."""
    rng = np.random.default_rng(seed)
    truth_classes = [c for c in range(num_classes) if c not in (1, 4)]
    truth = rng.choice(truth_classes, size=shape).astype(np.uint8)
    truth[rng.random(shape) < 0.1] = 255
    logits = rng.normal(size=(*shape, num_classes)).astype(np.float32)
    logits[..., 4] -= 100.0  # never predicted
    return truth, logits


def test_hand_computed_confusion_matrix_and_scores():
    cm = confusion_matrix(HAND_TRUTH, HAND_PRED, num_classes=5)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, HAND_CM)

    scores = segmentation_scores(HAND_TRUTH, HAND_PRED, num_classes=5)
    np.testing.assert_array_equal(scores["confusion_matrix"], HAND_CM)
    np.testing.assert_array_equal(scores["iou"], [1 / 3, 2 / 4, 0.0, NAN, 0.0])
    np.testing.assert_array_equal(scores["dice"], [2 / 4, 4 / 6, 0.0, NAN, 0.0])
    np.testing.assert_array_equal(scores["precision"], [1 / 2, 2 / 3, NAN, NAN, 0.0])
    np.testing.assert_array_equal(scores["recall"], [1 / 2, 2 / 3, 0.0, NAN, NAN])
    np.testing.assert_array_equal(scores["support"], [2, 3, 1, 0, 0])
    np.testing.assert_array_equal(scores["predicted"], [2, 3, 0, 0, 1])
    np.testing.assert_array_equal(scores["present"], [True, True, True, False, True])
    assert scores["pixels"] == 6
    assert scores["accuracy"] == 3 / 6
    assert scores["miou"] == pytest.approx((1 / 3 + 1 / 2 + 0 + 0) / 4, abs=0, rel=1e-15)
    assert scores["mdice"] == pytest.approx((1 / 2 + 2 / 3 + 0 + 0) / 4, abs=0, rel=1e-15)
    assert scores["mprecision"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3, abs=0, rel=1e-15)
    assert scores["mrecall"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3, abs=0, rel=1e-15)
    assert scores["miou_fg"] == pytest.approx((1 / 2 + 0 + 0) / 3, abs=0, rel=1e-15)
    assert scores["mdice_fg"] == pytest.approx((2 / 3 + 0 + 0) / 3, abs=0, rel=1e-15)
    assert scores["class_names"] == ["0", "1", "2", "3", "4"]


def test_foreground_means_leave_out_only_a_background_class():
    cm = np.array([[5, 1, 0], [2, 3, 0], [0, 1, 4]])
    iou = np.array([5 / 8, 3 / 7, 4 / 5])
    unnamed = scores_from_confusion(cm)  # no names: class 0 is background, as in COCO class sets
    named = scores_from_confusion(cm, ["background", "car", "dog"])
    for scores in (unnamed, named):
        assert scores["miou_fg"] == pytest.approx(iou[1:].mean(), rel=1e-15)
    # CamVid-like: class 0 is a class like the others (sky), so nothing is left out.
    camvid = scores_from_confusion(cm, ["sky", "building", "pole"])
    assert camvid["miou_fg"] == camvid["miou"] == pytest.approx(iou.mean(), rel=1e-15)
    assert camvid["mdice_fg"] == camvid["mdice"]


def test_scores_accept_logits_probabilities_and_channel_axis():
    one_hot_logits = np.eye(5, dtype=np.float32)[HAND_PRED] * 3.0 - 1.0
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(one_hot_logits))
    for prediction in (one_hot_logits, probabilities, HAND_PRED[..., None]):
        np.testing.assert_array_equal(
            confusion_matrix(HAND_TRUTH[..., None], prediction, 5), HAND_CM
        )
    np.testing.assert_array_equal(confusion_matrix(HAND_TRUTH, one_hot_logits, 5), HAND_CM)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scikit_learn_on_random_data_with_ignore(seed):
    num_classes = 6
    truth, logits = random_case(seed, num_classes)
    scores = segmentation_scores(truth, logits, num_classes, class_names=["background", *"bcdef"])

    counted = truth != 255
    t, p = truth[counted].astype(int), logits.argmax(-1)[counted]
    labels = list(range(num_classes))
    np.testing.assert_array_equal(
        scores["confusion_matrix"], skm.confusion_matrix(t, p, labels=labels)
    )
    # jaccard_score has no NaN zero_division: compare it on the classes where it is defined
    # (absent from both truth and prediction = undefined) and check the NaN there separately.
    defined = [c for c in labels if np.any(t == c) or np.any(p == c)]
    assert defined == [0, 1, 2, 3, 5]
    np.testing.assert_allclose(
        scores["iou"][defined],
        skm.jaccard_score(t, p, labels=defined, average=None),
        rtol=1e-15,
        atol=0,
    )
    assert np.isnan(scores["iou"][4])
    reference = {
        "dice": skm.f1_score(t, p, labels=labels, average=None, zero_division=NAN),
        "precision": skm.precision_score(t, p, labels=labels, average=None, zero_division=NAN),
        "recall": skm.recall_score(t, p, labels=labels, average=None, zero_division=NAN),
    }
    for key, expected in reference.items():
        np.testing.assert_allclose(scores[key], expected, rtol=1e-15, atol=0, err_msg=key)
    assert scores["accuracy"] == skm.accuracy_score(t, p)

    # The case really exercises the NaN rules: 1 predicted but not in truth, 4 nowhere.
    assert np.isnan(scores["recall"][1]) and not np.isnan(scores["precision"][1])
    assert np.all(np.isnan([scores[k][4] for k in ("iou", "dice", "precision", "recall")]))

    # sklearn's macro average with zero_division=NaN skips undefined values, like ours.
    present = [c for c in labels if scores["present"][c]]
    assert present == defined
    macro = {
        "miou": skm.jaccard_score(t, p, labels=present, average="macro"),
        "mdice": skm.f1_score(t, p, labels=present, average="macro", zero_division=NAN),
        "mprecision": skm.precision_score(t, p, labels=present, average="macro", zero_division=NAN),
        "mrecall": skm.recall_score(t, p, labels=present, average="macro", zero_division=NAN),
        "miou_fg": skm.jaccard_score(t, p, labels=present[1:], average="macro"),
        "mdice_fg": skm.f1_score(t, p, labels=present[1:], average="macro", zero_division=NAN),
    }
    for key, expected in macro.items():
        assert scores[key] == pytest.approx(expected, rel=1e-15, abs=0), key


def test_matches_explicit_per_class_masks():
    num_classes = 6
    truth, logits = random_case(7, num_classes)
    prediction = logits.argmax(-1)
    scores = segmentation_scores(truth, prediction, num_classes)
    counted = truth != 255
    for c in range(num_classes):
        tp = np.sum(counted & (truth == c) & (prediction == c))
        fp = np.sum(counted & (truth != c) & (prediction == c))
        fn = np.sum(counted & (truth == c) & (prediction != c))
        with np.errstate(invalid="ignore", divide="ignore"):
            np.testing.assert_array_equal(
                [scores["iou"][c], scores["dice"][c], scores["precision"][c], scores["recall"][c]],
                [tp / (tp + fp + fn), 2 * tp / (2 * tp + fp + fn), tp / (tp + fp), tp / (tp + fn)],
            )


def test_streaming_update_and_merge_equal_one_shot():
    truth, logits = random_case(3, shape=(8, 11, 13))
    one_shot = segmentation_scores(truth, logits, 6)

    streamed = ConfusionMatrix(6)
    for start in range(0, 8, 3):
        streamed.update(truth[start : start + 3], logits[start : start + 3])
    first, second = ConfusionMatrix(6), ConfusionMatrix(6)
    first.update(truth[:5], logits[:5])
    second.update(truth[5:], logits[5:].argmax(-1))
    merged = first.merge(second)

    for accumulator in (streamed, merged):
        result = accumulator.result()
        np.testing.assert_array_equal(result["confusion_matrix"], one_shot["confusion_matrix"])
        for key in ("iou", "dice", "precision", "recall"):
            np.testing.assert_array_equal(result[key], one_shot[key])
        for key in METRIC_NAMES:
            np.testing.assert_equal(result[key], one_shot[key])

    streamed.reset()
    assert streamed.matrix.sum() == 0


def test_merge_refuses_different_setups():
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(3).merge(ConfusionMatrix(4))
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(3).merge(ConfusionMatrix(3, ignore_index=None))
    with pytest.raises(ValueError, match="class_names"):
        ConfusionMatrix(2, class_names=["bg", "cat"]).merge(
            ConfusionMatrix(2, class_names=["bg", "dog"])
        )
    with pytest.raises(TypeError):
        ConfusionMatrix(3).merge(np.zeros((3, 3)))


def test_empty_and_all_ignored_give_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = segmentation_scores(np.full((2, 3), 255), np.zeros((2, 3), int), 3)
    assert scores["pixels"] == 0
    assert all(np.isnan(scores[key]) for key in METRIC_NAMES)
    assert np.all(np.isnan(scores["iou"]))


def test_ignore_index_none_counts_everything_and_other_ignore_values_work():
    truth = np.array([0, 1, 2, 2])
    prediction = np.array([0, 1, 2, 1])
    np.testing.assert_array_equal(
        confusion_matrix(truth, prediction, 3, ignore_index=None),
        [[1, 0, 0], [0, 1, 0], [0, 1, 1]],
    )
    np.testing.assert_array_equal(
        confusion_matrix(truth, prediction, 3, ignore_index=2), [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    )


def test_bad_labels_are_named():
    truth = np.array([[0, 7], [9, 255]])
    with pytest.raises(ValueError, match=r"y_true holds label\(s\) \[7, 9\] outside \[0, 3\)"):
        confusion_matrix(truth, np.zeros((2, 2), int), 3)
    with pytest.raises(ValueError, match=r"y_pred holds label\(s\) \[5\]"):
        confusion_matrix(np.array([0, 1]), np.array([0, 5]), 3)
    # A prediction out of range on an ignored pixel does not matter.
    confusion_matrix(np.array([0, 255]), np.array([0, 5]), 3)
    with pytest.raises(ValueError, match="last axis of num_classes=3"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 2, 4)), 3)
    with pytest.raises(ValueError, match="shaped like y_true"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        confusion_matrix(np.zeros(2), np.array([[0.0, NAN], [1.0, 0.0]]), 2)
    with pytest.raises(ValueError, match="integer class labels"):
        confusion_matrix(np.array([0.5, 1.0]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="class_names has 2 names"):
        scores_from_confusion(np.eye(3, dtype=int), class_names=["a", "b"])
    with pytest.raises(ValueError, match="square"):
        scores_from_confusion(np.zeros((2, 3), int))


# --- the Keras metric -------------------------------------------------------------------------


def keras_metric_value(metric_name, batches, **kwargs):
    metric = StreamingSegmentationMetric(6, metric=metric_name, **kwargs)
    for truth, logits in batches:
        metric.update_state(truth, logits)
    return metric


def test_keras_metric_equals_numpy_for_every_score():
    truth, logits = random_case(11, shape=(6, 9, 10))
    batches = [(truth[i : i + 2], logits[i : i + 2]) for i in range(0, 6, 2)]
    expected = segmentation_scores(truth, logits, 6)
    for name in METRIC_NAMES:
        metric = keras_metric_value(name, batches)
        np.testing.assert_array_equal(metric.confusion_matrix(), expected["confusion_matrix"])
        value = keras.ops.convert_to_numpy(metric.result())
        assert value.dtype == np.float32
        # Same float64 arithmetic, rounded to the metric's float32.
        assert value == np.float32(expected[name]), name
        float64_metric = keras_metric_value(name, batches, dtype="float64")
        assert keras.ops.convert_to_numpy(float64_metric.result()) == pytest.approx(
            expected[name], rel=1e-15, abs=0
        )
        assert metric.scores()["miou"] == expected["miou"]


def test_keras_metric_label_inputs_channel_axis_sample_weight_and_reset():
    truth, logits = random_case(12, shape=(2, 7, 8))
    expected = segmentation_scores(truth, logits, 6)["confusion_matrix"]
    metric = StreamingSegmentationMetric(6, metric="mdice")
    metric.update_state(truth[..., None], logits.argmax(-1)[..., None])
    np.testing.assert_array_equal(metric.confusion_matrix(), expected)

    # A zero sample weight masks pixels exactly like ignore; per-image weights broadcast.
    metric.reset_state()
    assert metric.confusion_matrix().sum() == 0
    unmasked = np.where(truth == 255, 0, truth)
    metric.update_state(unmasked, logits, sample_weight=(truth != 255).astype(np.float32))
    np.testing.assert_array_equal(metric.confusion_matrix(), expected)
    metric.reset_state()
    metric.update_state(truth, logits, sample_weight=np.array([0.0, 2.0]))
    np.testing.assert_array_equal(
        metric.confusion_matrix(), segmentation_scores(truth[1], logits[1], 6)["confusion_matrix"]
    )


def test_keras_metric_matches_keras_mean_iou_reference():
    truth, logits = random_case(13, shape=(4, 12, 12))
    ours = keras_metric_value("miou", [(truth, logits)])
    reference = keras.metrics.MeanIoU(num_classes=6, ignore_class=255, sparse_y_pred=False)
    reference.update_state(truth, logits)
    assert float(ours.result()) == pytest.approx(float(reference.result()), rel=1e-6)


def test_keras_metric_counts_are_exact_beyond_float32():
    # 2**24 + 1 is not a float32; the int64 state must keep it.
    big = np.array([[2**24 + 1, 3], [5, 2**33]], dtype=np.int64)
    metric = StreamingSegmentationMetric(2, metric="miou", dtype="float64")
    metric.confusion.assign(big)
    np.testing.assert_array_equal(metric.confusion_matrix(), big)
    assert float(metric.result()) == pytest.approx(scores_from_confusion(big)["miou"], rel=1e-15)


def test_keras_metric_bad_labels_in_graph_give_nan_and_scores_raise():
    import tensorflow as tf

    metric = StreamingSegmentationMetric(3, metric="miou")
    update = tf.function(metric.update_state)
    update(tf.constant([[0, 1], [7, 255]]), tf.constant([[0, 1], [1, 2]]))
    assert int(metric.invalid_pixels.numpy()) == 1
    assert np.isnan(float(metric.result()))
    with pytest.raises(ValueError, match=r"1 non-ignored pixels .* outside \[0, 3\)"):
        metric.scores()


def test_keras_metric_serialises_and_trains(tmp_path):
    keras.utils.set_random_seed(0)
    metric = StreamingSegmentationMetric(4, metric="miou_fg", ignore_index=255, name="fg_iou")
    restored = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert isinstance(restored, StreamingSegmentationMetric)
    assert restored.get_config() == metric.get_config()
    with pytest.raises(ValueError, match="unknown segmentation metric"):
        StreamingSegmentationMetric(4, metric="iou")

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 1)(inputs))
    # jit_compile=True: Keras compiles with XLA by default on GPUs, so the update must lower.
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[metric],
        jit_compile=True,
    )
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 4, size=(4, 8, 8)).astype(np.int32)
    history = model.fit(images, labels, batch_size=2, epochs=1, verbose=0)
    logits = model.predict(images, verbose=0)
    trained_value = model.evaluate(images, labels, batch_size=2, verbose=0, return_dict=True)[
        "fg_iou"
    ]
    assert trained_value == pytest.approx(
        segmentation_scores(labels, logits, 4)["miou_fg"], rel=1e-6
    )
    assert "fg_iou" in history.history

    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    reloaded_value = reloaded.evaluate(images, labels, batch_size=2, verbose=0, return_dict=True)
    assert reloaded_value["fg_iou"] == pytest.approx(trained_value, rel=1e-6)
