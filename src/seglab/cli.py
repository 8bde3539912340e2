"""`seglab <stage>`: thin entry points; each parses arguments and calls a stage function.

The same functions are what `dvc.yaml` runs and what the Prefect flows call.
"""

from __future__ import annotations

import argparse
import gc
import importlib.abc
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from seglab.config import ConfigError, load_config

log = logging.getLogger("seglab")


def _sample(cfg, args) -> dict:
    from seglab.data.sample import run_sample

    return run_sample(cfg)


def _shard(cfg, args) -> dict:
    from seglab.data.shard_stage import run_shard

    report = run_shard(cfg)
    return {k: v for k, v in report.items() if k != "skipped_records"} | {"skipped_records": len(report["skipped_records"])}


def _validate_data(cfg, args) -> dict:
    from seglab.data.validate import run_validate_data

    summary = run_validate_data(cfg)
    # The per-expectation detail lives in the report; the terminal gets the verdict.
    return {k: v for k, v in summary.items() if k != "expectations"}


def _train(cfg, args) -> dict:
    from seglab.train.run import run_train

    return run_train(cfg, args.name)


def _evaluate(cfg, args) -> dict:
    from seglab.evaluate.evaluate import run_evaluate

    return run_evaluate(cfg, args.name, data=args.data, split=args.split)


class InputsFailed(Exception):
    """A stage that ran but failed for some of its inputs: `result` is printed, then the failures,
    and the exit code is 1."""

    def __init__(self, result: dict, failures: list[str]):
        super().__init__(f"{len(failures)} input(s) failed:\n" + "\n".join(f"  {f}" for f in failures))
        self.result = result


def _predict(cfg, args) -> dict:
    from seglab.evaluate.predict import run_predict

    report = run_predict(cfg, args.name, args.images, args.out, tta=args.tta)
    summary = report.summary()
    if report.errors:
        raise InputsFailed(summary, [f"{e.error}: {e.message}" for e in report.errors])  # messages name the file
    return summary


def _ensemble(cfg, args) -> dict:
    from seglab.evaluate.ensemble import run_ensemble

    return run_ensemble(cfg)


def _ingest(cfg, args) -> dict:
    from seglab.warehouse.ingest import run_ingest

    return run_ingest(cfg)


def _report(cfg, args) -> str | dict:
    from seglab.warehouse.report import run_report

    warehouse = args.warehouse if args.warehouse is not None else cfg.warehouse.path
    return run_report(warehouse, dataset=args.dataset, class_set=args.class_set,
                      variant=args.variant, out=args.out)


def _train_gan(cfg, args) -> dict:
    from seglab.gan.train import run_train_gan

    return run_train_gan(cfg, args.name)


def _synthesize(cfg, args) -> dict:
    from seglab.gan.synthesize import run_synthesize

    return run_synthesize(cfg, args.name)


def _validate_synthetic(cfg, args) -> dict:
    from seglab.gan.validate import run_validate_synthetic

    summary = run_validate_synthetic(cfg, args.name)
    return {k: v for k, v in summary.items() if k not in ("expectations", "rejected_samples")}


def _download_coco(cfg, args) -> dict:
    from seglab.data.download import download_coco

    root = download_coco(args.dest, parts=args.parts, archives_dir=args.archives)
    return {"coco_root": str(root), "next": f"dvc exp run -S data.root={root}"}


