"""The `synthesize@<gan>` stage: a trained generator -> synthetic (image, label map) shards.

`synthesize` loads `<gan_dir>/<gan>/generator.keras` (+ `train.json`) and produces `count` pairs,
deterministically from `seed`:

- dcgan / sagan: latent vectors z ~ N(0, 1) from `numpy.random.default_rng(seed)`; the label map
  is the argmax of the generated label channels (the ignore channel -> 255);
- pix2pix: layouts from the real training label maps (cropped to the GAN size), drawn as real,
  geometrically transformed or recombined (`seglab.gan.pix2pix.make_layouts`, weights
  `layout_mix`), each rendered into the background of a real training image drawn at random, with
  object colours drawn from the real images' regions (`seglab.gan.pix2pix.synthesis_inputs`); the
  label map *is* the layout, checked pixel for pixel.

Pairs are optionally enlarged to `size` (image bilinear, label nearest so no class is mixed),
encoded like real shards (JPEG at `jpeg_quality`, PNG labels) and written to
`<out_dir>/<gan>/train/part-*.parquet` with `SHARD_SCHEMA`'s columns plus `generator` (string) and
`generator_seed` (int64), `source = "synthetic:<gan>"`, `split = "train"`. File metadata: the real
training shards' (`seglab.classes` identical, so `make_dataset([real, synthetic], "train")` reads
both as one split) plus `seglab.generator`, `seglab.generator_seed`,
`seglab.generator_params_hash`. Next to the shards: `synthesize.json` (counts, layout kinds,
class shares) and `preview.png` (the first pairs). The folder is written atomically.

Synthetic rows get image ids `SYNTHETIC_ID_BASE * (1 + index of the GAN in GANS) + n`, far above
COCO's ids, so real and synthetic rows never share an id.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from seglab.atomic import atomic_dir
from seglab.config import Config, GanConfig, ShardConfig
from seglab.data.classes import IGNORE_INDEX
from seglab.data.shards import SHARD_SCHEMA, read_classes, shard_files, write_shards
from seglab.gan import GANS

log = logging.getLogger(__name__)

__all__ = ["SYNTHETIC_ID_BASE", "SYNTHETIC_SCHEMA", "load_generator", "run_synthesize", "synthesize",
           "synthetic_image_id"]

SYNTHETIC_SCHEMA = SHARD_SCHEMA.append(pa.field("generator", pa.string(), nullable=False)).append(
    pa.field("generator_seed", pa.int64(), nullable=False))
SYNTHETIC_ID_BASE = 1 << 40
_PREVIEW_PAIRS = 16


def synthetic_image_id(gan: str, index: int) -> int:
    return SYNTHETIC_ID_BASE * (1 + GANS.index(gan)) + int(index)


def load_generator(gan_dir: str | Path, gan: str):
    """(generator, train info) from `<gan_dir>/<gan>/`, checked against each other."""
    import keras

    import seglab.gan.pix2pix  # noqa: F401  (registers the custom layers of pix2pix and SAGAN for loading)
    import seglab.gan.sagan  # noqa: F401
    from seglab.gan.train import load_train_info

    directory = Path(gan_dir) / gan
    info = load_train_info(directory)
    if info["gan"] != gan:
        raise ValueError(f"{directory / 'train.json'}: trained augmenter is {info['gan']!r}, expected {gan!r}")
    path = directory / "generator.keras"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; train the augmenter first (`seglab train-gan {gan}`)")
    try:
        generator = keras.models.load_model(path, compile=False)
    except Exception as e:  # Keras raises assorted types for a corrupt or foreign file
        raise ValueError(f"{path}: cannot be loaded as a Keras model: {type(e).__name__}: {e}") from e
    outputs = generator.output_shape
    size, channels = int(info["image_size"]), len(info["classes"]) + 1
    expected = [(None, size, size, 3), (None, size, size, channels)]
    if not isinstance(outputs, list) or [tuple(o) for o in outputs] != expected:
        raise ValueError(f"{path}: outputs {outputs}, expected [image, label channels] = {expected} "
                         f"for image_size {size} and {len(info['classes'])} classes in train.json")
    return generator, info


def _resize_pair(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    if image.shape[0] == size and image.shape[1] == size:
        return image, label
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize((size, size), Image.Resampling.NEAREST))
    return image, label


def _encode(image: np.ndarray, label: np.ndarray, jpeg_quality: int) -> tuple[bytes, bytes]:
    from seglab.data.coco import encode_png

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=jpeg_quality)
    return buffer.getvalue(), encode_png(label)


def synthesize(
    gan_dir: str | Path,
    shard_dir: str | Path,
    out_dir: str | Path,
    *,
    gan: str,
    count: int,
    seed: int,
    size: int | None = None,
    jpeg_quality: int | None = None,
    layout_mix: Sequence[float] | None = None,
    max_shard_mb: float | None = None,
    batch_size: int = 32,
    split: str = "train",
) -> dict:
    """Write `count` synthetic pairs of `gan` to `<out_dir>/<gan>/train/`; return the report.

    `shard_dir`: the real shards, whose `split` supplies the class list and metadata (and, for
    pix2pix, the layouts). `size`: side the pairs are enlarged to (None: the GAN size).
    `jpeg_quality` / `max_shard_mb` (None: params.yaml's `shard` block, as real shards are written)
    and `layout_mix` (None: params.yaml's `gan.layout_mix`).
    """
    jpeg_quality = ShardConfig().jpeg_quality if jpeg_quality is None else jpeg_quality
    max_shard_mb = ShardConfig().max_shard_mb if max_shard_mb is None else max_shard_mb
    layout_mix = GanConfig().layout_mix if layout_mix is None else layout_mix
    from seglab.gan.common import describe_labels, layouts_from_shards, render, save_sample_grid

    if gan not in GANS:
        raise ValueError(f"unknown GAN {gan!r}; expected one of {list(GANS)}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"gan.synth_images must be a positive integer, got {count!r}")
    started = time.perf_counter()
    gan_dir, shard_dir, out_dir = Path(gan_dir), Path(shard_dir), Path(out_dir)
    generator, info = load_generator(gan_dir, gan)
    gan_size = int(info["image_size"])
    out_size = gan_size if size is None else int(size)
    if out_size < gan_size:
        raise ValueError(f"gan.synth_size {size} is below the GAN size {gan_size}; synthesis only enlarges")

    real_file = shard_files(shard_dir, split)[0]
    classes = read_classes(real_file)
    if list(info["classes"]) != classes:
        raise ValueError(f"{gan_dir / gan / 'train.json'}: generator trained on classes {info['classes']}, but "
                         f"{real_file} has {classes}; retrain the augmenter on these shards")
    num_classes = len(classes)

    rng = np.random.default_rng(seed)
    if info["conditional"]:
        from seglab.gan.pix2pix import make_layouts, synthesis_inputs

        real_images, real_labels, _ = layouts_from_shards(shard_dir, split, image_size=gan_size, seed=seed)
        layouts, kinds = make_layouts(real_labels, count, rng, num_classes=num_classes, mix=layout_mix)
        inputs, backgrounds = synthesis_inputs(layouts, real_images, real_labels, rng, num_classes=num_classes)
    else:
        layouts, kinds, backgrounds = None, ["noise"] * count, None
        inputs = rng.standard_normal((count, int(info["latent_dim"]))).astype(np.float32)
    images, labels = render(generator, inputs, batch_size=batch_size)
    if layouts is not None and not np.array_equal(labels, layouts):
        raise ValueError(f"{gan_dir / gan / 'generator.keras'}: label output differs from the conditioning "
                         "layout; a pix2pix generator must pass its layout through")

    rows = []
    for index in range(count):
        image, label = _resize_pair(images[index], labels[index], out_size)
        jpeg, png = _encode(image, label, jpeg_quality)
        counts = np.bincount(label.ravel(), minlength=256)
        rows.append({
            "image_id": synthetic_image_id(gan, index),
            "file_name": f"synthetic/{gan}/seed{seed}/{index:06d}-{kinds[index]}.jpg",
            "split": "train",
            "source": f"synthetic:{gan}",
            "height": out_size,
            "width": out_size,
            # A synthetic image has no annotated original: its stored size is its size.
            "orig_height": out_size,
            "orig_width": out_size,
            "image": jpeg,
            "label": png,
            "class_pixels": [int(c) for c in counts[:num_classes]],
            "ignore_pixels": int(counts[IGNORE_INDEX]),
            "generator": gan,
            "generator_seed": int(seed),
        })

    metadata = dict(pq.read_schema(real_file).metadata or {})
    metadata.update({
        b"seglab.split": b"train",
        b"seglab.generator": gan.encode(),
        b"seglab.generator_seed": str(int(seed)).encode(),
        b"seglab.generator_params_hash": str(info["params_hash"]).encode(),
    })
    kinds_count = {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)}
    report = {
        "gan": gan,
        "images": count,
        "seed": int(seed),
        "gan_image_size": gan_size,
        "image_size": out_size,
        "classes": classes,
        "layout_kinds": kinds_count,
        "layout_mix": list(layout_mix) if info["conditional"] else None,
        # pix2pix: how many distinct real images lent their background
        "background_images": None if backgrounds is None else len(set(int(b) for b in backgrounds)),
        "class_shares": describe_labels(labels, classes),
        "generator_params_hash": info["params_hash"],
        "real_shards": str(shard_dir / split),
    }
    target = out_dir / gan
    with atomic_dir(target) as tmp:
        report["files"] = write_shards(rows, tmp / "train", metadata, max_shard_mb, schema=SYNTHETIC_SCHEMA)
        preview = min(count, _PREVIEW_PAIRS)
        save_sample_grid(tmp / "preview.png", images[:preview], labels[:preview])
        report["seconds"] = round(time.perf_counter() - started, 2)
        (tmp / "synthesize.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("%s: %d synthetic pairs at %dpx (seed %d) -> %s in %.1fs", gan, count, out_size, seed, target / "train",
             report["seconds"])
    return report


def run_synthesize(cfg: Config, gan_name: str) -> dict:
    """The `synthesize@<gan>` stage: `<gan.out>/<gan>/generator.keras` -> `<gan.synthetic_out>/<gan>/train/`."""
    g = cfg.gan
    return synthesize(g.out, cfg.shard.out, g.synthetic_out, gan=gan_name, count=g.synth_images, seed=cfg.seed,
                      size=g.synth_size, jpeg_quality=cfg.shard.jpeg_quality, layout_mix=list(g.layout_mix),
                      max_shard_mb=cfg.shard.max_shard_mb)
