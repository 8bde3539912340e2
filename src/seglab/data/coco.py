"""COCO instances -> semantic label maps, with pycocotools.

The same loader serves real COCO, coco-mini and the embedded sample. Rules (params `data.*`):

- Class set (`class_set`): `all80`, `voc20` or an explicit list of COCO names; label 0 is
  background, 1..N the set's classes; categories outside the set are background.
- Overlaps (`overlap`): a pixel covered by more than one in-set, non-crowd instance is 255
  (`ignore`, torchvision's rule), or takes the later instance's class (`last`, by annotation id).
- Crowd (`crowd`): in-set crowd regions are 255 (`ignore`, default), their class (`label`) or
  background (`background`) wherever no single instance already labels the pixel; crowd regions
  of categories outside the set are background.
- Training images with fewer than `min_train_area` labelled pixels (class > 0, not 255) at the
  original resolution are dropped (counted as "filtered"); validation images never are.
- Bad records (missing or corrupt image, annotation of an unknown image or category, ids that are
  not integers, polygon with fewer than 3 points or with a coordinate that is not finite or lies
  more than one image size outside the frame, RLE counts that do not cover exactly height x width,
  a `file_name` that escapes the image folder by text or through a symlink or is not UTF-8,
  duplicate ids, more than `MAX_IMAGE_PIXELS` pixels declared or stored, a size that disagrees
  with the file): `on_bad_record: error` raises `DataError` naming the file, record and rule;
  `skip` drops the affected image (or the orphan annotation) and counts it with its reason.
  A bad annotation drops its whole image, since labelling the object as background would be wrong.
  A split with no usable image is an error in either mode: shards must never become empty.
- Image modes: greyscale, palette, RGBA (alpha dropped), CMYK and 16-bit images become RGB.
  EXIF orientation is applied when the upright size is the size the record gives (what the
  annotator saw); when only the stored size matches, the stored pixels are used as they are.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils

from seglab.data.classes import IGNORE_INDEX, ClassSet, resolve_class_set

# Official COCO 2017 archives (cocodataset.org) with their MD5 checksums.
COCO2017_ARCHIVES = {
    "train2017.zip": ("http://images.cocodataset.org/zips/train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2"),
    "val2017.zip": ("http://images.cocodataset.org/zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80"),
    "annotations_trainval2017.zip": (
        "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
        "f4bbac642086de4f52a3fdda2de5fa2c",
    ),
}


# Decoding costs about a dozen bytes per pixel (RGB, label, masks) in every worker. The cap admits
# any camera photo (COCO's own images are at most 640 px a side) and refuses the decompression
# bombs PIL only warns about, so a pool of workers stays within a workstation's memory.
MAX_IMAGE_PIXELS = 50_000_000


class DataError(ValueError):
    """Bad input: the message names the file, the record and the rule it breaks."""

    def __init__(self, message: str, rule: str = "bad input"):
        super().__init__(message)
        self.rule = rule


@dataclass(frozen=True)
class LabelRules:
    crowd: Literal["ignore", "label", "background"] = "ignore"
    overlap: Literal["ignore", "last"] = "ignore"
    min_train_area: int = 0


@dataclass
class ImageTask:
    """Everything a worker needs to turn one image record into an (image, label) pair.

    The image's annotations, in annotation id order, are decoded where they are used
    (`annotations`, in the worker) from where they lie in the annotation file (`source`): a split's
    tasks then hold a few bytes per annotation, not the file's text or
    the ~10x that decoded Python objects take. A file whose offsets are not its characters' (not
    ASCII UTF-8) has them kept as their JSON text (`annotations_json`) instead.
    """

    image_id: int
    file_name: str
    path: Path
    split: str
    height: int
    width: int
    annotations_json: str  # a JSON array; "" when `source` holds the annotations
    record: str  # human-readable location of the image record, for error messages
    source: AnnotationSpans | None = None

    @property
    def annotations(self) -> list[dict]:
        if self.source is None:
            return json.loads(self.annotations_json)
        return json.loads(self.source.read(self.record))

    def image_and_label(self, class_set: ClassSet, rules: LabelRules) -> tuple[np.ndarray, np.ndarray]:
        """The RGB image and its label map (rasterised from the annotations). Runs in shard workers."""
        image = decode_image(self.path, (self.height, self.width), self.record)
        return image, label_map(self.annotations, self.height, self.width, class_set, rules)


@dataclass
class CocoSplit:
    name: str
    folder: str
    annotation_file: Path
    image_dir: Path
    class_set: ClassSet
    tasks: list[ImageTask]
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_records: list[str] = field(default_factory=list)

    @property
    def location(self) -> Path:
        """Where the split's annotations are, for messages about the split as a whole."""
        return self.annotation_file


