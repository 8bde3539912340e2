"""What the data stages hold as the data grows (issue 13, item 8; benchmarks/load.py measures it
at 20,000 images): a split's annotations are read once, kept as text, never all as Python objects."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from seglab.data.coco import DataError, load_split
from seglab.data.sample import generate_sample


def _coco_root(root, images: int, per_image: int, points: int):
    rng = np.random.default_rng(0)
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    records, annotations = [], []
    for i in range(1, images + 1):
        records.append({"id": i, "file_name": f"{i:012d}.jpg", "height": 240, "width": 320})
        for k in range(per_image):
            xy = rng.uniform(0, 240, size=2 * points).round(2).tolist()
            annotations.append({"id": i * 100 + k, "image_id": i, "category_id": 1 + k % 3, "iscrowd": 0,
                                "area": 100.0, "bbox": [0, 0, 10, 10], "segmentation": [xy]})
    categories = [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}, {"id": 3, "name": "car"}]
    path = root / "annotations" / "instances_train2017.json"
    path.write_text(json.dumps({"info": {}, "images": records, "annotations": annotations[::-1],  # any order
                                "categories": categories}, separators=(",", ":")))
    return path, annotations


def test_loading_a_split_holds_about_the_file_size_not_its_python_objects(tmp_path):
    # As decoded Python objects (what json.load made of the whole file) a COCO annotation file
    # takes ~12x its size; read member by member and kept as text, about its size.
    path, annotations = _coco_root(tmp_path / "root", images=600, per_image=6, points=30)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        split = load_split(tmp_path / "root", "train", "train2017", ["person", "bicycle", "car"])
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 1_500_000
    assert peak < 3.0 * size, f"peak {peak / size:.1f}x the file's {size:,} bytes"
    # The tasks keep where each annotation lies in the file, not its text (~1.3x the file before):
    # what is left is per image (paths, record names).
    assert held < 0.5 * size, f"the tasks hold {held / size:.1f}x the file's {size:,} bytes"
    # Nothing lost or reordered: each image's annotations, in id order, as the file had them.
    assert len(split.tasks) == 600
    task = split.tasks[7]
    assert task.annotations == sorted((a for a in annotations if a["image_id"] == task.image_id),
                                      key=lambda a: a["id"])


def test_annotations_read_back_from_the_file_are_the_ones_checked(tmp_path):
    path, annotations = _coco_root(tmp_path / "root", images=20, per_image=3, points=8)
    classes = ["person", "bicycle", "car"]
    split = load_split(tmp_path / "root", "train", "train2017", classes)
    assert all(t.source is not None and t.annotations_json == "" for t in split.tasks)
    task = split.tasks[3]
    expected = sorted((a for a in annotations if a["image_id"] == task.image_id), key=lambda a: a["id"])
    assert task.annotations == expected

    # Rewritten between reading and sharding: the worker refuses, naming the file and the image.
    document = json.loads(path.read_text())
    path.write_text(json.dumps(document, indent=1))
    with pytest.raises(DataError, match=r"instances_train2017.json: changed while its split was being sharded "
                                        r"\(instances_train2017.json: images\[3\] \(id 4\)"):
        task.annotations

    # A file whose character offsets are not its byte offsets keeps each image's text instead.
    document["info"] = {"description": "café"}
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    kept = load_split(tmp_path / "root", "train", "train2017", classes).tasks[3]
    assert kept.source is None and kept.annotations == expected


def test_the_pool_is_fed_a_bounded_window_ahead_of_the_writer(monkeypatch):
    # Executor.map submitted every chunk of a split at once: a slow chunk let all the finished rows
    # (image and label payloads) collect behind it. Now a few chunks per worker are in flight.
    from concurrent.futures import ProcessPoolExecutor

    from seglab.data import shard_stage

    submitted = []

    class CountingPool(ProcessPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            submitted.append(fn)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(shard_stage, "ProcessPoolExecutor", CountingPool)
    monkeypatch.setattr(shard_stage, "process_image", lambda number: ("row", number))  # forked workers see it
    results = shard_stage._results([(i,) for i in range(400)], workers=2)
    assert next(results) == ("row", 0)
    ahead = 2 * getattr(shard_stage, "_CHUNKS_AHEAD_PER_WORKER", 2) + 1
    assert len(submitted) <= ahead, f"{len(submitted)} chunks submitted before the first row was written"
    assert [value for _, value in results] == list(range(1, 400))  # every row, in input order


def test_the_sample_generator_streams_its_annotation_file(tmp_path):
    # It built each split's whole COCO document in memory (1.3 GB for 16,000 images): its peak grew
    # with the images (~20x the file). Streamed, only the small image records grow with the split.
    def peak_and_size(images: int) -> tuple[int, int]:
        out = tmp_path / f"sample{images}"
        tracemalloc.start()
        try:
            generate_sample(out, train_images=images, val_images=1, min_side=32, max_side=48, seed=0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return peak, Path(out, "annotations", "instances_train2017.json").stat().st_size

    peak_and_size(5)  # first-use allocations (lazy imports, caches) belong to neither measurement
    small_peak, small_size = peak_and_size(20)
    large_peak, large_size = peak_and_size(120)
    assert large_size - small_size > 200_000
    # The image records stay in memory (COCO's key order puts them before the annotations): measured
    # 0.5-1x the file's growth at these sizes, under whatever else runs in the process. The whole
    # document in memory was ~20x it.
    assert large_peak - small_peak < 3.0 * (large_size - small_size), (
        f"peak grew {(large_peak - small_peak) / (large_size - small_size):.1f}x the file's growth")
