"""The learning rate: linear warmup then cosine decay, whose height plateaus can lower.

A schedule-driven learning rate cannot be *set*, so Keras' ReduceLROnPlateau cannot act on it;
here plateaus multiply a scale variable that the schedule is multiplied by
(`PlateauScaledSchedule` + `ScheduleReduceLROnPlateau`): after a reduction the run keeps its
warmup/cosine shape at the reduced height.
"""

from __future__ import annotations

import logging
from typing import Any

import keras

log = logging.getLogger(__name__)

__all__ = ["PlateauScaledSchedule", "ScheduleReduceLROnPlateau", "warmup_cosine_schedule"]


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

    Create it under the strategy's scope (the scale is a variable read inside the train step).
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
