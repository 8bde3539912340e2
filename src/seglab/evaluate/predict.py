"""Predict on new images: a trained model's label map and colour overlay per image, at its own resolution.

`seglab predict MODEL IMAGES... --out DIR` is `run_predict`; the dashboard's upload calls the same
`predict_images` with a cached `Segmenter`.

- **Model**: ``<train.out>/<MODEL>/{model.keras, train.json}``, read and checked as `seglab evaluate`
  reads it (`load_trained`); the class names are train.json's.
- **Predictor**: the evaluation's full-resolution one (`seglab.evaluate.sliding`, README "Evaluation
  protocol"): each image is scaled by ``evaluate.scale``, covered by windows of the model's input
  size overlapping by ``evaluate.overlap``, their softmax averaged and resized back to the image's
  size; the label map is the argmax. With TTA (``predict.tta``, ``--tta``) each window's
  ``evaluate.tta`` views are merged (`plain_and_tta`), as in the evaluation's TTA variant; the
  report records the views (``tta``, null without). Windows of several images share the model
  calls, ``evaluate.batch_size`` windows per call (`SlidingWindow.predict_many`); up to that many
  images, and at most `GROUP_PIXELS` pixels unless one image is larger, are held at a time.
- **Inputs**: image files and folders. A folder gives its files with an image ending
  (`IMAGE_SUFFIXES`, any case) in name order; its other files and sub-folders are not searched and
  are listed as skipped. A file named on its own is tried whatever its ending. Symbolic links are
  followed; a file reached twice (named again, through a link or a folder) is predicted once.
- **Reading**: as the shard stage reads images (`seglab.data.coco.decode_image`): any PIL mode to
  RGB, EXIF orientation applied (the upright image, as viewers show it), more than
  `seglab.data.coco.MAX_IMAGE_PIXELS` pixels refused.
- **Outputs** in ``--out``, for an input ``<stem>.<ext>``: ``<stem>_labels.png``, the label map
  (8-bit greyscale PNG, one class index per pixel, the image's height and width) and
  ``<stem>_overlay.png``, the image blended with the class colours (`seglab.data.palette`; the
  colour's share is ``predict.overlay_alpha``) at its own resolution, with a legend of the classes
  present (colour, name, share of pixels) to its right. Both files of an image are written
  atomically and together: an image either has both, as predicted now, or keeps what it had.
- **Bad input** never stops the others: each failed file is reported with one of `ERRORS` and a
  message naming the file and what was expected. A clash of output names (``a.jpg`` and ``a.png``)
  is an error for the later input. Nothing is written for a failed image.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from seglab.atomic import atomic_path
from seglab.data.coco import DataError, decode_image, encode_png
from seglab.data.palette import label_palette
from seglab.evaluate.inference import (
    IMAGE_SUFFIXES,
    TracedPredictor,
    TrainedModel,
    _check_finite,
    inference_graph_options,
    load_trained,
    plain_and_tta,
)
from seglab.evaluate.sliding import SlidingWindow

log = logging.getLogger(__name__)

__all__ = [
    "ERRORS",
    "GROUP_PIXELS",
    "LABELS_SUFFIX",
    "OVERLAY_SUFFIX",
    "FileError",
    "Predicted",
    "PredictReport",
    "Segmenter",
    "class_pixels",
    "legend_entries",
    "list_inputs",
    "load_segmenter",
    "overlay_with_legend",
    "predict_images",
    "read_image",
    "run_predict",
]

ERRORS = {
    "missing image file": "no file at that path (or a link to nothing)",
    "not an image": "no image format recognised in the file",
    "unreadable image": "an image file that cannot be decoded (corrupt or truncated)",
    "image too large": "more pixels than seglab.data.coco.MAX_IMAGE_PIXELS",
    "unreadable folder": "a folder whose files cannot be listed",
    "output name clash": "another input (or an input itself) has the output's name",
    "write failed": "the outputs could not be written",
}
# Images decoded and predicted together hold about 20 bytes per pixel and class-probability
# channel; this bounds a group, not an image (a single larger one still runs alone).
GROUP_PIXELS = 16_000_000
LABELS_SUFFIX, OVERLAY_SUFFIX = "_labels.png", "_overlay.png"


@dataclass(frozen=True)
class FileError:
    file: str
    error: str  # one of ERRORS
    message: str


@dataclass(frozen=True)
class Predicted:
    """One image's outputs: its size and the pixels per class present (label order)."""

    file: str
    labels: str
    overlay: str
    height: int
    width: int
    classes: dict[str, int]


