"""Training speed per model at a profile: step time, images/s, input wait, bfloat16 vs float32.

For every model of params.yaml `models` (or `--models`), with the run's own code path
(`seglab.train.fit.plan_run` / `training_datasets` / `train_model`: same model, optimizer, loss,
metric, callbacks and per-epoch commit as `seglab train`):

1. **real input**: `--epochs` epochs of `steps_per_epoch` steps (the profile's: train images //
   batch) on the real pipeline (shard decode, random crop, augmentation, batching, prefetch)
   with the full validation pass. The first epoch (tracing, cache fill) is reported apart; step time
   and images/s are the means over the later epochs' training phases.
2. **cached input**: the same number of steps on batches taken once from that pipeline and held in
   memory (`take(steps).cache().repeat()`), so no step waits for input. The input-wait share is
   `1 - cached step / real step` (what the pipeline adds to a step, including CPU it takes from
   the model on shared cores); negative values mean noise larger than the effect.
3. **dtype** (`--dtype-models`): steps on cached batches under `mixed_bfloat16` against float32.

The encoder stays unfrozen (freeze epochs 0) so that every measured epoch runs the same step; the
estimate of a whole `train@<model>` stage at the profile is
`first epoch + (profile epochs - 1) x mean later epoch` (training + validation + commit).

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
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from seglab.atomic import write_text_atomic  # noqa: E402
from seglab.config import load_config  # noqa: E402
from seglab.train.fit import plan_run, train_model, training_datasets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "platform": platform.platform()}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for package in ("tensorflow-cpu", "tensorflow", "keras", "numpy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


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


def measure(plan, train_data, val_data, *, epochs: int, policy: str) -> dict:
    """Train `epochs` epochs with the stage's code; timings from the per-epoch history rows."""
    settings = dataclasses.replace(plan.settings, epochs=epochs, freeze_encoder_epochs=0)
    keras.backend.clear_session()
    cpu = TrainCpuTime()
    with tempfile.TemporaryDirectory(prefix="seglab-bench-") as state:
        result = train_model(plan.build, train_data, val_data, settings, state_dir=state, mixed_precision=policy,
                             callbacks=[cpu], verbose=0)
    rows = result.history
    later = rows[1:] or rows
    steps = settings.steps_per_epoch
    train_seconds = statistics.fmean(r["train_seconds"] for r in later)
    return {
        "policy": policy,
        "first_epoch_s": rows[0]["seconds"],
        "epoch_s": statistics.fmean(r["seconds"] for r in later),
        "step_ms": 1000 * train_seconds / steps,
        "step_cpu_ms": 1000 * statistics.fmean(cpu.seconds[1:] or cpu.seconds) / steps,
        "images_per_s": steps * settings.batch_size / train_seconds,
        "param_count": int(result.model.count_params()),
    }


def cached_batches(train_data: tf.data.Dataset, steps: int) -> tf.data.Dataset:
    return train_data.take(steps).cache().repeat()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--profile", help="profile of params.yaml to use (default: its `profile`)")
    p.add_argument("--image-size", type=int, help="override the profile's image_size")
    p.add_argument("--models", help="comma-separated names from params `models` (default: all)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per real-input run (the first is warm-up)")
    p.add_argument("--cached-epochs", type=int, default=2, help="epochs per cached-input run (the first is warm-up)")
    p.add_argument("--dtype-models", default="unet,deeplabv3plus_mobilenetv2_imagenet,unet_efficientnet_lite0_imagenet",
                   help="comma-separated models also measured under mixed_bfloat16 ('' for none)")
    p.add_argument("--no-cached", action="store_true", help="skip the cached-input runs (no input-wait share)")
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
                       "steps_per_epoch": plan.settings.steps_per_epoch}
        entry["real"] = measure(plan, train_data, val_data, epochs=args.epochs, policy="float32")
        print(f"{name}: real input {entry['real']['step_ms']:.0f} ms/step, "
              f"{entry['real']['images_per_s']:.1f} images/s", flush=True)
        if not args.no_cached or name in dtype_models:
            memory = cached_batches(train_data, plan.settings.steps_per_epoch)
            entry["cached"] = measure(plan, memory, val_data, epochs=args.cached_epochs, policy="float32")
            entry["input_wait_share"] = 1 - entry["cached"]["step_ms"] / entry["real"]["step_ms"]
            entry["input_cpu_share"] = 1 - entry["cached"]["step_cpu_ms"] / entry["real"]["step_cpu_ms"]
            print(f"{name}: cached input {entry['cached']['step_ms']:.0f} ms/step "
                  f"(input wait {100 * entry['input_wait_share']:.1f} %)", flush=True)
            if name in dtype_models:
                entry["cached_bf16"] = measure(plan, memory, val_data, epochs=args.cached_epochs,
                                               policy="mixed_bfloat16")
                entry["bf16_speedup"] = entry["cached"]["step_ms"] / entry["cached_bf16"]["step_ms"]
                entry["bf16_cpu_speedup"] = entry["cached"]["step_cpu_ms"] / entry["cached_bf16"]["step_cpu_ms"]
                print(f"{name}: mixed_bfloat16 {entry['cached_bf16']['step_ms']:.0f} ms/step "
                      f"({entry['bf16_speedup']:.2f}x float32; CPU time {entry['bf16_cpu_speedup']:.2f}x)", flush=True)
        real = entry["real"]
        entry["estimated_stage_s"] = real["first_epoch_s"] + (profile.epochs - 1) * real["epoch_s"]
        record["models"][name] = entry
    record["seconds"] = time.perf_counter() - started
    record["load_average_end"] = os.getloadavg()
    record["estimated_total_train_s"] = sum(m["estimated_stage_s"] for m in record["models"].values())

    print()
    print(f"| model | params | step ms (real input) | step CPU ms | images/s | input wait (wall / CPU) "
          f"| first epoch s | epoch s | est. train@ s ({profile.epochs} epochs) | bf16 / fp32 step ms (CPU ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in record["models"].items():
        wait = (f"{100 * m['input_wait_share']:.1f} % / {100 * m['input_cpu_share']:.1f} %"
                if "input_wait_share" in m else "–")
        bf16 = (f"{m['cached_bf16']['step_ms']:.0f} / {m['cached']['step_ms']:.0f} "
                f"({m['cached_bf16']['step_cpu_ms']:.0f} / {m['cached']['step_cpu_ms']:.0f})"
                if "cached_bf16" in m else "–")
        r = m["real"]
        print(f"| {name} | {r['param_count'] / 1e6:.2f} M | {r['step_ms']:.0f} | {r['step_cpu_ms']:.0f} "
              f"| {r['images_per_s']:.1f} | {wait} | {r['first_epoch_s']:.1f} | {r['epoch_s']:.1f} "
              f"| {m['estimated_stage_s']:.0f} | {bf16} |")
    print(f"\nestimated train@ total: {record['estimated_total_train_s']:.0f} s; benchmark took {record['seconds']:.0f} s")
    print(json.dumps(record, indent=2))
    if args.json:
        write_text_atomic(args.json, json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
