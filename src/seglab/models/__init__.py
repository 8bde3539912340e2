"""seglab's segmentation models.

Public API::

    from seglab import models
    models.available()            # ['attention_unet', 'deeplabv3plus_efficientnet_lite0', ...]
    model = models.build("deeplabv3plus_mobilenetv2", num_classes=21, input_shape=(256, 256, 3),
                         width=1.0, weights="imagenet-offline", output_stride=16)

Models take float32 RGB in [0, 255] and return float32 logits (B, H, W, num_classes); pretrained
encoders are one nested layer named ``encoder`` (see `seglab.models.transfer` to freeze it, unfreeze
it after N epochs, or give it its own learning-rate multiplier). `imagenet_classifier` (the
backbones with their ImageNet heads) comes from `seglab.models.classifier`.

Attributes are imported on first use, so ``import seglab.models`` does not load TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "available": "seglab.models.registry",
    "build": "seglab.models.registry",
    "build_with_weights": "seglab.models.registry",
    "spec": "seglab.models.registry",
    "ModelSpec": "seglab.models.registry",
    "load_weights_file": "seglab.models.registry",
    "imagenet_classifier": "seglab.models.classifier",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'seglab.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
