"""The prediction side of evaluation: trained models loaded and checked, predictors run over a split.

`load_trained` reads ``<train.out>/<name>/{model.keras, train.json}`` and checks that they agree;
`check_classes` refuses to score a model against another class mapping. `evaluate_predictors`
streams a dataset of (images, labels) through every predictor (plain, TTA, an ensemble) and adds
each argmax into one streaming confusion matrix per predictor.

The target (`eval_target`): a split of a shard root (`evaluate.data` / `evaluate.split`, or
`seglab evaluate --data --split`), its dataset name (the rows' `source`) and class list. A folder
that is not shards is refused with what to do (a raw dataset root must be sharded first).

Protocols (`evaluate.protocol`): `letterbox` streams batches of images letterboxed to the model's
input (padding is label 255); `full` streams the images at their stored size and predicts each
with a sliding window (`seglab.evaluate.sliding`), scoring against the stored label map.

Speed: images/s is the number of images over the wall time of the predictions (prediction to host
memory included; reading and decoding the shards, which overlap in tf.data's prefetch, not; for
`full`, an image's resize, windows and merge included), after one untimed warm-up call that traces
the graph. Each predictor is traced once, for any batch size (`inference_function`), so the
latency's batch of one reuses the graph. A last partial letterbox batch is padded to the batch
size (one input shape for the kernels); only its real images are counted.
Latency, p50/p90 in ms of one image per call: for `full`, each image of the split already is one
call (all its windows), so the percentiles are over those calls, every image at its own size (an
untimed warm-up call on the first image's first windows traced the graph); for `letterbox`, whose
calls are batches, `evaluate.latency_runs` extra calls with the first image, after a warm-up.

Graph rewrites (`inference_graph_options`): where no GPU is visible, the evaluation's graphs run
without Grappler's rewrites. They made the predictions no faster on this project's CPUs and took
time before each graph's first call; the probabilities change by rounding only
(benchmarks/README.md, "Graph rewrites at evaluation").

`plain_and_tta` gives the plain and the TTA predictor of one segmenter from a single trace of it:
tracing and optimising the graph cost more than the whole evaluation's predictions on the CPU
profile, and a TTA model built as one graph (`seglab.evaluate.tta.tta_model`) holds one copy of
the segmenter per transform. Here the TTA runs the transformed views as one batch through the same
traced segmenter and merges them as `tta_model` does (same transforms, same running mean). Its
identity view is the plain predictor's probabilities (its `base`): `evaluate_predictors` calls the
plain predictor once per batch or window batch and hands its probabilities to the TTA, and an
image's resize and windows are cut once for both (`SlidingWindow.tile`). The TTA's time counts the
plain calls it took the probabilities of; the shared resize and cut count for each variant.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from seglab.config import SPLIT_NAME
from seglab.data.classes import IGNORE_INDEX
from seglab.data.pipeline import make_dataset, stored_pairs
from seglab.data.shards import summarize_splits
from seglab.evaluate.sliding import SlidingWindow
from seglab.evaluate.tta import Transform, select_transforms
from seglab.metrics import ConfusionMatrix
from seglab.records import TrainRecord

__all__ = [
    "GRID_IMAGES",
    "IMAGE_SUFFIXES",
    "EvalTarget",
    "EvaluationPass",
    "TracedPredictor",
    "TrainedModel",
    "VariantResult",
    "check_classes",
    "eval_dataset",
    "eval_target",
    "evaluate_predictors",
    "inference_function",
    "inference_graph_options",
    "load_trained",
    "measure_latency",
    "plain_and_tta",
    "sliding_window",
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


@dataclass(frozen=True)
class EvalTarget:
    """The split an evaluation scores: its shard root, name, dataset (the rows' source) and classes."""

    data: Path
    split: str
    dataset: str
    classes: list[str]
    class_set: str | None
    images: int

    def describe(self) -> str:
        return f"the '{self.split}' shards in {self.data} (dataset {self.dataset})"


# The file endings taken for images where a folder is searched (here, and by `seglab predict`).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def _looks_like_a_dataset(folder: Path) -> bool:
    """COCO's annotations/ or image files in the folder or one level down: a dataset that is not sharded."""
    if (folder / "annotations").is_dir():
        return True
    for level in (folder, *(d for d in folder.iterdir() if d.is_dir())):
        if any(f.suffix.lower() in IMAGE_SUFFIXES for f in level.iterdir() if f.is_file()):
            return True
    return False


def eval_target(data: str | Path, split: str) -> EvalTarget:
    """`split` of the shard root `data`, checked to be shards (module doc)."""
    data = Path(data)
    if not SPLIT_NAME.fullmatch(split):
        raise ValueError(f"split {split!r}: a split name uses only letters, digits, '_' and '-'")
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: no such folder; --data / evaluate.data names a shard root "
                                "(<split>/part-*.parquet with manifest.json), e.g. data/shards")
    split_dir = data / split
    if not (split_dir / "manifest.json").is_file() and not any(split_dir.glob("part-*.parquet")):
        splits = sorted(d.name for d in data.iterdir() if (d / "manifest.json").is_file())
        if splits:
            raise FileNotFoundError(f"{data}: no split {split!r} in these shards; they hold {splits}")
        if _looks_like_a_dataset(data):
            raise ValueError(
                f"{data} is a dataset root, not shards: evaluation reads shards, which carry the class list "
                "a model is checked against. Shard it first with the one shard stage: in a copy of "
                f"params.yaml set data.root: {data} (and data.format, data.splits, data.labelmaps for images + "
                "label maps, docs/labelmaps.md) and shard.out: a new folder, run `seglab --params THAT_FILE "
                "shard`, then pass that folder as --data")
        raise FileNotFoundError(f"{data}: no seglab shards there (<split>/part-*.parquet with manifest.json); "
                                "build them with `seglab shard`")
    summary = summarize_splits(data, [split])  # the manifest check: a missing or changed part is named
    return EvalTarget(data, split, summary.dataset, list(summary.classes), summary.class_set, summary.rows[split])


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


