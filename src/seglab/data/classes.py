"""Class sets: which COCO categories become which label value.

Label value 0 is background, 1..N are the set's classes in the listed order, 255 is ignore.
Categories outside the set are background. (A label-map dataset lists its classes itself:
seglab.data.labelmaps.)
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = 255
BACKGROUND = "background"

# torchvision's COCO-with-VOC-labels list (references/segmentation/coco_utils.py CAT_LIST),
# as COCO category names in VOC order: aeroplane, bicycle, bird, boat, bottle, bus, car, cat,
# chair, cow, diningtable, dog, horse, motorbike, person, pottedplant, sheep, sofa, train, tv.
VOC20_COCO_NAMES = (
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorcycle", "person", "potted plant", "sheep", "couch",
    "train", "tv",
)
VOC20_COCO_IDS = (5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)


@dataclass(frozen=True)
class ClassSet:
    """The classes of a label map by label value; for COCO, which category ids they come from.

    A label-map dataset's set (seglab.data.labelmaps) has no category ids: its value map says where
    each class comes from, and its class 0 is the dataset's own (VOC's background, CamVid's sky).
    """

    name: str                       # "all80", "voc20", "custom" or a label-map dataset's name for its list
    classes: tuple[str, ...]        # label value -> class name; COCO sets: classes[0] == "background"
    category_ids: tuple[int, ...]   # label value -> COCO category id, 0 for background; () for label maps

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def label_of(self) -> dict[int, int]:
        """COCO category id -> label value, for the categories in the set."""
        return {cid: i for i, cid in enumerate(self.category_ids) if i > 0}


def resolve_class_set(spec: str | list[str] | tuple[str, ...], categories: list[dict]) -> ClassSet:
    """Build the class set `spec` against a COCO file's `categories` list.

    `all80` takes every declared category in id order; `voc20` takes torchvision's 20; a list
    takes the named categories in the given order. Unknown names are an error naming them.
    """
    by_name = {c["name"]: int(c["id"]) for c in categories}
    if spec == "all80":
        ids = sorted(int(c["id"]) for c in categories)
        names = [next(c["name"] for c in categories if int(c["id"]) == i) for i in ids]
        name = "all80"
    elif spec == "voc20":
        names, name = list(VOC20_COCO_NAMES), "voc20"
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"class set voc20 needs COCO categories {missing}, which the annotation file does not declare")
        ids = [by_name[n] for n in names]
    elif isinstance(spec, (list, tuple)):
        names, name = list(spec), "custom"
        if not names:
            raise ValueError("data.class_set: an explicit class list must name at least one category")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"data.class_set: categories listed twice: {dupes}")
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(
                f"data.class_set: unknown COCO categories {unknown}; declared are {sorted(by_name)}"
            )
        ids = [by_name[n] for n in names]
    else:
        raise ValueError(f"data.class_set: expected 'all80', 'voc20' or a list of names, got {spec!r}")
    if len(names) + 1 > IGNORE_INDEX:
        raise ValueError(f"class set has {len(names)} classes; at most {IGNORE_INDEX - 1} fit in a uint8 label map")
    return ClassSet(name=name, classes=(BACKGROUND, *names), category_ids=(0, *ids))
