"""Everything a `train@<model>` run derives from params.yaml and the shards before it trains.

Training data (`models.<name>.train_data`): the real training shards (`shard.out`), or for a
`<model>+<gan>` variant the real shards plus the synthetic shards that passed
``validate_synthetic@<gan>`` (`seglab.data.synthetic.accepted_synthetic_shards`). Both are read by
one `seglab.data.pipeline.make_dataset` over the two folders, as one split: row groups of both are
shuffled together, then elements through the shuffle buffer, so batches mix real and synthetic
samples in proportion to their counts (reproducibly for a seed), and every sample, whatever its
stored size, is cropped and augmented to the training size alike. An epoch is one pass over the
combined rows; validation stays on the real val split. When the gate accepted no synthetic sample
the variant trains on real data only, and says so.

Class pixel counts over that training data (every folder, from the shards' `class_pixels`) set the
classifier's initial bias (`train.prior_init`) and, with `train.class_weights: median_frequency`,
the loss's class weights (`seglab.data.stats.median_frequency_weights`).

A run is identified by its params hash and the shard files (synthetic ones included): its resume
state is kept only for the same key (`RunPlan.run_key`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from seglab.config import Config, GanTrainingConfig, settings_snapshot
from seglab.data.augment import Augmentation
from seglab.data.pipeline import make_dataset
from seglab.data.shards import SplitSummary, summarize_splits
from seglab.data.stats import PixelCounts, median_frequency_weights, pixel_counts
from seglab.data.synthetic import VALIDATION_FILE, accepted_synthetic_shards
from seglab.digest import sha256_json
from seglab.models import registry
from seglab.train.precision import resolve_mixed_precision
from seglab.train.settings import TrainSettings

log = logging.getLogger(__name__)

__all__ = ["CACHE_DECODED_MAX_IMAGES", "RunPlan", "SyntheticData", "init_logits_from_prior", "params_hash",
           "plan_run", "training_datasets"]

# Decoded training images are cached in memory (before the random crop and augmentation) when the
# split has at most this many: the embedded sample and coco-mini fit easily, full COCO does not.
CACHE_DECODED_MAX_IMAGES = 2000


@dataclass(frozen=True)
class SyntheticData:
    """What a run trains on besides the real shards: for a `<model>+<gan>` variant, the synthetic
    shards `validate_synthetic@<gan>` accepted; nothing for a real-data-only model."""

    augmenter: str | None = None     # the GAN; None: a real-data-only model
    valid_dir: Path | None = None    # validate_synthetic@<gan>'s folder (its verdict is there)
    shard_dir: Path | None = None    # the accepted shards' folder; None when none was accepted
    shards: SplitSummary | None = None
    decision: str | None = None      # the gate's verdict, as validation.json words it

    @property
    def accepted(self) -> bool | None:
        """Whether synthetic data was accepted (None for a real-data-only model)."""
        return None if self.augmenter is None else self.shard_dir is not None

    @property
    def rows(self) -> int:
        return self.shards.rows["train"] if self.shards is not None else 0


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
    shards: SplitSummary
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
        return _train_dirs(self.shard_dir, self.synthetic)

    @property
    def train_rows(self) -> int:
        return self.shards.rows["train"] + self.synthetic.rows

    def build(self) -> tuple[keras.Model, str]:
        """The model with its initial weights, and a record of the weights loaded."""
        model, info = registry.build_with_weights(self.arch, self.settings.num_classes, self.image_size, self.width,
                                                  self.weights, self.options)
        if self.class_pixels is not None:
            init_logits_from_prior(model, self.class_pixels)
        return model, info


def plan_run(cfg: Config, name: str) -> RunPlan:
    """Resolve model `name`'s settings (params.yaml + shards); fails early with a clear message."""
    entry = cfg.model(name)
    spec = registry.spec(entry.arch)
    profile, t = cfg.run_profile, cfg.train
    shard_dir = Path(cfg.shard.out)
    shards = summarize_splits(shard_dir)
    synthetic = _synthetic_data(cfg, name, shards)
    batch = profile.batch_size
    train_rows = shards.rows["train"] + synthetic.rows
    steps_per_epoch = train_rows // batch
    if steps_per_epoch < 1:
        held = f"{shard_dir}/train holds {shards.rows['train']} images" + (
            f" (+ {synthetic.rows} synthetic)" if synthetic.rows else "")
        raise ValueError(f"{held}, fewer than one batch of {batch} "
                         f"(profile {cfg.profile!r}, batch_size); lower the batch size or add images")
    median_frequency = t.class_weights == "median_frequency"
    counts = (pixel_counts(_train_dirs(shard_dir, synthetic), "train", len(shards.classes))
              if t.prior_init or median_frequency else None)
    class_weights = _median_frequency_weights(name, counts, shards.classes) if median_frequency else None
    return RunPlan(
        name=name,
        arch=entry.arch,
        backbone=spec.backbone,
        weights=entry.weights,
        width=cfg.model_width(name),
        image_size=profile.image_size,
        options={"output_stride": t.output_stride} if "output_stride" in spec.options else {},
        settings=TrainSettings(t, profile, num_classes=len(shards.classes), steps_per_epoch=steps_per_epoch,
                               pretrained_encoder=entry.weights is not None and spec.backbone is not None,
                               computed_class_weights=class_weights),
        policy=resolve_mixed_precision(t.mixed_precision),
        shard_dir=shard_dir,
        shards=shards,
        params_hash=params_hash(cfg, name),
        synthetic=synthetic,
        class_pixels=tuple(int(c) for c in counts.classes) if t.prior_init else None,
    )


