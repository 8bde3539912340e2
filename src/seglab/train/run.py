"""The `train@<model>` stage: plan the run, train it (resumable after a kill), write its artefacts.

Outputs, each folder written aside and swapped in at the end:
``<train.out>/<name>/{model.keras, train.json}`` and
``<train.metrics>/<name>/{history.csv, train_metrics.json}``. ``model.keras`` holds the
best-`val_miou` weights as an uncompiled inference model (no optimizer state: it loads with
`keras.models.load_model` given seglab's registered layers, without the training classes), in its
inference form: each BatchNormalization after a convolution folded into it (`seglab.models.fold`);
train.json is a `seglab.records.TrainRecord`.

Resume state lives in ``<train.state>/<name>/`` (`seglab.train.resume`) and is deleted once the
outputs are in place. In multi-worker training the other workers keep theirs in
``<train.state>/<name>.worker-<i>/`` and write no outputs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from seglab.atomic import atomic_dir
from seglab.config import Config
from seglab.models.fold import fold_batchnorm
from seglab.records import TrainRecord, git_revision, utc_now
from seglab.train.loop import HISTORY_COLUMNS, TrainResult, inference_view, train_model
from seglab.train.plan import CACHE_DECODED_MAX_IMAGES, RunPlan, plan_run, training_datasets
from seglab.train.resume import clear_state, open_state_dir
from seglab.train.strategy import get_strategy, is_chief

log = logging.getLogger(__name__)

__all__ = ["run_train"]

SUMMARY_FIELDS = ("best_val_miou", "epochs_run", "seconds_per_epoch", "train_images_per_second", "param_count",
                  "augmenter", "synthetic_accepted", "synthetic_images_used")


def run_train(cfg: Config, name: str, *, callbacks: Sequence[keras.callbacks.Callback] = (),
              strategy: tf.distribute.Strategy | None = None, verbose: int | str = 2,
              cache_decoded_max_images: int = CACHE_DECODED_MAX_IMAGES) -> dict[str, Any]:
    """The `train@<name>` stage: train `models.<name>` of params.yaml on the shards; returns train.json.

    `callbacks` are added to the recipe's (before the end-of-epoch commit).
    """
    # First: MultiWorkerMirroredStrategy must be created before TensorFlow's runtime starts.
    strategy = strategy or get_strategy()
    plan = plan_run(cfg, name)
    settings, t = plan.settings, cfg.train
    chief = is_chief(strategy)
    # Other workers keep their own backups beside the chief's folder, not in it: workers sharing a
    # file system (localhost) must not delete each other's state.
    state_dir = Path(t.state) / (name if chief else f"{name}.worker-{strategy.cluster_resolver.task_id}")
    open_state_dir(state_dir, plan.run_key)

    train_data, val_data = training_datasets(cfg, plan, cache_decoded_max_images=cache_decoded_max_images)
    keras.utils.set_random_seed(cfg.model_seed(name))  # the same initial weights on every run of these settings
    log.info("train@%s: %s (weights %s, width %g) at %d px, batch %d, %d epochs x %d steps, policy %s",
             name, plan.arch, plan.weights, plan.width, plan.image_size, settings.batch_size, settings.epochs,
             settings.steps_per_epoch, plan.policy)
    if plan.synthetic.accepted:
        log.info("train@%s: %d real + %d synthetic images from %s (%s)", name, plan.shards.rows["train"],
                 plan.synthetic.rows, plan.synthetic.shard_dir, plan.synthetic.decision)
    result = train_model(plan.build, train_data, val_data, settings, state_dir=state_dir, run_key=plan.run_key,
                         mixed_precision=plan.policy, strategy=strategy, callbacks=callbacks, verbose=verbose)
    record = _train_record(cfg, plan, result)
    if not chief:
        clear_state(state_dir)
        return record.to_json()

    with atomic_dir(Path(t.out) / name) as out:
        fold_batchnorm(inference_view(result.model)).save(out / "model.keras")
        record.write(out / "train.json")
    info = record.to_json()
    with atomic_dir(Path(t.metrics) / name) as out:
        _write_history_csv(out / "history.csv", result.history)
        summary = {key: info[key] for key in SUMMARY_FIELDS}
        (out / "train_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    clear_state(state_dir)
    log.info("train@%s: best val mIoU %.4f at epoch %d of %d, %.1f s/epoch", name, result.best_val_miou,
             result.best_epoch, result.epochs_run, result.seconds_per_epoch)
    return info


def _train_record(cfg: Config, plan: RunPlan, result: TrainResult) -> TrainRecord:
    settings, shards, synthetic, model = plan.settings, plan.shards, plan.synthetic, result.model
    return TrainRecord.of({
        "model": plan.name,
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
        "best_val_miou": result.best_val_miou,
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
        "augmenter": synthetic.augmenter,
        "train_data": str(cfg.model_train_data(plan.name)),
        "synthetic_accepted": synthetic.accepted,
        "synthetic_images_used": synthetic.rows,
        "synthetic_decision": synthetic.decision,
        "seed": cfg.model_seed(plan.name),
        "params_hash": plan.params_hash,
        "mixed_precision": result.dtype_policy,
        "strategy": result.strategy,
        "replicas": result.replicas,
        "git_rev": git_revision(),
        "created_at": utc_now(),
        "resumed_from_epoch": result.resumed_from_epoch,
        "stopped_early": result.stopped_early,
        "output_stride": plan.options.get("output_stride"),
        "optimizer": settings.train.optimizer,
        "loss": settings.train.loss,
        "freeze_encoder_epochs": settings.freeze_encoder_epochs,
        "encoder_lr_multiplier": settings.encoder_lr_multiplier,
        "encoder_batchnorm": settings.encoder_batchnorm,
        "class_weights": None if settings.class_weights is None else list(settings.class_weights),
    }, source=f"train@{plan.name}")


def _write_history_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    extra = sorted({k for r in rows for k in r} - set(HISTORY_COLUMNS))
    columns = [*HISTORY_COLUMNS, *extra]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    path.write_text(buffer.getvalue())

