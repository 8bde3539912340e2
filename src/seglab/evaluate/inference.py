"""The prediction side of evaluation: trained models loaded and checked, predictors run over a split.

`load_trained` reads ``<train.out>/<name>/{model.keras, train.json}`` and checks that they agree;
`check_classes` refuses to score a model against another class mapping. `evaluate_predictors`
streams a dataset of (images, labels) through every predictor (plain, TTA, an ensemble) and adds
each argmax into one streaming confusion matrix per predictor.

Speed: images/s is the number of val images over the wall time of the model calls (prediction
to host memory included; reading and decoding the shards, which overlap in tf.data's prefetch, not),
after one untimed warm-up call on the first batch that traces the graph. Each predictor is traced
once, for any batch size (`inference_function`), so the latency's batch of one reuses the graph. A
last partial batch is padded to the batch size (one input shape for the kernels); only its real
images are counted.
Latency: one image per call, `evaluate.latency_runs` timed calls after a warm-up, p50/p90 in ms.

`plain_and_tta` gives the plain and the TTA predictor of one segmenter from a single trace of it:
tracing and optimising the graph cost more than the whole evaluation's predictions on the CPU
profile, and a TTA model built as one graph (`seglab.evaluate.tta.tta_model`) holds one copy of
the segmenter per transform. Here the TTA runs the transformed views as one batch through the same
traced segmenter and merges them as `tta_model` does (same transforms, same running mean).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from seglab.data.classes import IGNORE_INDEX
from seglab.data.pipeline import make_dataset
from seglab.evaluate.tta import select_transforms
from seglab.metrics import ConfusionMatrix
from seglab.records import TrainRecord

__all__ = [
    "GRID_IMAGES",
    "EvaluationPass",
    "TracedPredictor",
    "TrainedModel",
    "VariantResult",
    "check_classes",
    "eval_dataset",
    "evaluate_predictors",
    "inference_function",
    "load_trained",
    "measure_latency",
    "plain_and_tta",
]

GRID_IMAGES = 6


@dataclass
class TrainedModel:
    """A trained model as the train stage left it: the Keras model and its train.json."""

    name: str
    directory: Path
    model: keras.Model
    info: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def image_shape(self) -> tuple[int, int]:
        return int(self.model.input_shape[1]), int(self.model.input_shape[2])


def _register_custom_objects() -> None:
    # Importing these registers seglab's serialisable layers with Keras, so load_model finds them.
    # Training saves an uncompiled inference view and it is loaded with compile=False, so no loss,
    # metric or optimizer (seglab.train's) is ever deserialised here.
    import seglab.models.registry  # noqa: F401
    import seglab.models.transfer  # noqa: F401


def load_trained(models_dir: str | Path, name: str) -> TrainedModel:
    """Load ``<models_dir>/<name>/{model.keras, train.json}`` (a `TrainRecord`) and check they agree."""
    directory = Path(models_dir) / name
    info_path, model_path = directory / "train.json", directory / "model.keras"
    for path in (info_path, model_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; train the model first (`seglab train {name}`)")
    info = TrainRecord.load(info_path).to_json()  # RecordError (a ValueError) names file and field
    classes = info["classes"]

    _register_custom_objects()
    try:
        # The optimizer and loss are training state; evaluation needs the forward pass only.
        model = keras.models.load_model(model_path, compile=False)
    except Exception as e:  # Keras raises assorted types for a corrupt or foreign file
        raise ValueError(f"{model_path}: cannot be loaded as a Keras model: {type(e).__name__}: {e}") from e

    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[3] != 3 or shape[1] is None or shape[2] is None:
        raise ValueError(f"{model_path}: expected an RGB input of static size (None, H, W, 3), got {shape}")
    outputs = model.output_shape[-1]
    if outputs != len(classes):
        raise ValueError(
            f"{model_path}: the model outputs {outputs} classes but {info_path} lists {len(classes)}; "
            "the two files are not from the same training run"
        )
    size = info["image_size"]
    expected = [size, size] if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else None
    if expected != [shape[1], shape[2]]:
        raise ValueError(
            f"{info_path}: image_size {size!r} does not match the model's input {shape[1]}x{shape[2]} in {model_path}"
        )
    return TrainedModel(name=name, directory=directory, model=model, info=info)


def check_classes(expected: Sequence[str], found: Sequence[str], expected_from: str, found_from: str) -> None:
    """Refuse to score a model against another class mapping: same names in the same order."""
    expected, found = list(expected), list(found)
    if expected == found:
        return
    if len(expected) != len(found):
        detail = f"{len(expected)} classes vs {len(found)}"
    else:
        index = next(i for i, (a, b) in enumerate(zip(expected, found)) if a != b)
        detail = f"label {index} is {expected[index]!r} in one and {found[index]!r} in the other"
    raise ValueError(
        f"class mismatch: {expected_from} has classes {expected} but {found_from} has {found} ({detail}); "
        "scores against another label mapping would be meaningless: retrain on these shards or evaluate "
        "on the shards the model was trained with"
    )


@dataclass
class VariantResult:
    """What one predictor (plain, TTA, ensemble) accumulated over the split."""

    variant: str
    confusion: ConfusionMatrix
    predict_seconds: float = 0.0
    # Process CPU time (all threads) during the same calls: unlike wall time it hardly moves when other
    # jobs share the cores. It includes whatever tf.data prefetching ran meanwhile (small next to a model).
    predict_cpu_seconds: float = 0.0
    timed_images: int = 0
    latency_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    grid_predictions: list[np.ndarray] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.timed_images / self.predict_seconds if self.predict_seconds > 0 else float("nan")

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000.0 * self.predict_cpu_seconds / self.timed_images if self.timed_images else float("nan")

    def latency_percentile(self, q: float) -> float:
        return float(np.percentile(self.latency_ms, q)) if self.latency_ms.size else float("nan")


@dataclass
class EvaluationPass:
    """The results of every predictor over one pass of the split, and the images for the grid."""

    results: dict[str, VariantResult]
    images: int
    grid_images: list[np.ndarray]
    grid_truths: list[np.ndarray]


def _check_finite(probabilities: np.ndarray, variant: str, batch_index: int) -> None:
    if not np.all(np.isfinite(probabilities)):
        raise ValueError(f"{variant}: the model produced NaN or infinite probabilities on val batch {batch_index}; "
                         "the checkpoint is broken (diverged training?)")


def inference_function(predictor: keras.Model, image_shape: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
    """`predictor` in inference mode as one graph for batches of any size of `image_shape` images.

    `predict_on_batch` traces a graph per input shape: the evaluation batch and the latency's batch
    of one would each be traced, for the plain and the TTA model, and tracing takes most of an
    evaluate stage's time at the CPU profile.
    """
    spec = tf.TensorSpec((None, *image_shape), tf.float32)
    graph = tf.function(lambda images: predictor(images, training=False), input_signature=[spec])
    return lambda images: graph(tf.convert_to_tensor(images, tf.float32)).numpy()


class TracedPredictor:
    """A traced predictor: images (B, H, W, 3) -> probabilities (B, H, W, C) as numpy, any B.

    `tta_transforms`: the names of the transforms merged (None for a plain predictor).
    """

    def __init__(self, graph: Callable[[tf.Tensor], tf.Tensor], name: str, tta_transforms: list[str] | None = None):
        self.graph, self.name, self.tta_transforms = graph, name, tta_transforms

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.graph(tf.convert_to_tensor(images, tf.float32)).numpy()


def plain_and_tta(model: keras.Model, transform_names: Sequence[str],
                  on_non_square: str = "skip") -> dict[str, TracedPredictor]:
    """{"plain": softmax of `model`, "tta": the TTA merge of `transform_names`} sharing one trace of
    `model` (module doc). `model` returns logits (B, H, W, C) for a static input (H, W, 3)."""
    height, width, channels = (int(d) for d in model.input_shape[1:])
    transforms = select_transforms(transform_names, (height, width), on_non_square)
    spec = tf.TensorSpec((None, height, width, channels), tf.float32)

    @tf.function(input_signature=[spec])
    def probabilities(images):
        return tf.nn.softmax(tf.cast(model(images, training=False), tf.float32), axis=-1)

    @tf.function(input_signature=[spec])
    def merged(images):
        # One batch of every view: the traced segmenter is called once, with the signature `plain`
        # uses, so it is traced once for both.
        views = probabilities(tf.concat([t.apply(images) for t in transforms], axis=0))
        batch = tf.shape(images)[0]
        mean = None
        for count, transform in enumerate(transforms, start=1):
            view = transform.invert(views[(count - 1) * batch:count * batch])
            # A running mean, as tta_model's: equal views come back unchanged, bit for bit.
            mean = view if mean is None else mean + (view - mean) / float(count)
        return mean

    return {"plain": TracedPredictor(probabilities, f"{model.name}_probabilities"),
            "tta": TracedPredictor(merged, f"{model.name}_tta", [t.name for t in transforms])}


def evaluate_predictors(
    predictors: Mapping[str, keras.Model | TracedPredictor],
    dataset: Any,
    class_names: Sequence[str],
    *,
    latency_runs: int = 20,
    grid_images: int = GRID_IMAGES,
) -> EvaluationPass:
    """Run every predictor (images -> probabilities (B, H, W, C)) over `dataset` of (images, labels).

    A Keras model is traced here (`inference_function`); a `TracedPredictor` is used as it is.

    Returns per predictor the confusion matrix, its throughput and latency (module doc) and its
    label maps for the first `grid_images` images (not-scored pixels set to 255).
    """
    if not predictors:
        raise ValueError("evaluate_predictors needs at least one predictor")
    num_classes = len(class_names)
    results = {variant: VariantResult(variant, ConfusionMatrix(num_classes, IGNORE_INDEX, class_names))
               for variant in predictors}
    grid_inputs: list[np.ndarray] = []
    grid_truths: list[np.ndarray] = []
    batch_size = None
    images_seen = 0
    first_image = None
    calls: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    for batch_index, (images, labels) in enumerate(dataset):
        images, labels = np.asarray(images, np.float32), np.asarray(labels)
        real = images.shape[0]
        if batch_size is None:
            batch_size = real
            first_image = images[:1].copy()
            calls = {variant: predictor if isinstance(predictor, TracedPredictor)
                     else inference_function(predictor, images.shape[1:]) for variant, predictor in predictors.items()}
            for call in calls.values():  # warm-up: tracing is not inference time
                call(images)
        if real < batch_size:  # pad to the traced batch shape; the padding is dropped below
            images = np.concatenate([images, np.zeros((batch_size - real, *images.shape[1:]), images.dtype)])
        scored = labels != IGNORE_INDEX
        take = max(0, min(grid_images - len(grid_inputs), real))
        grid_inputs += [images[i].astype(np.uint8) for i in range(take)]
        grid_truths += [labels[i].astype(np.uint8) for i in range(take)]
        for variant, call in calls.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            probabilities = call(images)
            results[variant].predict_seconds += time.perf_counter() - start
            results[variant].predict_cpu_seconds += time.process_time() - cpu_start
            _check_finite(probabilities[:real], variant, batch_index)
            results[variant].timed_images += real
            predicted = np.argmax(probabilities[:real], axis=-1)
            results[variant].confusion.update(labels, predicted)
            shown = np.where(scored, predicted, IGNORE_INDEX).astype(np.uint8)
            results[variant].grid_predictions += [shown[i] for i in range(take)]
        images_seen += real
    if images_seen == 0:
        raise ValueError("the evaluation dataset yielded no images")

    for variant, call in calls.items():
        results[variant].latency_ms = measure_latency(call, first_image, latency_runs)
    return EvaluationPass(results, images_seen, grid_inputs, grid_truths)


def measure_latency(predict: Callable[[np.ndarray], Any], image_batch: np.ndarray, runs: int) -> np.ndarray:
    """Milliseconds of `runs` single-image calls of `predict` after one untimed warm-up call."""
    if runs < 1:
        raise ValueError(f"latency runs must be >= 1, got {runs}")
    single = np.asarray(image_batch[:1], np.float32)
    predict(single)
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(single)
        timings.append((time.perf_counter() - start) * 1000.0)
    return np.asarray(timings)


def eval_dataset(cfg: Any, split: str, image_shape: tuple[int, int]) -> Any:
    """`split` of the shards as the evaluate stage reads it: letterboxed, in order, seeded."""
    return make_dataset(
        cfg.shard.out, split,
        image_size=image_shape,
        batch_size=cfg.evaluate.batch_size,
        training=False,  # letterbox, no shuffle, keep the last partial batch
        seed=cfg.seed,
        deterministic=True,
    )