def annotation_path(root: Path, folder: str) -> Path:
    return Path(root) / "annotations" / f"instances_{folder}.json"


# The members whose arrays are read one element at a time (`read_annotation_file`).
_ANNOTATIONS, _IMAGES = "annotations", "images"
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class _NotStreamable(Exception):
    """The text is not a JSON object this reader walks member by member; `json.loads` says why."""


@dataclass(frozen=True)
class AnnotationSpans:
    """Where one image's annotations lie in an annotation file: byte offsets, as a flat
    [start, end, start, end, ...] array, and the file's (inode, size, mtime_ns) when it was read."""

    path: Path
    stamp: tuple[int, int, int]
    offsets: array

    def read(self, record: str) -> str:
        """The annotations as a JSON array's text, checked to come from the file that was read."""
        with self.path.open("rb") as f:
            if _file_stamp(os.fstat(f.fileno())) != self.stamp:
                raise DataError(f"{self.path}: changed while its split was being sharded ({record}); "
                                "run `seglab shard` again")
            parts = []
            for start, end in zip(self.offsets[::2], self.offsets[1::2]):
                f.seek(start)
                parts.append(f.read(end - start).decode("ascii"))
        return "[" + ",".join(parts) + "]"


def _file_stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass
class AnnotationFile:
    """An instances_*.json file as `load_split` reads it: everything but the annotations decoded;
    the annotations left in the file's text, read one at a time (`annotations`) and kept as text
    (`annotation_text`), so a split's annotations are never all Python objects at once."""

    path: Path
    members: dict[str, Any]  # every top-level member except `annotations`
    _text: str = ""
    _spans: tuple[array, array] | None = None  # (start, end) of each annotation in _text
    _decoded: list | None = None  # the annotations, when the file was read by `json.loads`
    # (inode, size, mtime_ns) when the file was read, where character offsets in _text are byte
    # offsets in the file (ASCII UTF-8: COCO's files, written with json's ensure_ascii); else None
    byte_stamp: tuple[int, int, int] | None = None

    @property
    def images(self) -> list:
        return self.members[_IMAGES]

    @property
    def categories(self) -> list:
        return self.members["categories"]

    def __len__(self) -> int:
        return len(self._spans[0]) if self._spans is not None else len(self._decoded or [])

    def annotations(self) -> Iterator[tuple[int, Any]]:
        """(index, decoded annotation) in file order."""
        if self._spans is None:
            yield from enumerate(self._decoded or [])
            return
        for i, start in enumerate(self._spans[0]):
            yield i, _DECODER.raw_decode(self._text, start)[0]

    def annotation_span(self, index: int) -> tuple[int, int]:
        """The annotation's (start, end) offset in the file's text."""
        return self._spans[0][index], self._spans[1][index]

    def annotation_text(self, index: int) -> str:
        """The annotation's JSON text as the file has it."""
        if self._spans is None:
            return json.dumps(self._decoded[index], separators=(",", ":"))
        return self._text[self._spans[0][index]:self._spans[1][index]]


