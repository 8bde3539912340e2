"""What one training run is told: params.yaml's `train` section and run profile, plus what the data decides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from seglab.config import ProfileConfig, TrainConfig

__all__ = ["TrainSettings"]


@dataclass(frozen=True)
class TrainSettings:
    """The knobs of one training run, read from the typed config (never restated here).

    `train` and `profile` are the config's sections (`cfg.train`, `cfg.run_profile`); the rest
    comes from the data and the model: `num_classes` from the shards' class list,
    `steps_per_epoch` from the training rows and the batch size, and `pretrained_encoder`, whether
    the model has an encoder given pretrained weights: only then is it frozen first and trained at
    `train.encoder_lr_multiplier` afterwards; a from-scratch model trains everything at one rate.
    `computed_class_weights`: where `train.class_weights` is "median_frequency", the weights
    `plan_run` computed from the training shards (None otherwise).
    """

    train: TrainConfig
    profile: ProfileConfig
    num_classes: int
    steps_per_epoch: int
    pretrained_encoder: bool = False
    computed_class_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("num_classes", "steps_per_epoch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainSettings.{name} must be a positive integer, got {value!r}")
        mode = self.train.class_weights
        if (mode == "median_frequency") != (self.computed_class_weights is not None):
            raise ValueError(f"params.yaml train.class_weights is {mode!r}: TrainSettings.computed_class_weights "
                             "must be " + ("the weights computed from the training shards (plan_run)"
                                           if mode == "median_frequency" else "None"))
        weights = self.class_weights
        if weights is not None and len(weights) != self.num_classes:
            raise ValueError(f"params.yaml train.class_weights has {len(weights)} entries; the shards "
                             f"have {self.num_classes} classes (background included)")

    @property
    def class_weights(self) -> tuple[float, ...] | None:
        """The loss's weight per class: `train.class_weights` as given, or as median_frequency computed them."""
        mode = self.train.class_weights
        return tuple(mode) if isinstance(mode, list) else self.computed_class_weights

    @property
    def epochs(self) -> int:
        return self.profile.epochs

    @property
    def batch_size(self) -> int:
        """The global batch, over all replicas."""
        return self.profile.batch_size

    @property
    def learning_rate(self) -> float:
        return self.profile.learning_rate

    @property
    def freeze_encoder_epochs(self) -> int:
        return self.train.freeze_encoder_epochs if self.pretrained_encoder else 0

    @property
    def encoder_lr_multiplier(self) -> float:
        return self.train.encoder_lr_multiplier if self.pretrained_encoder else 1.0

    @property
    def encoder_batchnorm(self) -> str:
        """The encoder's BatchNorm once it trains: "train" or "frozen" (`seglab.models.transfer`)."""
        return self.train.encoder_batchnorm if self.pretrained_encoder else "train"

    @property
    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments of `seglab.train.losses.get_loss` for `train.loss`."""
        t = self.train
        weights = None if self.class_weights is None else list(self.class_weights)
        options: dict[str, Any] = {"class_weights": weights}
        if t.loss in ("focal", "focal_dice"):
            options["gamma"] = t.focal_gamma
        if t.loss == "focal_dice":
            options.update(focal_weight=t.focal_weight, dice_weight=t.dice_weight)
        return options
