"""The full ImageNet classifiers behind the converted backbones: the proof that a conversion is right.

A backbone whose weights were converted wrongly still produces features; only the complete
classifier shows it: `skimage.data.chelsea()` must come out as a cat, `coffee()` as espresso.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import keras
import numpy as np

from seglab.models.backbones import BACKBONES, build_backbone, entry
from seglab.models.sources import TorchCheckpoint
from seglab.models.weights import WeightsArg, load_backbone_weights


def classifier_backbones() -> tuple[str, ...]:
    """The backbones whose converted checkpoint includes the ImageNet classifier head."""
    return tuple(name for name, spec in BACKBONES.items() if isinstance(spec.imagenet, TorchCheckpoint))


def imagenet_classifier(
    backbone: str,
    *,
    weights: WeightsArg = "imagenet-offline",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[keras.Model, Callable[[np.ndarray], np.ndarray]]:
    """The converted ImageNet-1k classifier for `backbone` and its eval preprocessing.

    `model(preprocess(uint8_rgb_image))` gives (1, 1000) logits (no softmax), classes in the
    standard ImageNet-1k order. `weights` as in `seglab.models.weights` (not None: a random
    classifier is of no use).
    """
    if backbone not in classifier_backbones():
        # Xception's offline weights are keras.applications' no-top file: they have no ImageNet head.
        raise ValueError(f"no ImageNet classifier for {backbone!r}; available: {', '.join(classifier_backbones())}")
    if weights is None:
        raise ValueError("imagenet_classifier needs pretrained weights; weights=None would give a random classifier")
    checkpoint = entry(backbone).imagenet
    encoder = build_backbone(backbone, (None, None, 3))
    logits = checkpoint.classifier_head(encoder.outputs[-1])
    # Built on the encoder's own tensors, so the classifier is one flat functional model.
    model = keras.Model(encoder.input, logits, name=f"{backbone}_imagenet")
    loaded = load_backbone_weights(model, backbone, weights, cache_dir=cache_dir)
    if not loaded.head_loaded:  # cannot happen with the head built above; guards the layer-name contract
        raise RuntimeError(f"{backbone}: classifier head weights were not loaded from {loaded.source}")
    return model, checkpoint.eval_transform
