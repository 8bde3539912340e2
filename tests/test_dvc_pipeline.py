"""End to end: the real `dvc repro` and `dvc exp run` over the project's own dvc.yaml, in a scratch repo."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from .conftest import (
    COCO_MINI,
    REPO,
    copy_camvid_pairs,
    make_scratch_repo,
    requires_camvid,
    requires_coco_mini,
)
from .conftest import run_command as _run
from .stage_deps import stage_dependency_problems

pytestmark = pytest.mark.slow


@pytest.fixture
def scratch_repo(tmp_path) -> Path:
    """A git+DVC repo holding this project's pipeline files, with a smaller sample for speed."""
    return make_scratch_repo(tmp_path / "repo", lambda p: p["sample"].update(train_images=24, val_images=8))


def test_dvc_repro_runs_sample_shard_validate_then_does_nothing(scratch_repo, tmp_path, monkeypatch):
    # Each stage records the modules it loaded and the params it read (seglab.stage_trace).
    monkeypatch.setenv("SEGLAB_TRACE", str(tmp_path / "traces"))
    first = _run(["dvc", "repro", "validate_data"], scratch_repo)
    data_stages = {"sample", "shard", "validate_data"}
    assert stage_dependency_problems(scratch_repo, tmp_path / "traces", data_stages) == {}
    for stage in ("sample", "shard", "validate_data"):
        assert f"Running stage '{stage}'" in first.stdout, first.stdout
    report = json.loads((scratch_repo / "data/reports/shard.json").read_text())
    assert report["splits"]["train"]["images"] == 24 and report["splits"]["val"]["images"] == 8
    assert report["class_set"] == "voc20"
    assert (scratch_repo / "data/reports/validation/index.html").is_file()
    assert list((scratch_repo / "data/shards/train").glob("part-*.parquet"))
    second = _run(["dvc", "repro", "validate_data"], scratch_repo)
    assert "Running stage" not in second.stdout and "Data and pipelines are up to date" in second.stdout
    # What runs compare, one column each; per-class counts stay in the details file.
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], scratch_repo).stdout)
    [metrics] = [files["data"]["data/reports/shard.json"]["data"] for files in shown.values()]
    assert metrics["splits"]["train"]["images"] == 24 and 0 < metrics["splits"]["train"]["labelled_pixel_share"] < 1
    assert "class_pixels" not in json.dumps(metrics) and "classes" not in metrics
    table = _run(["dvc", "metrics", "show"], scratch_repo).stdout
    assert len(table.splitlines()[0].split()) <= 20, table


@requires_coco_mini
@pytest.mark.coco_mini
def test_dvc_exp_run_switches_to_a_real_coco_root(scratch_repo):
    proc = _run(["dvc", "exp", "run", "validate_data", "-S", f"data.root={COCO_MINI}", "-S", "data.class_set=all80"],
                scratch_repo)
    assert "Running stage 'shard'" in proc.stdout, proc.stdout
    report = json.loads((scratch_repo / "data/reports/shard.json").read_text())
    assert report["source"] == "coco-mini" and report["class_set"] == "all80" and report["num_classes"] == 81
    details = json.loads((scratch_repo / "data/reports/shard_details.json").read_text())
    assert len(details["classes"]) == 81 and len(details["splits"]["val"]["class_pixels"]) == 81
    assert report["splits"]["train"]["images"] == 158 and report["splits"]["val"]["images"] == 133


@requires_camvid
@pytest.mark.camvid
def test_dvc_exp_run_switches_to_camvid_label_maps_as_docs_labelmaps_md_says(scratch_repo, tmp_path, monkeypatch):
    # docs/labelmaps.md's command, on a few CamVid pairs; the stages it runs read what dvc.yaml declares.
    [command] = re.findall(r"```bash\n(dvc exp run .*?)```", (REPO / "docs" / "labelmaps.md").read_text(),
                           flags=re.DOTALL)
    subset = copy_camvid_pairs(tmp_path / "few" / "camvid")
    words = [w.replace("../shared/data/camvid", str(subset)) for w in shlex.split(command.replace("\\\n", " "))]
    assert "data.format=labelmaps" in words and f"data.root={subset}" in words
    monkeypatch.setenv("SEGLAB_TRACE", str(tmp_path / "traces"))
    proc = _run([*words[:3], "validate_data", *words[3:]], scratch_repo)
    assert "Running stage 'shard'" in proc.stdout and "Running stage 'validate_data'" in proc.stdout, proc.stdout
    assert "Running stage 'sample'" not in proc.stdout  # a label-map root does not need the embedded sample
    assert stage_dependency_problems(scratch_repo, tmp_path / "traces", {"shard", "validate_data"}) == {}
    report = json.loads((scratch_repo / "data/reports/shard.json").read_text())
    assert report["source"] == "camvid" and report["class_set"] == "camvid11" and report["num_classes"] == 11
    assert report["splits"]["train"]["images"] == 4 and report["splits"]["val"]["images"] == 3
    summary = json.loads((scratch_repo / "data/reports/validation/summary.json").read_text())
    assert summary["success"] and summary["num_classes"] == 11


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
        # The profile in use only: editing a GPU-profile value retrains nothing on the CPU profile.
        assert {k for k in keys if k.startswith("profile")} == {"profile", f"profiles.{params['profile']}"}, keys
        expected = {"data/shards", "data/synthetic_valid/pix2pix"} if name == augmented else {"data/shards"}
        assert {d for d in deps if d.startswith("data/")} == expected, name
    # `+` works in a stage name on the command line; the variant pulls in its own GAN's stages only.
    dag = _run(["dvc", "dag", "--dot", f"train@{augmented}"], scratch_repo).stdout
    upstream = set(re.findall(r'^\s*"([^"]+)";$', dag, flags=re.M))
    assert upstream == {"sample", "shard", "train_gan@pix2pix", "synthesize@pix2pix", "validate_synthetic@pix2pix",
                        f"train@{augmented}"}, dag
    assert "validate_synthetic" not in _run(["dvc", "dag", "--dot", "train@unet_mobilenetv2_imagenet"],
                                            scratch_repo).stdout


def test_dvc_parses_dvc_lock_in_c():
    """DVC reads dvc.lock (every stage of a `dvc repro` does) with ruamel.yaml's safe loader; with
    ruamel.yaml.clib installed (pyproject.toml) that loader parses in C, several times faster."""
    from ruamel.yaml import YAML

    parser = YAML(typ="safe").Parser
    assert parser.__name__ == "CParser", f"{parser}: ruamel.yaml.clib is not installed or not used"


def test_the_committed_dvc_lock_records_only_the_pipelines_stages():
    """DVC keeps the lock entry of a stage that left dvc.yaml (a model moved out of `models`) until it
    is removed by hand, and reads and rewrites the whole lock between every two stages of a `dvc
    repro`: the committed dvc.lock holds the current stages only."""
    names = set(_run(["dvc", "stage", "list", "--name-only"], REPO).stdout.split())
    locked = set(yaml.safe_load((REPO / "dvc.lock").read_text())["stages"])
    assert locked <= names, f"dvc.lock records stages dvc.yaml no longer has: {sorted(locked - names)}"
