"""`train.class_weights`: median-frequency balancing (Eigen & Fergus 2015) from the shards' `class_pixels`,
an explicit list as given, and what reaches the loss.

A hand-computed example on tiny shards written here (a class absent, ignore pixels), the settings the
loss is built from, and on real CamVid (skipped without it) the weights SegNet's recipe leads to.
The plan over real + accepted synthetic shards is in test_augmented_training.py, next to its data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from seglab.config import LabelMapLayout, LabelMapsConfig, ProfileConfig, ShardConfig, TrainConfig
from seglab.data.labelmaps import labelmap_classes
from seglab.data.shard_stage import build_shards
from seglab.data.stats import median_frequency_weights, pixel_counts
from seglab.train.losses import get_loss
from seglab.train.settings import TrainSettings
from tests.data.test_labelmaps import CAMVID_LABELMAPS
from tests.factories import write_label_split

CLASSES = ("background", "a", "b", "c")  # "c" occurs in no image
IGNORE = 255


def _hand_example(root: Path) -> list[Path]:
    """Three 2x4 label maps in two shard folders (as real + synthetic shards are two)."""
    first = np.array([[0, 0, 1, 1], [0, 0, IGNORE, IGNORE]], np.uint8)  # background 4, a 2, ignore 2
    second = np.array([[0, 0, 0, 0], [0, 2, 2, 2]], np.uint8)           # background 5, b 3
    third = np.array([[1, 2, 2, 2], [2, 2, 2, 2]], np.uint8)            # a 1, b 7
    write_label_split(root / "real", "train", [first, second], CLASSES)
    write_label_split(root / "more", "train", [third], CLASSES, seed=1)
    return [root / "real", root / "more"]


def test_median_frequency_weights_match_a_hand_computed_example(tmp_path):
    counts = pixel_counts(_hand_example(tmp_path), "train")
    assert counts.classes.tolist() == [9, 3, 10, 0] and counts.ignore == 2 and counts.images == 3
    # Labelled pixels of the images each class occurs in: the ignore pixels of the first count nowhere.
    assert counts.in_images_with.tolist() == [6 + 8, 6 + 8, 8 + 8, 0]
    # freq: background 9/14, a 3/14, b 10/16; median 10/16; c absent: out of the median, weight 0.
    median = 10 / 16
    expected = [median / (9 / 14), median / (3 / 14), 1.0, 0.0]
    np.testing.assert_allclose(median_frequency_weights(counts), expected, rtol=1e-12)
    # Counting the ignore pixels in the first image's total would have given background median / (9/16).
    assert median_frequency_weights(counts)[0] != pytest.approx(median / (9 / 16))


def test_no_labelled_pixel_leaves_no_frequency_to_weigh_by(tmp_path):
    write_label_split(tmp_path, "train", [np.full((2, 3), IGNORE, np.uint8)], CLASSES)
    with pytest.raises(ValueError, match="no labelled pixel in 1 images"):
        median_frequency_weights(pixel_counts(tmp_path, "train"))


def _settings(class_weights, weights=None) -> TrainSettings:
    profile = ProfileConfig(image_size=32, batch_size=4, epochs=1, width=0.125, learning_rate=1e-3)
    return TrainSettings(TrainConfig(class_weights=class_weights, loss="focal_dice"), profile,
                         num_classes=len(CLASSES), steps_per_epoch=1, computed_class_weights=weights)


def test_the_weights_reach_the_loss_whichever_way_they_were_given():
    computed = (0.9, 2.9, 1.0, 0.0)
    for settings, expected in ((_settings("median_frequency", computed), list(computed)),
                               (_settings([1.0, 2.0, 3.0, 4.0]), [1.0, 2.0, 3.0, 4.0]),  # a list, as before
                               (_settings(None), None)):
        assert settings.loss_options["class_weights"] == expected
        loss = get_loss("focal_dice", **settings.loss_options)
        assert loss.focal.class_weights == loss.dice.class_weights == expected


def test_settings_refuse_weights_that_do_not_fit_the_mode():
    with pytest.raises(ValueError, match="train.class_weights is 'median_frequency'.*computed from the training"):
        _settings("median_frequency")  # the plan computes them; none given
    for mode in (None, [1.0, 1.0, 1.0, 1.0]):  # computed weights for another mode: stale, refused
        with pytest.raises(ValueError, match=r"class_weights is .*: TrainSettings.computed_class_weights must be None"):
            _settings(mode, (1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="has 3 entries; the shards have 4 classes"):
        _settings("median_frequency", (1.0, 1.0, 1.0))


@pytest.mark.camvid
def test_on_camvid_the_rare_thin_classes_weigh_most_and_road_least(camvid, tmp_path):
    class_set, rules = labelmap_classes(LabelMapsConfig(**CAMVID_LABELMAPS), 0)
    # Stored at 160 px (nearest): the class shares barely move, the 367 images shard in seconds.
    build_shards(camvid, tmp_path, splits={"train": LabelMapLayout(images="train", labels="trainannot")},
                 class_set=class_set, rules=rules, settings=ShardConfig(max_side=160, workers=2))
    counts = pixel_counts(tmp_path, "train")
    assert counts.images == 367 and counts.ignore > 0  # void (11) is ignore, in no class's count
    classes = list(CAMVID_LABELMAPS["classes"])
    weights = dict(zip(classes, median_frequency_weights(counts)))
    ranked = sorted(weights, key=weights.get)
    assert set(ranked[-4:]) == {"pole", "sign_symbol", "pedestrian", "bicyclist"}
    # As SegNet's published weights rank them: road, building, sky the three most frequent.
    assert ranked[0] == "road" and set(ranked[:3]) == {"road", "building", "sky"}
    assert sorted(weights.values())[5] == pytest.approx(1.0)  # 11 classes: the median one weighs 1
