"""The train stage: contract outputs, the recipe's moving parts, and resuming after a kill.

Runs train tiny models (U-Net at width 0.125, 32 px, 4 steps per epoch) on shards written per
module. The resume tests train a killed run in a subprocess while the uninterrupted twin trains in
the test's process; the distribution tests at the end start their own processes (two replicas,
two workers).
"""

from __future__ import annotations

import dataclasses

import csv
import io
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from seglab.config import Config, ProfileConfig, TrainConfig
from seglab.data.classes import ClassSet
from seglab.data.coco import LabelRules, encode_png
from seglab.data.shards import shard_metadata, write_shards
from seglab.data.stats import pixel_counts
from seglab.train.loop import HISTORY_COLUMNS, set_batchnorm_momentum, train_model
from seglab.train.plan import init_logits_from_prior, params_hash, plan_run
from seglab.train.precision import CPU_AUTO_POLICY, dtype_policy, resolve_mixed_precision
from seglab.train.run import run_train
from seglab.train.schedules import PlateauScaledSchedule, ScheduleReduceLROnPlateau, warmup_cosine_schedule
from seglab.train.settings import TrainSettings
from seglab.train.strategy import get_strategy

CLASSES = ("background", "cat", "dog", "car")
PALETTE = np.array([[0, 0, 0], [230, 30, 30], [30, 220, 40], [40, 60, 230]], np.uint8)
CONTRACT_FIELDS = (
    "model", "arch", "backbone", "weights", "weights_loaded", "width", "image_size", "batch_size", "epochs_planned",
    "epochs_run", "best_epoch", "best_val_miou", "seconds_per_epoch", "train_seconds", "train_images_per_second",
    "param_count", "trainable_param_count", "classes", "class_set", "dataset", "train_images", "val_images", "seed",
    "params_hash", "mixed_precision", "strategy", "replicas", "git_rev", "created_at",
    "augmenter", "train_data", "synthetic_accepted", "synthetic_images_used",
)
REPO = Path(__file__).resolve().parents[2]


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _rows(split: str, count: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    for i in range(count):
        grid = rng.choice([0, 1, 2, 3, 255], size=(5, 6), p=[0.4, 0.2, 0.15, 0.15, 0.1])
        label = np.kron(grid, np.ones((8, 8), np.int64)).astype(np.uint8)  # 40 x 48
        image = np.where(label[..., None] == 255, 128, PALETTE[np.minimum(label, 3)]).astype(np.uint8)
        counts = np.bincount(label.ravel(), minlength=256)
        rows.append({
            "image_id": i, "file_name": f"{i:06d}.jpg", "split": split, "source": "tiny-test",
            "height": 40, "width": 48, "orig_height": 40, "orig_width": 48,
            "image": _jpeg(image), "label": encode_png(label),
            "class_pixels": [int(c) for c in counts[: len(CLASSES)]], "ignore_pixels": int(counts[255]),
        })
    return rows


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    class_set = ClassSet("custom", CLASSES, tuple(range(len(CLASSES))))
    for split, count in (("train", 16), ("val", 8)):
        write_shards(_rows(split, count, rng), root / split, shard_metadata(class_set, split, LabelRules()), 16.0)
    return root


def make_cfg(shards: Path, root: Path, *, epochs: int = 3, learning_rate: float = 3e-3, train: dict | None = None,
             model: dict | None = None) -> Config:
    return Config.model_validate({
        "seed": 0,
        "shard": {"out": str(shards)},
        "profile": "tiny",
        "profiles": {"tiny": {"image_size": 32, "batch_size": 4, "epochs": epochs, "width": 0.125,
                              "learning_rate": learning_rate}},
        "models": {"tiny": model or {"arch": "unet", "weights": None}},
        "train": {"out": str(root / "models"), "metrics": str(root / "metrics"), "state": str(root / "state"),
                  "mixed_precision": "off", "warmup_epochs": 1, "commit_every_seconds": 0, **(train or {})},
    })


def read_history(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------------- the stage


def test_run_train_writes_the_contract_files(shards, tmp_path, caplog):
    cfg = make_cfg(shards, tmp_path, epochs=3, train={"mixed_precision": "mixed_bfloat16"})
    # A resume state left by other settings: discarded (logged), never loaded (it would not load).
    state = tmp_path / "state" / "tiny"
    (state / "backup" / "epoch-0002").mkdir(parents=True)
    (state / "run.json").write_text(json.dumps({"params_hash": "0" * 64, "shards": "x"}))
    (state / "backup" / "LATEST").write_text("epoch-0002")
    before = keras.config.dtype_policy().name
    with caplog.at_level(logging.WARNING, logger="seglab.train.resume"):
        info = run_train(cfg, "tiny", verbose=0)
    assert "discarding a training state from other settings" in caplog.text

    # The global policy is back; the model itself trained (and is saved) under bfloat16.
    assert keras.config.dtype_policy().name == before == "float32"
    out = tmp_path / "models" / "tiny"
    train_json = json.loads((out / "train.json").read_text())
    assert train_json == json.loads(json.dumps(info))
    assert set(CONTRACT_FIELDS) <= set(train_json)
    assert train_json["mixed_precision"] == "mixed_bfloat16"
    assert train_json["classes"] == list(CLASSES) and train_json["class_set"] == "custom"
    assert train_json["dataset"] == "tiny-test"
    assert (train_json["train_images"], train_json["val_images"]) == (16, 8)
    assert train_json["weights_loaded"] == "random" and train_json["backbone"] is None
    assert train_json["params_hash"] == params_hash(cfg, "tiny")
    assert train_json["epochs_planned"] == 3 and train_json["resumed_from_epoch"] == 0
    assert train_json["param_count"] > train_json["trainable_param_count"] > 0  # BN moving stats
    assert train_json["class_weights"] is None  # params.yaml's default: an unweighted loss

    metrics_dir = tmp_path / "metrics" / "tiny"
    history = read_history(metrics_dir / "history.csv")
    assert len(history) == train_json["epochs_run"] == 3
    assert list(history[0])[: len(HISTORY_COLUMNS)] == list(HISTORY_COLUMNS)
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    val_miou = [float(r["val_miou"]) for r in history]
    # The kept model is the first epoch with the highest val mIoU (EarlyStopping, strict improvement).
    assert train_json["best_epoch"] == 1 + int(np.argmax(val_miou))
    assert train_json["best_val_miou"] == pytest.approx(max(val_miou))
    lrs = [float(r["lr"]) for r in history]
    assert lrs[-1] < lrs[0]  # cosine decay
    summary = json.loads((metrics_dir / "train_metrics.json").read_text())
    assert set(summary) == {"best_val_miou", "epochs_run", "seconds_per_epoch", "train_images_per_second",
                            "param_count", "augmenter", "synthetic_accepted", "synthetic_images_used"}
    # A real-data-only model: no augmenter, so nothing to accept, no synthetic image used.
    assert (summary["augmenter"], summary["synthetic_accepted"], summary["synthetic_images_used"]) == (None, None, 0)
    assert train_json["train_data"] == str(shards) and train_json["synthetic_decision"] is None

    model = keras.models.load_model(out / "model.keras")
    assert model.compiled is False or model.optimizer is None  # an inference artifact
    # In its inference form: the U-Net's BatchNorms (each after a convolution) folded into them.
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model._flatten_layers())
    logits = model.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0)
    assert logits.shape == (2, 32, 32, len(CLASSES)) and logits.dtype == np.float32
    assert not (tmp_path / "state" / "tiny").exists()  # resume state removed after success


