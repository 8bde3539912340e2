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
