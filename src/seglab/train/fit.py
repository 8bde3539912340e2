"""The `train@<model>` stage: the seed's recipe with Keras `model.fit`, resumable after a kill.

Recipe (per run, from params.yaml through `TrainSettings.from_config`):

- Adam, or AdamW with decoupled weight decay (biases and BatchNorm scales/offsets excluded), over
  a linear warmup (`warmup_epochs`, from lr / warmup_steps up to lr) followed by a cosine decay
  to 0 at the last step: `keras.optimizers.schedules.CosineDecay(warmup_target=, warmup_steps=)`.
- Loss from `seglab.train.losses.get_loss` (focal + Dice by default, 255 ignored), metric
  `StreamingSegmentationMetric` mIoU on the training batches (`miou`) and on validation (`val_miou`).
- `ModelCheckpoint` keeps the best epoch by `val_miou`; `EarlyStopping` on `val_miou`;
  `ReduceLROnPlateau` on `val_miou`. A schedule-driven learning rate cannot be *set*, so
  plateaus multiply a scale variable that the schedule is multiplied by
  (`PlateauScaledSchedule` + `ScheduleReduceLROnPlateau`): after a reduction the run keeps its
  warmup/cosine shape at the reduced height.
- Pretrained encoders (models with an ``encoder`` layer and `weights` set) start frozen (BatchNorm
  in inference mode) for `freeze_encoder_epochs`, then train at `encoder_lr_multiplier` x the
  decoder's learning rate (`seglab.models.transfer`), their BatchNorm layers kept frozen unless
  `encoder_batchnorm` is "train". From-scratch models train everything at one rate from the start.
- Mixed precision from `train.mixed_precision` (`resolve_mixed_precision`); the global Keras
  dtype policy is restored when training ends, however it ends.
- One code path under `get_strategy()`: MultiWorkerMirroredStrategy when ``TF_CONFIG`` is set
  (seglab's subclass, which works around Keras' calls to `Strategy.reduce` that fail across
  workers), MirroredStrategy on several GPUs, else the default strategy; `run_train` and
  `train_model` also take a strategy. `batch_size` is the global batch. In multi-worker training
  worker 0 (or the chief) writes the outputs; the others keep their resume state in
  ``<train.state>/<name>.worker-<i>/``, and all of them must be restarted together after a kill.

Resume: the run's state lives in ``<train.state>/<name>/`` and is committed atomically at the end
of every epoch by `ResumableBackup` (a `keras.callbacks.BackupAndRestore`): model and optimizer
weights, the epoch, the per-epoch history and the state of the callbacks (plateau counters and
scale, early-stopping counters, best checkpoint score) form one commit, published by an atomic
rename of a pointer file. A run killed at any point restarts from the last committed epoch with
exactly the history of the epochs before it; an epoch that ran after the commit is run again.
The state is keyed by the run's params hash and the shard files (synthetic ones included): a state
left by other settings or data is discarded (logged). It is deleted once the stage's outputs are in place.

Training data (`models.<name>.train_data`): the real training shards (`shard.out`), or for a
`<model>+<gan>` variant the real shards plus the synthetic shards that passed
``validate_synthetic@<gan>`` (`accepted_synthetic_shards`). Both are read by one
`seglab.data.pipeline.make_dataset` over the two folders, as one split: row groups of both are
shuffled together, then elements through the shuffle buffer, so batches mix real and synthetic
samples in proportion to their counts (reproducibly for a seed), and every sample, whatever its
stored size, is cropped and augmented to the training size alike. An epoch is one pass over the
combined rows; validation stays on the real val split. When the gate accepted no synthetic sample
the variant trains on real data only, logs so, and train.json records it (`augmenter`,
`synthetic_accepted`, `synthetic_images_used`).

Outputs (`run_train`), each folder written aside and swapped in at the end:
``<train.out>/<name>/{model.keras, train.json}`` and
``<train.metrics>/<name>/{history.csv, train_metrics.json}``. ``model.keras`` holds the
best-`val_miou` weights as an uncompiled inference model (no optimizer state: it loads with
`keras.models.load_model` given seglab's registered layers, without the training classes).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

from seglab.atomic import atomic_dir, write_text_atomic
from seglab.data.pipeline import classes_of, make_dataset
from seglab.data.shards import read_split, shard_files
from seglab.metrics import StreamingSegmentationMetric
from seglab.gan import GANS
from seglab.gan.validate import VALIDATION_FILE, accepted_synthetic_shards
from seglab.models.transfer import (ENCODER_LAYER, UnfreezeEncoder, build_optimizer, encoder_lr_optimizer,
                                    set_encoder_trainable)
from seglab.data.augment import Augmentation
from seglab.train.losses import get_loss

log = logging.getLogger(__name__)

__all__ = [
    "HISTORY_COLUMNS",
    "EpochRecorder",
    "MultiWorkerMirroredStrategy",
    "PlateauScaledSchedule",
    "ResumableBackup",
    "RunPlan",
    "ScheduleReduceLROnPlateau",
    "SyntheticData",
    "TrainResult",
    "TrainSettings",
    "build_with_weights",
    "clear_state",
    "dtype_policy",
    "get_strategy",
    "inference_view",
    "params_hash",
    "plan_run",
    "resolve_mixed_precision",
    "run_train",
    "train_model",
    "training_datasets",
    "warmup_cosine_schedule",
]

MONITOR = "val_miou"
HISTORY_COLUMNS = ("epoch", "loss", "miou", "val_loss", "val_miou", "lr")
POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
# What `mixed_precision: auto` picks without a GPU, from benchmarks/training.py on this project's
# CPU (Xeon with AMX-BF16, 2 cores; benchmarks/README.md, "Training speed"): mixed_bfloat16 sped up
# the plain U-Net 1.17x, left DeepLabV3+/ResNet50 alike (1.02x) and slowed the MobileNetV2 U-Net
# (0.93x), so float32.
CPU_AUTO_POLICY = "float32"
# Decoded training images are cached in memory (before the random crop and augmentation) when the
# split has at most this many: the embedded sample and coco-mini fit easily, full COCO does not.
CACHE_DECODED_MAX_IMAGES = 2000


# ----------------------------------------------------------------------------- strategy, precision


class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`tf.distribute.MultiWorkerMirroredStrategy` whose `reduce` takes what Keras 3's `fit` gives it.

    Across several workers, Keras 3.15's TensorFlow trainer calls `Strategy.reduce` in two ways
    that TensorFlow's collective reduce refuses, so `fit` failed before its first step:

    - `_maybe_symbolic_build` (run by `fit`, `evaluate`, `predict`) passes a whole ``(images,
      labels)`` batch of `PerReplica` values, a nest, where `reduce` takes one value ("TODO:
      support `value` being a nest" in TensorFlow): "Attempt to convert a value (PerReplica:{...})
      with an unsupported type ... to a Tensor". MirroredStrategy happens to cope with the nest.
    - `reduce_per_replica` averages each step's scalar logs with ``reduce(MEAN, v, axis=0)``:
      "Invalid reduction dimension 0 for input with 0 dimensions".

    Here each value of a nest is reduced on its own, and a scalar's ``axis`` is dropped (the mean
    over replicas, as Keras takes it on one worker). Other values are reduced as TensorFlow does.
    """

    def reduce(self, reduce_op, value, axis):
        def reduce_one(one):
            scalar = axis is not None and self.experimental_local_results(one)[0].shape.rank == 0
            return super(MultiWorkerMirroredStrategy, self).reduce(reduce_op, one, None if scalar else axis)

        return tf.nest.map_structure(reduce_one, value)


