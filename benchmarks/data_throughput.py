"""Data throughput: sharding speed, tf.data read speed from shards, and the naive read it replaces.

Measures on a COCO-layout root (default: coco-mini):

1. `build_shards` throughput (images/s over all splits, `--workers` processes, median of `--runs`).
2. Reading the shards with `make_dataset(training=True)` at `--image-size`², batch `--batch-size`:
   images/s over `--epochs` epochs after one warm-up epoch.
3. The naive read of the same split: every epoch decodes the original JPEG
   (`seglab.data.coco.decode_image`) and rasterises its polygons/RLE from the JSON with pycocotools
   (`seglab.data.coco.label_map`), then the same random-cover crop (`fit_to_size`), batching and
   prefetching; the Python loading runs in a parallel tf.data map so it gets the same cores.
4. (ablation) shards built with `--ablation-max-side` (default 640, i.e. COCO's full size), to show
   how much of the speed-up comes from storing smaller images rather than from the format.

Prints a Markdown table and the JSON record; `--json PATH` also writes the record.
Run: `.venv/bin/python benchmarks/data_throughput.py` from the repository root.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from environment import machine, versions  # noqa: E402
from seglab.atomic import write_text_atomic  # noqa: E402
from seglab.data.coco import LabelRules, decode_image, label_map, load_split  # noqa: E402
from seglab.data.pipeline import fit_to_size, make_dataset  # noqa: E402
from seglab.config import ShardConfig  # noqa: E402
from seglab.data.shard_stage import build_shards  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def time_epochs(ds: tf.data.Dataset, epochs: int) -> dict:
    """Iterate one warm-up epoch, then `epochs` timed ones; images/s over the timed ones."""
    sum(int(x.shape[0]) for x, _ in ds)  # warm-up: tracing, thread pools, page cache
    images, seconds = [], []
    cpu_start = time.process_time()  # all threads of this process: robust to other load on the machine
    for _ in range(epochs):
        start = time.perf_counter()
        images.append(sum(int(x.shape[0]) for x, _ in ds))
        seconds.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu_start
    return {
        "images_per_s": sum(images) / sum(seconds),
        "cpu_ms_per_image": 1000 * cpu / sum(images),
        "epoch_images": images[0],
        "epoch_seconds": [round(s, 3) for s in seconds],
    }


def _read_cells(result: dict) -> tuple[str, str]:
    return f"{result['images_per_s']:.0f}", f"{result['cpu_ms_per_image']:.2f}"


def naive_dataset(root: Path, split: str, folder: str, class_set: str, *, image_size: int, batch_size: int,
                  seed: int) -> tf.data.Dataset:
    """JPEG decode + pycocotools rasterisation from the JSON for every image in every epoch."""
    coco = load_split(root, split, folder, class_set)
    tasks, rules = coco.tasks, LabelRules()

    def load(index: np.int64) -> tuple[np.ndarray, np.ndarray]:
        task = tasks[int(index)]
        image = decode_image(task.path, (task.height, task.width), task.record)
        return image, label_map(task.annotations, task.height, task.width, coco.class_set, rules)

    def load_tf(index):
        image, label = tf.numpy_function(load, [index], [tf.uint8, tf.uint8], name="naive_load")
        return tf.ensure_shape(image, [None, None, 3]), tf.ensure_shape(label, [None, None])

    def fit(index, element_seed):
        image, label = load_tf(index)
        fit_seed = tf.random.experimental.stateless_split(element_seed, 2)[0]  # as make_dataset does
        image, label = fit_to_size(image, label, (image_size, image_size), mode="crop", seed=fit_seed)
        return image, tf.cast(label, tf.int32)

    indices = tf.data.Dataset.range(len(tasks)).shuffle(len(tasks), seed=seed, reshuffle_each_iteration=True)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    ds = tf.data.Dataset.zip(indices, seeds).map(fit, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--coco", type=Path, default=REPO / ".." / "shared" / "data" / "coco-mini")
    p.add_argument("--split", default="train", help="split read in the read benchmarks")
    p.add_argument("--splits", default="train=train2017,val=val2017", help="split=folder list to shard")
    p.add_argument("--class-set", default="voc20")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="build_shards runs (median reported)")
    p.add_argument("--epochs", type=int, default=10, help="timed epochs per read benchmark (after a warm-up)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-side", type=int, default=320, help="shard.max_side of the shards read")
    p.add_argument("--ablation-max-side", type=int, default=640, help="0 skips the ablation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the record here")
    args = p.parse_args(argv)
    if args.epochs < 3:
        p.error("--epochs must be >= 3")
    root = args.coco.resolve()
    splits = dict(item.split("=", 1) for item in args.splits.split(","))
    if args.split not in splits:
        p.error(f"--split {args.split!r} is not among --splits {sorted(splits)}")

    record: dict = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(),
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/data_throughput.py", *sys.argv[1:]]),
        "dataset": str(args.coco),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    read_kwargs = dict(image_size=(args.image_size, args.image_size), batch_size=args.batch_size, training=True,
                       seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="seglab-bench-") as tmp:
        shards = Path(tmp) / "shards"
        settings = ShardConfig(max_side=args.max_side, workers=args.workers)
        runs = []
        for _ in range(args.runs):
            start = time.perf_counter()
            report = build_shards(root, shards, splits=splits, class_set=args.class_set, settings=settings)
            runs.append(time.perf_counter() - start)
        images = sum(s["images"] for s in report["splits"].values())
        record["shard"] = {"images": images, "seconds": [round(s, 3) for s in runs],
                           "images_per_s": images / statistics.median(runs)}
        print(f"shard: {images} images, median {statistics.median(runs):.2f}s", flush=True)

        record["read_shards"] = time_epochs(make_dataset(shards, args.split, **read_kwargs), args.epochs)
        print(f"read shards: {record['read_shards']['images_per_s']:.1f} images/s", flush=True)

        naive = naive_dataset(root, args.split, splits[args.split], args.class_set, image_size=args.image_size,
                              batch_size=args.batch_size, seed=args.seed)
        record["read_naive"] = time_epochs(naive, args.epochs)
        print(f"read naive: {record['read_naive']['images_per_s']:.1f} images/s", flush=True)
        record["speedup"] = record["read_shards"]["images_per_s"] / record["read_naive"]["images_per_s"]

        if args.ablation_max_side:
            full = Path(tmp) / "shards-full"
            build_shards(root, full, splits={args.split: splits[args.split]}, class_set=args.class_set,
                         settings=ShardConfig(max_side=args.ablation_max_side, workers=args.workers))
            record["read_shards_ablation"] = {"max_side": args.ablation_max_side,
                                              **time_epochs(make_dataset(full, args.split, **read_kwargs), args.epochs)}
            record["speedup_ablation"] = (record["read_shards_ablation"]["images_per_s"]
                                          / record["read_naive"]["images_per_s"])

    s = args.image_size
    record["speedup_cpu"] = record["read_naive"]["cpu_ms_per_image"] / record["read_shards"]["cpu_ms_per_image"]
    shard = record["shard"]
    rows = [
        (f"`build_shards`, all splits, workers={args.workers}", f"{shard['images_per_s']:.0f}", "–",
         f"median of {args.runs} runs, {shard['images']} images"),
        (f"read shards (max_side {args.max_side}) at {s}²", *_read_cells(record["read_shards"]),
         f"{args.epochs} epochs × {record['read_shards']['epoch_images']} images after a warm-up epoch"),
        (f"naive read (JPEG + pycocotools) at {s}²", *_read_cells(record["read_naive"]),
         f"same; **shards {record['speedup']:.1f}× faster** ({record['speedup_cpu']:.1f}× less CPU)"),
    ]
    if "read_shards_ablation" in record:
        ablation = record["read_shards_ablation"]
        rows.append((f"read shards (max_side {args.ablation_max_side}) at {s}²", *_read_cells(ablation),
                     f"ablation: {record['speedup_ablation']:.1f}× the naive read "
                     f"({record['read_naive']['cpu_ms_per_image'] / ablation['cpu_ms_per_image']:.1f}× less CPU)"))
    print("\n| measurement | images/s | CPU ms/image | notes |\n|---|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\n" + json.dumps(record, indent=2))
    if args.json:
        write_text_atomic(args.json, json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
