"""Evaluation throughput per trained model, with and without test-time augmentation.

For every trained model (``<models-dir>/<name>/{model.keras, train.json}``; default: all of them),
streams the val split exactly as the `evaluate` stage does (`seglab.evaluate.inference`: letterbox at
the model's input size, batch `evaluate.batch_size`) and runs the plain softmax and the TTA-merged
probabilities (`evaluate.tta` transforms) on every batch, so both are timed under the same load:

- images/s: val images over the wall time of the model calls (after one untimed warm-up call that
  traces the graph), median of `--runs` passes;
- CPU ms/image: process CPU time (all threads) during those calls per image, median of the passes:
  hardly affected by other jobs sharing the cores, unlike images/s;
- latency: one image per call, p50 / p90 ms over `--latency-runs` calls (from the last pass);
- mIoU of both (the same in every pass: evaluation is deterministic), to show what TTA buys.

Prints a Markdown table and the JSON record (machine, date, versions, command); `--json PATH` also
writes the record. Run: `.venv/bin/python benchmarks/evaluation.py` from the repository root.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from environment import machine, versions  # noqa: E402

from seglab.atomic import write_text_atomic  # noqa: E402
from seglab.config import load_config  # noqa: E402
from seglab.data.pipeline import classes_of, make_dataset  # noqa: E402
from seglab.evaluate.inference import check_classes, evaluate_predictors, load_trained  # noqa: E402
from seglab.evaluate.tta import probability_model, tta_model  # noqa: E402


def trained_names(models_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in models_dir.glob("*/model.keras") if (p.parent / "train.json").is_file())


def measure(cfg, models_dir: Path, name: str, *, batch_size: int, tta: list[str], runs: int,
            latency_runs: int) -> dict:
    trained = load_trained(models_dir, name)
    classes = classes_of(cfg.shard.out, "val")
    check_classes(trained.classes, classes, str(trained.directory / "train.json"), f"{cfg.shard.out}/val")
    tta_predictor = tta_model(trained.model, tta)
    predictors = {"plain": probability_model(trained.model), "tta": tta_predictor}
    dataset = make_dataset(cfg.shard.out, "val", image_size=trained.image_shape, batch_size=batch_size,
                           training=False, seed=cfg.seed, deterministic=True)
    passes, cpu_seconds = [], []
    for _ in range(runs):
        cpu_start = time.process_time()
        passes.append(evaluate_predictors(predictors, dataset, classes, latency_runs=latency_runs, grid_images=0))
        cpu_seconds.append(time.process_time() - cpu_start)
    last = passes[-1]
    row = {
        "model": name,
        "arch": trained.info.get("arch"),
        "weights": trained.info.get("weights"),
        "image_size": list(trained.image_shape),
        "param_count": trained.model.count_params(),
        "val_images": last.images,
        "batch_size": batch_size,
        "tta": tta_predictor.tta_transforms,
        "runs": runs,
    }
    for variant in ("plain", "tta"):
        per_run = [p.results[variant].images_per_second for p in passes]
        cpu_per_run = [p.results[variant].cpu_ms_per_image for p in passes]
        result = last.results[variant]
        row[variant] = {
            "images_per_second_runs": per_run,
            "images_per_second": statistics.median(per_run),
            "cpu_ms_per_image_runs": cpu_per_run,
            "cpu_ms_per_image": statistics.median(cpu_per_run),
            "latency_ms_p50": result.latency_percentile(50),
            "latency_ms_p90": result.latency_percentile(90),
            "miou": result.confusion.result()["miou"],
        }
    row["tta_slowdown"] = row["plain"]["images_per_second"] / row["tta"]["images_per_second"]
    row["tta_cpu_ratio"] = row["tta"]["cpu_ms_per_image"] / row["plain"]["cpu_ms_per_image"]
    # Whole passes (data pipeline, both predictors, latency calls).
    row["cpu_seconds_per_pass"] = statistics.median(cpu_seconds)
    return row


def render(rows: list[dict]) -> str:
    lines = [
        "| model | params | input | images/s plain | images/s TTA | TTA slowdown | CPU ms/image plain / TTA "
        "| latency p50/p90 ms plain | latency p50/p90 ms TTA | mIoU plain | mIoU TTA |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p, t = r["plain"], r["tta"]
        lines.append(
            f"| {r['model']} | {r['param_count'] / 1e6:.2f} M | {r['image_size'][0]}x{r['image_size'][1]} "
            f"| {p['images_per_second']:.1f} | {t['images_per_second']:.1f} | {r['tta_slowdown']:.2f}x "
            f"| {p['cpu_ms_per_image']:.1f} / {t['cpu_ms_per_image']:.1f} "
            f"| {p['latency_ms_p50']:.1f} / {p['latency_ms_p90']:.1f} | {t['latency_ms_p50']:.1f} / {t['latency_ms_p90']:.1f} "
            f"| {p['miou']:.4f} | {t['miou']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="settings file (shards, evaluate.*)")
    parser.add_argument("--models-dir", type=Path, default=None, help="trained models (default: params train.out)")
    parser.add_argument("--models", nargs="+", default=None, help="names to measure (default: every trained one)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: params evaluate.batch_size")
    parser.add_argument("--tta", nargs="+", default=None, help="default: params evaluate.tta")
    parser.add_argument("--runs", type=int, default=3, help="passes over the val split per model (median)")
    parser.add_argument("--latency-runs", type=int, default=None, help="default: params evaluate.latency_runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the record here")
    args = parser.parse_args(argv)

    cfg = load_config(args.params)
    models_dir = args.models_dir or Path(cfg.train.out)
    names = args.models or trained_names(models_dir)
    if not names:
        parser.error(f"no trained models under {models_dir} (each needs model.keras and train.json); "
                     "run `dvc repro` (or `seglab train NAME`) first, or pass --models-dir")
    settings = {
        "batch_size": args.batch_size or cfg.evaluate.batch_size,
        "tta": args.tta or list(cfg.evaluate.tta),
        "runs": args.runs,
        "latency_runs": args.latency_runs or cfg.evaluate.latency_runs,
    }
    started = dt.datetime.now(dt.timezone.utc)
    rows = []
    for name in names:
        rows.append(measure(cfg, models_dir, name, **settings))
        print(f"{name}: {rows[-1]['plain']['images_per_second']:.1f} images/s plain, "
              f"{rows[-1]['tta']['images_per_second']:.1f} with TTA", file=sys.stderr)
    record = {
        "benchmark": "evaluation",
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/evaluation.py", *(argv or sys.argv[1:])]),
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine() | {"load_average": os.getloadavg()},
        "versions": versions(),
        "shards": str(cfg.shard.out),
        "models_dir": str(models_dir),
        "settings": settings,
        "results": rows,
    }
    print(render(rows))
    print(json.dumps(record, indent=2))
    if args.json:
        write_text_atomic(args.json, json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