@dataclass
class PredictReport:
    model: str
    out: str
    tta: list[str] | None
    scale: float | str
    overlap: float
    written: list[Predicted] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    errors: list[FileError] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What `seglab predict` prints (JSON)."""
        return {"model": self.model, "out": self.out, "tta": self.tta, "scale": self.scale, "overlap": self.overlap,
                "images": len(self.written), "failed": len(self.errors),
                "written": [asdict(p) for p in self.written], "skipped": self.skipped,
                "errors": [asdict(e) for e in self.errors]}


# ------------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class Segmenter:
    """A trained model ready to segment whole images at their own resolution (module doc)."""

    trained: TrainedModel
    sliding: SlidingWindow
    predictor: TracedPredictor

    @property
    def classes(self) -> list[str]:
        return self.trained.classes

    @property
    def tta(self) -> list[str] | None:
        """The TTA views merged, or None for the plain softmax."""
        return self.predictor.tta_transforms

    def label_maps(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(H, W) uint8 class indices for each (H, W, 3) image, at its size."""
        maps = []
        with inference_graph_options():
            for index, probabilities in enumerate(self.sliding.predict_many(self.predictor, images)):
                _check_finite(probabilities, self.trained.name, f"image {index} of a batch to predict")
                maps.append(np.argmax(probabilities, axis=-1).astype(np.uint8))
        return maps


def load_segmenter(cfg: Any, name: str, *, tta: bool | None = None, models_dir: str | Path | None = None) -> Segmenter:
    """`name` from `models_dir` (default train.out) with the evaluate protocol's sliding window, and
    its TTA views if `tta` (default predict.tta)."""
    trained = load_trained(cfg.train.out if models_dir is None else models_dir, name)
    if len(trained.classes) > 255:  # 255 is no class in seglab's uint8 label maps
        raise ValueError(f"{trained.directory / 'train.json'}: {len(trained.classes)} classes do not fit an "
                         "8-bit label map (at most 255)")
    settings = cfg.evaluate
    use_tta = cfg.predict.tta if tta is None else tta
    predictors = plain_and_tta(trained.model, settings.tta)
    sliding = SlidingWindow(trained.image_shape, settings.overlap, settings.scale, settings.batch_size)
    return Segmenter(trained, sliding, predictors["tta" if use_tta else "plain"])


# ------------------------------------------------------------------------------------------ inputs


def _not_a_file(path: Path) -> FileError | None:
    """Why `path` cannot be read as an image file before opening it, or None."""
    if path.is_file():
        return None
    if not path.exists():
        link = " (a symbolic link to nothing)" if path.is_symlink() else ""
        return FileError(str(path), "missing image file",
                         f"{path}: no such file or folder{link}; expected an image file or a folder of them")
    return FileError(str(path), "not an image", f"{path}: not a regular file; expected an image file")