def _multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` spans several workers (collective ops between processes)."""
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())  # the test Keras itself uses


def get_strategy() -> tf.distribute.Strategy:
    """`MultiWorkerMirroredStrategy` (seglab's, above) if ``TF_CONFIG`` is set, MirroredStrategy on >1 GPU,
    else the default strategy. Call it before TensorFlow's runtime starts (the multi-worker one needs that)."""
    if os.environ.get("TF_CONFIG"):
        try:
            cluster = json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError as err:
            raise ValueError(f"TF_CONFIG is not valid JSON ({err}); expected "
                             '{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": 0}}') from None
        if not isinstance(cluster, dict) or "cluster" not in cluster or "task" not in cluster:
            raise ValueError("TF_CONFIG must hold 'cluster' and 'task' (see tf.distribute.MultiWorkerMirroredStrategy)")
        strategy = MultiWorkerMirroredStrategy()
    elif len(tf.config.list_logical_devices("GPU")) > 1:
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    log.info("distribution: %s with %d replica(s)", type(strategy).__name__, strategy.num_replicas_in_sync)
    return strategy


def _is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this worker writes the outputs (always, outside multi-worker training)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def resolve_mixed_precision(setting: str) -> str:
    """`train.mixed_precision` -> a Keras dtype policy name.

    ``auto``: ``mixed_float16`` when a GPU is visible, else `CPU_AUTO_POLICY` (measured);
    ``off``: ``float32``; ``mixed_float16`` / ``mixed_bfloat16``: as given.
    """
    if setting == "auto":
        return "mixed_float16" if tf.config.list_physical_devices("GPU") else CPU_AUTO_POLICY
    if setting == "off":
        return "float32"
    if setting in ("mixed_float16", "mixed_bfloat16"):
        return setting
    raise ValueError(f"train.mixed_precision must be auto | off | mixed_float16 | mixed_bfloat16, got {setting!r}")


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Set Keras' global dtype policy for the block and restore the previous one after it."""
    if name not in POLICIES:
        raise ValueError(f"dtype policy must be one of {POLICIES}, got {name!r}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# --------------------------------------------------------------------------------- learning rate


def warmup_cosine_schedule(learning_rate: float, total_steps: int, warmup_steps: int) -> keras.optimizers.schedules.CosineDecay:
    """Linear warmup from ``learning_rate / warmup_steps`` to `learning_rate`, then cosine decay to 0."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    # Leave at least one step of decay: CosineDecay needs decay_steps >= 1.
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=total_steps)
    return keras.optimizers.schedules.CosineDecay(
        learning_rate / warmup_steps, decay_steps=total_steps - warmup_steps,
        warmup_target=learning_rate, warmup_steps=warmup_steps)


@keras.saving.register_keras_serializable(package="seglab")
class PlateauScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """``schedule(step) x scale``, where `scale` is a variable that `ScheduleReduceLROnPlateau` lowers.

    Keras' ReduceLROnPlateau assigns the optimizer's learning rate, which a schedule forbids; this
    keeps the schedule's shape and lets plateaus lower its height. Create it under the strategy's
    scope (the scale is a variable read inside the train step).
    """

    def __init__(self, schedule: keras.optimizers.schedules.LearningRateSchedule | dict, scale: float = 1.0):
        super().__init__()
        if isinstance(schedule, dict):
            schedule = keras.optimizers.schedules.deserialize(schedule)
        self.schedule = schedule
        self.scale = keras.Variable(float(scale), dtype="float32", trainable=False, name="lr_plateau_scale")

    def __call__(self, step):
        return self.schedule(step) * keras.ops.cast(self.scale, "float32")

    def get_config(self) -> dict[str, Any]:
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule), "scale": float(self.scale.numpy())}


class ScheduleReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """`keras.callbacks.ReduceLROnPlateau` that lowers a `PlateauScaledSchedule`'s scale.

    Monitoring, patience, cooldown and min_delta are Keras'; a reduction multiplies the scale by
    `factor`, down to `min_scale`. `min_lr` is not used (the schedule itself decays to 0).
    """

    def __init__(self, schedule: PlateauScaledSchedule, *, min_scale: float = 1e-3, **kwargs: Any):
        super().__init__(**kwargs)
        if not isinstance(schedule, PlateauScaledSchedule):
            raise TypeError(f"ScheduleReduceLROnPlateau needs a PlateauScaledSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.min_scale = float(min_scale)

    def _reduce_optimizer_lr(self, optimizer, epoch, name=""):
        old = float(self.schedule.scale.numpy())
        if old <= self.min_scale * (1 + 1e-6):
            return False
        new = max(old * self.factor, self.min_scale)
        self.schedule.scale.assign(new)
        log.info("epoch %d: %s did not improve for %d epochs; learning-rate scale %.4g -> %.4g",
                 epoch + 1, self.monitor, self.patience, old, new)
        return True


# ---------------------------------------------------------------------------- history and state


def _plain(value: Any) -> Any:
    """A logged value as a JSON-able Python number (None stays None)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if hasattr(value, "numpy"):
        value = value.numpy()
    if isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    return value


def _current_lr(optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class EpochRecorder(keras.callbacks.Callback):
    """One history row per completed epoch (1-based ``epoch``), with the learning rate and timings.

    ``seconds``: the whole epoch (training + validation); ``train_seconds``: the training steps
    only, from which ``images_per_second`` (at `images_per_epoch`) comes.
    """

    def __init__(self, images_per_epoch: int):
        super().__init__()
        self.images_per_epoch = int(images_per_epoch)
        self.rows: list[dict[str, Any]] = []
        self._epoch_start = self._train_end = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start, self._train_end = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        if self._epoch_start is not None and self._train_end is None:
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        end = time.perf_counter()
        train_end = self._train_end or end
        row: dict[str, Any] = {"epoch": epoch + 1}
        for key, value in (logs or {}).items():
            if key not in ("learning_rate",):
                row[key] = _plain(value)
        row["lr"] = _current_lr(self.model.optimizer)
        row["seconds"] = end - self._epoch_start
        row["train_seconds"] = train_end - self._epoch_start
        row["images_per_second"] = self.images_per_epoch / max(row["train_seconds"], 1e-9)
        # Keep rows of earlier epochs only: a restored history may not be extended twice.
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]

    def get_state(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.rows = [dict(r) for r in state["rows"]]


class _AttributeState:
    """Saves/restores named attributes of a library callback (its counters and best score)."""

    def __init__(self, obj: Any, names: Sequence[str]):
        self.obj, self.names = obj, tuple(names)

    def get_state(self) -> dict[str, Any]:
        return {name: _plain(getattr(self.obj, name)) for name in self.names}

    def set_state(self, state: Mapping[str, Any]) -> None:
        for name in self.names:
            setattr(self.obj, name, state[name])


class _ScaleState:
    def __init__(self, schedule: PlateauScaledSchedule):
        self.schedule = schedule

    def get_state(self) -> dict[str, Any]:
        return {"scale": float(self.schedule.scale.numpy())}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.schedule.scale.assign(float(state["scale"]))


class _EncoderState:
    def __init__(self, model: keras.Model):
        self.model = model

    def get_state(self) -> dict[str, Any]:
        return {"trainable": bool(self.model.get_layer(ENCODER_LAYER).trainable)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        pass  # applied before compiling (train_model), so that the optimizer is built to match


_CHECKPOINT_PATTERN = re.compile(r"^best-epoch(\d+)\.weights\.h5$")
_COMMIT_PATTERN = re.compile(r"^epoch-(\d+)$")


def _checkpoint_epochs(checkpoint_dir: Path) -> dict[int, Path]:
    found = {}
    if checkpoint_dir.is_dir():
        for path in checkpoint_dir.iterdir():
            match = _CHECKPOINT_PATTERN.match(path.name)
            if match:
                found[int(match.group(1))] = path
    return found


class ResumableBackup(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` whose end-of-epoch backup is one atomic commit, history and callbacks included.

    Layout of `backup_dir`::

        LATEST                  name of the committed folder (replaced atomically)
        epoch-0003/             latest.weights.h5, training_metadata.json, state.json
        checkpoints/            best-epochNNN.weights.h5 written by ModelCheckpoint

    A commit is written into a temporary folder, renamed to ``epoch-NNNN`` and published by
    rewriting ``LATEST``; a kill before that leaves the previous commit in force, and leftovers
    of the unfinished one are removed on restore (as are checkpoints of epochs after the commit).
    `stateful` maps names to objects with ``get_state() -> dict`` / ``set_state(dict)``; their
    states are saved with each commit and restored at the start of `fit` (after the other
    callbacks' ``on_train_begin``, since this callback must come last in the list).
    """

    def __init__(self, backup_dir: str | Path, stateful: Mapping[str, Any] | None = None,
                 run_key: Mapping[str, Any] | None = None):
        super().__init__(str(backup_dir), save_freq="epoch", delete_checkpoint=False)
        self.root = Path(backup_dir)
        self.stateful = dict(stateful or {})
        self.run_key = dict(run_key or {})
        self.restored_epoch = 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    def committed(self) -> tuple[Path, dict[str, Any]] | None:
        """(folder, state.json) of the committed backup, or None if there is none."""
        pointer = self.root / "LATEST"
        if not pointer.is_file():
            return None
        folder = self.root / pointer.read_text().strip()
        try:
            state = json.loads((folder / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RuntimeError(f"{folder}: the committed training state is unreadable ({err}); "
                               f"delete {self.root} to start this run from scratch") from None
        return folder, state

    def best_checkpoint(self, up_to_epoch: int | None = None) -> tuple[int, Path] | None:
        """The newest ModelCheckpoint file (ModelCheckpoint only writes on improvement, so the best)."""
        found = {e: p for e, p in _checkpoint_epochs(self.checkpoint_dir).items()
                 if up_to_epoch is None or e <= up_to_epoch}
        if not found:
            return None
        epoch = max(found)
        return epoch, found[epoch]

    # ---------------------------------------------------------------------------- keras hooks

    def on_train_begin(self, logs=None):
        # Replaces the parent's: its fallback to a ".bkp" copy is not needed with atomic commits.
        self._load_model()

    def _load_model(self):
        self._remove_uncommitted()
        found = self.committed()
        if found is None:
            self.restored_epoch = 0
            return
        folder, state = found
        if self.run_key and state.get("run_key") != self.run_key:
            raise RuntimeError(f"{folder}: training state of another run (key {state.get('run_key')}, expected "
                               f"{self.run_key}); clear it with seglab.train.fit.clear_state")
        self._weights_path = str(folder / "latest.weights.h5")
        self._training_metadata_path = str(folder / "training_metadata.json")
        super()._load_model()
        for name, obj in self.stateful.items():
            if name not in state["states"]:
                raise RuntimeError(f"{folder}/state.json: no state for {name!r}")
            obj.set_state(state["states"][name])
        self.restored_epoch = int(state["epoch"])
        self._current_epoch = self.restored_epoch
        log.info("resumed from %s: %d epoch(s) done", folder, self.restored_epoch)

    def _remove_uncommitted(self) -> None:
        if not self.root.is_dir():
            return
        pointer = self.root / "LATEST"
        current = pointer.read_text().strip() if pointer.is_file() else None
        committed_epoch = 0
        for path in self.root.iterdir():
            match = _COMMIT_PATTERN.match(path.name)
            if path.name.endswith(".tmp") or (match and path.name != current):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            elif match:
                committed_epoch = int(match.group(1))
        for epoch, path in _checkpoint_epochs(self.checkpoint_dir).items():
            if epoch > committed_epoch:
                path.unlink(missing_ok=True)  # written by an epoch that will run again

    def _save_model(self):
        epoch = self._current_epoch
        name = f"epoch-{epoch:04d}"
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.model.save_weights(str(tmp / "latest.weights.h5"))
        (tmp / "training_metadata.json").write_text(json.dumps({"epoch": epoch, "batch": 0}))
        state = {
            "run_key": self.run_key,
            "epoch": epoch,
            "stop_training": bool(self.model.stop_training),
            "states": {name_: obj.get_state() for name_, obj in self.stateful.items()},
        }
        (tmp / "state.json").write_text(json.dumps(state))
        target = self.root / name
        if target.exists():  # an uncommitted leftover of the same epoch
            shutil.rmtree(target)
        os.replace(tmp, target)
        write_text_atomic(self.root / "LATEST", name)
        # Committed: older commits and superseded checkpoints can go.
        for path in self.root.iterdir():
            if _COMMIT_PATTERN.match(path.name) and path.name != name:
                shutil.rmtree(path, ignore_errors=True)
        best = self.best_checkpoint(up_to_epoch=epoch)
        for other_epoch, path in _checkpoint_epochs(self.checkpoint_dir).items():
            if best is not None and other_epoch < best[0]:
                path.unlink(missing_ok=True)


def clear_state(state_dir: str | Path) -> None:
    """Delete a run's resume state (after its outputs are written, or to force a fresh start)."""
    shutil.rmtree(state_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainSettings:
    """The knobs of one training run (`from_config` maps params.yaml onto them)."""

    num_classes: int
    epochs: int
    steps_per_epoch: int
    batch_size: int  # global, over all replicas
    learning_rate: float
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 1e-4  # adamw only
    warmup_epochs: int = 1
    loss: str = "focal_dice"
    loss_options: Mapping[str, Any] = field(default_factory=dict)
    freeze_encoder_epochs: int = 0
    encoder_lr_multiplier: float = 1.0
    encoder_batchnorm: str = "train"  # train | frozen: the encoder's BatchNorm once it trains (transfer.py)
    early_stopping_patience: int = 10
    reduce_lr_patience: int = 3
    reduce_lr_factor: float = 0.5
    min_lr_scale: float = 1e-3
    jit_compile: bool | str = "auto"

    def __post_init__(self) -> None:
        for name in ("num_classes", "epochs", "steps_per_epoch", "batch_size", "early_stopping_patience",
                     "reduce_lr_patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainSettings.{name} must be a positive integer, got {value!r}")
        for name in ("warmup_epochs", "freeze_encoder_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainSettings.{name} must be an integer >= 0, got {value!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"TrainSettings.learning_rate must be > 0, got {self.learning_rate!r}")
        if self.encoder_batchnorm not in ("train", "frozen"):
            raise ValueError(f"TrainSettings.encoder_batchnorm must be 'train' or 'frozen', got {self.encoder_batchnorm!r}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"TrainSettings.optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if not 0 < self.reduce_lr_factor < 1:
            raise ValueError(f"TrainSettings.reduce_lr_factor must be in (0, 1), got {self.reduce_lr_factor!r}")

    @classmethod
    def from_config(cls, cfg: Any, name: str, *, num_classes: int, steps_per_epoch: int,
                    pretrained_encoder: bool) -> TrainSettings:
        """Settings of model `name` from a `seglab.config.Config`.

        `pretrained_encoder`: the model has an encoder that was given pretrained weights; only then
        is it frozen first and trained at `train.encoder_lr_multiplier` afterwards.
        """
        profile, t = cfg.run_profile, cfg.train
        if t.class_weights is not None and len(t.class_weights) != num_classes:
            raise ValueError(f"params.yaml train.class_weights has {len(t.class_weights)} entries; the shards "
                             f"have {num_classes} classes (background included)")
        loss_options: dict[str, Any] = {"class_weights": t.class_weights}
        if t.loss in ("focal", "focal_dice"):
            loss_options["gamma"] = t.focal_gamma
        if t.loss == "focal_dice":
            loss_options.update(focal_weight=t.focal_weight, dice_weight=t.dice_weight)
        return cls(
            num_classes=num_classes,
            epochs=profile.epochs,
            steps_per_epoch=steps_per_epoch,
            batch_size=profile.batch_size,
            learning_rate=profile.learning_rate,
            optimizer=t.optimizer,
            weight_decay=t.weight_decay,
            warmup_epochs=t.warmup_epochs,
            loss=t.loss,
            loss_options=loss_options,
            freeze_encoder_epochs=t.freeze_encoder_epochs if pretrained_encoder else 0,
            encoder_lr_multiplier=t.encoder_lr_multiplier if pretrained_encoder else 1.0,
            encoder_batchnorm=t.encoder_batchnorm if pretrained_encoder else "train",
            early_stopping_patience=t.early_stopping_patience,
            reduce_lr_patience=t.reduce_lr_patience,
        )


@dataclass
class TrainResult:
    """What `train_model` did. `model` holds the best checkpoint's weights."""

    model: keras.Model
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_miou: float
    epochs_run: int
    resumed_from_epoch: int
    stopped_early: bool
    dtype_policy: str
    strategy: str
    replicas: int
    build_info: Any = None

    @property
    def seconds_per_epoch(self) -> float:
        return statistics.fmean(r["seconds"] for r in self.history)

    @property
    def train_seconds(self) -> float:
        return math.fsum(r["seconds"] for r in self.history)

    @property
    def images_per_second(self) -> float:
        # Median over epochs: the first epoch of a process (tracing) and an unfreeze (re-tracing) are slower.
        return statistics.median(r["images_per_second"] for r in self.history)


def _make_optimizer(settings: TrainSettings, schedule) -> keras.optimizers.Optimizer:
    if settings.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=settings.weight_decay)
    return keras.optimizers.Adam(learning_rate=schedule)


def _has_encoder(model: keras.Model) -> bool:
    return any(layer.name == ENCODER_LAYER for layer in model.layers)


def train_model(
    build_model: Callable[[], keras.Model | tuple[keras.Model, Any]],
    train_data: tf.data.Dataset,
    val_data: tf.data.Dataset,
    settings: TrainSettings,
    *,
    state_dir: str | Path,
    run_key: Mapping[str, Any] | None = None,
    mixed_precision: str = "float32",
    strategy: tf.distribute.Strategy | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int | str = 2,
) -> TrainResult:
    """Train a model with the recipe of the module doc; resumes from `state_dir` if it holds a commit.

    build_model: called under the strategy's scope and the dtype policy; returns the model (float32
        logits (B, H, W, num_classes)), or (model, info) where info is passed through to the result.
    train_data: repeated batches of (images, labels); `settings.steps_per_epoch` of them make an epoch.
    val_data: a finite validation dataset, evaluated after every epoch.
    state_dir: this run's resume state (created; not deleted here: see `clear_state`).
    run_key: JSON-able identity of the run; a state committed under another key is refused.
    mixed_precision: a Keras policy name (float32 | mixed_float16 | mixed_bfloat16).
    callbacks: extra callbacks, run after the recipe's and before the end-of-epoch commit.
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if _multi_worker(strategy) and not isinstance(strategy, MultiWorkerMirroredStrategy):
        raise TypeError("multi-worker training needs seglab.train.fit.MultiWorkerMirroredStrategy (get_strategy() "
                        "makes one from TF_CONFIG): with tf.distribute's own, Keras' fit fails before the first "
                        "step (see its docstring)")
    if settings.batch_size % replicas:
        raise ValueError(f"batch_size {settings.batch_size} (global) is not divisible by the {replicas} replicas")
    state_dir = Path(state_dir)
    total_steps = settings.epochs * settings.steps_per_epoch

    with dtype_policy(mixed_precision), strategy.scope():
        built = build_model()
        model, build_info = built if isinstance(built, tuple) else (built, None)
        schedule = PlateauScaledSchedule(warmup_cosine_schedule(
            settings.learning_rate, total_steps, settings.warmup_epochs * settings.steps_per_epoch))
        optimizer = _make_optimizer(settings, schedule)
        encoder = _has_encoder(model)
        freezing = settings.freeze_encoder_epochs > 0
        train_batchnorm = settings.encoder_batchnorm == "train"
        if freezing and not encoder:
            raise ValueError(f"freeze_encoder_epochs={settings.freeze_encoder_epochs} but model {model.name!r} has no "
                             f"layer named {ENCODER_LAYER!r} to freeze")
        if encoder and (freezing or settings.encoder_lr_multiplier != 1.0):
            optimizer = encoder_lr_optimizer(model, optimizer, settings.encoder_lr_multiplier)
        if settings.optimizer == "adamw":
            # Decay the weights, not the biases or BatchNorm's scale/offset (after wrapping, so that
            # the encoder's optimizer copy gets the same exclusions).
            optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])

        recorder = EpochRecorder(settings.steps_per_epoch * settings.batch_size)
        plateau = ScheduleReduceLROnPlateau(schedule, monitor=MONITOR, mode="max", factor=settings.reduce_lr_factor,
                                            patience=settings.reduce_lr_patience, min_scale=settings.min_lr_scale)
        stopping = keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=settings.early_stopping_patience)
        stateful: dict[str, Any] = {
            "history": recorder,
            "plateau": _AttributeState(plateau, ("wait", "best", "cooldown_counter")),
            "lr_scale": _ScaleState(schedule),
            "early_stopping": _AttributeState(stopping, ("wait", "best", "best_epoch", "stopped_epoch")),
        }
        backup = ResumableBackup(state_dir / "backup", stateful, run_key)
        checkpoint = keras.callbacks.ModelCheckpoint(
            str(backup.checkpoint_dir / "best-epoch{epoch:03d}.weights.h5"), monitor=MONITOR, mode="max",
            save_best_only=True, save_weights_only=True)
        stateful["checkpoint"] = _AttributeState(checkpoint, ("best",))
        recipe = [recorder, plateau, stopping, checkpoint, keras.callbacks.TerminateOnNaN()]
        if freezing:
            stateful["encoder"] = _EncoderState(model)
            recipe.insert(1, UnfreezeEncoder(settings.freeze_encoder_epochs, train_batchnorm=train_batchnorm))

        # The optimizer must be built for the trainable set the committed state was saved with.
        committed = backup.committed()
        if freezing:
            trainable = bool(committed and committed[1]["states"].get("encoder", {}).get("trainable", False))
            set_encoder_trainable(model, trainable, train_batchnorm=train_batchnorm)
        elif encoder and not train_batchnorm:
            set_encoder_trainable(model, True, train_batchnorm=False)
        model.compile(
            optimizer=optimizer,
            loss=get_loss(settings.loss, **settings.loss_options),
            metrics=[StreamingSegmentationMetric(settings.num_classes, "miou", name="miou")],
            jit_compile=settings.jit_compile,
        )
        finished = bool(committed and (committed[1]["stop_training"] or committed[1]["epoch"] >= settings.epochs))
        if finished:
            # Killed after its last epoch, before the outputs: restore without running fit.
            backup.set_model(model)
            backup.on_train_begin()
        else:
            build_optimizer(model)
            model.fit(train_data, validation_data=val_data, epochs=settings.epochs,
                      steps_per_epoch=settings.steps_per_epoch, shuffle=False,  # the dataset shuffles
                      callbacks=[*recipe, *callbacks, backup], verbose=verbose)

        history = recorder.rows
        if not history:
            raise RuntimeError(f"{state_dir}: training ran no epoch")
        if any(not math.isfinite(r.get("loss", math.nan)) for r in history):
            bad = next(r["epoch"] for r in history if not math.isfinite(r.get("loss", math.nan)))
            raise RuntimeError(f"training diverged: loss is not finite in epoch {bad} (TerminateOnNaN stopped it); "
                               "check the labels and the learning rate")
        best = backup.best_checkpoint()
        if best is None:
            raise RuntimeError(f"no best checkpoint in {backup.checkpoint_dir}: {MONITOR} was never logged")
        best_epoch, best_path = best
        _load_model_weights(model, best_path)
        rows_by_epoch = {r["epoch"]: r for r in history}
        return TrainResult(
            model=model,
            history=history,
            best_epoch=best_epoch,
            best_val_miou=float(rows_by_epoch[best_epoch][MONITOR]),
            epochs_run=len(history),
            resumed_from_epoch=backup.restored_epoch,
            stopped_early=len(history) < settings.epochs,
            dtype_policy=mixed_precision,
            strategy=type(strategy).__name__,
            replicas=replicas,
            build_info=build_info,
        )


def _load_model_weights(model: keras.Model, path: Path) -> None:
    """Load a checkpoint's layer weights into `model`, whatever optimizer state the file holds."""
    # The file also holds the optimizer as it was then (maybe before the encoder was unfrozen);
    # an uncompiled view of the same layers reads only the layers' variables.
    inference_view(model).load_weights(str(path))


def inference_view(model: keras.Model) -> keras.Model:
    """An uncompiled functional model sharing `model`'s layers and weights (no optimizer to save)."""
    # A one-element `outputs` list would make the saved model return a list instead of a tensor.
    outputs = model.outputs[0] if len(model.outputs) == 1 else model.outputs
    return keras.Model(model.inputs, outputs, name=model.name)


# ------------------------------------------------------------------------------------- the stage


def params_hash(cfg: Any, name: str) -> str:
    """sha256 of the settings that define run `name`: model entry, profile, train, data, shard, seed,
    and for a GAN-augmented model the settings that made its synthetic data."""
    entry = cfg.model(name)
    settings = {
        # Without train_data: for real-data-only models it repeats shard.out (and may be unset);
        # an augmented model is told apart by its augmenter below.
        "model": entry.model_dump(mode="json", exclude={"train_data", "seed"}),
        "width": cfg.model_width(name),
        "profile": cfg.run_profile.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json"),
        "data": cfg.data.model_dump(mode="json"),
        "shard": cfg.shard.model_dump(mode="json"),
        "seed": cfg.model_seed(name),
    }
    gan = entry.gan
    if gan is not None:
        # This GAN's settings only: another GAN's epochs do not change this run's data.
        gan_settings = {k: v for k, v in cfg.gan.model_dump(mode="json").items()
                        if k not in ("names", "state", *GANS)}
        settings["augmenter"] = {"name": gan, "gan": gan_settings,
                                 gan: getattr(cfg.gan, gan).model_dump(mode="json"),
                                 "validate_synthetic": cfg.validate_synthetic.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class _ShardInfo:
    classes: list[str]
    class_set: str | None
    dataset: str
    rows: dict[str, int]
    fingerprint: str


def _shard_info(shard_dir: Path, splits: Sequence[str] = ("train", "val")) -> _ShardInfo:
    classes = {split: classes_of(shard_dir, split) for split in splits}
    first = classes[splits[0]]
    for split in splits[1:]:
        if classes[split] != first:
            raise ValueError(f"{shard_dir}: split '{split}' has classes {classes[split]} but '{splits[0]}' has "
                             f"{first}; train and val must share one class list (rebuild the shards)")
    rows, sources, class_sets, digest = {}, set(), set(), hashlib.sha256()
    for split in splits:
        rows[split] = 0
        for path in shard_files(shard_dir, split):
            parquet = pq.ParquetFile(path)
            rows[split] += parquet.metadata.num_rows
            digest.update(f"{split}/{path.name}:{path.stat().st_size}:{parquet.metadata.num_rows};".encode())
            meta = parquet.schema_arrow.metadata or {}
            if b"seglab.class_set" in meta:
                class_sets.add(meta[b"seglab.class_set"].decode())
            sources.update(v for v in parquet.read(columns=["source"]).column("source").to_pylist())
    return _ShardInfo(first, "+".join(sorted(class_sets)) or None, "+".join(sorted(sources)), rows,
                      digest.hexdigest())


@dataclass(frozen=True)
class SyntheticData:
    """What a run trains on besides the real shards: for a `<model>+<gan>` variant, the synthetic
    shards `validate_synthetic@<gan>` accepted; nothing for a real-data-only model."""

    augmenter: str | None = None     # the GAN; None: a real-data-only model
    valid_dir: Path | None = None    # validate_synthetic@<gan>'s folder (its verdict is there)
    shard_dir: Path | None = None    # the accepted shards' folder; None when none was accepted
    shards: _ShardInfo | None = None
    decision: str | None = None      # the gate's verdict, as validation.json words it

    @property
    def accepted(self) -> bool | None:
        """Whether synthetic data was accepted (None for a real-data-only model)."""
        return None if self.augmenter is None else self.shard_dir is not None

    @property
    def rows(self) -> int:
        return self.shards.rows["train"] if self.shards is not None else 0


def _synthetic_data(cfg: Any, name: str, real: _ShardInfo) -> SyntheticData:
    """Model `name`'s accepted synthetic shards (checked against the real ones), if it is augmented."""
    gan = cfg.model(name).gan
    if gan is None:
        return SyntheticData()
    valid_dir = cfg.model_train_data(name)
    accepted = accepted_synthetic_shards(valid_dir)  # FileNotFoundError naming the stage to run
    decision = json.loads((valid_dir / VALIDATION_FILE).read_text()).get("decision")  # read fine just above
    if accepted is None:
        log.warning("train@%s: validate_synthetic@%s accepted no synthetic sample (%s): training on real data only",
                    name, gan, decision)
        return SyntheticData(augmenter=gan, valid_dir=valid_dir, decision=decision)
    shards = _shard_info(accepted, splits=("train",))
    if shards.classes != real.classes:
        raise ValueError(f"{accepted}/train: synthetic shards have classes {shards.classes}, the real training "
                         f"shards {real.classes}; rerun the {gan} stages on these shards "
                         f"(dvc repro validate_synthetic@{gan})")
    return SyntheticData(augmenter=gan, valid_dir=valid_dir, shard_dir=accepted, shards=shards, decision=decision)


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_with_weights(arch: str, num_classes: int, image_size: int, width: float, weights: str | None,
                       options: Mapping[str, Any]) -> tuple[keras.Model, str]:
    """`seglab.models.build`, returning also a record of the weights actually loaded.

    ``"random"`` for none; for ImageNet weights the loader's source and sha256; for a file its
    path, whether it held the whole model or the encoder, and its sha256.
    """
    from seglab.models import registry
    from seglab.models.backbones import load_imagenet_weights

    spec = registry.spec(arch)
    shape = (image_size, image_size, 3)
    if weights is None:
        return registry.build(arch, num_classes, shape, width, None, **options), "random"
    if weights in registry.WEIGHT_KEYWORDS:
        registry._check_weights_request(spec, weights, width)  # the zoo's own checks, before building
        model = registry.build(arch, num_classes, shape, width, None, **options)
        loaded = load_imagenet_weights(model.get_layer(ENCODER_LAYER), spec.backbone, weights)
        return model, f"{loaded.weights}: {loaded.source}" + (f" (sha256 {loaded.sha256})" if loaded.sha256 else "")
    model = registry.build(arch, num_classes, shape, width, None, **options)
    kind = registry.load_weights_file(model, weights)
    return model, f"file {weights} ({kind} weights, sha256 {_sha256_file(Path(weights))})"


def _write_history_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    extra = sorted({k for r in rows for k in r} - set(HISTORY_COLUMNS))
    columns = [*HISTORY_COLUMNS, *extra]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    path.write_text(buffer.getvalue())


def _json_number(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass(frozen=True)
class RunPlan:
    """Everything `run_train` derives from params.yaml and the shards before training model `name`."""

    name: str
    arch: str
    backbone: str | None
    weights: str | None
    width: float
    image_size: int
    options: Mapping[str, Any]
    settings: TrainSettings
    policy: str
    shard_dir: Path
    shards: _ShardInfo
    params_hash: str
    synthetic: SyntheticData = SyntheticData()
    class_pixels: tuple[int, ...] | None = None  # training pixels per class, for the prior init

    @property
    def run_key(self) -> dict[str, str]:
        key = {"params_hash": self.params_hash, "shards": self.shards.fingerprint}
        if self.synthetic.augmenter is not None:  # a resume state is kept only for the same synthetic data too
            key["synthetic"] = self.synthetic.shards.fingerprint if self.synthetic.shards else "none accepted"
        return key

    @property
    def train_dirs(self) -> list[Path]:
        """The shard folders whose `train` splits make the training data."""
        return [self.shard_dir] + ([self.synthetic.shard_dir] if self.synthetic.shard_dir is not None else [])

    @property
    def train_rows(self) -> int:
        return self.shards.rows["train"] + self.synthetic.rows

    def build(self) -> tuple[keras.Model, str]:
        model, info = build_with_weights(self.arch, self.settings.num_classes, self.image_size, self.width,
                                         self.weights, self.options)
        if self.class_pixels is not None:
            init_logits_from_prior(model, self.class_pixels)
        return model, info


def plan_run(cfg: Any, name: str) -> RunPlan:
    """Resolve model `name`'s settings (params.yaml + shards); fails early with a clear message."""
    from seglab.models import registry

    entry = cfg.model(name)
    spec = registry.spec(entry.arch)
    profile, t = cfg.run_profile, cfg.train
    shard_dir = Path(cfg.shard.out)
    shards = _shard_info(shard_dir)
    synthetic = _synthetic_data(cfg, name, shards)
    batch = profile.batch_size
    train_rows = shards.rows["train"] + synthetic.rows
    steps_per_epoch = train_rows // batch
    if steps_per_epoch < 1:
        held = f"{shard_dir}/train holds {shards.rows['train']} images" + (
            f" (+ {synthetic.rows} synthetic)" if synthetic.rows else "")
        raise ValueError(f"{held}, fewer than one batch of {batch} "
                         f"(profile {cfg.profile!r}, batch_size); lower the batch size or add images")
    pretrained_encoder = entry.weights is not None and spec.backbone is not None
    plan = RunPlan(
        name=name,
        arch=entry.arch,
        backbone=spec.backbone,
        weights=entry.weights,
        width=cfg.model_width(name),
        image_size=profile.image_size,
        options={"output_stride": t.output_stride} if "output_stride" in spec.options else {},
        settings=TrainSettings.from_config(cfg, name, num_classes=len(shards.classes),
                                           steps_per_epoch=steps_per_epoch, pretrained_encoder=pretrained_encoder),
        policy=resolve_mixed_precision(t.mixed_precision),
        shard_dir=shard_dir,
        shards=shards,
        params_hash=params_hash(cfg, name),
        synthetic=synthetic,
    )
    if not t.prior_init:
        return plan
    counts = class_pixel_counts(plan.train_dirs, "train", len(shards.classes))
    return replace(plan, class_pixels=tuple(int(c) for c in counts))


def class_pixel_counts(shard_dirs: Sequence[Path], split: str, num_classes: int) -> np.ndarray:
    """Labelled pixels per class over `split` of the shard folders (their `class_pixels` column)."""
    counts = np.zeros(num_classes, np.int64)
    for shard_dir in shard_dirs:
        for row in read_split(shard_dir, split, columns=["class_pixels"]).column("class_pixels").to_pylist():
            counts[: min(len(row), num_classes)] += np.asarray(row[:num_classes], np.int64)
    return counts


def init_logits_from_prior(model: keras.Model, class_pixels: Sequence[int]) -> None:
    """Set the final classifier's bias to the log class frequencies (add-one smoothed).

    A fresh classifier predicts every class alike (cross-entropy ~ log C); with a short budget the
    first hundreds of steps would go into learning that most pixels are background. Starting from
    the prior (as RetinaNet does for focal loss, Lin et al. 2017) leaves those steps to the shapes.
    """
    counts = np.asarray(class_pixels, np.float64)
    classifier = next((layer for layer in reversed(model.layers) if isinstance(layer, keras.layers.Conv2D)
                       and layer.filters == counts.size and layer.use_bias), None)
    if classifier is None:
        raise ValueError(f"model {model.name!r}: no final Conv2D with {counts.size} filters and a bias to "
                         "initialise from the class prior (train.prior_init)")
    kernel, bias = classifier.get_weights()
    prior = (counts + 1.0) / (counts.sum() + counts.size)
    classifier.set_weights([kernel, np.log(prior).astype(bias.dtype)])


def training_datasets(cfg: Any, plan: RunPlan, *, cache_decoded_max_images: int = CACHE_DECODED_MAX_IMAGES
                      ) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """(train, val) datasets of a run: augmented, repeated training batches (real, plus accepted synthetic
    shards for an augmented model, read as one split); letterboxed validation on the real val split."""
    image_size = (plan.image_size, plan.image_size)
    batch = plan.settings.batch_size
    train_dirs = plan.train_dirs
    train_data = make_dataset(train_dirs if len(train_dirs) > 1 else plan.shard_dir, "train", image_size=image_size,
                              batch_size=batch, training=True, augment=Augmentation.from_config(cfg.train.augment),
                              seed=cfg.model_seed(plan.name), deterministic=True, repeat=True,
                              cache=plan.train_rows <= cache_decoded_max_images)
    val_data = make_dataset(plan.shard_dir, "val", image_size=image_size, batch_size=batch, training=False)
    # A known length spares Keras' "ran out of data" warning at the end of every validation pass.
    val_data = val_data.apply(tf.data.experimental.assert_cardinality(-(-plan.shards.rows["val"] // batch)))
    if plan.shards.rows["val"] <= cache_decoded_max_images:
        # Letterboxed validation has no randomness: keep the finished batches after the first pass.
        val_data = val_data.cache()
    return train_data, val_data


def run_train(cfg: Any, name: str, *, callbacks: Sequence[keras.callbacks.Callback] = (),
              strategy: tf.distribute.Strategy | None = None, verbose: int | str = 2,
              cache_decoded_max_images: int = CACHE_DECODED_MAX_IMAGES) -> dict[str, Any]:
    """The `train@<name>` stage: train `models.<name>` of params.yaml on the shards; returns train.json.

    Writes ``<train.out>/<name>/{model.keras, train.json}`` and ``<train.metrics>/<name>/{history.csv,
    train_metrics.json}`` (module doc); resumes from ``<train.state>/<name>`` after a kill.
    `callbacks` are added to the recipe's (before the end-of-epoch commit).
    """
    # First: MultiWorkerMirroredStrategy must be created before TensorFlow's runtime starts.
    strategy = strategy or get_strategy()
    plan = plan_run(cfg, name)
    settings, shards, t = plan.settings, plan.shards, cfg.train
    chief = _is_chief(strategy)
    state_dir = Path(t.state) / name
    if not chief:
        # Other workers keep their own backups and write no outputs. Beside the chief's folder,
        # not in it: workers sharing a file system (localhost) must not delete each other's state
        # when the chief discards a stale state or clears its own after success.
        state_dir = Path(t.state) / f"{name}.worker-{strategy.cluster_resolver.task_id}"
    _discard_stale_state(state_dir, plan.run_key)
    state_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(state_dir / "run.json", json.dumps(plan.run_key) + "\n")

    train_data, val_data = training_datasets(cfg, plan, cache_decoded_max_images=cache_decoded_max_images)
    keras.utils.set_random_seed(cfg.model_seed(name))  # the same initial weights on every run of these settings
    log.info("train@%s: %s (weights %s, width %g) at %d px, batch %d, %d epochs x %d steps, policy %s",
             name, plan.arch, plan.weights, plan.width, plan.image_size, settings.batch_size, settings.epochs,
             settings.steps_per_epoch, plan.policy)
    synthetic = plan.synthetic
    if synthetic.accepted:
        log.info("train@%s: %d real + %d synthetic images from %s (%s)", name, shards.rows["train"], synthetic.rows,
                 synthetic.shard_dir, synthetic.decision)
    result = train_model(plan.build, train_data, val_data, settings, state_dir=state_dir, run_key=plan.run_key,
                         mixed_precision=plan.policy, strategy=strategy, callbacks=callbacks, verbose=verbose)

    model = result.model
    info = {
        "model": name,
        "arch": plan.arch,
        "backbone": plan.backbone,
        "weights": plan.weights,
        "weights_loaded": result.build_info,
        "width": plan.width,
        "image_size": plan.image_size,
        "batch_size": settings.batch_size,
        "epochs_planned": settings.epochs,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "best_val_miou": _json_number(result.best_val_miou),
        "seconds_per_epoch": result.seconds_per_epoch,
        "train_seconds": result.train_seconds,
        "train_images_per_second": result.images_per_second,
        "param_count": int(model.count_params()),
        "trainable_param_count": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
        "classes": shards.classes,
        "class_set": shards.class_set,
        "dataset": shards.dataset,
        "train_images": shards.rows["train"],
        "val_images": shards.rows["val"],
        # GAN augmentation: the GAN (null: real data only by design), whether its gate accepted any
        # synthetic sample (null when there is no augmenter) and how many were trained on.
        "augmenter": synthetic.augmenter,
        "train_data": str(cfg.model_train_data(name)),
        "synthetic_accepted": synthetic.accepted,
        "synthetic_images_used": synthetic.rows,
        "synthetic_decision": synthetic.decision,
        "seed": cfg.model_seed(name),
        "params_hash": plan.params_hash,
        "mixed_precision": result.dtype_policy,
        "strategy": result.strategy,
        "replicas": result.replicas,
        "git_rev": _git_revision(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "resumed_from_epoch": result.resumed_from_epoch,
        "stopped_early": result.stopped_early,
        "output_stride": plan.options.get("output_stride"),
        "optimizer": settings.optimizer,
        "loss": settings.loss,
        "freeze_encoder_epochs": settings.freeze_encoder_epochs,
        "encoder_lr_multiplier": settings.encoder_lr_multiplier,
        "encoder_batchnorm": settings.encoder_batchnorm,
    }
    if not chief:
        clear_state(state_dir)
        return info

    with atomic_dir(Path(t.out) / name) as out:
        inference_view(model).save(out / "model.keras")
        (out / "train.json").write_text(json.dumps(info, indent=2) + "\n")
    with atomic_dir(Path(t.metrics) / name) as out:
        _write_history_csv(out / "history.csv", result.history)
        summary = {key: info[key] for key in ("best_val_miou", "epochs_run", "seconds_per_epoch",
                                              "train_images_per_second", "param_count", "augmenter",
                                              "synthetic_accepted", "synthetic_images_used")}
        (out / "train_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    clear_state(Path(t.state) / name)
    log.info("train@%s: best val mIoU %.4f at epoch %d of %d, %.1f s/epoch", name, result.best_val_miou,
             result.best_epoch, result.epochs_run, result.seconds_per_epoch)
    return info


def _discard_stale_state(state_dir: Path, run_key: Mapping[str, Any]) -> None:
    """Remove a resume state that another configuration or other shards left behind."""
    if not state_dir.exists():
        return
    try:
        previous = json.loads((state_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        previous = None
    if previous != dict(run_key):
        log.warning("%s: discarding a training state from other settings or data (%s; this run is %s)",
                    state_dir, previous, dict(run_key))
        clear_state(state_dir)
