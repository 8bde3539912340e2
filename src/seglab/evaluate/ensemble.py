"""The `ensemble` stage: a weighted mean of trained models' probabilities, evaluated like a model.

`run_ensemble(cfg)` loads every ``ensemble.members`` model from ``<train.out>/<member>/``, checks
that they were trained on the same classes (names and order) and take the same input size, and that
those classes are the target shards' classes (``evaluate.data`` / ``evaluate.split``, as for every
model); a mismatch is an error listing every member's value. The ensemble's probabilities are
``sum_i w_i softmax(logits_i)`` with ``ensemble.weights`` normalised to sum to 1 (equal weights when
none are given). It is evaluated by the same code and under the same protocol as a single model
(`seglab.evaluate.inference`, `seglab.evaluate.evaluate`), so its scores compare with its members',
and written to ``<evaluate.out>/ensemble/`` with one eval.json entry, variant "ensemble".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import ops

from seglab.digest import json_safe, sha256_json
from seglab.evaluate.evaluate import (
    evaluation_key,
    flat_metrics,
    protocol_fields,
    run_id,
    speed_fields,
    variant_entry,
    write_evaluation,
)
from seglab.records import git_revision, utc_now
from seglab.evaluate.inference import (
    GRID_IMAGES,
    TrainedModel,
    check_classes,
    eval_dataset,
    eval_target,
    evaluate_predictors,
    load_trained,
    sliding_window,
)

log = logging.getLogger(__name__)

__all__ = ["ENSEMBLE_NAME", "check_members", "ensemble_model", "normalised_weights", "run_ensemble"]

ENSEMBLE_NAME = "ensemble"


def normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Weights scaled to sum to 1; equal weights for None."""
    if count < 1:
        raise ValueError("an ensemble needs at least one member (params.yaml ensemble.members)")
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ValueError(f"ensemble.weights has {len(values)} entries for {count} members")
    if any(not np.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
        raise ValueError(f"ensemble.weights must be finite, non-negative and sum to > 0, got {values}")
    total = sum(values)
    return [w / total for w in values]


def check_members(members: Sequence[TrainedModel]) -> None:
    """Members must share classes (same names, same order) and input size; errors list every member."""
    if len({m.name for m in members}) != len(members):
        raise ValueError(f"ensemble.members lists a model twice: {[m.name for m in members]}")
    classes = {m.name: m.classes for m in members}
    if len({tuple(c) for c in classes.values()}) > 1:
        listing = "; ".join(f"{name}: {c}" for name, c in classes.items())
        raise ValueError(f"ensemble members were trained on different classes, so their probabilities do not "
                         f"line up: {listing}")
    shapes = {m.name: m.image_shape for m in members}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{name}: {h}x{w}" for name, (h, w) in shapes.items())
        raise ValueError(f"ensemble members take different input sizes ({listing}); train them at one "
                         "image_size to ensemble them")


def _scope_names(names: Sequence[str]) -> list[str]:
    """`names` as unique Keras scope names: a model's name becomes a name scope when it is called, and
    params.yaml names such as `unet_mobilenetv2_imagenet+pix2pix` hold characters scopes refuse."""
    scopes: list[str] = []
    for index, name in enumerate(names):
        scope = re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))
        scopes.append(scope if scope not in scopes else f"{scope}_{index}")
    return scopes


def ensemble_model(models: Sequence[keras.Model], weights: Sequence[float], names: Sequence[str] | None = None) -> keras.Model:
    """A Keras model: images -> ``sum_i weights[i] * softmax(models[i](images))`` in float32.

    `weights` are used as given (normalise them first). `names` rename the members inside the
    ensemble graph, which needs unique layer names (two members of one architecture share a name).
    """
    if len(models) != len(weights) or not models:
        raise ValueError(f"ensemble_model: {len(models)} models and {len(weights)} weights; need one weight each")
    shape = tuple(models[0].input_shape[1:])
    images = keras.Input(shape=shape, name="images")
    combined = None
    scopes = _scope_names(names) if names is not None else None
    for index, (model, weight) in enumerate(zip(models, weights)):
        if scopes is not None:
            model.name = scopes[index]
        probabilities = ops.softmax(ops.cast(model(images, training=False), "float32"), axis=-1)
        # A weight of exactly 1 or 0 leaves the other terms bit-identical (p * 1 = p, p + 0 = p).
        term = probabilities * float(weight)
        combined = term if combined is None else combined + term
    return keras.Model(images, combined, name=ENSEMBLE_NAME)