def _check_finite(probabilities: np.ndarray, variant: str, where: str) -> None:
    if not np.all(np.isfinite(probabilities)):
        raise ValueError(f"{variant}: the model produced NaN or infinite probabilities on {where}; "
                         "the checkpoint is broken (diverged training?)")


@contextlib.contextmanager
def inference_graph_options() -> Iterator[None]:
    """Grappler's rewrites off for the block where no GPU is visible (module doc), then as they were.

    TensorFlow reads the setting when a traced graph is first run, so the block holds the first calls.
    """
    if tf.config.list_physical_devices("GPU"):  # not measured there: TensorFlow's default (rewrites on) stays
        yield
        return
    before = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": before})


def inference_function(predictor: keras.Model, image_shape: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
    """`predictor` in inference mode as one graph for batches of any size of `image_shape` images.

    `predict_on_batch` traces a graph per input shape: the evaluation batch and the latency's batch
    of one would each be traced, for the plain and the TTA model, and tracing takes most of an
    evaluate stage's time at the CPU profile.
    """
    spec = tf.TensorSpec((None, *image_shape), tf.float32)
    graph = tf.function(lambda images: predictor(images, training=False), input_signature=[spec], autograph=False)
    return lambda images: graph(tf.convert_to_tensor(images, tf.float32)).numpy()


class TracedPredictor:
    """A predictor on one traced graph: images (B, H, W, 3) -> probabilities (B, H, W, C) as numpy, any B.

    `graph`: the segmenter's softmax as a traced function. With `transforms` (TTA), the views of the
    images go through `graph` as one batch and are inverted and merged here (eagerly: a handful of
    operations per call, and no second graph to trace). `base`: a predictor on the same graph whose
    probabilities are the identity view (`plain_and_tta`): called alone, the TTA runs it; `given`
    takes probabilities it already gave.
    """

    def __init__(self, graph: Callable[[tf.Tensor], tf.Tensor], name: str,
                 transforms: Sequence[Transform] | None = None, base: TracedPredictor | None = None):
        if base is not None and not any(t.name == "identity" for t in transforms or ()):
            raise ValueError(f"{name}: only a TTA with the identity view takes a base predictor's probabilities")
        self.graph, self.name, self.transforms, self.base = graph, name, transforms, base

    @property
    def tta_transforms(self) -> list[str] | None:
        """The names of the views merged (None for a plain predictor)."""
        return None if self.transforms is None else [t.name for t in self.transforms]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = tf.convert_to_tensor(images, tf.float32)
        if self.transforms is None:
            return self.graph(images).numpy()
        return self._merge(images, None if self.base is None else self.base.graph(images)).numpy()

    def given(self, images: np.ndarray, base_probabilities: np.ndarray) -> np.ndarray:
        """The probabilities of `images` from `base`'s probabilities of the same images."""
        if self.base is None:
            raise ValueError(f"{self.name}: takes no base predictor's probabilities")
        return self._merge(tf.convert_to_tensor(images, tf.float32),
                           tf.convert_to_tensor(base_probabilities, tf.float32)).numpy()

    def _merge(self, images: tf.Tensor, identity: tf.Tensor | None) -> tf.Tensor:
        # The views other than a given identity go through the graph as one batch; the running mean
        # over all of them in the transforms' order, as tta_model's: equal views come back unchanged.
        assert self.transforms is not None
        others = [t for t in self.transforms if identity is None or t.name != "identity"]
        views = self.graph(tf.concat([t.apply(images) for t in others], axis=0)) if others else None
        batch = int(images.shape[0])
        mean, computed = None, 0
        for count, transform in enumerate(self.transforms, start=1):
            if identity is not None and transform.name == "identity":
                view = identity
            else:
                view = transform.invert(views[computed * batch:(computed + 1) * batch])
                computed += 1
            mean = view if mean is None else mean + (view - mean) / float(count)
        return mean


def plain_and_tta(model: keras.Model, transform_names: Sequence[str],
                  on_non_square: str = "skip") -> dict[str, TracedPredictor]:
    """{"plain": softmax of `model`, "tta": the TTA merge of `transform_names`} on one trace of
    `model` (module doc). `model` returns logits (B, H, W, C) for a static input (H, W, 3).

    Where the views include the identity, the TTA takes it from the plain predictor (its `base`), so
    an evaluation that runs both computes it once."""
    height, width, channels = (int(d) for d in model.input_shape[1:])
    transforms = select_transforms(transform_names, (height, width), on_non_square)
    spec = tf.TensorSpec((None, height, width, channels), tf.float32)

    # No AutoGraph (as the data pipeline's functions): nothing here branches on tensors.
    @tf.function(input_signature=[spec], autograph=False)
    def probabilities(images):
        return tf.nn.softmax(tf.cast(model(images, training=False), tf.float32), axis=-1)

    plain = TracedPredictor(probabilities, f"{model.name}_probabilities")
    base = plain if any(t.name == "identity" for t in transforms) else None
    return {"plain": plain, "tta": TracedPredictor(probabilities, f"{model.name}_tta", transforms, base)}


def _bases(predictors: Mapping[str, Any]) -> dict[str, str]:
    """{variant: the earlier variant whose probabilities it takes} for the TracedPredictors whose
    `base` is listed before them; the others are called on the images alone."""
    bases, earlier = {}, {}
    for variant, predictor in predictors.items():
        base = predictor.base if isinstance(predictor, TracedPredictor) else None
        if base is not None and id(base) in earlier:
            bases[variant] = earlier[id(base)]
        earlier[id(predictor)] = variant
    return bases


def _call_variants(calls: Mapping[str, Any], bases: Mapping[str, str],
                   images: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, float]]]:
    """Every predictor's probabilities of `images`, a variant with a base (`_bases`) taking the base's,
    and the wall and CPU seconds of the calls each variant needed (its base's included)."""
    outputs: dict[str, np.ndarray] = {}
    spent: dict[str, tuple[float, float]] = {}
    for variant, call in calls.items():
        base = bases.get(variant)
        start, cpu_start = time.perf_counter(), time.process_time()
        outputs[variant] = call.given(images, outputs[base]) if base else call(images)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        if base:
            seconds, cpu_seconds = seconds + spent[base][0], cpu_seconds + spent[base][1]
        spent[variant] = (seconds, cpu_seconds)
    return outputs, spent


