"""End to end: the real `dvc repro` and `dvc exp run` over the project's own dvc.yaml, in a scratch repo."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import COCO_MINI, REPO, requires_coco_mini

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _run(args, cwd, check=True):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", GX_ANALYTICS_ENABLED="false")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def scratch_repo(tmp_path) -> Path:
    """A git+DVC repo holding this project's pipeline files, with a smaller sample for speed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "data").mkdir()
    shutil.copy(REPO / "data" / ".gitignore", repo / "data" / ".gitignore")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sample"].update(train_images=24, val_images=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    _run(["dvc", "config", "core.analytics", "false"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], repo)
    return repo


def test_dvc_repro_runs_sample_shard_validate_then_does_nothing(scratch_repo):
    first = _run(["dvc", "repro", "validate_data"], scratch_repo)
    for stage in ("sample", "shard", "validate_data"):
        assert f"Running stage '{stage}'" in first.stdout, first.stdout
    report = json.loads((scratch_repo / "data/reports/shard.json").read_text())
    assert report["splits"]["train"]["images"] == 24 and report["splits"]["val"]["images"] == 8
    assert report["class_set"] == "voc20"
    assert (scratch_repo / "data/reports/validation/index.html").is_file()
    assert list((scratch_repo / "data/shards/train").glob("part-*.parquet"))
    second = _run(["dvc", "repro", "validate_data"], scratch_repo)
    assert "Running stage" not in second.stdout and "Data and pipelines are up to date" in second.stdout
    metrics = _run(["dvc", "metrics", "show", "--json"], scratch_repo)
    assert "shard.json" in metrics.stdout


@requires_coco_mini
@pytest.mark.coco_mini
def test_dvc_exp_run_switches_to_a_real_coco_root(scratch_repo):
    proc = _run(["dvc", "exp", "run", "validate_data", "-S", f"data.root={COCO_MINI}", "-S", "data.class_set=all80"],
                scratch_repo)
    assert "Running stage 'shard'" in proc.stdout, proc.stdout
    report = json.loads((scratch_repo / "data/reports/shard.json").read_text())
    assert report["source"] == "coco-mini" and report["class_set"] == "all80" and len(report["classes"]) == 81
    assert report["splits"]["train"]["images"] == 158 and report["splits"]["val"]["images"] == 133


def test_bad_params_fail_with_the_key_named(scratch_repo):
    params = yaml.safe_load((scratch_repo / "params.yaml").read_text())
    params["data"]["crowd"] = "maybe"
    (scratch_repo / "params.yaml").write_text(yaml.safe_dump(params))
    proc = _run(["seglab", "shard"], scratch_repo, check=False)
    assert proc.returncode == 2 and "data.crowd" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_reports_bad_input_without_a_traceback(scratch_repo, tmp_path):
    params = yaml.safe_load((scratch_repo / "params.yaml").read_text())
    params["data"]["root"] = str(tmp_path / "no-such-coco")
    (scratch_repo / "params.yaml").write_text(yaml.safe_dump(params))
    proc = _run(["seglab", "shard"], scratch_repo, check=False)
    assert proc.returncode == 1 and "COCO root not found" in proc.stderr and "Traceback" not in proc.stderr


def test_only_the_gan_augmented_variants_depend_on_the_gan_stages(scratch_repo):
    from dvc.dependency import ParamsDependency
    from dvc.repo import Repo

    params = yaml.safe_load((scratch_repo / "params.yaml").read_text())
    augmented = "unet_mobilenetv2_imagenet+pix2pix"
    assert params["models"][augmented]["train_data"] == "data/synthetic_valid/pix2pix"
    with Repo(str(scratch_repo)) as repo:
        stages = {stage.name: stage for stage in repo.index.stages}
    for name in params["models"]:
        stage = stages[f"train@{name}"]
        deps = {d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)}
        keys = {p for d in stage.deps if isinstance(d, ParamsDependency) for p in d.params}
        # GAN settings reach a variant through validate_synthetic@<gan>'s output, never as params.
        assert not any(k.startswith(("gan", "validate_synthetic")) for k in keys), (name, keys)
        expected = {"data/shards", "data/synthetic_valid/pix2pix"} if name == augmented else {"data/shards"}
        assert {d for d in deps if d.startswith("data/")} == expected, name
    # `+` works in a stage name on the command line; the variant pulls in its own GAN's stages only.
    dag = _run(["dvc", "dag", "--dot", f"train@{augmented}"], scratch_repo).stdout
    upstream = set(re.findall(r'^\s*"([^"]+)";$', dag, flags=re.M))
    assert upstream == {"sample", "shard", "train_gan@pix2pix", "synthesize@pix2pix", "validate_synthetic@pix2pix",
                        f"train@{augmented}"}, dag
    assert "validate_synthetic" not in _run(["dvc", "dag", "--dot", "train@unet_mobilenetv2_imagenet"],
                                            scratch_repo).stdout