def list_inputs(paths: Iterable[str | Path], out: str | Path) -> tuple[list[Path], list[dict[str, str]], list[FileError]]:
    """The image files to predict, in order; what was skipped (with why); inputs that are errors
    before any reading (missing, not a file, an unlistable folder, an output name clash)."""
    out = Path(out)
    images: list[Path] = []
    skipped: list[dict[str, str]] = []
    errors: list[FileError] = []
    seen: dict[Path, Path] = {}  # resolved file -> the input that named it first
    stems: dict[str, Path] = {}

    def take(path: Path) -> None:
        problem = _not_a_file(path)
        if problem is not None:
            errors.append(problem)
            return
        real = path.resolve()
        if real in seen:
            skipped.append({"file": str(path), "reason": f"the same file as {seen[real]}"})
            return
        seen[real] = path
        if path.stem in stems:
            errors.append(FileError(str(path), "output name clash",
                                    f"{path}: its outputs {path.stem}{LABELS_SUFFIX} and {path.stem}{OVERLAY_SUFFIX} "
                                    f"in {out} would replace those of {stems[path.stem]}; rename one or predict them "
                                    "into separate --out folders"))
            return
        stems[path.stem] = path
        images.append(path)

    for given in map(Path, paths):
        if not given.is_dir():
            take(given)
            continue
        try:
            entries = sorted(given.iterdir(), key=lambda p: p.name)
        except OSError as e:
            errors.append(FileError(str(given), "unreadable folder", f"{given}: cannot list the folder: {e}"))
            continue
        found = 0
        for entry in entries:
            if entry.is_dir():
                skipped.append({"file": str(entry), "reason": "a sub-folder (a folder gives its own files only)"})
            elif entry.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append({"file": str(entry), "reason": "not an image file ending (expected one of "
                                                              f"{', '.join(sorted(IMAGE_SUFFIXES))})"})
            else:
                found += 1
                take(entry)
        if not found:
            skipped.append({"file": str(given), "reason": "a folder without image files"})
    # An output must never replace an input (an --out that is an input folder holding a file named
    # like another image's output).
    for path in list(images):
        for suffix in (LABELS_SUFFIX, OVERLAY_SUFFIX):
            target = (out / f"{path.stem}{suffix}").resolve()
            if target in seen:
                images.remove(path)
                errors.append(FileError(str(path), "output name clash",
                                        f"{path}: its output {target} is the input {seen[target]}; choose another --out"))
                break
    return images, skipped, errors


def read_image(path: Path) -> np.ndarray:
    """uint8 RGB (H, W, 3) of an image file (module doc, "Reading"); `DataError` with one of `ERRORS`
    as its rule."""
    try:
        return decode_image(path, None, "image to predict")
    except DataError as e:
        # decode_image counts a file PIL cannot identify as unreadable, as the shard stage's rules do;
        # here it is the user's most likely mistake, so it gets its own name.
        if isinstance(e.__context__, UnidentifiedImageError):
            size = path.stat().st_size if path.is_file() else 0
            raise DataError(f"{path} is not an image: no image format recognised in its {size:,} bytes (expected "
                            "an image file such as JPEG or PNG)", rule="not an image") from None
        raise


# ------------------------------------------------------------------------------------------ outputs


def class_pixels(label: np.ndarray, classes: Sequence[str]) -> dict[str, int]:
    """Pixels per class present in a predicted label map, in label order."""
    counts = np.bincount(np.asarray(label).ravel(), minlength=len(classes))
    return {classes[v]: int(counts[v]) for v in np.flatnonzero(counts)}


def legend_entries(pixels: dict[str, int], classes: Sequence[str]) -> list[tuple[int, str]]:
    """(label value, "name  share") for each class in `pixels` (`class_pixels`): what a legend shows
    beside the class colour (`seglab.data.palette`)."""
    total = sum(pixels.values())
    entries = []
    for name, count in pixels.items():
        share = count / total
        # A class on a handful of pixels is present, not "0.0%".
        entries.append((classes.index(name), f"{name}  {share:.1%}" if share >= 0.0005 else f"{name}  <0.1%"))
    return entries


