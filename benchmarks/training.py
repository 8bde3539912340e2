"""Training speed per model at a profile: step time, images/s, input wait, bfloat16 vs float32.

For every model of params.yaml `models` (or `--models`), with the run's own code path
(`seglab.train.plan.plan_run` / `training_datasets`, `seglab.train.loop.train_model`: same model, optimizer, loss,
metric, callbacks and per-epoch commit as `seglab train`):

1. **real vs cached input, paired**: one training run whose epochs alternate between the real
   pipeline (shard decode, random crop, augmentation, batching, prefetch) and the same number of
   batches taken once from it and held in memory, so no step of those epochs waits for input.
   Each epoch has the profile's `steps_per_epoch` steps plus the full validation pass. The first
   epoch (tracing, cache fill) is reported apart; then `--pairs` real and `--pairs` cached epochs
   alternate, so load from other jobs on the machine hits both kinds alike. Step time = median
   training-phase time per epoch / steps. Input-wait share = 1 - cached step / real step.
   The same is computed from the process CPU time (all threads) of the training phase, which
   other jobs hardly move: the share of the step's CPU the input pipeline takes.
2. **dtype** (`--dtype-models`): cached-input epochs under `mixed_bfloat16` against float32,
   alternating runs (float32, bfloat16, float32, bfloat16; each a fresh model with one warm-up
   epoch), medians of each kind.

The encoder stays unfrozen (freeze epochs 0) so that every measured epoch runs the same step; the
estimate of a whole `train@<model>` stage at the profile is
`first epoch + (profile epochs - 1) x median real epoch` (training + validation + commit), without
process start-up.

Prints a Markdown table and the JSON record; `--json PATH` also writes the record.
Run: `.venv/bin/python benchmarks/training.py` from the repository root (needs `data/shards`:
`dvc repro validate_data`).
"""

from __future__ import annotations