def evaluate_predictors(
    predictors: Mapping[str, keras.Model | TracedPredictor],
    dataset: Any,
    class_names: Sequence[str],
    *,
    latency_runs: int = 20,
    grid_images: int = GRID_IMAGES,
    sliding: SlidingWindow | None = None,
) -> EvaluationPass:
    """Run every predictor (images -> probabilities (B, H, W, C)) over `dataset`.

    Without `sliding`, `dataset` yields batches (images, labels) at the model's input size. With it,
    `dataset` yields one (image (H, W, 3), label (H, W)) at a time at any size (`stored_pairs`), and
    each image is predicted window by window (`SlidingWindow.predict`) and scored at that size.

    A Keras model is traced here (`inference_function`); a `TracedPredictor` is used as it is.

    `latency_runs`: the extra single-image calls timed without `sliding` (with it, every image's call
    is timed). Returns per predictor the confusion matrix, its throughput and latency (module doc) and its
    label maps for the first `grid_images` images (not-scored pixels set to 255).
    """
    if not predictors:
        raise ValueError("evaluate_predictors needs at least one predictor")
    with inference_graph_options():
        if sliding is not None:
            return _evaluate_windows(predictors, dataset, class_names, sliding, grid_images=grid_images)
        return _evaluate_batches(predictors, dataset, class_names, latency_runs=latency_runs, grid_images=grid_images)


