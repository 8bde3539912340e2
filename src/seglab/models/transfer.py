"""Transfer-learning controls for segmenters whose pretrained encoder is one nested layer named ``encoder``.

- `freeze_encoder` / `unfreeze_encoder` / `UnfreezeEncoder(epoch)`: a frozen encoder gets no updates
  and its BatchNorm runs in inference mode (Keras 3 does that for ``trainable=False``), keeping its
  ImageNet statistics. ``train_batchnorm=False`` keeps BatchNorm frozen after unfreezing, the Keras
  transfer-learning guide's advice: small batches' statistics are noisy and would overwrite them.
- `encoder_lr_optimizer`: the encoder learns at ``lr x multiplier`` (see `EncoderLROptimizer` for why
  it runs two optimizers rather than scaling gradients).
- Holding the encoder (`EncoderLROptimizer.hold_encoder` / `release_encoder`, what
  ``UnfreezeEncoder(epoch, train_batchnorm=False)`` does): its variables stay trainable but get no
  updates, through a variable of the optimizer, so the traced train step is the same before and after
  the release. Switching ``trainable`` instead changes the trainable set, which makes Keras re-trace
  the train step (tens of seconds per model on a CPU, benchmarks/README.md); it remains the way when
  BatchNorm must start training at the unfreeze (its training mode is a different graph anyway).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from seglab.models.backbones import ENCODER_LAYER

log = logging.getLogger(__name__)


def get_encoder(model: keras.Model, encoder: str = ENCODER_LAYER) -> keras.layers.Layer:
    """The nested encoder layer of `model`; a clear error for models without one (e.g. plain U-Nets)."""
    names = [layer.name for layer in model.layers]
    if encoder not in names:
        raise ValueError(
            f"model {model.name!r} has no layer named {encoder!r}: only segmenters built on a pretrained backbone "
            f"(unet_<backbone>, deeplabv3plus_<backbone>) have an encoder to freeze or to give its own learning rate"
        )
    return model.get_layer(encoder)


def _unwrap_loss_scale(optimizer):
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def set_encoder_trainable(model: keras.Model, trainable: bool, encoder: str = ENCODER_LAYER, *,
                          train_batchnorm: bool = True) -> None:
    """Freeze (False) or unfreeze (True) the encoder of `model`, compiled or not.

    `train_batchnorm=False` unfreezes everything but the encoder's BatchNorm layers (module doc).

    On a compiled model the train step is re-traced on next use. Unfreezing a compiled model whose
    optimizer was built without the encoder's variables is refused unless the optimizer is an
    `EncoderLROptimizer` (which builds the encoder's optimizer state on demand).
    """
    encoder_layer = get_encoder(model, encoder)
    compiled = getattr(model, "compiled", False)
    optimizer = _unwrap_loss_scale(model.optimizer) if compiled else None
    previous = encoder_layer.trainable
    encoder_layer.trainable = bool(trainable)  # Keras sets every sublayer alike
    if trainable and not train_batchnorm:
        for layer in _batchnorm_layers(encoder_layer):
            layer.trainable = False
    if trainable and optimizer is not None and optimizer.built:
        if isinstance(optimizer, EncoderLROptimizer):
            optimizer.bind(model, encoder)
        else:
            try:
                optimizer._check_variables_are_known(encoder_layer.trainable_variables)
            except ValueError:
                encoder_layer.trainable = previous
                raise RuntimeError(
                    f"cannot unfreeze the encoder of {model.name!r}: its optimizer {optimizer.name!r} was built "
                    "without the encoder's variables (compiled while frozen). Compile with "
                    "seglab.models.transfer.encoder_lr_optimizer(model, optimizer) (multiplier 1.0 is fine), "
                    "or compile again with a new optimizer after unfreezing."
                ) from None
    if compiled:
        # The traced step captured the old trainable set and BatchNorm mode.
        model.make_train_function(force=True)
    state = ("unfrozen (trainable" + ("" if train_batchnorm else "; BatchNorm frozen") + ")") if trainable \
        else "frozen (BatchNorm in inference mode)"
    log.info("encoder of %r %s", model.name, state)


def _batchnorm_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    return [sub for sub in layer._flatten_layers(include_self=False)
            if isinstance(sub, keras.layers.BatchNormalization)]


def freeze_encoder(model: keras.Model, encoder: str = ENCODER_LAYER) -> None:
    set_encoder_trainable(model, False, encoder)


def unfreeze_encoder(model: keras.Model, encoder: str = ENCODER_LAYER, *, train_batchnorm: bool = True) -> None:
    set_encoder_trainable(model, True, encoder, train_batchnorm=train_batchnorm)


def encoder_lr_wrapper(model: keras.Model) -> EncoderLROptimizer | None:
    """The `EncoderLROptimizer` `model` was compiled with (under loss scaling too), or None."""
    optimizer = _unwrap_loss_scale(model.optimizer) if getattr(model, "compiled", False) else None
    return optimizer if isinstance(optimizer, EncoderLROptimizer) else None


class UnfreezeEncoder(keras.callbacks.Callback):
    """Encoder frozen for epochs ``< epoch`` (0-based), trainable from ``epoch`` on.

    ``UnfreezeEncoder(3)`` trains 3 epochs with a frozen encoder, then fine-tunes it; with
    ``fit(initial_epoch=5)`` it unfreezes from the start. ``epoch=0`` never freezes.

    ``train_batchnorm=False`` keeps the encoder's BatchNorm layers frozen (inference mode) throughout
    and needs a model compiled with an `EncoderLROptimizer`: the encoder's other variables are made
    trainable once, before the first step, and the frozen epochs hold their updates
    (`EncoderLROptimizer.hold_encoder`), so the unfreeze re-traces nothing and the encoder's
    optimizer then starts as freshly built. ``train_batchnorm=True`` freezes through ``trainable``
    (BatchNorm in inference mode while frozen, training mode after): the train step is re-traced at
    the unfreeze.
    """

    def __init__(self, epoch: int, encoder: str = ENCODER_LAYER, *, train_batchnorm: bool = True):
        super().__init__()
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"UnfreezeEncoder: epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = epoch
        self.encoder = encoder
        self.train_batchnorm = train_batchnorm

    def on_train_begin(self, logs=None):
        encoder_layer = get_encoder(self.model, self.encoder)  # fail before the first epoch, not in the middle
        if self.train_batchnorm:
            return
        if encoder_lr_wrapper(self.model) is None:
            raise ValueError("UnfreezeEncoder(train_batchnorm=False) holds the encoder through its optimizer: compile "
                             "with seglab.models.transfer.encoder_lr_optimizer(model, optimizer)")
        if not encoder_layer.trainable or any(layer.trainable for layer in _batchnorm_layers(encoder_layer)):
            set_encoder_trainable(self.model, True, self.encoder, train_batchnorm=False)
            build_optimizer(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        should_train = epoch >= self.epoch
        if not self.train_batchnorm:
            optimizer = encoder_lr_wrapper(self.model)
            if optimizer.encoder_held == should_train:
                optimizer.release_encoder() if should_train else optimizer.hold_encoder()
                log.info("epoch %d: encoder %s", epoch, "released" if should_train else "held")
        elif get_encoder(self.model, self.encoder).trainable != should_train:
            set_encoder_trainable(self.model, should_train, self.encoder, train_batchnorm=True)
            build_optimizer(self.model)
            log.info("epoch %d: encoder %s", epoch, "unfrozen" if should_train else "frozen")


def build_optimizer(model: keras.Model) -> None:
    """Create the optimizer state for `model`'s current trainable variables now, eagerly.

    Left to the first train step, the state is created inside the traced function, and
    TensorFlow then traces the whole step a second time (seconds to tens of seconds per model).
    """
    optimizer = model.optimizer
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # under LossScaleOptimizer
    scope = getattr(model, "distribute_strategy", None)
    with scope.scope() if scope is not None else contextlib.nullcontext():
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        if isinstance(inner, EncoderLROptimizer):
            inner.build_new(model.trainable_variables)


def _executing_eagerly() -> bool:
    if keras.backend.backend() != "tensorflow":
        return True
    import tensorflow as tf

    return tf.executing_eagerly()


def _compact(value: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, value), the value one element when all are equal: optimizer slots start constant
    (Adam's moments at zero), and a full copy would cost the size of the encoder per slot."""
    flat = value.reshape(-1)
    if flat.size and np.all(flat == flat[0]):
        return value.shape, flat[:1].reshape(())
    return value.shape, value


def _check_multiplier(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"encoder_lr_multiplier must be a finite number >= 0, got {value!r}")
    return float(value)


@keras.saving.register_keras_serializable(package="seglab")
class EncoderLROptimizer(keras.optimizers.Optimizer):
    """Wraps `optimizer` so variables of the encoder are updated with ``lr x encoder_lr_multiplier``.

    Scaling gradients would not do this (Adam and other adaptive optimizers are invariant to gradient
    scale), so the wrapper runs two copies: `optimizer` for the decoder/head, and a clone for the
    encoder whose learning rate is the given one's current rate (schedule, ReduceLROnPlateau
    included) times the multiplier. The clone is built when the encoder first gets gradients, so an
    encoder unfrozen after N epochs starts with fresh moments, and a plain optimizer's "Unknown
    variable" refusal on late unfreezing does not arise. Works with `fit`/`train_on_batch` on the
    TensorFlow and PyTorch backends (not JAX's stateless training) and under mixed precision;
    serialises with the model (both states saved; encoder variables identified by path, recorded by
    `bind(model)`). Not supported: ``gradient_accumulation_steps`` (the copies would drift apart).

    `hold_encoder` stops the encoder's updates without changing the traced step: its gradients are
    replaced by zeros (so they count in no global norm and leave Adam's moments at zero) and its
    learning rate is multiplied by 0 (so weight decay moves nothing either): its weights stay
    bit-identical. `release_encoder` resumes them and resets the encoder's optimizer to the state
    it was built with, as if it were built at that moment (a held optimizer's step counter went on).
    Whether the encoder is held is a variable of this optimizer, saved with its state.

    optimizer: a fresh (unbuilt) Keras optimizer; it updates every non-encoder variable.
    encoder_lr_multiplier: >= 0 (0 keeps the encoder fixed while BatchNorm still trains).
    encoder_variable_paths: paths of the encoder's variables; usually set by `bind(model)`.
    Loss scaling and ``global_clipnorm`` of `optimizer` move to the wrapper, so they apply to all
    gradients at once; ``clipnorm``/``clipvalue``/``weight_decay``/EMA stay per variable.
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer | dict,
        encoder_lr_multiplier: float = 1.0,
        encoder_variable_paths: Sequence[str] = (),
        name: str | None = None,
        loss_scale_factor: float | None = None,
        global_clipnorm: float | None = None,
    ):
        if isinstance(optimizer, dict):
            optimizer = keras.optimizers.deserialize(optimizer)
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"EncoderLROptimizer wraps a keras.optimizers.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, (keras.optimizers.LossScaleOptimizer, EncoderLROptimizer)):
            raise TypeError(f"EncoderLROptimizer must wrap a plain optimizer, got a {type(optimizer).__name__} "
                            "(Keras adds loss scaling itself when compiling under mixed_float16)")
        if optimizer.built:
            raise ValueError(f"EncoderLROptimizer needs a fresh optimizer; {optimizer.name!r} is already built")
        if optimizer.gradient_accumulation_steps:
            raise ValueError("EncoderLROptimizer does not support gradient_accumulation_steps")
        loss_scale_factor = loss_scale_factor if loss_scale_factor is not None else optimizer.loss_scale_factor
        global_clipnorm = global_clipnorm if global_clipnorm is not None else optimizer.global_clipnorm
        super().__init__(learning_rate=0.0, name=name or f"encoder_lr_{optimizer.name}",
                         loss_scale_factor=loss_scale_factor, global_clipnorm=global_clipnorm)
        self.encoder_lr_multiplier = _check_multiplier(encoder_lr_multiplier)
        self.encoder_variable_paths = frozenset(encoder_variable_paths)
        # The wrapper unscales and clips once, over all gradients.
        optimizer.loss_scale_factor = None
        optimizer.global_clipnorm = None
        self.decoder_optimizer = optimizer
        clone_config = {**optimizer.get_config(), "name": f"{optimizer.name}_encoder",
                        "learning_rate": self._encoder_learning_rate}
        self.encoder_optimizer = type(optimizer).from_config(clone_config)
        # 1: the encoder learns, 0: held. A variable, read inside the traced step, so that switching
        # it re-traces nothing.
        self._encoder_learns = self.add_variable((), initializer="ones", dtype="float32",
                                                 aggregation="only_first_replica", name="encoder_learns")
        self._fresh_encoder_state: list | None = None

    def _encoder_learning_rate(self):
        rate = ops.multiply(self.decoder_optimizer.learning_rate, self.encoder_lr_multiplier)
        return ops.multiply(rate, ops.cast(self._encoder_learns, rate.dtype))

    # ------------------------------------------------------------------------------- holding

    @property
    def encoder_held(self) -> bool:
        return float(ops.convert_to_numpy(self._encoder_learns)) == 0.0

    def hold_encoder(self) -> None:
        """Stop the encoder's updates (class doc); call eagerly, e.g. from a callback."""
        self._encoder_learns.assign(0.0)

    def release_encoder(self) -> None:
        """Resume the encoder's updates with its optimizer as freshly built (class doc)."""
        if self.encoder_optimizer.built:
            if self._fresh_encoder_state is None:
                raise RuntimeError(f"{self.name}: the encoder's optimizer was built inside a traced function, so "
                                   "its initial state is unknown; build it eagerly first (build_optimizer(model))")
            for variable, (shape, value) in zip(self.encoder_optimizer.variables, self._fresh_encoder_state):
                variable.assign(np.broadcast_to(value, shape))
        self._encoder_learns.assign(1.0)

    # ------------------------------------------------------------------------------ partitioning

    def bind(self, model: keras.Model, encoder: str = ENCODER_LAYER) -> EncoderLROptimizer:
        """Record which variables of `model` belong to its encoder (by path). Returns self."""
        encoder_layer = get_encoder(model, encoder)
        encoder_paths = {v.path for v in encoder_layer.weights}
        encoder_ids = {id(v) for v in encoder_layer.weights}
        clashes = sorted({v.path for v in model.weights if id(v) not in encoder_ids} & encoder_paths)
        if clashes:
            raise ValueError(
                f"model {model.name!r}: variable path(s) {clashes[:3]} occur both inside and outside the encoder, "
                "so the encoder's variables cannot be told apart by path; rename the clashing layers"
            )
        if self.built and self.encoder_variable_paths and encoder_paths != self.encoder_variable_paths:
            raise ValueError(f"{self.name}: already built for another encoder ({len(self.encoder_variable_paths)} "
                             f"variable paths, this model's encoder has {len(encoder_paths)})")
        self.encoder_variable_paths = frozenset(encoder_paths)
        return self

    def _split(self, grads: Sequence, variables: Sequence) -> tuple[list, list, list, list]:
        if not self.encoder_variable_paths:
            raise ValueError(f"{self.name}: no encoder variables recorded; call .bind(model) first "
                             "(seglab.models.transfer.encoder_lr_optimizer does)")
        encoder_grads, encoder_vars, decoder_grads, decoder_vars = [], [], [], []
        for grad, variable in zip(grads, variables):
            if variable.path in self.encoder_variable_paths:
                encoder_grads.append(grad)
                encoder_vars.append(variable)
            else:
                decoder_grads.append(grad)
                decoder_vars.append(variable)
        return encoder_grads, encoder_vars, decoder_grads, decoder_vars

    # ----------------------------------------------------------------------------------- keras

    def build(self, var_list):
        variables = list(var_list)
        _, encoder_vars, _, decoder_vars = self._split([None] * len(variables), variables)
        if decoder_vars and not self.decoder_optimizer.built:
            self.decoder_optimizer.build(decoder_vars)
        if encoder_vars and not self.encoder_optimizer.built:
            self.encoder_optimizer.build(encoder_vars)
            self._note_fresh_encoder_state()
        super().build(variables)

    def _note_fresh_encoder_state(self) -> None:
        # What `release_encoder` resets to. Keras builds optimizers eagerly (fit, train_on_batch,
        # build_optimizer); inside a traced function the values cannot be read.
        if _executing_eagerly():
            self._fresh_encoder_state = [_compact(ops.convert_to_numpy(v)) for v in self.encoder_optimizer.variables]

    def build_new(self, trainable_variables) -> None:
        """Build the encoder's optimizer if `trainable_variables` now hold encoder variables it has no
        state for yet (the encoder was just unfrozen)."""
        _, encoder_vars, _, _ = self._split([None] * len(trainable_variables), list(trainable_variables))
        self._build_encoder_optimizer(encoder_vars)

    def _build_encoder_optimizer(self, encoder_vars) -> None:
        # The encoder's state starts with its first variables (e.g. when it was just unfrozen).
        if encoder_vars and not self.encoder_optimizer.built:
            with keras.name_scope(self.encoder_optimizer.name, caller=self.encoder_optimizer):
                self.encoder_optimizer.build(encoder_vars)
            self._note_fresh_encoder_state()

    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            if not self.built:
                raise ValueError(f"{self.name}: pass trainable_variables, or build the optimizer first")
            trainable_variables = self._trainable_variables
        grads, trainable_variables = list(grads), list(trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        if self.loss_scale_factor is not None:
            grads = [None if g is None else g / self.loss_scale_factor for g in grads]
        encoder_grads, encoder_vars, decoder_grads, decoder_vars = self._split(grads, trainable_variables)
        if encoder_grads:
            # Held: zeros (`where`, not a product, so that a non-finite gradient cannot leak in).
            learns = ops.greater(self._encoder_learns, 0.0)
            encoder_grads = [None if g is None else ops.where(learns, g, ops.zeros_like(g)) for g in encoder_grads]
        if self.global_clipnorm:
            grads = self._clip_gradients(decoder_grads + encoder_grads)
            decoder_grads, encoder_grads = grads[:len(decoder_grads)], grads[len(decoder_grads):]
        if decoder_vars:
            self.decoder_optimizer.apply(decoder_grads, decoder_vars)
        if encoder_vars:
            self._build_encoder_optimizer(encoder_vars)
            self.encoder_optimizer.apply(encoder_grads, encoder_vars)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise NotImplementedError("EncoderLROptimizer supports the stateful backends (TensorFlow, PyTorch), "
                                  "not JAX's stateless training")

    @property
    def variables(self):
        return self._variables + self.decoder_optimizer.variables + self.encoder_optimizer.variables

    def save_own_variables(self, store):
        # The two inner optimizers are saved as child objects by Keras' saving; only the wrapper's own here.
        for i, variable in enumerate(self._variables):
            store[str(i)] = variable.numpy()

    def load_own_variables(self, store):
        if len(store.keys()) != len(self._variables):
            raise ValueError(f"{self.name}: saved state has {len(store.keys())} own variables, "
                             f"expected {len(self._variables)}")
        for i, variable in enumerate(self._variables):
            variable.assign(store[str(i)])

    @property
    def learning_rate(self):
        return self.decoder_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.decoder_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.decoder_optimizer.iterations

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        self.decoder_optimizer.exclude_from_weight_decay(var_list=var_list, var_names=var_names)
        self.encoder_optimizer.exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    def finalize_variable_values(self, var_list):
        variables = list(var_list)
        _, encoder_vars, _, decoder_vars = self._split([None] * len(variables), variables)
        if self.decoder_optimizer.built and decoder_vars:
            self.decoder_optimizer.finalize_variable_values(decoder_vars)
        if self.encoder_optimizer.built and encoder_vars:
            self.encoder_optimizer.finalize_variable_values(encoder_vars)

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.optimizers.serialize(self.decoder_optimizer),
            "encoder_lr_multiplier": self.encoder_lr_multiplier,
            "encoder_variable_paths": sorted(self.encoder_variable_paths),
            "loss_scale_factor": self.loss_scale_factor,
            "global_clipnorm": self.global_clipnorm,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["optimizer"] = keras.optimizers.deserialize(config["optimizer"], custom_objects=custom_objects)
        return cls(**config)


def encoder_lr_optimizer(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                         encoder_lr_multiplier: float = 1.0, encoder: str = ENCODER_LAYER) -> EncoderLROptimizer:
    """`optimizer` wrapped so `model`'s encoder learns at ``lr x encoder_lr_multiplier``; pass it to `compile`."""
    return EncoderLROptimizer(optimizer, encoder_lr_multiplier).bind(model, encoder)

