"""Fixed costs of the `train@<model>` and `evaluate@<model>` stages: where a default stage's time goes.

Every stage runs in a fresh process, as `dvc repro` runs it (`run_train` / `run_evaluate`, the
functions `seglab train` / `seglab evaluate` call), with params.yaml as it is except that outputs
and resume state go to a temporary folder. Inside the process:

- **start → first step**: from the process's start (its start time in /proc, so the interpreter's
  own start-up counts) to the first `on_train_batch_begin`, split into imports, planning
  (`plan_run`: shard summaries, class pixel counts), the datasets (`training_datasets`), the model
  with its weights (`RunPlan.build`), and the rest up to the first batch (compile, optimizer build,
  fit's set-up and iterator).
- **tracing**: the first train batch of the process minus the median later batch (the train step is
  traced on its first call), the same for the first validation batch, and for the first batch of
  the epoch that unfreezes a pretrained encoder (re-tracing, where the unfreeze changes the trainable
  set: with `train.encoder_batchnorm: train` only, since a held encoder keeps it).
- **per epoch outside the train steps**: validation (`on_test_begin` → `on_test_end`), the
  callbacks after it (history, plateau, early stopping with its copy of the best weights), the resume commit
  (`ResumableBackup._save_model`), and the gaps between (fit's own bookkeeping).
- **saving**: from the end of `fit` to `run_train`'s return (restoring the best weights, writing
  model.keras, train.json, history.csv), and the process's exit after it (the parent's wall
  time of the process minus the time the child saw; the child exits as `seglab` does, without the
  interpreter's teardown).

All timestamps inside `fit` come from a Keras callback (`PhaseClock`); the steps outside it from
wrappers around the named seglab functions. For `evaluate@` the same: start-up and imports,
loading the model, the first call of each predictor (tracing), the timed predictions, the
latency runs, and writing the outputs.

Before each stage the parent times a fixed pure-Python loop (`python_probe`, the last column): this
machine's minutes differ in speed, and single-threaded Python work (imports, tracing, Keras'
loading) slows in its slow minutes by more than the training steps do, so the column tells which
rows ran in one.

`--jit` runs the `train@` stage of each of `--jit-models` once more per setting of Keras'
`jit_compile` (XLA): True and False (the main pass ran "auto", which Keras resolves to False on a
CPU-only TensorFlow; the table shows what it resolved to), in alternating order by model, and
reports the first-epoch cost (tracing/compilation) against the median step time.

`--stages evaluate` still trains each model first (into the temporary folder); `--trained` instead
evaluates the models the project's train stages left in params.yaml's train.out (after `dvc repro`).

Prints Markdown tables and the JSON record; `--json PATH` writes the record.
Run: `.venv/bin/python benchmarks/overhead.py` from the repository root (needs `data/shards`:
`dvc repro validate_data`).
"""

from __future__ import annotations

import os
import time

# The process's age when this line runs (the interpreter's own start-up), from its start time in /proc.
_TICKS = os.sysconf("SC_CLK_TCK")
with open("/proc/self/stat") as _stat:
    _STARTED_AFTER_BOOT = int(_stat.read().rsplit(")", 1)[1].split()[19]) / _TICKS
PROCESS_START = time.perf_counter() - (time.clock_gettime(time.CLOCK_BOOTTIME) - _STARTED_AFTER_BOOT)

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# One of each kind in the default comparison: U-Net and DeepLabV3+, ImageNet and from scratch.
HEADLINE_MODELS = ("unet_mobilenetv2_imagenet", "unet_mobilenetv2_scratch", "deeplabv3plus_mobilenetv2_imagenet")
JIT_SETTINGS = ("true", "false")  # "auto" is the default run's setting, measured in the main pass


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Stopwatch:
    """Durations of wrapped functions (and the start of each call), by name."""

    def __init__(self):
        self.calls: dict[str, list[float]] = {}
        self.starts: dict[str, list[float]] = {}

    def wrap(self, owner, attribute: str, name: str | None = None):
        function = getattr(owner, attribute)
        name = name or attribute

        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            self.starts.setdefault(name, []).append(start)
            try:
                return function(*args, **kwargs)
            finally:
                self.calls.setdefault(name, []).append(time.perf_counter() - start)

        setattr(owner, attribute, timed)

    def total(self, name: str) -> float:
        return sum(self.calls.get(name, []))