def _skip(text: str, pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()


def _scan_object(text: str) -> tuple[dict[str, Any], tuple[array, array] | None]:
    """The top-level object's members, decoded, except `annotations`: its elements' spans.

    Each annotation is decoded here only to find where it ends and dropped at once. Anything but a
    plain JSON object with an `annotations` array raises _NotStreamable (or JSONDecodeError, with
    its position in the whole text).
    """
    members: dict[str, Any] = {}
    spans = None
    pos = _skip(text, 0)
    if text[pos:pos + 1] != "{":
        raise _NotStreamable
    pos = _skip(text, pos + 1)
    if text[pos:pos + 1] == "}":
        raise _NotStreamable
    while True:
        if text[pos:pos + 1] != '"':
            raise _NotStreamable
        key, pos = _DECODER.raw_decode(text, pos)
        pos = _skip(text, pos)
        if text[pos:pos + 1] != ":":
            raise _NotStreamable
        pos = _skip(text, pos + 1)
        if key == _ANNOTATIONS and text[pos:pos + 1] == "[":
            starts, ends = array("q"), array("q")
            pos = _skip(text, pos + 1)
            if text[pos:pos + 1] == "]":
                pos += 1
            else:
                while True:
                    _, end = _DECODER.raw_decode(text, pos)
                    starts.append(pos)
                    ends.append(end)
                    pos = _skip(text, end)
                    if text[pos:pos + 1] == ",":
                        pos = _skip(text, pos + 1)
                    elif text[pos:pos + 1] == "]":
                        pos += 1
                        break
                    else:
                        raise _NotStreamable
            members.pop(key, None)  # a repeated key: the last one counts, as in json.loads
            spans = (starts, ends)
        else:
            members[key], pos = _DECODER.raw_decode(text, pos)
            if key == _ANNOTATIONS:
                spans = None
        pos = _skip(text, pos)
        if text[pos:pos + 1] == ",":
            pos = _skip(text, pos + 1)
        elif text[pos:pos + 1] == "}":
            break
        else:
            raise _NotStreamable
    if _skip(text, pos + 1) != len(text):
        raise _NotStreamable
    if spans is None:
        raise _NotStreamable
    return members, spans


def read_annotation_file(path: Path) -> AnnotationFile:
    """Parse an instances_*.json file, turning every way it can be broken into a DataError.

    The annotations stay in the file's text (`AnnotationFile`): a COCO-sized file takes about
    twice its size in memory while it is read instead of ten times. A file this reader does not
    walk (not an object, no annotation array) is read whole by `json.loads`.
    """
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found (expected a COCO root with annotations/instances_<split>.json)")
    decoded = byte_stamp = None
    try:
        with path.open("rb") as f:
            stamp = _file_stamp(os.fstat(f.fileno()))
            raw = f.read()
        # As json.load does: UTF-8, -16 or -32 (a UTF-8 BOM is refused by the decoder).
        encoding = json.detect_encoding(raw)
        text = raw.decode(encoding, "surrogatepass")
        del raw
        try:
            members, spans = _scan_object(text)
            if encoding == "utf-8" and text.isascii():
                byte_stamp = stamp
        except _NotStreamable:
            decoded, members, spans, text = json.loads(text), {}, None, ""
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (truncated or malformed) at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from None
    if decoded is not None:
        if not isinstance(decoded, dict):
            raise DataError(f"{path}: expected a JSON object with images/annotations/categories, got {type(decoded).__name__}")
        members, decoded = decoded, decoded.get(_ANNOTATIONS)
    for key in (_IMAGES, _ANNOTATIONS, "categories"):
        if key == _ANNOTATIONS and spans is not None:
            continue
        if not isinstance(members.get(key), list):
            raise DataError(f"{path}: field '{key}' missing or not a list")
    members.pop(_ANNOTATIONS, None)
    for i, cat in enumerate(members["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str):
            raise DataError(f"{path}: categories[{i}]: expected an object with integer 'id' and string 'name', got {cat!r}")
    return AnnotationFile(path, members, text, spans, decoded, byte_stamp)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_image_record(rec: Any) -> tuple[str, str] | None:
    """Return (rule, explanation) when an image record is unusable, else None."""
    if not isinstance(rec, dict):
        return "malformed image record", f"expected an object, got {type(rec).__name__}"
    if not _is_int(rec.get("id")):
        return "malformed image record", "field 'id' missing or not an integer"
    name = rec.get("file_name")
    if not isinstance(name, str) or not name:
        return "malformed image record", "field 'file_name' missing or empty"
    try:
        name.encode("utf-8")  # lone surrogates from JSON escapes cannot be a file name or a Parquet string
    except UnicodeEncodeError:
        return "malformed image record", f"file_name {name!r} is not encodable as UTF-8"
    if "\x00" in name:
        return "malformed image record", f"file_name {name!r} contains a NUL character"
    norm = posixpath.normpath(name.replace("\\", "/"))
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or (len(norm) > 1 and norm[1] == ":"):
        return "file_name escapes the image folder", f"file_name {name!r} escapes the image folder"
    for key in ("height", "width"):
        if not _is_int(rec.get(key)) or rec[key] <= 0:
            return "malformed image record", f"field '{key}' missing or not a positive integer (got {rec.get(key)!r})"
    if rec["height"] * rec["width"] > MAX_IMAGE_PIXELS:
        return "image too large", (f"declared size {rec['height']}x{rec['width']} (HxW) exceeds the "
                                   f"{MAX_IMAGE_PIXELS:,}-pixel limit (seglab.data.coco.MAX_IMAGE_PIXELS)")
    return None


def links_outside(image_dir_real: str, path: Path, name: str) -> bool:
    """Whether `path` (the folder's entry `name`) resolves outside the folder whose real path is
    `image_dir_real`: through a symlink (file or sub-folder), or by '..' or an absolute `name`."""
    if "/" not in name and not os.path.islink(path):
        return False  # a plain entry of the folder itself: one lstat instead of resolving every part
    return os.path.commonpath([image_dir_real, os.path.realpath(path)]) != image_dir_real


def compressed_rle_counts(counts: str) -> list[int] | None:
    """Run lengths of a compressed RLE string, decoded as pycocotools' rleFrString does.

    None when the string is malformed: a character outside '0'..'o', a run that needs more than
    the seven 5-bit groups of a 32-bit count, or a string that ends inside a run (pycocotools
    would read past its end).
    """
    runs: list[int] = []
    value = shift = 0
    for char in counts:
        code = ord(char) - 48
        if not 0 <= code < 64:
            return None
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:  # more groups follow
            if shift >= 35:
                return None
            continue
        if code & 0x10:  # sign bit of the last group
            value |= -1 << shift
        if len(runs) > 2:  # after the first two, runs are stored as differences
            value += runs[-2]
        runs.append(value)
        value = shift = 0
    return None if shift else runs


def _check_rle_counts(runs: list[int], height: int, width: int, kind: str) -> tuple[str, str] | None:
    # pycocotools fills exactly sum(runs) pixels of an H x W buffer: fewer leaves uninitialised
    # memory in the mask, more writes past it, and a negative run overflows its unsigned counts.
    if any(r < 0 for r in runs):
        return "malformed segmentation", f"{kind} RLE counts contain a negative run"
    if sum(runs) != height * width:
        return "malformed segmentation", f"{kind} RLE counts sum to {sum(runs)}, expected height*width = {height * width}"
    return None


def _polygon_problem(k: int, poly: list, height: int, width: int) -> tuple[str, str] | None:
    # Real outlines stray a pixel or so outside the frame, but pycocotools' rasteriser walks every
    # edge at 5x resolution: one image size of margin is plenty, and a NaN or 1e12 would make it
    # allocate without bound (or crash). NaN fails every comparison, so it is caught here too.
    for j, v in enumerate(poly):
        limit = width if j % 2 == 0 else height
        if not -limit <= v <= 2 * limit:
            axis = "x" if j % 2 == 0 else "y"
            return "polygon coordinate out of range", (
                f"segmentation polygon {k} has {axis} = {v!r} at index {j}; coordinates must be finite and "
                f"within one image size of the frame ({axis} in [{-limit}, {2 * limit}])")
    return None


def _check_segmentation(ann: dict, height: int, width: int) -> tuple[str, str] | None:
    """Return (rule, explanation) when an annotation's segmentation is unusable, else None."""
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        if not seg:
            return "malformed segmentation", "segmentation is an empty polygon list"
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly):
                return "malformed segmentation", f"segmentation polygon {k} is not a list of numbers"
            if len(poly) % 2:
                return "malformed segmentation", f"segmentation polygon {k} has an odd number of coordinates ({len(poly)})"
            if len(poly) < 6:
                return "polygon with fewer than 3 points", f"segmentation polygon {k} has {len(poly) // 2} points; a polygon needs at least 3"
            problem = _polygon_problem(k, poly, height, width)
            if problem is not None:
                return problem
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return "malformed segmentation", "RLE segmentation without an integer [height, width] 'size'"
        if list(size) != [height, width]:
            return "malformed segmentation", f"RLE size {size} differs from the image's [{height}, {width}]"
        if isinstance(counts, list):
            if not all(_is_int(c) for c in counts):
                return "malformed segmentation", "uncompressed RLE counts must be integers"
            return _check_rle_counts(counts, height, width, "uncompressed")
        if isinstance(counts, str):
            runs = compressed_rle_counts(counts)
            if runs is None:
                return "malformed segmentation", "compressed RLE counts are not a valid RLE string"
            return _check_rle_counts(runs, height, width, "compressed")
        return "malformed segmentation", "RLE 'counts' must be a list (uncompressed) or a string (compressed)"
    return "malformed segmentation", f"segmentation must be a polygon list or an RLE object, got {type(seg).__name__}"


def load_split(
    root: str | Path,
    split: str,
    folder: str,
    class_set_spec: str | list[str],
    on_bad_record: Literal["error", "skip"] = "error",
) -> CocoSplit:
    """Read and check one split's annotation file; return one task per usable image."""
    root = Path(root)
    ann_file = annotation_path(root, folder)
    image_dir = root / folder
    if not root.is_dir():
        raise DataError(f"{root}: COCO root not found (data.root in params.yaml; `seglab download-coco` fetches COCO 2017)")
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder for split '{split}' not found")
    data = read_annotation_file(ann_file)
    class_set = resolve_class_set(class_set_spec, data.categories)
    known_categories = {int(c["id"]) for c in data.categories}
    skipped: Counter = Counter()
    skipped_records: list[str] = []

    def bad(record: str, rule: str, reason: str) -> None:
        if on_bad_record == "error":
            raise DataError(f"{ann_file}: {record}: {reason} [rule: {rule}] (data.on_bad_record: skip skips such records)", rule)
        skipped[rule] += 1
        skipped_records.append(f"{ann_file.name}: {record}: {reason}")

    images: dict[int, dict] = {}
    locations: dict[int, str] = {}
    image_dir_real = os.path.realpath(image_dir)
    for i, rec in enumerate(data.images):
        where = f"images[{i}]" + (f" (id {rec.get('id')})" if isinstance(rec, dict) else "")
        problem = _check_image_record(rec)
        if problem is None and rec["id"] in images:
            problem = "duplicate image id", f"duplicate image id {rec['id']} (first at {locations[rec['id']]})"
        if problem is None and links_outside(image_dir_real, image_dir / rec["file_name"], rec["file_name"]):
            problem = ("file_name escapes the image folder",
                       f"file_name {rec['file_name']!r} resolves outside the image folder (through a symlink)")
        if problem is not None:
            bad(where, *problem)
            continue
        images[rec["id"]] = rec
        locations[rec["id"]] = where

    # Per image: (sort key, (start, end) in the file, or the JSON text) of its annotations; the
    # decoded annotation is dropped.
    by_image: dict[int, list[tuple[tuple[bool, int], Any]]] = {i: [] for i in images}
    stamp = data.byte_stamp
    dropped: set[int] = set()
    seen_ann_ids: set[int] = set()
    for i, ann in data.annotations():
        if not isinstance(ann, dict):
            bad(f"annotations[{i}]", "malformed annotation", f"expected an object, got {type(ann).__name__}")
            continue
        where = f"annotations[{i}] (id {ann.get('id')}, image_id {ann.get('image_id')})"
        image_id = ann.get("image_id")
        if not _is_int(image_id):  # also keeps unhashable ids (lists, objects) out of the lookups
            bad(where, "malformed annotation", f"image_id {image_id!r} is not an integer")
            continue
        if image_id not in images:
            bad(where, "annotation of an unknown image", f"image_id {image_id!r} is not a known image")
            continue
        if image_id in dropped:
            continue
        cat = ann.get("category_id")
        if not _is_int(cat):
            problem = "malformed annotation", f"category_id {cat!r} is not an integer"
        elif ann.get("id") is not None and not _is_int(ann.get("id")):
            problem = "malformed annotation", f"annotation id {ann.get('id')!r} is not an integer"
        elif cat not in known_categories:
            problem = "annotation of an unknown category", f"category_id {cat!r} is not a declared category"
        elif ann.get("id") in seen_ann_ids:
            problem = "duplicate annotation id", f"duplicate annotation id {ann.get('id')}"
        else:
            rec = images[image_id]
            problem = _check_segmentation(ann, rec["height"], rec["width"])
        if problem is not None:
            bad(where, *problem)  # raises in error mode
            dropped.add(image_id)
            continue
        seen_ann_ids.add(ann.get("id"))
        # Annotation order decides "last" overlaps; sorted by id below, so file order never matters.
        by_image[image_id].append(((ann.get("id") is None, ann.get("id") or 0),
                                   data.annotation_span(i) if stamp else data.annotation_text(i)))
    image_count = len(data.images)
    del data  # the file's text: the tasks keep where each annotation is (or its own text)

    tasks = []
    for image_id, rec in images.items():
        if image_id in dropped:
            continue
        anns = [where for _, where in sorted(by_image.pop(image_id), key=lambda a: a[0])]
        source = (AnnotationSpans(ann_file, stamp, array("q", (offset for span in anns for offset in span)))
                  if stamp else None)
        tasks.append(
            ImageTask(
                image_id=image_id,
                file_name=rec["file_name"],
                path=image_dir / rec["file_name"],
                split=split,
                height=rec["height"],
                width=rec["width"],
                annotations_json="" if stamp else "[" + ",".join(anns) + "]",
                record=f"{ann_file.name}: {locations[image_id]} file {rec['file_name']!r}",
                source=source,
            )
        )
    if not tasks:
        # Written out, an empty split would replace good shards with an empty folder.
        raise DataError(f"{ann_file}: split '{split}' has no usable images ({image_count} image records, "
                        f"{sum(skipped.values())} bad records skipped); refusing to write an empty split", "empty split")
    tasks.sort(key=lambda t: t.image_id)  # output order independent of file order
    return CocoSplit(split, folder, ann_file, image_dir, class_set, tasks, skipped, skipped_records)


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Rasterise one COCO segmentation (polygons, uncompressed or compressed RLE) to a bool mask."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


def label_map(
    annotations: list[dict], height: int, width: int, class_set: ClassSet, rules: LabelRules
) -> np.ndarray:
    """The uint8 label map of one image under the module's rules (0 background, 255 ignore)."""
    lut = class_set.label_of()
    label = np.zeros((height, width), np.uint8)
    cover = np.zeros((height, width), np.uint8)  # in-set instances covering each pixel (saturating)
    crowds = []
    for ann in annotations:
        cls = lut.get(ann["category_id"])
        if cls is None:
            continue
        if ann.get("iscrowd", 0):
            crowds.append((cls, ann))
            continue
        m = annotation_mask(ann["segmentation"], height, width)
        label[m] = cls
        np.minimum(cover.astype(np.uint16) + m, 2, out=cover, casting="unsafe")
    if rules.overlap == "ignore":
        label[cover > 1] = IGNORE_INDEX
    for cls, ann in crowds:
        m = annotation_mask(ann["segmentation"], height, width) & (cover == 0)
        if rules.crowd == "ignore":
            label[m] = IGNORE_INDEX
        elif rules.crowd == "label":
            label[m] = cls
        # "background": crowd pixels stay 0
    return label


def decode_image(path: Path, expected_hw: tuple[int, int] | None, record: str,
                 expected_from: str = "record") -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3) in the orientation the size `expected_hw` describes;
    `expected_from` names where that size comes from (the annotation record, a label map). Without
    an expected size (an image to predict on) the image is turned upright by its EXIF orientation,
    as image viewers show it."""
    try:
        with Image.open(path) as im:  # reads the header only
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise DataError(
                    f"{record}: image {path} is {im.height}x{im.width} (HxW), over the {MAX_IMAGE_PIXELS:,}-pixel "
                    "limit (seglab.data.coco.MAX_IMAGE_PIXELS)", rule="image too large")
            im.load()
            upright = ImageOps.exif_transpose(im)
            if expected_hw is None or (upright.height, upright.width) == expected_hw:
                im = upright
            elif (im.height, im.width) != expected_hw:
                raise DataError(
                    f"{record}: image {path} is {im.height}x{im.width} (HxW) but the {expected_from} says "
                    f"{expected_hw[0]}x{expected_hw[1]}",
                    rule=f"image size disagrees with {expected_from}",
                )
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit greyscale: scale to 8 bits rather than clip.
                a = np.asarray(im, dtype=np.float64)
                hi = a.max() if a.size and a.max() > 0 else 1.0
                im = Image.fromarray((a * (255.0 / hi)).round().astype(np.uint8), "L")
            rgb = im.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{record}: image file {path} not found", rule="missing image file") from None
    except Image.DecompressionBombError as e:  # PIL's own limit, met before ours when the header is huge
        raise DataError(f"{record}: image file {path}: {e}", rule="image too large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(
            f"{record}: image file {path} is not a readable image (corrupt or truncated): {e}", rule="unreadable image"
        ) from None


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
