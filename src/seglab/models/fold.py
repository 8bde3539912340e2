"""A trained model's inference form: every BatchNormalization that directly follows a convolution
folded into that convolution's kernel and bias.

In inference BatchNormalization is a fixed per-channel affine map, y = (x - mean) * gamma /
sqrt(var + eps) + beta, so after a Conv2D or DepthwiseConv2D it can be absorbed by scaling the
kernel's output channels and adding the shift to the bias (as TFLite's and ONNX's converters do).
The folded model computes the same function up to float rounding with about a third fewer layers
and half the variables or fewer, which is what evaluation pays for in loading, tracing and every
call (benchmarks/README.md, "The inference form: BatchNorm folded"). A BatchNormalization after
anything else, or after a convolution whose output is also read elsewhere, stays as it is.

The functional graph is rewritten in its config (the folded BatchNormalization removed, its
readers rewired to the convolution) and rebuilt with `from_config`, nested models included, so
the result is an ordinary Keras model that saves and loads like the original.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

__all__ = ["fold_batchnorm"]

_CONVOLUTIONS = ("Conv2D", "DepthwiseConv2D")


def fold_batchnorm(model: keras.Model) -> keras.Model:
    """A new functional model computing `model`'s inference output with each foldable
    BatchNormalization absorbed into the convolution before it; `model` is left unchanged."""
    config = model.get_config()
    folds = _fold_config(config)
    folded = model.__class__.from_config(config)
    _copy_weights(model, folded, folds)
    return folded


def _history(node_arg: Any) -> list | None:
    if isinstance(node_arg, dict) and node_arg.get("class_name") == "__keras_tensor__":
        return node_arg["config"]["keras_history"]
    return None


def _histories(value: Any):
    """Every keras_history list in an inbound node's args/kwargs, however nested."""
    found = _history(value)
    if found is not None:
        yield found
    elif isinstance(value, dict):
        for item in value.values():
            yield from _histories(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _histories(item)


def _fold_config(config: dict) -> dict[str, dict[str, str]]:
    """Rewrite a functional config in place, nested models first; returns, per model name, the
    folded BatchNormalization name -> the convolution that absorbed it."""
    folds: dict[str, dict[str, str]] = {}
    for layer in config["layers"]:
        if "output_layers" in layer.get("config", {}):  # a nested functional model (a Sequential stays)
            folds.update(_fold_config(layer["config"]))
    by_name = {layer["config"]["name"]: layer for layer in config["layers"]}
    readers: dict[str, int] = {}
    for layer in config["layers"]:
        for node in layer.get("inbound_nodes", []):
            for history in _histories(node):
                readers[history[0]] = readers.get(history[0], 0) + 1
    for output in _outputs(config["output_layers"]):
        readers[output[0]] = readers.get(output[0], 0) + 1

    here: dict[str, str] = {}
    for layer in config["layers"]:
        if layer["class_name"] != "BatchNormalization" or layer.get("module") != "keras.layers":
            continue
        bn = layer["config"]
        nodes = layer.get("inbound_nodes", [])
        if len(nodes) != 1 or bn.get("axis") not in (-1, [-1], 3, [3]):
            continue
        sources = list(_histories(nodes[0]))
        if len(sources) != 1:
            continue
        conv = by_name.get(sources[0][0])
        if (conv is None or conv["class_name"] not in _CONVOLUTIONS or conv.get("module") != "keras.layers"
                or len(conv.get("inbound_nodes", [])) != 1 or readers.get(conv["config"]["name"]) != 1
                or conv["config"].get("activation", "linear") != "linear"
                or conv["config"].get("data_format", "channels_last") != "channels_last"):
            continue
        here[bn["name"]] = conv["config"]["name"]

    if here:
        for conv_name in here.values():
            by_name[conv_name]["config"]["use_bias"] = True
        config["layers"] = [layer for layer in config["layers"] if layer["config"]["name"] not in here]
        for layer in config["layers"]:
            for node in layer.get("inbound_nodes", []):
                for history in _histories(node):
                    history[0] = here.get(history[0], history[0])
        for output in _outputs(config["output_layers"]):
            output[0] = here.get(output[0], output[0])
    folds[config["name"]] = here
    return folds


def _outputs(output_layers: list) -> list[list]:
    """output_layers is one [name, node, tensor] triple or a list of them."""
    if output_layers and isinstance(output_layers[0], str):
        return [output_layers]
    return output_layers


def _copy_weights(source: keras.Model, target: keras.Model, folds: dict[str, dict[str, str]]) -> None:
    folded_here = folds.get(source.name, {})
    absorbed = {conv: bn for bn, conv in folded_here.items()}
    for layer in target.layers:
        original = source.get_layer(layer.name)
        if isinstance(layer, keras.Model) and layer.name in folds:
            _copy_weights(original, layer, folds)
        elif layer.name in absorbed:
            layer.set_weights(_folded_weights(original, source.get_layer(absorbed[layer.name])))
        else:
            layer.set_weights(original.get_weights())


def _folded_weights(conv: keras.layers.Layer, bn: keras.layers.BatchNormalization) -> list[np.ndarray]:
    def values(variable) -> np.ndarray:
        return keras.ops.convert_to_numpy(variable).astype(np.float64)

    stored = keras.ops.convert_to_numpy(conv.kernel)
    # Output channel c of a depthwise kernel (h, w, in, multiplier) is in * multiplier + m.
    channel_shape = stored.shape[2:] if isinstance(conv, keras.layers.DepthwiseConv2D) else stored.shape[3:]
    channels = int(np.prod(channel_shape))
    bias = values(conv.bias) if conv.use_bias else np.zeros(channels)
    gamma = values(bn.gamma) if bn.scale else np.ones(channels)
    beta = values(bn.beta) if bn.center else np.zeros(channels)
    scale = gamma / np.sqrt(values(bn.moving_variance) + bn.epsilon)
    kernel = stored.astype(np.float64) * scale.reshape(channel_shape)
    bias = (bias - values(bn.moving_mean)) * scale + beta
    return [kernel.astype(stored.dtype), bias.astype(stored.dtype)]