def test_the_classifier_bias_starts_at_the_log_class_prior(shards, tmp_path):
    expected = np.zeros(len(CLASSES), np.int64)
    for row in _rows("train", 16, np.random.default_rng(0)):  # the fixture's train rows, regenerated
        expected += row["class_pixels"]
    assert list(pixel_counts(shards, "train", len(CLASSES)).classes) == list(expected)

    plan = plan_run(make_cfg(shards, tmp_path), "tiny")
    model, _ = plan.build()
    bias = model.get_layer("logits_conv").get_weights()[1]
    prior = (expected + 1.0) / (expected.sum() + len(CLASSES))
    np.testing.assert_allclose(bias, np.log(prior), rtol=1e-6)
    # A fresh model's softmax then starts at the prior everywhere (the kernel still adds its noise).
    assert np.argmax(bias) == 0

    off = plan_run(make_cfg(shards, tmp_path, train={"prior_init": False}), "tiny")
    assert off.class_pixels is None and not off.build()[0].get_layer("logits_conv").get_weights()[1].any()
    with pytest.raises(ValueError, match="no final Conv2D with 5 filters"):
        init_logits_from_prior(model, [1, 2, 3, 4, 5])


def test_params_hash_tracks_the_run_settings(shards, tmp_path):
    base = params_hash(make_cfg(shards, tmp_path), "tiny")
    assert base == params_hash(make_cfg(shards, tmp_path), "tiny")
    assert base != params_hash(make_cfg(shards, tmp_path, epochs=4), "tiny")
    assert base != params_hash(make_cfg(shards, tmp_path, train={"loss": "ce"}), "tiny")
    weighting = [params_hash(make_cfg(shards, tmp_path, train={"class_weights": mode}), "tiny")
                 for mode in (None, "median_frequency", [1.0, 2.0, 2.0, 2.0])]
    assert weighting[0] == base and len(set(weighting)) == 3  # params.yaml's default: null
    assert base != params_hash(make_cfg(shards, tmp_path, model={"arch": "unet", "width": 0.25}), "tiny")


def test_unknown_model_and_too_few_images_fail_clearly(shards, tmp_path):
    cfg = make_cfg(shards, tmp_path)
    with pytest.raises(ValueError, match="no model 'nope'"):
        run_train(cfg, "nope")
    big_batch = cfg.model_copy(update={"profiles": {"tiny": cfg.run_profile.model_copy(update={"batch_size": 64})}})
    with pytest.raises(ValueError, match="fewer than one batch of 64"):
        run_train(big_batch, "tiny")


# ----------------------------------------------------------------------------------- resume

DRIVER = textwrap.dedent("""
    import json, sys, time
    import keras
    from seglab.config import Config
    from seglab.train.run import run_train

    class SlowEpochStart(keras.callbacks.Callback):
        # Leaves a window after each commit in which the test can kill the process.
        def on_epoch_begin(self, epoch, logs=None):
            time.sleep(float(sys.argv[2]))

    cfg = Config.model_validate(json.loads(open(sys.argv[1]).read()))
    run_train(cfg, "tiny", callbacks=[SlowEpochStart()], verbose=0)
""")