def _train_dirs(shard_dir: Path, synthetic: SyntheticData) -> list[Path]:
    return [shard_dir] + ([synthetic.shard_dir] if synthetic.shard_dir is not None else [])


def _median_frequency_weights(name: str, counts: PixelCounts, classes: Sequence[str]) -> tuple[float, ...]:
    """`train.class_weights: median_frequency` over the run's training pixels, logged (train.json records them)."""
    try:
        weights = median_frequency_weights(counts)
    except ValueError as e:
        raise ValueError(f"train@{name}: train.class_weights median_frequency: {e}") from None
    log.info("train@%s: median-frequency class weights over %d training images: %s", name, counts.images,
             ", ".join(f"{c} {w:.3g}" for c, w in zip(classes, weights)))
    absent = [c for c, n in zip(classes, counts.classes) if n == 0]
    if absent:
        log.warning("train@%s: class(es) %s have no training pixel: weight 0", name, ", ".join(absent))
    return tuple(float(w) for w in weights)


def params_hash(cfg: Config, name: str) -> str:
    """sha256 of the settings that define run `name`: model entry, profile, train, data, shard, seed,
    and for a GAN-augmented model the settings that made its synthetic data."""
    entry = cfg.model(name)
    settings = {
        # Without train_data: for real-data-only models it repeats shard.out (and may be unset);
        # an augmented model is told apart by its augmenter below.
        "model": entry.model_dump(mode="json", exclude={"train_data", "seed"}),
        "width": cfg.model_width(name),
        # Snapshots, not reads: the run's data arrives as a DVC dependency, not through these params.
        "profile": settings_snapshot(cfg.run_profile),
        "train": settings_snapshot(cfg.train),
        "data": settings_snapshot(cfg.data),
        "shard": settings_snapshot(cfg.shard),
        "seed": cfg.model_seed(name),
    }
    gan = entry.gan
    if gan is not None:
        # The settings all GANs share, and this GAN's own section: another GAN's do not change this run's data.
        per_gan = {key for key, value in cfg.gan if isinstance(value, GanTrainingConfig)}
        shared = {k: v for k, v in settings_snapshot(cfg.gan).items() if k not in ("names", "state", *per_gan)}
        settings["augmenter"] = {"name": gan, "gan": shared,
                                 gan: settings_snapshot(getattr(cfg.gan, gan)),
                                 "validate_synthetic": settings_snapshot(cfg.validate_synthetic)}
    return sha256_json(settings)


def _synthetic_data(cfg: Config, name: str, real: SplitSummary) -> SyntheticData:
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
    shards = summarize_splits(accepted, splits=("train",))
    if shards.classes != real.classes:
        raise ValueError(f"{accepted}/train: synthetic shards have classes {shards.classes}, the real training "
                         f"shards {real.classes}; rerun the {gan} stages on these shards "
                         f"(dvc repro validate_synthetic@{gan})")
    return SyntheticData(augmenter=gan, valid_dir=valid_dir, shard_dir=accepted, shards=shards, decision=decision)


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


def training_datasets(cfg: Config, plan: RunPlan, *, cache_decoded_max_images: int = CACHE_DECODED_MAX_IMAGES
                      ) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """(train, val) datasets of a run: augmented, repeated training batches (real, plus accepted synthetic
    shards for an augmented model, read as one split); letterboxed validation on the real val split."""
    image_size = (plan.image_size, plan.image_size)
    batch = plan.settings.batch_size
    train_dirs = plan.train_dirs
    # tf.data mixes TensorFlow's global seed (keras.utils.set_random_seed sets it) into every op
    # seed: build the data as a fresh process does, so that a run's batches never depend on what
    # ran before it in the process (an earlier run, a flow running several stages).
    tf.random.set_seed(None)
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
