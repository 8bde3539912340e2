"""The segmenters' optimizers: Keras' Adam and AdamW, each variable updated by TensorFlow's fused Adam kernel.

Keras 3's `Adam.update_step` is written in backend-neutral ops, about twenty per variable (the bias
corrections, the two moment updates, the step), so a MobileNetV2 U-Net's train step holds thousands
of small optimizer ops: they are traced in Python at the start of every training process and
dispatched one by one at every step. TensorFlow's `ResourceApplyAdam` does one variable's whole
update in one op, by the same formula as Keras' (`alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)`,
`m += (g - m)(1 - beta_1)`, `v += (g^2 - v)(1 - beta_2)`, `var -= alpha * m / (sqrt(v) + epsilon)`);
the results differ from Keras' ops only by floating-point rounding (the fused kernel evaluates
each expression in one pass). Everything else is Keras': the variables and their saving, the
learning-rate schedule, AdamW's decoupled weight decay (applied before the update), clipping,
loss scaling. `amsgrad` keeps Keras' own update (the kernel has no such variant).
benchmarks/README.md has the measured trace and step times.
"""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = ["FusedAdam", "FusedAdamW"]


class _FusedAdamUpdate:
    """`update_step` of Keras' Adam as one `ResourceApplyAdam` op (module doc)."""

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or not hasattr(variable, "handle"):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].value.handle,
            v=self._velocities[index].value.handle,
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
        )


@keras.saving.register_keras_serializable(package="seglab")
class FusedAdam(_FusedAdamUpdate, keras.optimizers.Adam):
    """Keras' Adam with TensorFlow's fused update (module doc)."""


@keras.saving.register_keras_serializable(package="seglab")
class FusedAdamW(_FusedAdamUpdate, keras.optimizers.AdamW):
    """Keras' AdamW with TensorFlow's fused update; the weight decay stays Keras' (module doc)."""
