"""The full ImageNet classifiers behind the converted backbones: the proof that a conversion is right.

A backbone whose weights were converted wrongly still produces features; only the complete
classifier shows it: `skimage.data.chelsea()` must come out as a cat, `coffee()` as espresso.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import keras
import numpy as np
from PIL import Image

from seglab.models import efficientnet_lite, mobilenetv2
from seglab.models.weights import OFFLINE_BACKBONES, WeightsArg, load_backbone_weights

CROP_SIZE = 224
RESIZE_SHORT_SIDE = 256  # torchvision's ImageNet eval: resize to 256, center-crop 224


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"preprocess expects one uint8 RGB image of shape (H, W, 3), got {image.dtype} {image.shape}")
    return image


def preprocess_torchvision(image: np.ndarray) -> np.ndarray:
    """torchvision's eval transform: bilinear (antialiased) resize of the short side to 256, center crop 224.

    Returns a (1, 224, 224, 3) float32 batch in [0, 255]; the model normalises.
    """
    image = _check_image(image)
    height, width = image.shape[:2]
    # torchvision keeps the short side exact and truncates the long one.
    if height <= width:
        size = (int(RESIZE_SHORT_SIDE * width / height), RESIZE_SHORT_SIDE)
    else:
        size = (RESIZE_SHORT_SIDE, int(RESIZE_SHORT_SIDE * height / width))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), dtype=np.float32)
    top = int(round((resized.shape[0] - CROP_SIZE) / 2.0))
    left = int(round((resized.shape[1] - CROP_SIZE) / 2.0))
    return resized[None, top : top + CROP_SIZE, left : left + CROP_SIZE]


def preprocess_tf_efficientnet(image: np.ndarray, size: int = efficientnet_lite.NATIVE_RESOLUTION) -> np.ndarray:
    """TF EfficientNet's eval transform: center crop of size/(size+32) of the short side, bicubic resize to size.

    Returns a (1, size, size, 3) float32 batch in [0, 255]; the model normalises.
    """
    image = _check_image(image)
    height, width = image.shape[:2]
    crop = int(size / (size + 32) * min(height, width))
    top, left = (height - crop + 1) // 2, (width - crop + 1) // 2
    cropped = Image.fromarray(image[top : top + crop, left : left + crop])
    return np.asarray(cropped.resize((size, size), Image.BICUBIC), dtype=np.float32)[None]


_CLASSIFIERS: dict[str, tuple[Callable, Callable, Callable[[np.ndarray], np.ndarray]]] = {
    "mobilenetv2": (mobilenetv2.mobilenetv2_backbone, mobilenetv2.mobilenetv2_classifier_head, preprocess_torchvision),
    "efficientnet_lite0": (efficientnet_lite.efficientnet_lite0_backbone,
                           efficientnet_lite.efficientnet_lite0_classifier_head, preprocess_tf_efficientnet),
}


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
    if backbone not in _CLASSIFIERS:
        raise ValueError(f"no ImageNet classifier for {backbone!r}; available: {', '.join(OFFLINE_BACKBONES)}")
    if weights is None:
        raise ValueError("imagenet_classifier needs pretrained weights; weights=None would give a random classifier")
    build_backbone, build_head, preprocess = _CLASSIFIERS[backbone]
    encoder = build_backbone((None, None, 3))
    logits = build_head(encoder.outputs[-1])
    # Built on the encoder's own tensors, so the classifier is one flat functional model.
    model = keras.Model(encoder.input, logits, name=f"{backbone}_imagenet")
    loaded = load_backbone_weights(model, backbone, weights, cache_dir=cache_dir)
    if not loaded.head_loaded:  # cannot happen with the head built above; guards the layer-name contract
        raise RuntimeError(f"{backbone}: classifier head weights were not loaded from {loaded.source}")
    return model, preprocess