def _phase_clock():
    import keras

    class PhaseClock(keras.callbacks.Callback):
        """Timestamps of fit's phases: per epoch, every train and validation batch, and the callbacks."""

        def __init__(self):
            super().__init__()
            self.train_begin = self.train_end = None
            self.epochs: list[dict] = []

        def on_train_begin(self, logs=None):
            self.train_begin = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.epochs.append({"epoch": epoch + 1, "begin": time.perf_counter(), "batches": [], "test_batches": []})

        def on_train_batch_begin(self, batch, logs=None):
            self.epochs[-1]["batches"].append([time.perf_counter(), None])

        def on_train_batch_end(self, batch, logs=None):
            self.epochs[-1]["batches"][-1][1] = time.perf_counter()

        def on_test_begin(self, logs=None):
            if self.epochs:
                self.epochs[-1]["test_begin"] = time.perf_counter()

        def on_test_batch_begin(self, batch, logs=None):
            if self.epochs:
                self.epochs[-1]["test_batches"].append([time.perf_counter(), None])

        def on_test_batch_end(self, batch, logs=None):
            if self.epochs:
                self.epochs[-1]["test_batches"][-1][1] = time.perf_counter()

        def on_test_end(self, logs=None):
            if self.epochs:
                self.epochs[-1]["test_end"] = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epochs[-1]["end"] = time.perf_counter()

        def on_train_end(self, logs=None):
            self.train_end = time.perf_counter()

    return PhaseClock()


def _median_after_first(durations: list[float]) -> float:
    return statistics.median(durations[1:]) if len(durations) > 1 else durations[0]


def child_train(params: Path, name: str, jit: str) -> dict:
    import logging

    import keras  # noqa: F401
    import tensorflow  # noqa: F401

    from seglab.config import load_config
    from seglab.models import transfer
    from seglab.train import loop, plan, resume, run
    imported = time.perf_counter()
    logging.basicConfig(level=logging.WARNING)

    watch = Stopwatch()
    watch.wrap(run, "plan_run")
    watch.wrap(run, "training_datasets")
    watch.wrap(plan.RunPlan, "build")
    watch.wrap(resume.ResumableBackup, "_save_model", "commit")
    # The parts of saving: the record (git revision included), model.keras, the resume state's removal.
    watch.wrap(run, "_train_record")
    watch.wrap(run.keras.Model, "save", "save_model")
    watch.wrap(run, "clear_state")
    watch.wrap(transfer, "build_optimizer")
    loop.build_optimizer = transfer.build_optimizer  # the name loop.py calls, and UnfreezeEncoder's module's
    compiled = {}
    compile_model = loop.keras.Model.compile

    def compile_and_note(model, *args, **kwargs):
        compile_model(model, *args, **kwargs)
        compiled["jit_compile"] = bool(model.jit_compile)

    loop.keras.Model.compile = compile_and_note
    loop.JIT_COMPILE = {"auto": "auto", "true": True, "false": False}[jit]
    cfg = load_config(params)
    clock = _phase_clock()
    run.run_train(cfg, name, callbacks=[clock], verbose=0)
    returned = time.perf_counter()

    epochs = clock.epochs
    steps = [[end - begin for begin, end in e["batches"]] for e in epochs]
    tests = [[end - begin for begin, end in e["test_batches"]] for e in epochs]
    later_steps = [d for epoch in steps for d in epoch[1:]] + [epoch[0] for epoch in steps[1:]]
    step = statistics.median(later_steps)
    test_step = statistics.median([d for epoch in tests for d in epoch[1:]] or [d for epoch in tests for d in epoch])
    # A commit belongs to the epoch whose end it follows (commits are spaced by time, not every epoch).
    commits = list(zip(watch.starts.get("commit", []), watch.calls.get("commit", [])))
    rows = []
    for i, e in enumerate(epochs):
        following = epochs[i + 1]["begin"] if i + 1 < len(epochs) else clock.train_end
        rows.append({
            "epoch": e["epoch"],
            "seconds": following - e["begin"],
            "steps": sum(steps[i]),
            "first_step": steps[i][0],
            "validation": e["test_end"] - e["test_begin"],
            "after_validation": e["end"] - e["test_end"],  # history, plateau, early stopping, checkpoint
            "commit": sum(seconds for start, seconds in commits if e["end"] <= start < following),
            "after_epoch": following - e["end"],            # commit, next epoch's on_epoch_begin (unfreeze)
        })
    settings_freeze = cfg.train.freeze_encoder_epochs
    pretrained = cfg.model(name).weights is not None
    unfreeze_epoch = settings_freeze + 1 if pretrained and settings_freeze and len(epochs) > settings_freeze else None
    first_batch = epochs[0]["batches"][0][0]
    out = {
        "model": name,
        "jit": jit,
        "jit_compile": compiled.get("jit_compile"),
        "steps_per_epoch": len(steps[0]),
        "epochs": len(epochs),
        "imports": imported - PROCESS_START,
        "plan": watch.total("plan_run"),
        "datasets": watch.total("training_datasets"),
        "build": watch.total("build"),
        "to_fit": clock.train_begin - watch.starts["plan_run"][0] - watch.total("plan_run")
        - watch.total("training_datasets") - watch.total("build"),
        "fit_setup": first_batch - clock.train_begin,
        "start_to_first_step": first_batch - PROCESS_START,
        "step": step,
        "trace_train": steps[0][0] - step,
        "trace_validation": tests[0][0] - test_step,
        "retrace_unfreeze": (steps[unfreeze_epoch - 1][0] - step) if unfreeze_epoch else None,
        "unfreeze_build_optimizer": watch.total("build_optimizer"),
        "fit": clock.train_end - clock.train_begin,
        "train_steps": sum(sum(s) for s in steps),
        "saving": returned - clock.train_end,
        "saving_parts": {key: watch.total(key) for key in ("_train_record", "save_model", "clear_state")},
        "child_seconds": returned - PROCESS_START,
        "epoch_rows": rows,
    }
    return out