STAGES: dict[str, tuple[Callable, str]] = {
    "sample": (_sample, "generate the embedded default COCO-format dataset (params: sample, seed)"),
    "shard": (_shard, "COCO root or images + label maps (data.format) -> Parquet shards (params: data, shard)"),
    "validate-data": (_validate_data, "check the shards with the Great Expectations suite (params: validate)"),
    "train": (_train, "train one model from params `models` (params: profile, train, models.NAME)"),
    "evaluate": (_evaluate, ("evaluate one trained model, plain and with TTA, on evaluate.split of evaluate.data "
                             "(params: evaluate) or on --data/--split")),
    "predict": (_predict, ("label map and colour overlay of new images with a trained model, at their own "
                           "resolution (params: evaluate protocol, predict)")),
    "ensemble": (_ensemble, "evaluate the weighted ensemble of params `ensemble.members`"),
    "ingest": (_ingest, "load every evaluation into the DuckDB warehouse (params: warehouse)"),
    "report": (_report, ("Markdown tables from the warehouse: latest runs, mean +- std over seeds, "
                         "GAN augmenter effect (params: warehouse.path)")),
    "train-gan": (_train_gan, "train one GAN augmenter (dcgan | sagan | pix2pix; params: gan)"),
    "synthesize": (_synthesize, "write labelled synthetic shards from a trained augmenter"),
    "validate-synthetic": (_validate_synthetic,
                           "Great Expectations gate on synthetic shards (params: validate_synthetic)"),
    "download-coco": (_download_coco, "download and unpack COCO 2017 (needs internet), verifying MD5 checksums"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seglab", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (_, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in ("train", "evaluate"):
            p.add_argument("name", help="a model name from params.yaml `models`")
        if name == "evaluate":
            p.add_argument("--data", type=Path, default=None,
                           help=("a shard root (<split>/part-*.parquet with manifest.json, e.g. data/shards); "
                                 "default: params.yaml evaluate.data. A raw dataset must be sharded first "
                                 "(`seglab shard`)"))
            p.add_argument("--split", default=None,
                           help=("the split of --data to evaluate (default: params.yaml evaluate.split). Any "
                                 "other target than params.yaml's writes <evaluate.out>/<name>@<dataset>.<split>/"))
        if name == "predict":
            p.add_argument("name", help="a trained model: <train.out>/<name>/{model.keras, train.json}")
            p.add_argument("images", nargs="+", type=Path,
                           help="image files, or folders whose image files (by ending) are taken in name order")
            p.add_argument("--out", type=Path, required=True,
                           help="folder for <stem>_labels.png (class indices) and <stem>_overlay.png per image")
            p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                           help="merge the evaluate.tta views per window (default: params.yaml predict.tta)")
        if name in ("train-gan", "synthesize", "validate-synthetic"):
            p.add_argument("name", choices=["dcgan", "sagan", "pix2pix"], help="the augmenter")
        if name == "report":
            p.add_argument("--warehouse", type=Path, default=None,
                           help="the DuckDB file (default: params.yaml warehouse.path)")
            p.add_argument("--dataset", default=None, help="only runs on this dataset (runs.dataset)")
            p.add_argument("--class-set", default=None, help="only runs on this class set (runs.class_set)")
            p.add_argument("--variant", choices=["plain", "tta"], default=None,
                           help="only this variant (default: both)")
            p.add_argument("--out", type=Path, default=None,
                           help="write the Markdown to this file (atomically) instead of printing it")
        if name == "download-coco":
            p.add_argument("--dest", type=Path, default=Path("coco"), help="where the COCO root is created")
            p.add_argument("--parts", nargs="+", default=["annotations", "val2017", "train2017"],
                           choices=["annotations", "val2017", "train2017"], help="archives to fetch")
            p.add_argument("--archives", type=Path, default=None,
                           help="folder with already-downloaded archives (checked against the MD5s, no network)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # GX logs every expectation at INFO; our own summary says what matters.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    handler, _ = STAGES[args.stage]
    trace_dir = os.environ.get("SEGLAB_TRACE")
    try:
        # `report --warehouse PATH` needs nothing from params.yaml, so it runs outside the project too.
        cfg = None if getattr(args, "warehouse", None) is not None else load_config(args.params)
        if trace_dir:  # what this run reads, for checking dvc.yaml's deps (seglab.stage_trace)
            from seglab.stage_trace import ParamsReads, write_trace

            reads = ParamsReads(cfg) if cfg is not None else None
        result = handler(cfg, args)
        if trace_dir:
            write_trace(trace_dir, list(argv if argv is not None else sys.argv[1:]), reads)
    except ConfigError as e:
        print(f"seglab {args.stage}: {e}", file=sys.stderr)
        return 2
    except InputsFailed as e:  # the others were done: their result first, then what failed
        print(json.dumps(e.result, indent=2, default=str))
        print(f"seglab {args.stage}: error: {e}", file=sys.stderr)
        return 1
    except (ConnectionError, TimeoutError) as e:
        # Transient by nature: EX_TEMPFAIL tells schedulers (flows/pipeline.py) a retry may succeed.
        print(f"seglab {args.stage}: temporary failure: {e}", file=sys.stderr)
        return 75
    except (ValueError, FileNotFoundError) as e:
        # Bad input: the message already names the file/record and the rule; no traceback needed.
        print(f"seglab {args.stage}: error: {e}", file=sys.stderr)
        return 1
    if isinstance(result, str):  # a document (the report's Markdown), printed as it is
        sys.stdout.write(result)
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0


# Keras imports these when they are installed: scikit-learn for its wrappers, matplotlib.pyplot for
# its plotting helpers, pandas so that its data adapters recognise a DataFrame. No stage calls the
# first two (seglab's plots use matplotlib's object API), and the stages that run Keras models read
# no DataFrame (the Great Expectations and warehouse stages do, so they keep pandas). Each is a part
# of a stage process's start-up (benchmarks/README.md, "Fixed costs of a stage"). TensorFlow's legacy
# tf.keras imports scipy.sparse when it is installed (some 130 modules): of the Keras stages only the
# GANs' use scipy (pix2pix's layouts), the segmenters' do not.
KERAS_STAGES = ("train", "evaluate", "predict", "ensemble", "train-gan", "synthesize")
SEGMENTER_STAGES = ("train", "evaluate", "predict", "ensemble")
# module -> the stages whose process never imports it
LEFT_OUT_BY_STAGES = {"sklearn": tuple(STAGES), "matplotlib.pyplot": tuple(STAGES), "pandas": KERAS_STAGES,
                      "scipy": SEGMENTER_STAGES}


def imports_left_out(stage: str) -> tuple[str, ...]:
    """The modules the `seglab <stage>` process never imports (`run`)."""
    return tuple(module for module, stages in LEFT_OUT_BY_STAGES.items() if stage in stages)


class LeaveOut(importlib.abc.MetaPathFinder):
    """First on `sys.meta_path`: an import of one of `names` raises ModuleNotFoundError, which Keras and
    pyarrow take as "not installed". (A None entry in sys.modules would not do: pyarrow's compiled
    code reads sys.modules directly and takes the None for the module.)"""

    def __init__(self, names: Sequence[str]):
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        # Returning None (any other name) lets the next finder look for it.
        if fullname in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (left out of this process)", name=fullname)


def leave_out_imports(stage: str) -> None:
    """Make this process's imports of `imports_left_out(stage)` fail as if they were not installed."""
    sys.meta_path.insert(0, LeaveOut(imports_left_out(stage)))


def start_stage_process(stage: str) -> None:
    """What a `seglab <stage>` process does before the stage: leave out `imports_left_out(stage)` and,
    for a Keras stage, import Keras (with TensorFlow) while the garbage collector is paused, then
    freeze what the imports made.

    The imports make some 340,000 objects that live as long as the process; the collector's passes
    over them, during the imports and at every later full collection, find nothing to free
    (benchmarks/README.md, "Start-up without garbage collection").
    """
    leave_out_imports(stage)
    if stage not in KERAS_STAGES:
        return
    gc.disable()
    try:
        import keras  # noqa: F401
    finally:
        gc.enable()
    gc.freeze()


def run() -> None:
    """The `seglab` command: `main`, then an immediate exit once its outputs are on disk.

    Every stage has closed and atomically renamed its outputs when `main` returns; what remains,
    the interpreter tearing down TensorFlow's thread pools and objects, takes seconds per process
    (benchmarks/README.md, "Fixed costs of a stage") and writes nothing, so it is skipped.
    The process starts as `start_stage_process` says.
    """
    start_stage_process(build_parser().parse_args().stage)  # usage errors and --help exit here, as in main
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(rc)


if __name__ == "__main__":
    run()