def _kill_after_commit(proc, backup: Path, epoch: int) -> None:
    """SIGKILL the training process `proc` as soon as its backup has committed `epoch`."""
    try:
        deadline = time.monotonic() + 180
        while not ((backup / "LATEST").is_file() and (backup / "LATEST").read_text() == f"epoch-{epoch:04d}"):
            if proc.poll() is not None:
                pytest.fail(f"training exited before epoch {epoch} was committed:\n{proc.stderr.read().decode()[-5000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no commit of epoch {epoch} within 180 s")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()



class KilledRun:
    """`cfg`'s model "tiny" trained in a process that is SIGKILLed right after it committed epoch
    `kill_after`. A thread watches for the commit, so the test can train the uninterrupted twin in
    the meantime (two cores: the two runs overlap instead of queueing)."""

    def __init__(self, cfg: Config, root: Path, kill_after: int):
        root.mkdir(parents=True, exist_ok=True)
        (root / "cfg.json").write_text(cfg.model_dump_json(by_alias=True))
        (root / "driver.py").write_text(DRIVER)
        self.backup = Path(cfg.train.state) / "tiny" / "backup"
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        self.proc = subprocess.Popen([sys.executable, str(root / "driver.py"), str(root / "cfg.json"), "2"],
                                     cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._failure: BaseException | None = None
        self._watcher = threading.Thread(target=self._watch, args=(kill_after,), daemon=True)
        self._watcher.start()

    def _watch(self, kill_after: int) -> None:
        try:
            _kill_after_commit(self.proc, self.backup, kill_after)
        except BaseException as failure:  # pytest.fail's exception too: raised again in the test's thread
            self._failure = failure

    def backup_after_kill(self) -> Path:
        """Waits for the kill; returns the run's backup folder."""
        self._watcher.join()
        if self._failure is not None:
            raise self._failure
        assert self.proc.returncode == -signal.SIGKILL
        return self.backup


class CommitsSeen(keras.callbacks.Callback):
    """The committed epoch (the backup's LATEST) at each epoch end; runs before the end-of-epoch commit."""

    def __init__(self, backup: Path):
        super().__init__()
        self.backup, self.seen = backup, []

    def _latest(self):
        pointer = self.backup / "LATEST"
        return pointer.read_text() if pointer.is_file() else None

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(self._latest())

    def on_train_end(self, logs=None):
        self.seen.append(self._latest())


@pytest.mark.parametrize("every, expected", [
    (0, [None, "epoch-0001", "epoch-0002", "epoch-0003"]),  # a commit after every epoch
    (3600, [None, None, None, None]),                        # none within the hour: the run keeps going
])
def test_commits_are_spaced_by_commit_every_seconds(shards, tmp_path, every, expected):
    cfg = make_cfg(shards, tmp_path, epochs=3, train={"commit_every_seconds": every})
    seen = CommitsSeen(Path(cfg.train.state) / "tiny" / "backup")
    info = run_train(cfg, "tiny", callbacks=[seen], verbose=0)
    assert seen.seen == expected
    assert info["epochs_run"] == 3 and 1 <= info["best_epoch"] <= 3  # the best checkpoint is kept without commits


def test_a_killed_and_resumed_run_ends_like_an_uninterrupted_one(shards, tmp_path):
    """Same settings and seed: one run straight through, one killed right after committing an epoch
    and resumed. Both must log the same history and keep the same best epoch with the same weights.
    The learning rate is high enough for the best epoch to come before the kill: the resumed run
    must remember that score (else its first epoch counts as the best) and go on with the batches
    the uninterrupted run saw next (else its losses part from there). Leftovers of a kill in the
    middle of the next commit must be ignored, not loaded."""
    epochs, kill_after = 5, 2
    cfg = make_cfg(shards, tmp_path / "resumed", epochs=epochs, learning_rate=0.1)
    killed = KilledRun(cfg, tmp_path / "resumed", kill_after)
    straight = run_train(make_cfg(shards, tmp_path / "straight", epochs=epochs, learning_rate=0.1), "tiny", verbose=0)
    assert straight["best_epoch"] <= kill_after  # the case this test is about
    backup = killed.backup_after_kill()

    assert not (tmp_path / "resumed" / "models" / "tiny").exists()  # nothing published by the killed run
    committed = json.loads((backup / f"epoch-{kill_after:04d}" / "state.json").read_text())
    before = committed["states"]["history"]["rows"]
    assert [r["epoch"] for r in before] == [1, 2]
    (backup / f".epoch-{kill_after + 1:04d}.tmp").mkdir()
    (backup / f".epoch-{kill_after + 1:04d}.tmp" / "latest.weights.h5").write_bytes(b"half-written")

    resumed = run_train(cfg, "tiny", verbose=0)
    assert resumed["resumed_from_epoch"] == kill_after
    for key in ("best_epoch", "epochs_run", "stopped_early"):
        assert resumed[key] == straight[key], key
    assert resumed["best_val_miou"] == pytest.approx(straight["best_val_miou"], rel=1e-6)
    histories = [read_history(tmp_path / run / "metrics" / "tiny" / "history.csv") for run in ("straight", "resumed")]
    assert [int(r["epoch"]) for r in histories[1]] == list(range(1, epochs + 1))  # each epoch exactly once
    for old, new in zip(before, histories[1]):  # the epochs before the kill are kept as they were logged
        for key in ("loss", "val_loss", "val_miou", "lr"):
            assert float(new[key]) == pytest.approx(old[key], rel=1e-12)
    # The learning-rate schedule went on from the restored step, not from step 0.
    assert float(histories[1][kill_after]["lr"]) < float(histories[1][kill_after - 1]["lr"])
    for row_straight, row_resumed in zip(*histories):
        for key in ("loss", "miou", "val_loss", "val_miou", "lr"):
            assert float(row_resumed[key]) == pytest.approx(float(row_straight[key]), rel=1e-5, abs=1e-7), \
                (row_straight["epoch"], key)
    assert not (tmp_path / "resumed" / "state" / "tiny").exists()
    models = [keras.models.load_model(tmp_path / run / "models" / "tiny" / "model.keras") for run in ("straight", "resumed")]
    for w_straight, w_resumed in zip(*(model.get_weights() for model in models)):
        np.testing.assert_allclose(w_resumed, w_straight, rtol=1e-5, atol=1e-6)


def test_a_run_killed_while_its_encoder_is_frozen_resumes_exactly(shards, tmp_path):
    """A pretrained encoder (a weights file) held for 2 epochs, BatchNorm frozen; killed after
    committing epoch 1 (held) and resumed: the encoder must stay held for epoch 2, be released at
    epoch 3 with a fresh optimizer, and the run end as an uninterrupted one does."""
    from seglab import models

    keras.utils.set_random_seed(0)
    encoder_file = tmp_path / "encoder.weights.h5"
    models.build("unet_mobilenetv2", len(CLASSES), (32, 32, 3), width=0.125).get_layer("encoder").save_weights(
        encoder_file)
    model = {"arch": "unet_mobilenetv2", "weights": str(encoder_file)}
    train = {"freeze_encoder_epochs": 2, "encoder_batchnorm": "frozen", "encoder_lr_multiplier": 0.5,
             "optimizer": "adamw"}
    epochs, kill_after = 3, 1
    cfg = make_cfg(shards, tmp_path / "resumed", epochs=epochs, train=train, model=model)
    killed = KilledRun(cfg, tmp_path / "resumed", kill_after)
    straight = run_train(make_cfg(shards, tmp_path / "straight", epochs=epochs, train=train, model=model), "tiny",
                         verbose=0)
    backup = killed.backup_after_kill()
    assert (backup / "LATEST").read_text() == f"epoch-{kill_after:04d}"
    resumed = run_train(cfg, "tiny", verbose=0)
    assert resumed["resumed_from_epoch"] == kill_after
    for key in ("best_epoch", "epochs_run"):
        assert resumed[key] == straight[key], key
    histories = [read_history(tmp_path / run / "metrics" / "tiny" / "history.csv") for run in ("straight", "resumed")]
    for row_straight, row_resumed in zip(*histories):
        for key in ("loss", "miou", "val_loss", "val_miou", "lr"):
            assert float(row_resumed[key]) == pytest.approx(float(row_straight[key]), rel=1e-5, abs=1e-7), \
                (row_straight["epoch"], key)
    models_ = [keras.models.load_model(tmp_path / run / "models" / "tiny" / "model.keras")
               for run in ("straight", "resumed")]
    for w_straight, w_resumed in zip(*(m.get_weights() for m in models_)):
        np.testing.assert_allclose(w_resumed, w_straight, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- recipe


def tiny_settings(*, epochs: int, steps_per_epoch: int, batch_size: int, learning_rate: float,
                  pretrained_encoder: bool = False, num_classes: int = 4, **train) -> TrainSettings:
    """Settings of a tiny run: `train` are params.yaml `train` keys; the encoder ones count only for a
    `pretrained_encoder` (as in plan_run)."""
    profile = ProfileConfig(image_size=32, batch_size=batch_size, epochs=epochs, width=0.125,
                            learning_rate=learning_rate)
    recipe = {"optimizer": "adam", "warmup_epochs": 1, "loss": "focal_dice", "class_weights": None,
              "early_stopping_patience": 10, "reduce_lr_patience": 3, "freeze_encoder_epochs": 0,
              "encoder_lr_multiplier": 1.0, "encoder_batchnorm": "train"}  # fixed here, whatever params.yaml says
    return TrainSettings(TrainConfig(**{**recipe, **train}), profile, num_classes=num_classes, steps_per_epoch=steps_per_epoch,
                         pretrained_encoder=pretrained_encoder)


def tiny_segmenter(num_classes: int = 4) -> keras.Model:
    """A segmenter with an encoder nested as a layer named "encoder", like the zoo's backbone models."""
    image = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(image)
    x = keras.layers.Conv2D(8, 3, padding="same", name="enc_conv")(x)
    x = keras.layers.BatchNormalization(name="enc_bn")(x)
    encoder = keras.Model(image, keras.layers.Activation("relu")(x), name="encoder")
    inputs = keras.Input((32, 32, 3))
    y = keras.layers.Conv2D(num_classes, 1, name="decoder_conv")(encoder(inputs))
    return keras.Model(inputs, keras.layers.Activation("linear", dtype="float32", name="logits")(y))


def random_batches(count: int, num_classes: int = 4, seed: int = 0) -> tf.data.Dataset:
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (count * 4, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, (count * 4, 32, 32)).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)


class WeightSnapshots(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.snapshots = []

    def _take(self):
        model = self.model
        self.snapshots.append({
            "encoder": [w.numpy().copy() for w in model.get_layer("encoder").weights],
            "decoder": [w.numpy().copy() for w in model.get_layer("decoder_conv").weights],
            "encoder_trainable": model.get_layer("encoder").trainable,
        })

    def on_train_begin(self, logs=None):
        self._take()

    def on_epoch_end(self, epoch, logs=None):
        self._take()


def _changed(before, after) -> bool:
    return any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_encoder_frozen_then_unfrozen_at_the_given_epoch(tmp_path):
    keras.utils.set_random_seed(0)
    settings = tiny_settings(epochs=3, steps_per_epoch=2, batch_size=4, learning_rate=1e-2, pretrained_encoder=True,
                             warmup_epochs=0, freeze_encoder_epochs=2, encoder_lr_multiplier=0.5,
                             encoder_batchnorm="train", optimizer="adamw")
    snapshots = WeightSnapshots()
    result = train_model(tiny_segmenter, random_batches(2).repeat(), random_batches(1, seed=1), settings,
                         state_dir=tmp_path / "state", callbacks=[snapshots], verbose=0)
    initial, epoch1, epoch2, epoch3 = snapshots.snapshots
    # Frozen for epochs 1 and 2: kernels, BatchNorm scale/offset and moving statistics all unchanged.
    assert not _changed(initial["encoder"], epoch1["encoder"])
    assert not _changed(epoch1["encoder"], epoch2["encoder"])
    assert _changed(initial["decoder"], epoch1["decoder"]) and _changed(epoch1["decoder"], epoch2["decoder"])
    # Unfrozen from epoch 3 on.
    assert _changed(epoch2["encoder"], epoch3["encoder"])
    assert epoch3["encoder_trainable"] and not epoch2["encoder_trainable"]
    assert result.epochs_run == 3


@pytest.mark.parametrize("freeze_epochs", [1, 0])
def test_encoder_batchnorm_frozen_keeps_its_statistics_while_the_encoder_trains(tmp_path, freeze_epochs):
    keras.utils.set_random_seed(0)
    settings = tiny_settings(epochs=2, steps_per_epoch=2, batch_size=4, learning_rate=1e-2, pretrained_encoder=True,
                             warmup_epochs=0, freeze_encoder_epochs=freeze_epochs, encoder_lr_multiplier=0.5,
                             encoder_batchnorm="frozen")
    snapshots = WeightSnapshots()
    train_model(tiny_segmenter, random_batches(2).repeat(), random_batches(1, seed=1), settings,
                state_dir=tmp_path / "state", callbacks=[snapshots], verbose=0)
    initial, _, last = snapshots.snapshots
    names = [w.path for w in tiny_segmenter().get_layer("encoder").weights]
    is_bn = ["enc_bn" in name for name in names]
    assert any(is_bn) and not all(is_bn)
    for bn, before, after in zip(is_bn, initial["encoder"], last["encoder"]):
        assert np.array_equal(before, after) == bn  # BatchNorm (gamma, beta, moving stats) fixed, the conv trained
    assert last["encoder_trainable"]


def test_held_encoder_is_released_without_tracing_the_train_step_again(tmp_path):
    """The default path (BatchNorm frozen): the frozen epochs leave the whole encoder bit-identical
    (AdamW's weight decay included), it trains from the unfreeze on, and the step is traced once."""
    keras.utils.set_random_seed(0)
    settings = tiny_settings(epochs=3, steps_per_epoch=2, batch_size=4, learning_rate=1e-2, pretrained_encoder=True,
                             warmup_epochs=0, freeze_encoder_epochs=2, encoder_lr_multiplier=0.5,
                             encoder_batchnorm="frozen", optimizer="adamw")
    traces = []

    def build():
        model = tiny_segmenter()
        train_step = model.train_step

        def counted(data):  # Keras calls train_step only while tracing
            traces.append(1)
            return train_step(data)

        model.train_step = counted
        return model

    snapshots = WeightSnapshots()
    train_model(build, random_batches(2).repeat(), random_batches(1, seed=1), settings, state_dir=tmp_path / "state",
                callbacks=[snapshots], verbose=0)
    initial, epoch1, epoch2, epoch3 = snapshots.snapshots
    assert not _changed(initial["encoder"], epoch2["encoder"])
    assert _changed(initial["decoder"], epoch1["decoder"]) and _changed(epoch1["decoder"], epoch2["decoder"])
    assert _changed(epoch2["encoder"], epoch3["encoder"])
    assert len(traces) == 1


def test_encoder_batchnorm_setting_is_checked():
    with pytest.raises(ValueError, match="encoder_batchnorm"):
        tiny_settings(epochs=1, steps_per_epoch=1, batch_size=4, learning_rate=1e-3, encoder_batchnorm="fixed")


@pytest.mark.parametrize("encoder_batchnorm", ["frozen", "train"])
def test_mixed_float16_with_frozen_encoder_trains(tmp_path, encoder_batchnorm):
    """The GPU default path (loss scaling + encoder learning-rate wrapper + unfreeze) runs end to end."""
    settings = tiny_settings(epochs=2, steps_per_epoch=2, batch_size=4, learning_rate=1e-3, pretrained_encoder=True,
                             freeze_encoder_epochs=1, encoder_lr_multiplier=0.1, encoder_batchnorm=encoder_batchnorm)
    snapshots = WeightSnapshots()
    result = train_model(tiny_segmenter, random_batches(2).repeat(), random_batches(1, seed=1), settings,
                         state_dir=tmp_path / "state", mixed_precision="mixed_float16", callbacks=[snapshots],
                         verbose=0)
    assert not _changed(snapshots.snapshots[0]["encoder"], snapshots.snapshots[1]["encoder"])  # frozen epoch 1
    assert isinstance(result.model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert result.model.get_layer("decoder_conv").dtype_policy.name == "mixed_float16"
    assert all(math.isfinite(row["loss"]) for row in result.history) and result.epochs_run == 2
    assert keras.config.dtype_policy().name == "float32"


def test_freezing_a_model_without_encoder_is_refused(tmp_path):
    settings = tiny_settings(epochs=1, steps_per_epoch=1, batch_size=4, learning_rate=1e-3, pretrained_encoder=True,
                             freeze_encoder_epochs=1)

    def no_encoder():
        inputs = keras.Input((32, 32, 3))
        return keras.Model(inputs, keras.layers.Conv2D(4, 1)(inputs))

    with pytest.raises(ValueError, match="no layer named 'encoder'"):
        train_model(no_encoder, random_batches(1).repeat(), random_batches(1), settings, state_dir=tmp_path)


def test_plateau_lowers_the_schedule_scale_not_its_shape():
    schedule = PlateauScaledSchedule(warmup_cosine_schedule(1e-2, total_steps=100, warmup_steps=10))
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse")
    callback = ScheduleReduceLROnPlateau(schedule, monitor="val_miou", mode="max", patience=2, factor=0.5,
                                         min_scale=0.2)
    callback.set_model(model)
    callback.on_train_begin()
    scales = []
    for epoch, value in enumerate([0.5, 0.6, 0.6, 0.55, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]):
        callback.on_epoch_end(epoch, {"val_miou": value})
        scales.append(float(schedule.scale.numpy()))
    # Two epochs without improvement -> halve; never below min_scale.
    assert scales[:4] == [1.0, 1.0, 1.0, 0.5]
    assert min(scales) == pytest.approx(0.2) and scales[-1] == pytest.approx(0.2)
    base = warmup_cosine_schedule(1e-2, total_steps=100, warmup_steps=10)
    assert float(schedule(50)) == pytest.approx(0.2 * float(base(50)), rel=1e-6)


def test_without_plateau_patience_the_learning_rate_is_the_schedule_alone(tmp_path):
    # Random labels: val_miou stalls at once, which with a patience would lower the scale.
    keras.utils.set_random_seed(0)
    settings = tiny_settings(epochs=4, steps_per_epoch=2, batch_size=4, learning_rate=1e-2, warmup_epochs=1,
                             reduce_lr_patience=None)
    result = train_model(tiny_segmenter, random_batches(2).repeat(), random_batches(1, seed=1), settings,
                         state_dir=tmp_path / "state", verbose=0)
    schedule = warmup_cosine_schedule(1e-2, total_steps=8, warmup_steps=2)
    # history's lr is the rate at the optimizer's step count after each epoch
    expected = [float(schedule(2 * (epoch + 1))) for epoch in range(4)]
    assert [row["lr"] for row in result.history] == pytest.approx(expected, rel=1e-5)


def test_batchnorm_momentum_applies_to_every_batchnorm_layer_nested_ones_included(tmp_path):
    keras.utils.set_random_seed(0)
    settings = tiny_settings(epochs=1, steps_per_epoch=2, batch_size=4, learning_rate=1e-2, batchnorm_momentum=0.5)
    result = train_model(tiny_segmenter, random_batches(2).repeat(), random_batches(1, seed=1), settings,
                         state_dir=tmp_path / "state", verbose=0)
    layers = [layer for layer in result.model._flatten_layers(include_self=False, recursive=True)
              if isinstance(layer, keras.layers.BatchNormalization)]
    assert layers and {layer.momentum for layer in layers} == {0.5}
    # The moving mean (from 0) moves further in two steps than with the architecture's 0.99.
    keras.utils.set_random_seed(0)
    slow = train_model(tiny_segmenter, random_batches(2).repeat(), random_batches(1, seed=1),
                       dataclasses.replace(settings, train=settings.train.model_copy(update={"batchnorm_momentum": None})),
                       state_dir=tmp_path / "state_slow", verbose=0)
    moved = [np.abs(m.get_layer("encoder").get_layer("enc_bn").moving_mean.numpy()).mean() for m in (result.model, slow.model)]
    assert moved[0] > 10 * moved[1], moved
    untouched = tiny_segmenter()
    assert set_batchnorm_momentum(untouched, None) == 0
    assert untouched.get_layer("encoder").get_layer("enc_bn").momentum == 0.99


def test_warmup_then_cosine_decay():
    schedule = warmup_cosine_schedule(1e-3, total_steps=40, warmup_steps=10)
    values = np.array([float(schedule(step)) for step in range(41)])
    assert values[0] == pytest.approx(1e-4)
    assert values[10] == pytest.approx(1e-3)
    assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[10:]) < 0)
    assert values[40] == pytest.approx(0.0, abs=1e-12)
    no_warmup = warmup_cosine_schedule(1e-3, total_steps=5, warmup_steps=0)
    assert float(no_warmup(0)) == pytest.approx(1e-3)


def test_mixed_precision_resolution_and_policy_restore():
    assert resolve_mixed_precision("off") == "float32"
    assert resolve_mixed_precision("mixed_bfloat16") == "mixed_bfloat16"
    if not tf.config.list_physical_devices("GPU"):
        assert resolve_mixed_precision("auto") == CPU_AUTO_POLICY
    with pytest.raises(ValueError, match="mixed_precision"):
        resolve_mixed_precision("fp8")
    with pytest.raises(RuntimeError, match="boom"):
        with dtype_policy("mixed_bfloat16"):
            assert keras.config.dtype_policy().name == "mixed_bfloat16"
            raise RuntimeError("boom")
    assert keras.config.dtype_policy().name == "float32"


def test_strategy_selection(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = get_strategy()
    assert strategy.num_replicas_in_sync == 1
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        get_strategy()


def test_settings_validation_names_the_field():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        tiny_settings(epochs=1, steps_per_epoch=0, batch_size=4, learning_rate=1e-3)
    with pytest.raises(ValueError, match="optimizer"):
        tiny_settings(epochs=1, steps_per_epoch=1, batch_size=4, learning_rate=1e-3, optimizer="sgd")
    with pytest.raises(ValueError, match="class_weights has 2 entries; the shards have 4 classes"):
        tiny_settings(epochs=1, steps_per_epoch=1, batch_size=4, learning_rate=1e-3, class_weights=[1.0, 2.0])
    settings = tiny_settings(epochs=1, steps_per_epoch=1, batch_size=4, learning_rate=1e-3, freeze_encoder_epochs=3)
    assert (settings.freeze_encoder_epochs, settings.encoder_lr_multiplier) == (0, 1.0)  # no pretrained encoder


# ----------------------------------------------------------------------------------- distribution
# Several replicas need a fresh process: MirroredStrategy gets two by splitting the CPU into two
# logical devices before TensorFlow starts; MultiWorkerMirroredStrategy needs one process per worker.

SPLIT_CPU = textwrap.dedent("""
    import tensorflow as tf
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    MIRRORED = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
""")

EQUIVALENCE_DRIVER = SPLIT_CPU + textwrap.dedent("""
    import json, sys
    import keras
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from tests.train.test_training import tiny_segmenter, tiny_settings
    from seglab.train.loop import train_model

    def batches(count, seed, copies):
        # Batches of 2 images, each repeated `copies` times: under two replicas, each gets one copy.
        rng = np.random.default_rng(seed)
        images = rng.uniform(0, 255, (count, 32, 32, 3)).astype(np.float32)
        labels = rng.choice([0, 1, 2, 3, 255], (count, 32, 32)).astype(np.int32)
        data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(2)
        return data.map(lambda x, y: (tf.concat([x] * copies, 0), tf.concat([y] * copies, 0)))

    out = {}
    for name, options in json.loads(sys.argv[2]).items():
        for strategy, copies in ((tf.distribute.get_strategy(), 1), (MIRRORED, 2)):
            keras.utils.set_random_seed(0)
            settings = tiny_settings(epochs=3, steps_per_epoch=2, batch_size=2 * copies, learning_rate=1e-2,
                                     **options)
            result = train_model(tiny_segmenter, batches(8, 0, copies).repeat(), batches(4, 1, copies), settings,
                                 state_dir=f"{sys.argv[3]}/{name}-{copies}", strategy=strategy, verbose=0)
            out[f"{name}/{result.replicas}"] = {
                "strategy": result.strategy,
                "history": [{k: row[k] for k in ("loss", "miou", "val_loss", "val_miou", "lr")}
                            for row in result.history],
                "weights": [w.numpy().ravel().tolist() for w in result.model.weights],
            }
    print(json.dumps(out))
""")


def _subprocess_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", **extra}


def test_two_replicas_train_like_one_device_on_its_share(tmp_path):
    """Under MirroredStrategy with two replicas, each seeing the same half of every batch, training
    must match one device on that half: the same losses, mIoU and weights. This holds only if every
    loss term is divided by the replicas before the gradients are summed (the Dice term was not),
    the optimizers (EncoderLROptimizer's two copies included) apply the summed gradients once, and
    metrics are summed over the replicas."""
    runs = {"plain": {},
            "encoder": {"pretrained_encoder": True, "freeze_encoder_epochs": 1, "encoder_lr_multiplier": 0.5,
                        "encoder_batchnorm": "train", "optimizer": "adamw"},
            "held_encoder": {"pretrained_encoder": True, "freeze_encoder_epochs": 1, "encoder_lr_multiplier": 0.5,
                             "encoder_batchnorm": "frozen", "optimizer": "adamw"}}
    (tmp_path / "driver.py").write_text(EQUIVALENCE_DRIVER)
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(REPO), json.dumps(runs), str(tmp_path)],
                          cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in runs:
        one, two = out[f"{name}/1"], out[f"{name}/2"]
        assert (one["strategy"], two["strategy"]) == ("_DefaultDistributionStrategy", "MirroredStrategy")
        assert len(one["history"]) == len(two["history"]) == 3
        for row_one, row_two in zip(one["history"], two["history"]):
            assert row_two == pytest.approx(row_one, rel=1e-4, abs=1e-6), name
        for w_one, w_two in zip(one["weights"], two["weights"]):
            np.testing.assert_allclose(w_two, w_one, rtol=1e-4, atol=1e-5, err_msg=name)
    # The encoder runs did train after the unfreeze (their weights are not the initial ones).
    for name in ("encoder", "held_encoder"):
        assert out[f"{name}/2"]["history"][-1]["loss"] != out[f"{name}/2"]["history"][0]["loss"]


# argv: config file, seconds to sleep at each epoch start, "mirrored" or "tf_config" (run_train's own
# strategy: get_strategy() reads TF_CONFIG).
RUN_DRIVER = "import sys\nMIRRORED = None\nif sys.argv[3] == 'mirrored':\n" + textwrap.indent(SPLIT_CPU, "    ") + \
    textwrap.dedent("""
    import json, time
    import keras
    from seglab.config import Config
    from seglab.train.run import run_train

    class SlowEpochStart(keras.callbacks.Callback):
        # Leaves a window after each commit in which the test can kill the process.
        def on_epoch_begin(self, epoch, logs=None):
            time.sleep(float(sys.argv[2]))

    cfg = Config.model_validate(json.loads(open(sys.argv[1]).read()))
    info = run_train(cfg, "tiny", strategy=MIRRORED, callbacks=[SlowEpochStart()], verbose=0)
    print(json.dumps(info))
""")


def test_run_train_under_mirrored_strategy_resumes_after_kill(shards, tmp_path):
    cfg = make_cfg(shards, tmp_path, epochs=2)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json(by_alias=True))
    (tmp_path / "driver.py").write_text(RUN_DRIVER)
    backup = tmp_path / "state" / "tiny" / "backup"
    env = _subprocess_env()
    command = [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "cfg.json")]
    proc = subprocess.Popen([*command, "2", "mirrored"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _kill_after_commit(proc, backup, 1)
    before = json.loads((backup / "epoch-0001" / "state.json").read_text())["states"]["history"]["rows"]

    resumed = subprocess.run([*command, "0", "mirrored"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    info = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert (info["strategy"], info["replicas"]) == ("MirroredStrategy", 2)
    assert info["resumed_from_epoch"] == 1 and info["epochs_run"] == 2
    history = read_history(tmp_path / "metrics" / "tiny" / "history.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2]
    for key in ("loss", "miou", "val_loss", "val_miou", "lr"):
        assert float(history[0][key]) == pytest.approx(before[0][key], rel=1e-12)
    assert all(math.isfinite(float(r["loss"])) for r in history)
    assert not (tmp_path / "state" / "tiny").exists()
    keras.models.load_model(tmp_path / "models" / "tiny" / "model.keras")


def _free_localhost_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("localhost", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    except OSError as err:
        pytest.skip(f"cannot bind localhost ports for the workers ({err})")
    finally:
        for sock in sockets:
            sock.close()


def test_multi_worker_training_from_tf_config(shards, tmp_path):
    """Two workers on localhost, MultiWorkerMirroredStrategy from TF_CONFIG, through run_train.
    Before seglab's MultiWorkerMirroredStrategy this failed before the first step with "Attempt to
    convert a value (PerReplica:{...}) with an unsupported type ... to a Tensor"."""
    cfg = make_cfg(shards, tmp_path, epochs=2)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json(by_alias=True))
    (tmp_path / "driver.py").write_text(RUN_DRIVER)
    cluster = {"worker": [f"localhost:{port}" for port in _free_localhost_ports(2)]}
    procs = []
    for index in (1, 0):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "cfg.json"), "0", "tf_config"], cwd=REPO,
            env=_subprocess_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:  # a worker left alone waits for its peer: a time limit, not a hang
            outputs.append(proc.communicate(timeout=240))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-5000:]
    worker, chief = (json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs)
    for info in (worker, chief):
        assert (info["strategy"], info["replicas"], info["epochs_run"]) == ("MultiWorkerMirroredStrategy", 2, 2)
    # Both trained the same replicated model; only the chief (worker 0) wrote the outputs.
    assert worker["best_val_miou"] == chief["best_val_miou"]
    train_json = json.loads((tmp_path / "models" / "tiny" / "train.json").read_text())
    assert train_json["strategy"] == "MultiWorkerMirroredStrategy" and train_json["replicas"] == 2
    history = read_history(tmp_path / "metrics" / "tiny" / "history.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2] and all(math.isfinite(float(r["loss"])) for r in history)
    assert not list((tmp_path / "state").iterdir())  # the chief's and the worker's resume states are gone
    keras.models.load_model(tmp_path / "models" / "tiny" / "model.keras")


def test_a_run_killed_after_its_last_commit_restores_the_best_epoch_without_training(tmp_path):
    """Every epoch committed, the outputs not yet written (killed in between): training again with the
    same state skips `fit` and returns the best epoch's weights, not the last epoch's."""
    settings = tiny_settings(epochs=4, steps_per_epoch=2, batch_size=4, learning_rate=0.05, warmup_epochs=0,
                             commit_every_seconds=0)
    keras.utils.set_random_seed(0)
    first = train_model(tiny_segmenter, random_batches(2).repeat(), random_batches(1, seed=1), settings,
                        state_dir=tmp_path / "state", verbose=0)
    assert first.best_epoch < first.epochs_run  # the case this test is about: the last epoch is not the best
    keras.utils.set_random_seed(1)  # other initial weights: whatever comes back must be restored
    again = train_model(tiny_segmenter, random_batches(2).repeat(), random_batches(1, seed=1), settings,
                        state_dir=tmp_path / "state", verbose=0)
    assert again.resumed_from_epoch == first.epochs_run and again.best_epoch == first.best_epoch
    assert [r["epoch"] for r in again.history] == [r["epoch"] for r in first.history]
    for restored, best in zip(again.model.get_weights(), first.model.get_weights()):
        np.testing.assert_array_equal(restored, best)
