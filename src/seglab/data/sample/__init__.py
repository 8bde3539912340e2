"""The embedded sample: a small COCO-format dataset that seglab generates itself (the `sample` stage).

Procedural scenes with eight VOC-20 categories (person, car, cat, dog, bird, bottle, chair,
bicycle), each a family of multi-part shapes with its own colour and texture distribution, on
procedural backgrounds (gradients, fractal noise, stripes, tiles, sky-over-ground scenes) with
unlabelled clutter, soft shadows, camera blur and sensor noise; some images are greyscale, as in
COCO. Objects are drawn back to front, so later ones occlude earlier ones.

Annotations follow COCO 2017 exactly (`instances_<split>.json`, all 80 categories declared):

- most instances are annotated with their *visible* region, traced into COCO polygons that
  rasterise (pycocotools) to exactly the object's visible pixels: one polygon per connected piece,
  holes (a see-through wheel, a chair back, an occluder in the middle) spliced in through a
  zero-width slit, since a COCO polygon list is a union and cannot carry holes as polygons;
- a small share (`amodal_fraction`) of occluded instances carry their full (amodal) outline, so
  those annotations overlap their occluders, as happens in real COCO;
- a few images (`crowd_fraction`) hold a crowd: a cluster of many small objects of one category,
  annotated as one uncompressed-RLE region with `iscrowd: 1`.

`area` and `bbox` come from pycocotools' rasterisation of the stored segmentation, so they agree
with what any COCO loader computes. Annotation ids grow from back to front within an image.

Everything is drawn from numpy Generators seeded by (seed, split[, image index]), never from a
global RNG: a rerun writes byte-identical files.

The parts, each usable on its own: `categories` (COCO's category table, what the sample draws),
`textures` (colours, paints), `shapes` (the eight shape families), `objects` (placing, shadowing
and painting one object), `backgrounds`, `scene` (one image and what to annotate),
`annotations` (masks -> COCO polygons and RLE) and `stage` (files, ids, the stage function).
"""

from seglab.data.sample.annotations import mask_to_polygons, mask_to_uncompressed_rle
from seglab.data.sample.categories import CATEGORY_ID, COCO_CATEGORIES, CROWD_CATEGORIES, SAMPLE_CATEGORIES
from seglab.data.sample.stage import GENERATOR_VERSION, JPEG_QUALITY, SPLITS, generate_sample, run_sample

__all__ = [
    "CATEGORY_ID",
    "COCO_CATEGORIES",
    "CROWD_CATEGORIES",
    "GENERATOR_VERSION",
    "JPEG_QUALITY",
    "SAMPLE_CATEGORIES",
    "SPLITS",
    "generate_sample",
    "mask_to_polygons",
    "mask_to_uncompressed_rle",
    "run_sample",
]
