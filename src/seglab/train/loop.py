"""The training recipe: Keras `model.fit` with the seed's optimizer, schedule, loss and callbacks, resumable.

- Adam, or AdamW with decoupled weight decay (biases and BatchNorm scales/offsets excluded), each
  variable's update done by TensorFlow's fused kernel (`seglab.train.optimizers`), over
  a linear warmup (`warmup_epochs`) followed by a cosine decay to 0 at the last step, whose height
  `ReduceLROnPlateau` on `val_miou` lowers (`seglab.train.schedules`).
- Loss from `seglab.train.losses.get_loss` (focal + Dice by default, 255 ignored), metric
  `StreamingSegmentationMetric` mIoU on the training batches (`miou`) and on validation (`val_miou`).
- `EarlyStopping` on `val_miou`, which also keeps the best epoch's weights (in memory: a weights file
  per improving epoch cost about as much as the validation; the resume commits hold them).
- Pretrained encoders start frozen (BatchNorm in inference mode) for `freeze_encoder_epochs`, then
  train at `encoder_lr_multiplier` x the decoder's learning rate (`seglab.models.transfer`), their
  BatchNorm layers kept frozen unless `encoder_batchnorm` is "train". With BatchNorm frozen (the
  default) the frozen epochs hold the encoder's updates through its optimizer, so the unfreeze
  re-traces nothing; with "train" the encoder is frozen through ``trainable`` and the train step is
  traced again at the unfreeze (BatchNorm's training mode is another graph).
- Under a dtype policy (`seglab.train.precision`) and a distribution strategy
  (`seglab.train.strategy`); the global Keras dtype policy is restored however training ends.
- Epochs end with a commit of the whole run state (`seglab.train.resume`), at most one per
  `train.commit_every_seconds`; a resumed run also skips the batches the committed epochs
  consumed, so it ends as an uninterrupted run would.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from seglab.metrics import StreamingSegmentationMetric
from seglab.models.transfer import (ENCODER_LAYER, UnfreezeEncoder, build_optimizer, encoder_lr_optimizer,
                                    set_encoder_trainable)
from seglab.train.losses import get_loss
from seglab.train.optimizers import FusedAdam, FusedAdamW
from seglab.train.precision import dtype_policy
from seglab.train.resume import AttributeState, BestWeightsState, ResumableBackup, VariableState
from seglab.train.schedules import PlateauScaledSchedule, ScheduleReduceLROnPlateau, warmup_cosine_schedule
from seglab.train.settings import TrainSettings
from seglab.train.strategy import MultiWorkerMirroredStrategy, is_multi_worker

__all__ = ["HISTORY_COLUMNS", "MONITOR", "EpochRecorder", "TrainResult", "inference_view", "train_model"]

MONITOR = "val_miou"
HISTORY_COLUMNS = ("epoch", "loss", "miou", "val_loss", "val_miou", "lr")
REDUCE_LR_FACTOR = 0.5
MIN_LR_SCALE = 1e-3  # plateaus never lower the schedule below this share of its height
JIT_COMPILE = "auto"


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
        row.update((key, value) for key, value in (logs or {}).items() if key != "learning_rate")  # Python floats
        row["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row["seconds"] = end - self._epoch_start
        row["train_seconds"] = train_end - self._epoch_start
        row["images_per_second"] = self.images_per_epoch / max(row["train_seconds"], 1e-9)
        # Keep rows of earlier epochs only: a restored history may not be extended twice.
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]

    def get_state(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.rows = [dict(r) for r in state["rows"]]


class _EncoderState:
    """Whether the encoder trains; applied before compiling (`train_model`), so that the optimizer is
    built for the trainable set the committed weights were saved with."""

    def __init__(self, model: keras.Model):
        self.model = model

    def get_state(self) -> dict[str, Any]:
        return {"trainable": bool(self.model.get_layer(ENCODER_LAYER).trainable)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        pass


@dataclass
class TrainResult:
    """What `train_model` did. `model` holds the best epoch's weights."""

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
        # Median over epochs: the first epoch of a process (tracing) and, with encoder_batchnorm "train",
        # an unfreeze (re-tracing) are slower.
        return statistics.median(r["images_per_second"] for r in self.history)


def _make_optimizer(settings: TrainSettings, schedule) -> keras.optimizers.Optimizer:
    if settings.train.optimizer == "adamw":
        return FusedAdamW(learning_rate=schedule, weight_decay=settings.train.weight_decay)
    return FusedAdam(learning_rate=schedule)


