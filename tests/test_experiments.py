"""experiments/*.sh write their experiment's settings into params.yaml before `dvc exp run`: the
params they write must be valid for the project's own config and say what their headers promise.
(The `dvc exp run` itself is the published runs' job, docs/results/.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from seglab.config import load_config

REPO = Path(__file__).resolve().parents[1]


def edit_params(tmp_path: Path, script: str, *args: str):
    """Run `script`'s params.yaml edit (its `python - ... <<'PY'` block) on a copy of params.yaml."""
    text = (REPO / "experiments" / script).read_text()
    block = re.search(r"^python - [^\n]*<<'PY'\n(.*?)^PY$", text, flags=re.MULTILINE | re.DOTALL)
    assert block, f"{script}: no params edit block"
    shutil.copyfile(REPO / "params.yaml", tmp_path / "params.yaml")
    subprocess.run([sys.executable, "-", *args], input=block.group(1), text=True, cwd=tmp_path, check=True)
    return load_config(tmp_path / "params.yaml")


CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
                  "pedestrian", "bicyclist"]


@pytest.mark.parametrize(("mode", "epochs", "size"), [("best", 30, 256), ("table", 4, 192)])
def test_camvid_writes_the_documented_camvid_settings(tmp_path, mode, epochs, size):
    cfg = edit_params(tmp_path, "camvid.sh", mode, "../shared/data/camvid", str(epochs), str(size))
    assert cfg.data.format == "labelmaps" and cfg.data.root == Path("../shared/data/camvid")
    assert cfg.data.labelmaps.classes == CAMVID_CLASSES and cfg.data.labelmaps.ignore == [11]
    assert cfg.shard.max_side == 480  # CamVid's full 480x360, which the papers score
    assert cfg.train.class_weights == "median_frequency" and cfg.evaluate.tta == ["identity", "hflip"]
    profile = cfg.profiles["cpu"]
    assert (profile.epochs, profile.image_size) == (epochs, size)
    # The whole pipeline is the experiment (no targets), so it holds only what is to be run.
    assert set(cfg.ensemble.members) <= set(cfg.models)
    assert cfg.gan.names  # ingest depends on the synthetic gate's report folder: one GAN runs
    if mode == "table":  # the seed's models, every pretrained encoder's twin, no GAN variant
        names = set(cfg.models)
        twins = {n for n in names if n.endswith("_scratch")}
        assert {n.replace("_scratch", "_imagenet") for n in twins} == \
            {n for n in names if n.endswith("_imagenet")} - {"deeplabv3plus_xception_imagenet"}
        seed_six = {"unet", "attention_unet", "unet_resnet50", "deeplabv3plus_xception",
                    "deeplabv3plus_resnet50", "deeplabv3plus_resnet101"}
        assert seed_six | {"deeplabv3plus_xception_imagenet"} <= names and not names & set(cfg.more_models)
        assert len(names) == 13 and not any("+" in n for n in names)  # no model trains on synthetic data
    else:
        assert list(cfg.models) == ["unet_mobilenetv2_imagenet"] == cfg.ensemble.members


def test_coco_mini_transfer_keeps_only_the_pair_and_its_replicates(tmp_path):
    cfg = edit_params(tmp_path, "coco-mini.sh", "1 2", "transfer")
    assert set(cfg.models) == {f"unet_mobilenetv2_{w}{s}" for w in ("imagenet", "scratch") for s in ("", "_s1", "_s2")}
    assert cfg.gan.names == ["pix2pix"] and set(cfg.ensemble.members) <= set(cfg.models)


def test_coco_mini_adds_the_twins_xception_replicates_and_every_gan(tmp_path):
    cfg = edit_params(tmp_path, "coco-mini.sh", "1 2", "table")
    names = set(cfg.models)
    for name in ("unet_efficientnet_lite0_imagenet", "unet_efficientnet_lite0_scratch",
                 "deeplabv3plus_mobilenetv2_scratch", "deeplabv3plus_xception_imagenet"):
        assert name in names and name not in cfg.more_models
    assert cfg.gan.names == ["dcgan", "sagan", "pix2pix"]
    for gan in cfg.gan.names:
        assert {f"unet_mobilenetv2_imagenet+{gan}", f"unet_mobilenetv2_imagenet_s1+{gan}",
                f"unet_mobilenetv2_imagenet_s2+{gan}"} <= names
    assert cfg.models["unet_mobilenetv2_scratch_s2"].seed == 2
