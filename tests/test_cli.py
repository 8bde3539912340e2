"""The `seglab` command as a process: exit codes, and its output complete despite the immediate exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from seglab import cli

SEGLAB = Path(sys.executable).parent / "seglab"


def _seglab(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([str(SEGLAB), *args], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_stage_exits_zero_with_its_whole_json_result_on_stdout(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"sample": {"out": "sample", "train_images": 2, "val_images": 1}}))
    proc = _seglab(["sample"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # parses only if the exit flushed all of it
    assert (tmp_path / "sample" / "annotations" / "instances_train2017.json").is_file()
    assert result


def test_a_config_error_exits_two_naming_the_file(tmp_path):
    proc = _seglab(["--params", "missing.yaml", "sample"], tmp_path)
    assert proc.returncode == 2
    assert "missing.yaml" in proc.stderr


def test_the_stages_import_and_plot_without_the_modules_the_command_leaves_out(tmp_path):
    """`seglab` blocks Keras' optional imports of scikit-learn, matplotlib.pyplot and, in the stages that
    run Keras models, pandas (in the segmenters' stages also TensorFlow's of scipy); every such stage
    module must still import, Keras must take them as absent, and the evaluation's plots must still draw.
    Keras comes in at the start, with the collector running again after it and the objects of the
    imports frozen."""
    assert set(cli.KERAS_STAGES) <= set(cli.STAGES)
    assert "pandas" not in cli.imports_left_out("validate-data")  # Great Expectations reads DataFrames
    assert "scipy" in cli.imports_left_out("evaluate") and "scipy" not in cli.imports_left_out("train-gan")
    script = """
import sys
from seglab import cli
cli.start_stage_process("evaluate")
import gc
assert gc.isenabled() and gc.get_freeze_count() > 0 and "keras" in sys.modules
import numpy as np
import seglab.train.run, seglab.evaluate.evaluate, seglab.evaluate.predict, seglab.evaluate.ensemble
import seglab.gan.train, seglab.gan.synthesize
from seglab.evaluate.plots import plot_confusion
plot_confusion(np.eye(3, dtype=np.int64) * 5, ["a", "b", "c"], sys.argv[1])
import keras.src.wrappers.fixes as fixes
import keras.src.trainers.data_adapters.array_slicing as slicing
import pyarrow.parquet  # its pandas shim takes pandas as absent too
assert fixes.sklearn is None and slicing.pandas is None
assert not {"sklearn", "pandas", "matplotlib.pyplot", "scipy"} & set(sys.modules)
"""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "confusion.png")], check=False, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
