"""Learning regression test: the training recipe must actually learn, and this test must notice when it does not.

A small fixed set is drawn here (seeded): on a textured background, discs and squares of three
classes, each with its own colour, with noise and an ignore border. A tiny U-Net trained with the
project's recipe (`seglab.train.loop.train_model`: its optimizer, schedule, loss, prior init and
callbacks) for a few epochs must lower its training loss and beat the all-background score on the
val images (all-background mIoU = background share of the labelled pixels / number of classes
present in the truth: the IoU of predicting background everywhere, averaged over present classes).

The same run with training broken must fail that check: labels shuffled between images, the
learning rate 0 (frozen weights), or a loss whose gradient never reaches the predictions.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from seglab.config import Config
from seglab.data.classes import IGNORE_INDEX
from seglab.metrics import ConfusionMatrix
from seglab.models import registry
from seglab.train import loop
from seglab.train.plan import init_logits_from_prior
from seglab.train.settings import TrainSettings

SIZE = 32
CLASS_COLOURS = np.array([[200, 40, 40], [40, 190, 60], [50, 70, 220]], np.float32)  # classes 1..3
TRAIN_IMAGES, VAL_IMAGES, BATCH, EPOCHS = 48, 16, 8, 6
# Above all-background. Not the default run's 0.05: with labels shuffled between images the Dice
# term still pays for putting one foreground class on every coloured blob, which beats
# all-background by about 0.06 here; learning which colour is which class gives about 0.6.
MARGIN = 0.25


def draw_set(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` (image, label) pairs: 1-3 shapes of classes 1..3 on a noisy grey background."""
    images = np.empty((count, SIZE, SIZE, 3), np.float32)
    labels = np.zeros((count, SIZE, SIZE), np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(count):
        image = rng.uniform(60, 160, 3).astype(np.float32) + rng.normal(0, 25, (SIZE, SIZE, 3))
        for _ in range(rng.integers(1, 4)):
            cls = int(rng.integers(1, 4))
            cy, cx, r = rng.integers(6, SIZE - 6, 2).tolist() + [int(rng.integers(4, 9))]
            inside = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if rng.random() < 0.5 else \
                ((abs(yy - cy) <= r) & (abs(xx - cx) <= r))
            image[inside] = CLASS_COLOURS[cls - 1] + rng.normal(0, 20, (int(inside.sum()), 3))
            labels[i][inside] = cls
        labels[i][:1], labels[i][-1:] = IGNORE_INDEX, IGNORE_INDEX  # never counted by loss or metric
        images[i] = np.clip(image, 0, 255)
    return images, labels


def all_background_miou(labels: np.ndarray) -> float:
    """IoU of predicting background everywhere, averaged over the classes present in `labels`."""
    counted = labels[labels != IGNORE_INDEX]
    present = np.unique(counted)
    return float(np.mean(counted == 0) / len(present))


def _cfg(tmp_path) -> Config:
    return Config.model_validate({
        "seed": 0,
        "profile": "tiny",
        "profiles": {"tiny": {"image_size": SIZE, "batch_size": BATCH, "epochs": EPOCHS, "width": 0.125,
                              "learning_rate": 1e-2}},
        "models": {"tiny": {"arch": "unet", "weights": None}},
        "train": {"out": str(tmp_path / "models"), "metrics": str(tmp_path / "metrics"),
                  "state": str(tmp_path / "state"), "mixed_precision": "off"},
    })


def train_tiny(tmp_path, monkeypatch, *, shuffle_labels: bool = False, learning_rate: float | None = None,
               loss=None) -> dict[str, float]:
    """Train the tiny U-Net with the recipe; the first and last epoch's training loss, val mIoU and
    the val set's all-background mIoU. `loss` wraps the recipe's loss (as the loop builds it)."""
    rng = np.random.default_rng(0)
    train_images, train_labels = draw_set(TRAIN_IMAGES, rng)
    val_images, val_labels = draw_set(VAL_IMAGES, rng)
    if shuffle_labels:  # every image paired with another image's label map
        train_labels = train_labels[np.roll(np.arange(TRAIN_IMAGES), 1)]
    cfg = _cfg(tmp_path)
    settings = TrainSettings(cfg.train, cfg.run_profile, num_classes=4, steps_per_epoch=TRAIN_IMAGES // BATCH)
    if learning_rate is not None:  # model_copy skips validation: the config refuses a rate of 0
        settings = dataclasses.replace(settings, profile=settings.profile.model_copy(
            update={"learning_rate": learning_rate}))
    class_pixels = np.bincount(train_labels[train_labels != IGNORE_INDEX], minlength=4)

    def build():
        model = registry.build("unet", 4, (SIZE, SIZE, 3), width=0.125)
        init_logits_from_prior(model, class_pixels)
        return model

    train_data = tf.data.Dataset.from_tensor_slices((train_images, train_labels)).shuffle(
        TRAIN_IMAGES, seed=0).batch(BATCH, drop_remainder=True).repeat()
    val_data = tf.data.Dataset.from_tensor_slices((val_images, val_labels)).batch(BATCH)
    keras.utils.set_random_seed(0)
    if loss is not None:
        original = loop.get_loss
        monkeypatch.setattr(loop, "get_loss", lambda name, **options: loss(original(name, **options)))
    result = train_model(build, train_data, val_data, settings, state_dir=tmp_path / "state")
    confusion = ConfusionMatrix(4)
    # Eager: a tiny model's 16 images take less than tracing a predict function would.
    logits = keras.ops.convert_to_numpy(result.model(val_images, training=False))
    confusion.update(val_labels, np.argmax(logits, axis=-1))
    return {"first_loss": result.history[0]["loss"], "last_loss": result.history[-1]["loss"],
            "miou": float(confusion.result()["miou"]), "all_background": all_background_miou(val_labels)}


def train_model(*args, **kwargs):
    return loop.train_model(*args, verbose=0, **kwargs)


def learned(run: dict[str, float]) -> bool:
    return run["last_loss"] < 0.9 * run["first_loss"] and run["miou"] >= run["all_background"] + MARGIN


def test_the_recipe_learns_a_small_fixed_set(tmp_path, monkeypatch):
    run = train_tiny(tmp_path, monkeypatch)
    assert run["last_loss"] < 0.9 * run["first_loss"], run
    assert run["miou"] >= run["all_background"] + MARGIN, run


class GradientFreeLoss(keras.losses.Loss):
    """The real loss's value, but no gradient reaches the predictions (a broken loss)."""

    def __init__(self, inner: keras.losses.Loss):
        super().__init__(name="gradient_free")
        self.inner = inner

    def call(self, y_true, y_pred):
        return self.inner(y_true, keras.ops.stop_gradient(y_pred)) + 0.0 * keras.ops.mean(y_pred)


@pytest.mark.parametrize("broken", [
    pytest.param({"shuffle_labels": True}, id="shuffled-labels"),
    pytest.param({"learning_rate": 0.0}, id="frozen-weights"),
    pytest.param({"loss": GradientFreeLoss}, id="loss-without-gradient"),
])
def test_broken_training_fails_the_check(tmp_path, monkeypatch, broken):
    run = train_tiny(tmp_path, monkeypatch, **broken)
    assert not learned(run), run