def child_evaluate(params: Path, name: str) -> dict:
    import logging

    import keras  # noqa: F401
    import tensorflow  # noqa: F401

    from seglab.config import load_config
    from seglab.evaluate import evaluate, inference
    imported = time.perf_counter()
    logging.basicConfig(level=logging.WARNING)

    watch = Stopwatch()
    # plain_and_tta / TracedPredictor: only from 2026-12-06 on (A/B runs against older code skip them).
    for attribute in ("load_trained", "eval_dataset", "evaluate_predictors", "plain_and_tta", "write_evaluation"):
        if hasattr(evaluate, attribute):
            watch.wrap(evaluate, attribute)
    watch.wrap(inference, "measure_latency")  # called by evaluate_predictors, in its own module

    def record(key, call, images):
        start = time.perf_counter()
        try:
            return call(images)
        finally:
            watch.calls.setdefault(key, []).append(time.perf_counter() - start)

    # Every predictor's calls, timed: Keras models (traced by inference_function) and TracedPredictors.
    make_function = inference.inference_function
    inference.inference_function = lambda predictor, shape: functools.partial(
        record, f"predictor-{predictor.name}", make_function(predictor, shape))
    if hasattr(inference, "TracedPredictor"):
        traced_call = inference.TracedPredictor.__call__
        inference.TracedPredictor.__call__ = lambda predictor, images: record(
            f"predictor-{predictor.name}", functools.partial(traced_call, predictor), images)
    if hasattr(getattr(inference, "TracedPredictor", None), "given"):  # the TTA from the plain predictor's probabilities
        traced_given = inference.TracedPredictor.given
        inference.TracedPredictor.given = lambda predictor, images, base: record(
            f"predictor-{predictor.name}", lambda batch: traced_given(predictor, batch, base), images)
    cfg = load_config(params)
    evaluate.run_evaluate(cfg, name)
    returned = time.perf_counter()
    predictors = sorted(k for k in watch.calls if k.startswith("predictor-"))
    # Extra latency calls (warm-up + runs) close each predictor's calls where measure_latency ran; the
    # full protocol times its val calls as the latency instead (seglab.evaluate.inference), so none.
    latency_calls = (cfg.evaluate.latency_runs + 1) if "measure_latency" in watch.calls else 0
    first_calls = sum(watch.calls[k][0] for k in predictors)                    # tracing + one batch
    batch_calls = sum(sum(watch.calls[k][1:len(watch.calls[k]) - latency_calls]) for k in predictors)  # val calls
    return {
        "model": name,
        "imports": imported - PROCESS_START,
        "load_model": watch.total("load_trained"),
        "make_predictors": watch.total("plain_and_tta"),
        "first_calls": first_calls,
        "predict": batch_calls,
        "latency": watch.total("measure_latency"),
        "latency_runs": cfg.evaluate.latency_runs,
        "evaluate_predictors": watch.total("evaluate_predictors"),
        "write": watch.total("write_evaluation"),
        "child_seconds": returned - PROCESS_START,
    }