def _evaluate_batches(
    predictors: Mapping[str, keras.Model | TracedPredictor],
    dataset: Any,
    class_names: Sequence[str],
    *,
    latency_runs: int,
    grid_images: int,
) -> EvaluationPass:
    """`evaluate_predictors` for batches letterboxed to the model's input size."""
    num_classes = len(class_names)
    results = {variant: VariantResult(variant, ConfusionMatrix(num_classes, IGNORE_INDEX, class_names))
               for variant in predictors}
    grid_inputs: list[np.ndarray] = []
    grid_truths: list[np.ndarray] = []
    batch_size = None
    images_seen = 0
    first_image = None
    calls: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    bases = _bases(predictors)
    for batch_index, (images, labels) in enumerate(dataset):
        images, labels = np.asarray(images, np.float32), np.asarray(labels)
        real = images.shape[0]
        if batch_size is None:
            batch_size = real
            first_image = images[:1].copy()
            calls = {variant: predictor if isinstance(predictor, TracedPredictor)
                     else inference_function(predictor, images.shape[1:]) for variant, predictor in predictors.items()}
            _call_variants(calls, bases, images)  # warm-up: tracing is not inference time
        if real < batch_size:  # pad to the traced batch shape; the padding is dropped below
            images = np.concatenate([images, np.zeros((batch_size - real, *images.shape[1:]), images.dtype)])
        scored = labels != IGNORE_INDEX
        take = max(0, min(grid_images - len(grid_inputs), real))
        grid_inputs += [images[i].astype(np.uint8) for i in range(take)]
        grid_truths += [labels[i].astype(np.uint8) for i in range(take)]
        outputs, spent = _call_variants(calls, bases, images)
        for variant, probabilities in outputs.items():
            results[variant].predict_seconds += spent[variant][0]
            results[variant].predict_cpu_seconds += spent[variant][1]
            _check_finite(probabilities[:real], variant, f"batch {batch_index}")
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