def set_batchnorm_momentum(model: keras.Model, momentum: float | None) -> int:
    """Set every BatchNormalization layer's moving-average momentum (None: leave them); returns how many.

    The moving statistics are what inference uses; with 0.99 (Keras' default, TF EfficientNet's) they
    average over ~100 steps, so in a run of a few hundred steps they trail the weights and a model
    that fits its training batches still predicts background in inference mode.
    """
    if momentum is None:
        return 0
    layers = [layer for layer in model._flatten_layers(include_self=False, recursive=True)
              if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.momentum = float(momentum)
    return len(layers)


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
    train_data: repeated batches of (images, labels); `settings.steps_per_epoch` of them make an
        epoch, and successive epochs continue one pass over it.
    val_data: a finite validation dataset, evaluated after every epoch.
    state_dir: this run's resume state (created; not deleted here: see `seglab.train.resume.clear_state`).
    run_key: JSON-able identity of the run; a state committed under another key is refused.
    mixed_precision: a Keras policy name (float32 | mixed_float16 | mixed_bfloat16).
    callbacks: extra callbacks, run after the recipe's and before the end-of-epoch commit.
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if is_multi_worker(strategy) and not isinstance(strategy, MultiWorkerMirroredStrategy):
        raise TypeError("multi-worker training needs seglab.train.strategy.MultiWorkerMirroredStrategy "
                        "(get_strategy() makes one from TF_CONFIG): with tf.distribute's own, Keras' fit fails "
                        "before the first step (see its docstring)")
    if settings.batch_size % replicas:
        raise ValueError(f"batch_size {settings.batch_size} (global) is not divisible by the {replicas} replicas")
    state_dir = Path(state_dir)
    t = settings.train
    total_steps = settings.epochs * settings.steps_per_epoch

    with dtype_policy(mixed_precision), strategy.scope():
        built = build_model()
        model, build_info = built if isinstance(built, tuple) else (built, None)
        set_batchnorm_momentum(model, t.batchnorm_momentum)
        schedule = PlateauScaledSchedule(warmup_cosine_schedule(
            settings.learning_rate, total_steps, t.warmup_epochs * settings.steps_per_epoch))
        optimizer = _make_optimizer(settings, schedule)
        encoder = _has_encoder(model)
        freezing = settings.freeze_encoder_epochs > 0
        train_batchnorm = settings.encoder_batchnorm == "train"
        if freezing and not encoder:
            raise ValueError(f"freeze_encoder_epochs={settings.freeze_encoder_epochs} but model {model.name!r} has no "
                             f"layer named {ENCODER_LAYER!r} to freeze")
        if encoder and (freezing or settings.encoder_lr_multiplier != 1.0):
            optimizer = encoder_lr_optimizer(model, optimizer, settings.encoder_lr_multiplier)
        if t.optimizer == "adamw":
            # Decay the weights, not the biases or BatchNorm's scale/offset (after wrapping, so that
            # the encoder's optimizer copy gets the same exclusions).
            optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])

        backup_dir = state_dir / "backup"
        recorder = EpochRecorder(settings.steps_per_epoch * settings.batch_size)
        plateau = None if t.reduce_lr_patience is None else ScheduleReduceLROnPlateau(
            schedule, monitor=MONITOR, mode="max", factor=REDUCE_LR_FACTOR,
            patience=t.reduce_lr_patience, min_scale=MIN_LR_SCALE)
        stopping = keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=t.early_stopping_patience,
                                                 restore_best_weights=True)
        recipe = [c for c in (recorder, plateau, stopping, keras.callbacks.TerminateOnNaN()) if c is not None]
        if freezing:
            recipe.insert(1, UnfreezeEncoder(settings.freeze_encoder_epochs, train_batchnorm=train_batchnorm))
        # Everything the rest of the run depends on, committed with each epoch: without the best
        # score and weights a resumed run would keep its first epoch as the best.
        stateful = {
            "history": recorder,
            **({"plateau": AttributeState(plateau, ("wait", "best", "cooldown_counter"))} if plateau else {}),
            "lr_scale": VariableState(schedule.scale, "scale"),
            "early_stopping": AttributeState(stopping, ("wait", "best", "best_epoch", "stopped_epoch")),
            # Held encoders: whether they learn is optimizer state, committed with the weights.
            **({"encoder": _EncoderState(model)} if freezing and train_batchnorm else {}),
        }
        backup = ResumableBackup(backup_dir, stateful, run_key, arrays={"best_weights": BestWeightsState(stopping)},
                                 commit_every_seconds=t.commit_every_seconds)

        # The optimizer must be built for the trainable set the committed state was saved with.
        committed = backup.committed()
        if freezing and train_batchnorm:
            trainable = bool(committed and committed[1]["states"].get("encoder", {}).get("trainable", False))
            set_encoder_trainable(model, trainable, train_batchnorm=True)
        elif encoder and not train_batchnorm:
            set_encoder_trainable(model, True, train_batchnorm=False)
        model.compile(
            optimizer=optimizer,
            loss=get_loss(t.loss, **settings.loss_options),
            metrics=[StreamingSegmentationMetric(settings.num_classes, "miou", name="miou")],
            jit_compile=JIT_COMPILE,
        )
        finished = bool(committed and (committed[1]["stop_training"] or committed[1]["epoch"] >= settings.epochs))
        if finished:
            # Killed after its last epoch, before the outputs: restore without running fit.
            backup.set_model(model)
            backup.on_train_begin()
            if stopping.best_weights is not None:  # what EarlyStopping's on_train_end does after a fit
                model.set_weights(stopping.best_weights)
        else:
            if committed:
                # Fit draws every epoch from one pass over the repeated data: go on where the
                # committed epochs stopped, so the resumed epochs see the batches they would have.
                train_data = train_data.skip(int(committed[1]["epoch"]) * settings.steps_per_epoch)
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
        if stopping.best_weights is None:
            raise RuntimeError(f"{state_dir}: no best epoch: {MONITOR} was never logged")
        best_epoch = int(stopping.best_epoch) + 1
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


def inference_view(model: keras.Model) -> keras.Model:
    """An uncompiled functional model sharing `model`'s layers and weights (no optimizer to save)."""
    # A one-element `outputs` list would make the saved model return a list instead of a tensor.
    outputs = model.outputs[0] if len(model.outputs) == 1 else model.outputs
    return keras.Model(model.inputs, outputs, name=model.name)