def python_probe() -> float:
    """Seconds of a fixed single-threaded pure-Python loop: this machine's speed for the kind of work
    (imports, tracing) that slows the most in its slow minutes, taken just before each stage."""
    start = time.perf_counter()
    total = 0
    for i in range(3_000_000):
        total += i
    return time.perf_counter() - start


def run_child(args: list[str]) -> dict:
    probe = python_probe()
    start, load_before = time.perf_counter(), loadavg()
    done = subprocess.run([sys.executable, __file__, "--child", *args], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{args}: exit {done.returncode}\n{done.stderr[-4000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record.update(wall=wall, exit=wall - record["child_seconds"], loadavg_before=load_before, loadavg_after=loadavg(),
                  python_probe=probe)
    return record


def stage_params(folder: Path, trained: bool = False) -> Path:
    """params.yaml with the outputs in `folder`; with `trained`, the models and histories the
    project's own train stages wrote (params.yaml's train.out, train.metrics) are read from where they are."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if not trained:
        params["train"].update(out=str(folder / "models"), metrics=str(folder / "metrics"),
                               state=str(folder / "state"))
    params["evaluate"]["out"] = str(folder / "eval")
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _s(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def _probe(record: dict) -> str:
    return f"{record['python_probe']:.2f}" if "python_probe" in record else "–"  # records from before it existed


def train_table(records: list[dict]) -> str:
    lines = ["| model | stage s | start → 1st step s (imports / plan / data / build / rest) | trace s (train / val) "
             "| re-trace at unfreeze s | epochs × steps | step ms | train steps s | validation s/epoch "
             "| callbacks s/epoch | commits (n / s) | saving + exit s | non-step share | by the steps' sum | Python probe s |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        rows = r["epoch_rows"]
        steady = rows[1:] or rows
        # Tracing is not step time: steps at the median step time are.
        non_step = r["wall"] - r["epochs"] * r["steps_per_epoch"] * r["step"]
        lines.append(
            f"| {r['model']} | {r['wall']:.1f} | {r['start_to_first_step']:.1f} ({r['imports']:.1f} / {r['plan']:.1f} / "
            f"{r['datasets']:.1f} / {r['build']:.1f} / {r['to_fit'] + r['fit_setup']:.1f}) | {r['trace_train']:.1f} / "
            f"{r['trace_validation']:.1f} | {_s(r['retrace_unfreeze'])} | {r['epochs']} × {r['steps_per_epoch']} | "
            f"{1000 * r['step']:.0f} | {r['train_steps']:.1f} | "
            f"{statistics.median(x['validation'] for x in steady):.2f} | "
            f"{statistics.median(x['after_validation'] for x in steady):.2f} | "
            f"{sum(x['commit'] > 0 for x in rows)} / {sum(x['commit'] for x in rows):.1f} | "
            f"{r['saving'] + r['exit']:.1f} | "
            f"{100 * non_step / r['wall']:.0f} % | {100 * (1 - r['train_steps'] / r['wall']):.0f} % | "
            f"{_probe(r)} |")
    return "\n".join(lines)


def evaluate_table(records: list[dict]) -> str:
    lines = ["| model | stage s | imports s | load model s | first calls (tracing) s | val predictions s "
             "| latency runs s | write outputs s | other + exit s | Python probe s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        known = r["imports"] + r["load_model"] + r["first_calls"] + r["predict"] + r["latency"] + r["write"]
        lines.append(f"| {r['model']} | {r['wall']:.1f} | {r['imports']:.1f} | {r['load_model']:.1f} | "
                     f"{r['first_calls']:.1f} | {r['predict']:.1f} | {r['latency']:.1f} | {r['write']:.1f} | "
                     f"{r['wall'] - known:.1f} | {_probe(r)} |")
    return "\n".join(lines)


def jit_table(records: list[dict]) -> str:
    lines = ["| model | jit_compile (resolved) | stage s | first train batch s | first val batch s | step ms | load |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in records:
        first = r["epoch_rows"][0]["first_step"]
        lines.append(f"| {r['model']} | {r['jit']} ({r['jit_compile']}) | {r['wall']:.1f} | {first:.1f} | "
                     f"{r['trace_validation']:.1f} | {1000 * r['step']:.0f} | {r['loadavg_before']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(HEADLINE_MODELS))
    parser.add_argument("--jit", default=",".join(JIT_SETTINGS),
                        help="jit_compile settings to compare (empty: only the default run)")
    parser.add_argument("--jit-models", default="unet_mobilenetv2_imagenet")
    parser.add_argument("--stages", default="train,evaluate", help="which stages of each model to run")
    parser.add_argument("--trained", action="store_true",
                        help="evaluate the models `dvc repro` trained (params.yaml train.out) without training them")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, params, name, *rest = args.child
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from seglab import cli

        # As `seglab` starts (seglab.cli.run); commits before start_stage_process only left out imports.
        getattr(cli, "start_stage_process", cli.leave_out_imports)(kind)
        record = child_train(Path(params), name, *rest) if kind == "train" else child_evaluate(Path(params), name)
        print(json.dumps(record))
        # Leave as `seglab` does (seglab.cli.run): no interpreter teardown after the outputs.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    sys.path.insert(0, str(Path(__file__).parent))
    from environment import machine, versions

    models = [m for m in args.models.split(",") if m]
    jits = [j for j in args.jit.split(",") if j]
    started = dt.datetime.now(dt.timezone.utc)
    train, evaluations, jit_runs = [], [], []
    with tempfile.TemporaryDirectory(prefix="seglab-overhead-") as tmp:
        params = stage_params(Path(tmp), trained=args.trained)
        stages = args.stages.split(",")
        if args.trained and ("train" in stages or jits):
            parser.error("--trained evaluates the models there are: use it with --stages evaluate --jit ''")
        for name in models:
            if not args.trained:
                train.append(run_child(["train", str(params), name, "auto"]))
                print(f"train@{name}: {train[-1]['wall']:.1f} s, load {train[-1]['loadavg_before']}", file=sys.stderr)
            if "evaluate" in stages:
                evaluations.append(run_child(["evaluate", str(params), name]))
                print(f"evaluate@{name}: {evaluations[-1]['wall']:.1f} s", file=sys.stderr)
        for index, name in enumerate(m for m in args.jit_models.split(",") if m):
            order = jits if index % 2 == 0 else jits[::-1]  # alternate, so load drifts hit every setting alike
            for jit in order:
                jit_runs.append(run_child(["train", str(params), name, jit]))
                print(f"train@{name} jit={jit}: {jit_runs[-1]['wall']:.1f} s", file=sys.stderr)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    record = {
        "command": shlex.join([".venv/bin/python", "benchmarks/overhead.py", *(argv or sys.argv[1:])]),
        "commit": git,
        "machine": machine(),
        "versions": versions(),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "train": train,
        "evaluate": evaluations,
        "jit": jit_runs,
    }
    if train:
        print("### train@\n\n" + train_table(train))
    if evaluations:
        print("\n### evaluate@\n\n" + evaluate_table(evaluations))
    if jit_runs:
        jit_runs += [r for r in train if r["model"] in args.jit_models.split(",")]
        print("\n### jit_compile\n\n" + jit_table(sorted(jit_runs, key=lambda r: (r["model"], r["jit"]))))
    print(json.dumps({k: v for k, v in record.items() if k not in ("train", "evaluate", "jit")}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