def overlay_with_legend(image: np.ndarray, label: np.ndarray, classes: Sequence[str], alpha: float) -> np.ndarray:
    """uint8 RGB: `image` blended with the class colours of `label` (the colour's share `alpha`),
    unchanged in size at the top left, and the legend of the classes present to its right (colour,
    name, share of pixels) on white."""
    image, label = np.asarray(image), np.asarray(label)
    if image.shape[:2] != label.shape:
        raise ValueError(f"overlay: image {image.shape} and label map {label.shape} differ in size")
    colours = label_palette()
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours[label].astype(np.float32)
    overlay = np.clip(np.rint(blended), 0, 255).astype(np.uint8)

    height, width = label.shape
    entries = legend_entries(class_pixels(label, classes), classes)
    # Text about 1/40 of the image's longer side, readable from a thumbnail up to a photo.
    size = int(np.clip(round(max(height, width) / 40), 12, 64))
    font = ImageFont.load_default(size=size)
    line, pad, swatch = round(size * 1.5), size // 2 + 2, size
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(int(measure.textlength(text, font=font)) for _, text in entries)
    panel_w = pad + swatch + pad + text_width + pad
    panel_h = pad + line * len(entries) + pad
    canvas = Image.new("RGB", (width + panel_w, max(height, panel_h)), (255, 255, 255))
    canvas.paste(Image.fromarray(overlay), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (value, text) in enumerate(entries):
        top = pad + row * line
        left = width + pad
        draw.rectangle([left, top, left + swatch, top + swatch], fill=tuple(int(c) for c in colours[value]),
                       outline=(0, 0, 0))
        draw.text((left + swatch + pad, top), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def _write_outputs(out: Path, path: Path, image: np.ndarray, label: np.ndarray, classes: Sequence[str],
                   alpha: float) -> Predicted:
    labels_path, overlay_path = out / f"{path.stem}{LABELS_SUFFIX}", out / f"{path.stem}{OVERLAY_SUFFIX}"
    labels_png = encode_png(label)
    overlay_png = encode_png(overlay_with_legend(image, label, classes, alpha))
    # Both temporary files exist before either is renamed: a failure leaves neither output new.
    with atomic_path(labels_path) as labels_tmp, atomic_path(overlay_path) as overlay_tmp:
        labels_tmp.write_bytes(labels_png)
        overlay_tmp.write_bytes(overlay_png)
    return Predicted(str(path), str(labels_path), str(overlay_path), int(label.shape[0]), int(label.shape[1]),
                     class_pixels(label, classes))


def _groups(paths: Sequence[Path], size: int, errors: list[FileError]) -> Iterator[list[tuple[Path, np.ndarray]]]:
    """Decoded images in groups of at most `size` and `GROUP_PIXELS` (a larger image alone); files
    that cannot be read go to `errors`."""
    group: list[tuple[Path, np.ndarray]] = []
    pixels = 0
    for path in paths:
        try:
            image = read_image(path)
        except DataError as e:
            errors.append(FileError(str(path), e.rule, str(e)))
            log.warning("%s", e)
            continue
        if group and (len(group) == size or pixels + image.shape[0] * image.shape[1] > GROUP_PIXELS):
            yield group
            group, pixels = [], 0
        group.append((path, image))
        pixels += image.shape[0] * image.shape[1]
    if group:
        yield group


def predict_images(segmenter: Segmenter, inputs: Iterable[str | Path], out: str | Path, *,
                   overlay_alpha: float) -> PredictReport:
    """Label map and overlay of every image in `inputs` (files or folders) into `out` (module doc)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a folder (it is created where missing)")
    if not 0 < overlay_alpha <= 1:
        raise ValueError(f"overlay_alpha must be in (0, 1], got {overlay_alpha}")
    paths, skipped, errors = list_inputs(inputs, out)
    report = PredictReport(segmenter.trained.name, str(out), segmenter.tta, segmenter.sliding.scale,
                           segmenter.sliding.overlap, skipped=skipped, errors=errors)
    if not paths and not errors:
        raise ValueError("no image to predict: " + "; ".join(f"{s['file']}: {s['reason']}" for s in skipped))
    for group in _groups(paths, segmenter.sliding.batch_size, report.errors):
        labels = segmenter.label_maps([image for _, image in group])
        for (path, image), label in zip(group, labels):
            try:
                report.written.append(_write_outputs(out, path, image, label, segmenter.classes, overlay_alpha))
            except OSError as e:
                report.errors.append(FileError(str(path), "write failed",
                                               f"{path}: writing its outputs into {out} failed: {e}"))
    log.info("predicted %d images with %s%s into %s; %d failed, %d skipped", len(report.written),
             segmenter.trained.name, f" (TTA {segmenter.tta})" if segmenter.tta else "", out,
             len(report.errors), len(report.skipped))
    return report


def run_predict(cfg: Any, name: str, inputs: Sequence[str | Path], out: str | Path, *,
                tta: bool | None = None) -> PredictReport:
    """`seglab predict NAME INPUTS... --out DIR [--tta | --no-tta]`: the model from train.out, the
    settings from params.yaml (evaluate.scale/overlap/batch_size/tta, predict.tta/overlay_alpha)."""
    segmenter = load_segmenter(cfg, name, tta=tta)
    log.info("predicting with %s (%d classes, input %s, scale %s, overlap %s, TTA %s)", name,
             len(segmenter.classes), segmenter.trained.image_shape, segmenter.sliding.scale,
             segmenter.sliding.overlap, segmenter.tta)
    return predict_images(segmenter, inputs, out, overlay_alpha=cfg.predict.overlay_alpha)