import argparse
import dataclasses
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

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from environment import machine, versions  # noqa: E402
from seglab.atomic import write_text_atomic  # noqa: E402
from seglab.config import load_config  # noqa: E402
from seglab.train.loop import train_model  # noqa: E402
from seglab.train.plan import plan_run, training_datasets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class TrainCpuTime(keras.callbacks.Callback):
    """Process CPU seconds (all threads) of each epoch's training phase: hardly moved by other jobs."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.process_time()

    def on_test_begin(self, logs=None):
        if self._start is not None:
            self.seconds.append(time.process_time() - self._start)
            self._start = None


def in_memory(train_data: tf.data.Dataset, steps: int) -> tf.data.Dataset:
    """`steps` batches of the pipeline, materialised once: an input that never makes a step wait."""
    images, labels = zip(*((x.numpy(), y.numpy()) for x, y in train_data.take(steps)))
    return tf.data.Dataset.from_tensor_slices((np.stack(images), np.stack(labels)))


def _train(plan, data, val_data, *, epochs: int, policy: str) -> tuple[list[dict], list[float], int]:
    settings = dataclasses.replace(plan.settings, profile=plan.settings.profile.model_copy(update={"epochs": epochs}),
                                   train=plan.settings.train.model_copy(update={"freeze_encoder_epochs": 0}))
    keras.backend.clear_session()
    cpu = TrainCpuTime()
    with tempfile.TemporaryDirectory(prefix="seglab-bench-") as state:
        result = train_model(plan.build, data, val_data, settings, state_dir=state, mixed_precision=policy,
                             callbacks=[cpu], verbose=0)
    return result.history, cpu.seconds, int(result.model.count_params())


def _summary(rows: list[dict], cpu_seconds: list[float], steps: int, batch: int) -> dict:
    train_s = statistics.median(r["train_seconds"] for r in rows)
    return {
        "epochs": len(rows),
        "epoch_s": statistics.median(r["seconds"] for r in rows),
        "step_ms": 1000 * train_s / steps,
        "step_cpu_ms": 1000 * statistics.median(cpu_seconds) / steps,
        "images_per_s": steps * batch / train_s,
    }


def measure_input(plan, train_data, val_data, *, pairs: int) -> dict:
    """Epoch 1 real (warm-up), then real and cached epochs alternating (`pairs` of each)."""
    steps, batch = plan.settings.steps_per_epoch, plan.settings.batch_size
    memory = in_memory(train_data, steps)
    # Epoch e takes its batches from the real pipeline when e is odd (1-based), else from memory.
    choice = tf.data.Dataset.from_tensor_slices(np.array([0] * steps + [1] * steps, np.int64)).repeat()
    alternating = tf.data.Dataset.choose_from_datasets([train_data, memory.repeat()], choice)
    rows, cpu, params = _train(plan, alternating, val_data, epochs=1 + 2 * pairs, policy="float32")
    real = [i for i in range(1, len(rows)) if i % 2 == 0]  # 0-based: epochs 3, 5, ... are real
    cached = [i for i in range(1, len(rows)) if i % 2 == 1]
    out = {
        "param_count": params,
        "first_epoch_s": rows[0]["seconds"],
        "real": _summary([rows[i] for i in real], [cpu[i] for i in real], steps, batch),
        "cached": _summary([rows[i] for i in cached], [cpu[i] for i in cached], steps, batch),
    }
    out["input_wait_share"] = 1 - out["cached"]["step_ms"] / out["real"]["step_ms"]
    out["input_cpu_share"] = 1 - out["cached"]["step_cpu_ms"] / out["real"]["step_cpu_ms"]
    return out


def measure_dtype(plan, train_data, val_data, *, epochs: int, repeats: int) -> dict:
    """float32 vs mixed_bfloat16 on in-memory batches; runs alternate, medians over `repeats` each."""
    steps, batch = plan.settings.steps_per_epoch, plan.settings.batch_size
    memory = in_memory(train_data, steps).repeat()
    runs: dict[str, list[dict]] = {"float32": [], "mixed_bfloat16": []}
    for _ in range(repeats):
        for policy in runs:
            rows, cpu, _ = _train(plan, memory, val_data, epochs=epochs, policy=policy)
            runs[policy].append(_summary(rows[1:], cpu[1:], steps, batch))
    out = {policy: {key: statistics.median(r[key] for r in results) for key in results[0]}
           for policy, results in runs.items()}
    out["bf16_speedup"] = out["float32"]["step_ms"] / out["mixed_bfloat16"]["step_ms"]
    out["bf16_cpu_speedup"] = out["float32"]["step_cpu_ms"] / out["mixed_bfloat16"]["step_cpu_ms"]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--profile", help="profile of params.yaml to use (default: its `profile`)")
    p.add_argument("--image-size", type=int, help="override the profile's image_size")
    p.add_argument("--models", help="comma-separated names from params `models` (default: all)")
    p.add_argument("--pairs", type=int, default=3, help="real and cached epochs measured per model (each)")
    p.add_argument("--dtype-models", default="unet,deeplabv3plus_resnet50,unet_mobilenetv2_imagenet",
                   help="comma-separated models also measured under mixed_bfloat16 ('' for none)")
    p.add_argument("--dtype-epochs", type=int, default=3, help="epochs per dtype run (the first is warm-up)")
    p.add_argument("--dtype-repeats", type=int, default=2, help="runs of each dtype per model (alternating)")
    p.add_argument("--json", type=Path, help="also write the record here")
    args = p.parse_args(argv)

    os.chdir(REPO)  # params paths are relative to the repository root
    cfg = load_config(args.params)
    if args.profile:
        cfg = cfg.model_copy(update={"profile": args.profile})
        cfg.run_profile  # noqa: B018 - fails on an unknown profile
    if args.image_size:
        profiles = {**cfg.profiles, cfg.profile: cfg.run_profile.model_copy(update={"image_size": args.image_size})}
        cfg = cfg.model_copy(update={"profiles": profiles})
    names = args.models.split(",") if args.models else list(cfg.models)
    dtype_models = [n for n in args.dtype_models.split(",") if n] if args.dtype_models else []
    profile = cfg.run_profile
    record: dict = {
        "benchmark": "training",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/training.py", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "versions": versions(),
        "profile": {"name": cfg.profile, **profile.model_dump(mode="json")},
        "load_average_start": os.getloadavg(),
        "models": {},
    }
    started = time.perf_counter()
    for name in names:
        plan = plan_run(cfg, name)
        train_data, val_data = training_datasets(cfg, plan)
        entry: dict = {"arch": plan.arch, "weights": plan.weights, "width": plan.width,
                       "steps_per_epoch": plan.settings.steps_per_epoch,
                       **measure_input(plan, train_data, val_data, pairs=args.pairs)}
        entry["estimated_stage_s"] = entry["first_epoch_s"] + (profile.epochs - 1) * entry["real"]["epoch_s"]
        print(f"{name}: {entry['real']['step_ms']:.0f} ms/step real input, {entry['cached']['step_ms']:.0f} "
              f"cached (input wait {100 * entry['input_wait_share']:.1f} % wall, "
              f"{100 * entry['input_cpu_share']:.1f} % CPU)", flush=True)
        if name in dtype_models:
            entry["dtype"] = measure_dtype(plan, train_data, val_data, epochs=args.dtype_epochs,
                                           repeats=args.dtype_repeats)
            print(f"{name}: mixed_bfloat16 {entry['dtype']['bf16_speedup']:.2f}x float32 speed "
                  f"({entry['dtype']['bf16_cpu_speedup']:.2f}x in CPU time)", flush=True)
        record["models"][name] = entry
    record["seconds"] = time.perf_counter() - started
    record["load_average_end"] = os.getloadavg()
    record["estimated_total_train_s"] = sum(m["estimated_stage_s"] for m in record["models"].values())

    print()
    print(f"| model | params | step ms, real input | step ms, cached | images/s | input wait: wall / CPU "
          f"| first epoch s | epoch s | est. train@ s ({profile.epochs} epochs) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in record["models"].items():
        r, c = m["real"], m["cached"]
        print(f"| {name} | {m['param_count'] / 1e6:.2f} M | {r['step_ms']:.0f} | {c['step_ms']:.0f} "
              f"| {r['images_per_s']:.1f} | {100 * m['input_wait_share']:.1f} % / {100 * m['input_cpu_share']:.1f} % "
              f"| {m['first_epoch_s']:.1f} | {r['epoch_s']:.1f} | {m['estimated_stage_s']:.0f} |")
    dtype_rows = [(n, m["dtype"]) for n, m in record["models"].items() if "dtype" in m]
    if dtype_rows:
        print()
        print("| model | float32 step ms (CPU ms) | mixed_bfloat16 step ms (CPU ms) | bf16 speed-up: wall / CPU |")
        print("|---|---:|---:|---:|")
        for name, d in dtype_rows:
            f, b = d["float32"], d["mixed_bfloat16"]
            print(f"| {name} | {f['step_ms']:.0f} ({f['step_cpu_ms']:.0f}) | {b['step_ms']:.0f} ({b['step_cpu_ms']:.0f}) "
                  f"| {d['bf16_speedup']:.2f}x / {d['bf16_cpu_speedup']:.2f}x |")
    print(f"\nestimated train@ total: {record['estimated_total_train_s']:.0f} s; benchmark took "
          f"{record['seconds']:.0f} s")
    print(json.dumps(record, indent=2))
    if args.json:
        write_text_atomic(args.json, json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
