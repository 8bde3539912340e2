"""Images + label maps -> (image, label) records for the shard stage: the dataset format beside COCO.

Most segmentation sets ship an image folder and a label-map folder per split (CamVid's train /
trainannot, Pascal VOC's JPEGImages + SegmentationClass with an ImageSets list). The shard stage
(`seglab.data.shard_stage`) writes their pairs into the same shards as COCO's images, with the same
writer, schema and class-list metadata. Rules (params `data.splits`, `data.labelmaps`):

- Pairs: per split, the files of two folders matched by name, or the names a list file gives
  (`seglab.config.LabelMapLayout`). Pairs are sorted by name; `image_id` is a hash of the name, so an
  image keeps its id whatever else the folders hold.
- Label values: a label map is single-channel (greyscale, palette indices as stored, 16-bit); each
  stored value becomes a class index (`value_map`, identity by default) or 255 (`ignore`). Class
  indices are the positions in `classes`; class 0 is whatever the dataset puts there (VOC's
  background, CamVid's sky).
- The image is read as COCO's are (`seglab.data.coco.decode_image`: modes to RGB, EXIF orientation)
  and must have the label map's size.
- Bad records (an image without its label map or the reverse, a listed file that is missing, a name
  that escapes its folder (`../`, absolute, through a symlink) or is not UTF-8, two files with one
  pair name, a name listed twice or holding a NUL character, an unreadable or corrupt file, a label map that is not single-channel or holds a value
  the map does not cover, sizes that disagree, more than `MAX_IMAGE_PIXELS` pixels):
  `on_bad_record: error` raises `DataError` naming the file, the record and the rule; `skip` drops
  the pair and counts it by rule, as for COCO. A split with no usable pair is an error in either mode.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from seglab.config import LabelMapLayout, LabelMapsConfig
from seglab.data.classes import IGNORE_INDEX, ClassSet
from seglab.data.coco import MAX_IMAGE_PIXELS, DataError, decode_image, links_outside
from seglab.data.payloads import png_problem

# PIL modes that hold one integer per pixel. A palette image ('P') is read as its indices, which is
# how VOC stores classes; the palette is only for viewing.
LABEL_MAP_MODES = ("1", "L", "P", "I;16", "I;16L", "I;16B", "I")


@dataclass(frozen=True)
class LabelMapRules:
    """How stored label values become label values; stored with the shards (`seglab.label_rules`)."""

    value_map: dict[int, int]  # stored value -> class index, or 255 (ignore)
    min_train_area: int = 0


def labelmap_classes(settings: LabelMapsConfig, min_train_area: int = 0) -> tuple[ClassSet, LabelMapRules]:
    """The class set and label rules `data.labelmaps` describes."""
    value_map = (dict(settings.value_map) if settings.value_map is not None
                 else {i: i for i in range(len(settings.classes))})
    value_map |= {value: IGNORE_INDEX for value in settings.ignore}
    # No COCO category ids: the value map (in the label rules) says where each class comes from.
    class_set = ClassSet(name=settings.class_set, classes=tuple(settings.classes), category_ids=())
    return class_set, LabelMapRules(value_map=dict(sorted(value_map.items())), min_train_area=min_train_area)


@dataclass
class LabelMapTask:
    """One image and its label map, as a shard worker needs them."""

    image_id: int
    file_name: str  # the image's name in its folder
    path: Path
    label_path: Path
    split: str
    record: str  # human-readable location of the pair, for error messages

    def image_and_label(self, class_set: ClassSet, rules: LabelMapRules) -> tuple[np.ndarray, np.ndarray]:
        """The RGB image and its label map in label values. Runs in shard workers."""
        label = read_label_map(self.label_path, rules.value_map, self.record)
        image = decode_image(self.path, label.shape, self.record, expected_from="label map")
        return image, label


@dataclass
class LabelMapSplit:
    name: str
    location: Path  # the label folder or the list file: where the split's annotations are
    class_set: ClassSet
    tasks: list[LabelMapTask]
    skipped: Counter = field(default_factory=Counter)  # rule -> count
    skipped_records: list[str] = field(default_factory=list)


def pair_image_id(name: str) -> int:
    """A stable non-negative int64 id for the pair called `name` (its sha256, first 63 bits)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