def _evaluate_windows(
    predictors: Mapping[str, keras.Model | TracedPredictor],
    dataset: Any,
    class_names: Sequence[str],
    sliding: SlidingWindow,
    *,
    grid_images: int,
) -> EvaluationPass:
    """`evaluate_predictors` for whole images at their stored size, predicted window by window."""
    num_classes = len(class_names)
    results = {variant: VariantResult(variant, ConfusionMatrix(num_classes, IGNORE_INDEX, class_names))
               for variant in predictors}
    calls = {variant: predictor if isinstance(predictor, TracedPredictor)
             else inference_function(predictor, (*sliding.window, 3)) for variant, predictor in predictors.items()}
    bases = _bases(predictors)
    grid_inputs: list[np.ndarray] = []
    grid_truths: list[np.ndarray] = []
    latency_ms: dict[str, list[float]] = {variant: [] for variant in predictors}
    images_seen = 0
    for index, (image, label) in enumerate(dataset):
        image, label = np.asarray(image, np.float32), np.asarray(label)
        if image.ndim != 3 or label.shape != image.shape[:2]:
            raise ValueError(f"full-resolution evaluation takes one (H, W, 3) image and its (H, W) label at a "
                             f"time, got {image.shape} and {label.shape}")
        scored = label != IGNORE_INDEX
        shown_in_grid = len(grid_inputs) < grid_images
        if shown_in_grid:
            grid_inputs.append(image.astype(np.uint8))
            grid_truths.append(label.astype(np.uint8))
        # A variant's time: the image's resize and windows (shared), the model calls it needed (a
        # base's included) and its own merge.
        start, cpu_start = time.perf_counter(), time.process_time()
        tiling = sliding.tile([image])
        tiled = (time.perf_counter() - start, time.process_time() - cpu_start)
        if index == 0:  # tracing is not inference time: the first image's first windows, untimed
            _call_variants(calls, bases, tiling.batches[0])
        called = [_call_variants(calls, bases, windows) for windows in tiling.batches]
        for variant in calls:
            start, cpu_start = time.perf_counter(), time.process_time()
            probabilities = tiling.merge([outputs[variant] for outputs, _ in called])[0]
            seconds = tiled[0] + sum(spent[variant][0] for _, spent in called) + time.perf_counter() - start
            results[variant].predict_seconds += seconds
            results[variant].predict_cpu_seconds += (tiled[1] + sum(spent[variant][1] for _, spent in called)
                                                     + time.process_time() - cpu_start)
            latency_ms[variant].append(1000.0 * seconds)
            _check_finite(probabilities, variant, f"image {index}")
            results[variant].timed_images += 1
            predicted = np.argmax(probabilities, axis=-1)
            results[variant].confusion.update(label, predicted)
            if shown_in_grid:
                results[variant].grid_predictions.append(np.where(scored, predicted, IGNORE_INDEX).astype(np.uint8))
        images_seen += 1
    if images_seen == 0:
        raise ValueError("the evaluation dataset yielded no images")

    for variant, timings in latency_ms.items():  # one call per image (module doc)
        results[variant].latency_ms = np.asarray(timings)
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


def sliding_window(cfg: Any, image_shape: tuple[int, int]) -> SlidingWindow | None:
    """The full-resolution protocol for a model of input `image_shape`, or None for `letterbox`.

    Every protocol key is read whichever protocol is chosen, so the stages that take them list
    them all (dvc.yaml) and a change to any reruns them.
    """
    settings = cfg.evaluate
    protocol, scale, overlap, batch_size = settings.protocol, settings.scale, settings.overlap, settings.batch_size
    if protocol == "letterbox":
        return None
    return SlidingWindow(tuple(image_shape), overlap, scale, batch_size)


def eval_dataset(cfg: Any, target: EvalTarget, image_shape: tuple[int, int],
                 sliding: SlidingWindow | None = None) -> Any:
    """The target split as the evaluation reads it, in order: whole images at their stored size for
    the sliding window, else batches letterboxed to `image_shape`. Neither draws anything at
    random (no shuffle, no crop), so no seed is read."""
    if sliding is not None:
        return stored_pairs(target.data, target.split)
    return make_dataset(
        target.data, target.split,
        image_size=image_shape,
        batch_size=cfg.evaluate.batch_size,
        training=False,  # letterbox, no shuffle, keep the last partial batch
        deterministic=True,
    )
