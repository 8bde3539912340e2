"""The `seglab` command as a process: exit codes, and its output complete despite the immediate exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

SEGLAB = Path(sys.executable).parent / "seglab"


def _seglab(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([str(SEGLAB), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


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
    """`seglab` blocks Keras' optional imports of scikit-learn and matplotlib.pyplot; every stage module
    must still import, Keras must take them as absent, and the evaluation's plots must still draw."""
    script = """
import sys
from seglab import cli
for name in cli.NOT_IMPORTED_BY_STAGES:
    sys.modules.setdefault(name, None)
import numpy as np
import seglab.train.run, seglab.evaluate.evaluate, seglab.gan.train, seglab.data.validate
from seglab.evaluate.plots import plot_confusion
plot_confusion(np.eye(3, dtype=np.int64) * 5, ["a", "b", "c"], sys.argv[1])
import keras.src.wrappers.fixes as fixes
assert fixes.sklearn is None and sys.modules["sklearn"] is None
"""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "confusion.png")], check=False, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
