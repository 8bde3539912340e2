"""The Keras dtype policy a run trains under: `train.mixed_precision` resolved, and set for a block only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
import tensorflow as tf

__all__ = ["CPU_AUTO_POLICY", "POLICIES", "dtype_policy", "resolve_mixed_precision"]

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
# `auto` without a GPU: bfloat16 does not pay for itself on this project's CPUs across the model
# zoo (benchmarks/README.md, "Training speed", has the measurements).
CPU_AUTO_POLICY = "float32"


def resolve_mixed_precision(setting: str) -> str:
    """`train.mixed_precision` -> a Keras dtype policy name.

    ``auto``: ``mixed_float16`` when a GPU is visible, else `CPU_AUTO_POLICY`;
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