def run_ensemble(cfg: Any, *, grid_images: int = GRID_IMAGES) -> dict:
    """The `ensemble` stage: see the module doc. Returns the metrics.json numbers and the folder."""
    names = list(cfg.ensemble.members)
    if not names:
        raise ValueError("params.yaml ensemble.members is empty: name the trained models to ensemble")
    if ENSEMBLE_NAME in cfg.models:
        raise ValueError(f"params.yaml models has a model named {ENSEMBLE_NAME!r}, which would share the "
                         f"ensemble's output folder; rename it")
    weights = normalised_weights(cfg.ensemble.weights, len(names))
    members = [load_trained(cfg.train.out, name) for name in names]
    check_members(members)
    target = eval_target(cfg.evaluate.data, cfg.evaluate.split)
    check_classes(members[0].classes, target.classes, f"the ensemble members {names}", target.describe())

    model = ensemble_model([m.model for m in members], weights, names=names)
    protocol = cfg.evaluate.protocol
    sliding = sliding_window(cfg, members[0].image_shape)
    log.info("ensemble of %s with weights %s on %s, %s protocol", names, weights, target.describe(), protocol)
    evaluation = evaluate_predictors(
        {ENSEMBLE_NAME: model}, eval_dataset(cfg, target, members[0].image_shape, sliding), target.classes,
        latency_runs=cfg.evaluate.latency_runs, grid_images=grid_images, sliding=sliding,
    )
    result = evaluation.results[ENSEMBLE_NAME]
    scores = result.confusion.result()

    member_hashes = [m.info.get("params_hash") for m in members]
    # The ensemble is defined by its members' runs and their weights.
    params_hash = sha256_json({"members": [list(pair) for pair in zip(names, member_hashes)], "weights": weights})
    infos = [m.info for m in members]
    class_sets = [i.get("class_set") for i in infos]
    if any(c != class_sets[0] for c in class_sets):
        raise ValueError(f"ensemble members name different class sets: {dict(zip(names, class_sets))}")
    # Members trained on different data (same classes) are allowed; the run says which.
    train_dataset = "+".join(sorted({str(i.get("dataset")) for i in infos}))
    run = {
        "model": ENSEMBLE_NAME,
        "name": ENSEMBLE_NAME,
        "variant": ENSEMBLE_NAME,
        "run_id": run_id(ENSEMBLE_NAME, ENSEMBLE_NAME, params_hash, evaluation_key(train_dataset, target, protocol)),
        "arch": ENSEMBLE_NAME,
        "backbone": None,
        "weights": None,  # no pretrained weights of its own: see its members'
        "members": names,
        "member_weights": weights,
        "member_params_hashes": member_hashes,
        "params_hash": params_hash,
        "classes": members[0].classes,
        "class_set": class_sets[0],
        "dataset": target.dataset,
        "train_dataset": train_dataset,
        "image_size": infos[0].get("image_size"),
        "batch_size": cfg.evaluate.batch_size,
        "param_count": sum(m.model.count_params() for m in members),
        "seed": cfg.seed,
        "git_rev": git_revision(),
        "split": target.split,
        "eval_data": str(target.data),
        **protocol_fields(protocol, sliding),
        "eval_images": evaluation.images,
        **speed_fields(result),
        "evaluated_at": utc_now(),
    }
    metrics = flat_metrics(scores, result)
    out_dir = Path(cfg.evaluate.out) / ENSEMBLE_NAME
    write_evaluation(out_dir, [variant_entry(run, scores, [])], metrics, evaluation, target.classes,
                     title=f"ensemble of {', '.join(names)}", images_from=target.split)
    log.info("ensemble: mIoU %.4f, %.1f images/s -> %s", metrics["miou"], metrics["images_per_second"], out_dir)
    return {"model": ENSEMBLE_NAME, "members": names, "member_weights": weights, "out": str(out_dir),
            **json_safe(metrics)}
