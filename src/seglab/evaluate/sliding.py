"""Full-resolution evaluation: sliding-window inference over whole images at their stored size.

seglab's segmenters are built for one static input size (the training crops'), so a whole image is
predicted window by window (`evaluate.protocol: full`; README, "Evaluation protocol"):

1. **Scale.** The stored image (H, W) is resized by a factor s to (round(H s), round(W s)),
   bilinearly (antialiased when shrinking, as the input pipeline does). ``evaluate.scale: cover``
   takes, per image, the scale training's crops have: s = max(h / H, w / W) for the model's input
   (h, w), so the windows just cover the image's shorter side and objects appear at the size the
   model learned them. A number is a fixed factor (1.0: the stored resolution; 0.5 for a model
   trained on half-resolution crops).
2. **Windows.** Windows of the model's input size. Along an axis of length L >= w there are
   n = ceil((L - w) / floor(w (1 - overlap))) + 1 of them, spread evenly from 0 to L - w (starts
   rounded), so neighbours share at least ``evaluate.overlap`` of a side and the last one ends on the
   edge. An axis shorter than a window is padded at its end (bottom, right) to one window with 0,
   the value training's and the letterbox's padding use; predictions on the padding are dropped.
3. **Merge.** Each window's probabilities (the softmax, or the TTA merge of the views of that
   window: TTA runs per window) are summed into a canvas; a pixel's probabilities are the mean over
   the windows that cover it.
4. **Back to the label map.** Where s != 1 the mean probabilities are resized to (H, W) (bilinear,
   antialiased when shrinking); their argmax is compared with the stored label map pixel for pixel,
   and pixels labelled 255 (void, ignore) are not counted.

Windows go through the model `batch_size` at a time (one image's windows per call or calls; with
`predict_many` the windows of several images share the calls); a traced predictor takes any batch
size, so this never retraces. Steps 1-2 (`SlidingWindow.tile`) and 3-4 (`Tiling.merge`) are apart,
so predictors that score the same images (the evaluation's plain and TTA) share one resize and cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

__all__ = ["SlidingWindow", "Tiling", "window_starts"]

Predict = Callable[[np.ndarray], np.ndarray]


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets of the windows along one axis (module doc, step 2); [0] where one window covers it.

    `length` must be at least `window` (shorter axes are padded to one window first).
    """
    if window < 1 or length < window:
        raise ValueError(f"window_starts: need 1 <= window <= length, got window {window}, length {length}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    slack = length - window
    if slack == 0:
        return [0]
    stride = max(1, math.floor(window * (1 - overlap)))
    count = math.ceil(slack / stride) + 1
    return [round(i * slack / (count - 1)) for i in range(count)]


def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) float32 -> `size`, bilinear with half-pixel centres, antialiased when an axis shrinks."""
    shrinks = size[0] < array.shape[0] or size[1] < array.shape[1]
    return tf.image.resize(array, size, method="bilinear", antialias=shrinks).numpy()


@dataclass(frozen=True)
class SlidingWindow:
    """The full-resolution protocol for one model input size (module doc)."""

    window: tuple[int, int]  # the model's input (height, width)
    overlap: float
    scale: float | str       # "cover" or a factor
    batch_size: int = 8

    def __post_init__(self) -> None:
        if len(self.window) != 2 or min(self.window) < 1:
            raise ValueError(f"window must be (height, width) with positive sides, got {self.window}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.scale != "cover" and not (isinstance(self.scale, (int, float)) and self.scale > 0):
            raise ValueError(f"scale must be 'cover' or a positive factor, got {self.scale!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def scale_for(self, height: int, width: int) -> float:
        """The factor an image of the stored size (height, width) is resized by."""
        if self.scale == "cover":
            return max(self.window[0] / height, self.window[1] / width)
        return float(self.scale)

    def scaled_size(self, height: int, width: int) -> tuple[int, int]:
        factor = self.scale_for(height, width)
        if factor == 1.0:
            return height, width
        return max(1, round(height * factor)), max(1, round(width * factor))

    def corners(self, height: int, width: int) -> list[tuple[int, int]]:
        """(top, left) of every window over a scaled image of (height, width), padded to a window."""
        padded_h, padded_w = max(height, self.window[0]), max(width, self.window[1])
        return [(top, left) for top in window_starts(padded_h, self.window[0], self.overlap)
                for left in window_starts(padded_w, self.window[1], self.overlap)]

    def predict(self, predict: Predict, image: np.ndarray) -> np.ndarray:
        """Mean probabilities (H, W, C) float32 of `predict` (window batch (B, h, w, 3) ->
        probabilities (B, h, w, C)) over the windows of `image` (H, W, 3) at its stored size."""
        return self.predict_many(predict, [image])[0]

    def predict_many(self, predict: Predict, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """`predict` for several images of any sizes: their windows (all of the model's input size)
        go through `predict` together, `batch_size` at a time, so small images that make one or two
        windows each still fill a batch. Each image gets the same windows and merge as alone, and a
        single image is called in exactly the chunks `predict` used before."""
        tiling = self.tile(images)
        return tiling.merge([predict(windows) for windows in tiling.batches])

    def tile(self, images: Sequence[np.ndarray]) -> Tiling:
        """The windows of `images` (steps 1-2), in the batches `predict_many` calls; `Tiling.merge`
        does steps 3-4 for each predictor's probabilities of those batches, so several predictors
        share one resize and cut."""
        window_h, window_w = self.window
        canvases, sizes, jobs = [], [], []
        for index, image in enumerate(images):
            image = np.asarray(image, np.float32)
            if image.ndim != 3:
                raise ValueError(f"SlidingWindow.predict takes (H, W, 3) images, got shape {image.shape}")
            height, width = image.shape[:2]
            scaled_h, scaled_w = self.scaled_size(height, width)
            scaled = image if (scaled_h, scaled_w) == (height, width) else np.clip(
                _resize(image, (scaled_h, scaled_w)), 0.0, 255.0)  # float rounding may overshoot 255
            padded_h, padded_w = max(scaled_h, window_h), max(scaled_w, window_w)
            if (padded_h, padded_w) != (scaled_h, scaled_w):
                canvas = np.zeros((padded_h, padded_w, image.shape[2]), np.float32)
                canvas[:scaled_h, :scaled_w] = scaled
                scaled = canvas
            canvases.append(scaled)
            sizes.append(((height, width), (scaled_h, scaled_w)))
            jobs += [(index, top, left) for top, left in self.corners(scaled_h, scaled_w)]
        chunks = [jobs[first:first + self.batch_size] for first in range(0, len(jobs), self.batch_size)]
        batches = [np.stack([canvases[i][top:top + window_h, left:left + window_w] for i, top, left in chunk])
                   for chunk in chunks]
        return Tiling(self.window, [canvas.shape[:2] for canvas in canvases], sizes, chunks, batches)

    def describe(self) -> dict[str, object]:
        """The protocol's settings, as eval.json records them."""
        return {"window": list(self.window), "overlap": self.overlap, "scale": self.scale}


@dataclass(frozen=True)
class Tiling:
    """The windows of some images, cut by `SlidingWindow.tile`: `batches` go through a predictor and
    `merge` turns its probabilities of them into each image's mean probabilities at its stored size."""

    window: tuple[int, int]
    padded: list[tuple[int, int]]                               # each image's scaled, padded canvas
    sizes: list[tuple[tuple[int, int], tuple[int, int]]]        # (stored, scaled) (height, width)
    chunks: list[list[tuple[int, int, int]]]                    # (image, top, left) of each batch's windows
    batches: list[np.ndarray]                                   # (B, h, w, 3) windows

    def merge(self, probabilities: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each image's mean probabilities (H, W, C) float32 (module doc, steps 3-4) from a predictor's
        probabilities (B, h, w, C) of `batches`, in order."""
        window_h, window_w = self.window
        totals: list[np.ndarray | None] = [None] * len(self.padded)
        counts = [np.zeros((*shape, 1), np.float32) for shape in self.padded]
        for chunk, windows, batch in zip(self.chunks, self.batches, probabilities, strict=True):
            batch = np.asarray(batch, np.float32)
            if batch.shape[:3] != (len(chunk), window_h, window_w):
                raise ValueError(f"the predictor returned {batch.shape} for windows {windows.shape}; "
                                 "expected per-pixel probabilities (B, h, w, C)")
            for (i, top, left), window in zip(chunk, batch):
                if totals[i] is None:
                    totals[i] = np.zeros((*self.padded[i], batch.shape[-1]), np.float32)
                totals[i][top:top + window_h, left:left + window_w] += window
                counts[i][top:top + window_h, left:left + window_w] += 1.0
        means = []
        for total, count, ((height, width), (scaled_h, scaled_w)) in zip(totals, counts, self.sizes):
            assert total is not None  # every image has at least one window
            mean = total[:scaled_h, :scaled_w] / count[:scaled_h, :scaled_w]
            if (scaled_h, scaled_w) != (height, width):
                mean = _resize(mean, (height, width))
            means.append(mean)
        return means