def _is_utf8(name: str) -> bool:
    """Whether a file name can be stored as text (os.scandir returns undecodable bytes as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _folder_files(folder: Path, suffix: str | None) -> dict[str, list[str]]:
    """Pair name -> the file names in `folder` that carry it (more than one is ambiguous).

    The pair name is the file name without `suffix`, or without its extension when no suffix is
    given. Hidden files (.DS_Store) and sub-folders are not part of a dataset's listing."""
    names: dict[str, list[str]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or entry.is_dir():
                continue
            if suffix is None:
                key = os.path.splitext(entry.name)[0]
            elif entry.name.endswith(suffix) and len(entry.name) > len(suffix):
                key = entry.name[: -len(suffix)]
            else:
                continue
            names.setdefault(key, []).append(entry.name)
    return names


def _list_entries(path: Path) -> list[tuple[int, str]]:
    """(line number, pair name) for each non-blank line of a split list file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: split list file not found", "missing list file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: split list file is not UTF-8 text: {e}", "malformed list file") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def load_labelmap_split(
    root: str | Path,
    split: str,
    layout: LabelMapLayout,
    class_set: ClassSet,
    on_bad_record: Literal["error", "skip"] = "error",
) -> LabelMapSplit:
    """Pair one split's images with their label maps; return one task per usable pair.

    Checks what the listing can tell (pairs complete, names safe and unique); the files themselves
    are read by the workers (`LabelMapTask.image_and_label`)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found (data.root in params.yaml)")
    image_dir, label_dir = root / layout.images, root / layout.labels
    for kind, folder in (("image", image_dir), ("label map", label_dir)):
        if not folder.is_dir():
            raise DataError(f"{folder}: {kind} folder of split '{split}' not found (data.splits.{split})")
    skipped: Counter = Counter()
    skipped_records: list[str] = []

    def bad(record: str, rule: str, reason: str) -> None:
        if on_bad_record == "error":
            raise DataError(f"{record}: {reason} [rule: {rule}] (data.on_bad_record: skip skips such records)", rule)
        skipped[rule] += 1
        skipped_records.append(f"{record}: {reason}")

    # (pair name, image file name, label file name, where the pair was named)
    pairs: list[tuple[str, str, str, str]] = []
    if layout.list_file is not None:
        list_path = root / layout.list_file
        location = list_path
        seen: dict[str, int] = {}
        for line, name in _list_entries(list_path):
            where = f"{list_path}: line {line} ({name!r})"
            if "\x00" in name:  # no file can be called that; os calls would raise on it
                bad(where, "malformed list entry", f"{name!r} contains a NUL character")
                continue
            if name in seen:
                bad(where, "duplicate list entry", f"{name!r} is listed twice (first on line {seen[name]})")
                continue
            seen[name] = line
            pairs.append((name, name + layout.image_suffix, name + layout.label_suffix, where))
    else:
        location = label_dir
        images = _folder_files(image_dir, layout.image_suffix)
        labels = _folder_files(label_dir, layout.label_suffix)
        for name in sorted(images.keys() | labels.keys()):
            where = f"split '{split}' pair {name!r}"
            ambiguous = [(kind, folder, sorted(files[name])) for kind, folder, files in
                         (("images", image_dir, images), ("label maps", label_dir, labels))
                         if len(files.get(name, ())) > 1]
            if ambiguous:
                kind, folder, names = ambiguous[0]
                bad(where, "ambiguous pair name", f"{folder} holds {len(names)} {kind} named {name!r} "
                    f"({', '.join(names)}); give data.splits.{split}.image_suffix / label_suffix")
            elif name not in labels:
                bad(where, "image without label map", f"{image_dir / images[name][0]} has no label map "
                    f"{name}{layout.label_suffix or '.*'} in {label_dir}")
            elif name not in images:
                bad(where, "label map without image", f"{label_dir / labels[name][0]} has no image "
                    f"{name}{layout.image_suffix or '.*'} in {image_dir}")
            else:
                pairs.append((name, images[name][0], labels[name][0], where))

    tasks: list[LabelMapTask] = []
    ids: dict[int, str] = {}
    folders = ((image_dir, os.path.realpath(image_dir)), (label_dir, os.path.realpath(label_dir)))
    for name, image_name, label_name, where in sorted(pairs):
        undecodable = [file for file in (image_name, label_name) if not _is_utf8(file)]
        if undecodable:
            bad(where, "file name not UTF-8", f"file name {undecodable[0]!r} is not UTF-8")
            continue
        paths = [folder / file for (folder, _), file in zip(folders, (image_name, label_name))]
        escaping = [(path, folder) for path, (folder, real), file in zip(paths, folders, (image_name, label_name))
                    if links_outside(real, path, file)]
        if escaping:
            path, folder = escaping[0]
            bad(where, "file name escapes the folder",
                f"{path} resolves to {os.path.realpath(path)}, outside {folder} (by '..', an absolute name or a symlink)")
            continue
        if not paths[0].is_file():
            bad(where, "missing image file", f"image file {paths[0]} not found")
            continue
        if not paths[1].is_file():
            bad(where, "image without label map", f"label map {paths[1]} not found")
            continue
        image_id = pair_image_id(name)
        if image_id in ids:  # 63 bits of sha256: never seen, but a silent merge would be worse
            raise DataError(f"{where}: image id {image_id} collides with pair {ids[image_id]!r}", "duplicate image id")
        ids[image_id] = name
        record = f"{where}: {layout.images}/{image_name} + {layout.labels}/{label_name}"
        tasks.append(LabelMapTask(image_id, image_name, paths[0], paths[1], split, record))
    if not tasks:
        # Written out, an empty split would replace good shards with an empty folder.
        raise DataError(f"{location}: split '{split}' has no usable image + label map pair ({len(pairs)} paired, "
                        f"{sum(skipped.values())} bad records skipped; pairs are matched within the folders "
                        "themselves, not their sub-folders); refusing to write an empty split", "empty split")
    return LabelMapSplit(split, location, class_set, tasks, skipped, skipped_records)


def read_label_map(path: Path, value_map: dict[int, int], record: str) -> np.ndarray:
    """Read a label-map file and map its stored values to label values (uint8, 255 ignore)."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise DataError(f"{record}: label map {path} is {im.height}x{im.width} (HxW), over the "
                                f"{MAX_IMAGE_PIXELS:,}-pixel limit (seglab.data.coco.MAX_IMAGE_PIXELS)",
                                rule="image too large")
            if im.mode not in LABEL_MAP_MODES:
                raise DataError(f"{record}: label map {path} has mode {im.mode}; expected one value per pixel "
                                f"(PIL modes {', '.join(LABEL_MAP_MODES)}), not colours", rule="label map not single-channel")
            # A flipped bit in a PNG's pixel data can still inflate, into wrong classes: check the CRCs.
            problem = png_problem(data) if im.format == "PNG" else None
            if problem is not None:
                raise DataError(f"{record}: label map {path} is corrupt: {problem}", rule="unreadable label map")
            im.load()
            stored = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"{record}: label map {path} not found", rule="image without label map") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{record}: label map {path}: {e}", rule="image too large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{record}: label map {path} is not a readable image (corrupt or truncated): {e}",
                        rule="unreadable label map") from None
    return map_label_values(stored, value_map, f"{record}: label map {path}")


def map_label_values(stored: np.ndarray, value_map: dict[int, int], where: str) -> np.ndarray:
    """`stored` values -> label values through `value_map`; a value it lacks is a DataError."""
    if stored.dtype == np.bool_:  # PIL mode '1' (its True bytes are 255: a view would read 255, not 1)
        stored = stored.astype(np.uint8)
    if stored.dtype.kind == "u" and stored.dtype.itemsize <= 2:
        # A lookup table indexed by the stored value: linear time, where np.unique would sort (3x slower).
        counts = np.bincount(stored.ravel())
        values, index = np.arange(counts.size), stored
    else:  # 32-bit values ('I'): a table over their range could be huge
        values, index, counts = np.unique(stored, return_inverse=True, return_counts=True)
        index = index.reshape(stored.shape)
    unknown = [(int(v), int(c)) for v, c in zip(values, counts) if c and int(v) not in value_map]
    if unknown:
        shown = ", ".join(f"{v} ({c} px)" for v, c in unknown[:8]) + (", ..." if len(unknown) > 8 else "")
        known = sorted(value_map)
        known_text = ", ".join(map(str, known)) if len(known) <= 40 else f"{len(known)} values from {known[0]} to {known[-1]}"
        raise DataError(f"{where} holds stored values {shown} that data.labelmaps neither maps to a class nor "
                        f"ignores (value_map and ignore cover {known_text})", rule="label value outside the value map")
    lookup = np.array([value_map.get(int(v), 0) for v in values], np.uint8)  # absent values are never looked up
    return lookup[index]
