"""Where training runs: one device, several GPUs (MirroredStrategy) or several workers (``TF_CONFIG``).

`batch_size` is always the global batch. In multi-worker training worker 0 (or the chief) writes
the outputs; all workers must be restarted together after a kill.
"""

from __future__ import annotations

import json
import logging
import os

import tensorflow as tf

log = logging.getLogger(__name__)

__all__ = ["MultiWorkerMirroredStrategy", "get_strategy", "is_chief", "is_multi_worker"]


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


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
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


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this worker writes the outputs (always, outside multi-worker training)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief
