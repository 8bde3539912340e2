#!/usr/bin/env bash
# CamVid (11 classes, void ignored; ../shared/data/camvid) as DVC experiments, published in
# docs/results/camvid.md next to ENet and SegNet.
#
#   experiments/camvid.sh [best|table] [CAMVID_ROOT] [REPORT.md]
#
# best (default): the headline model, the MobileNetV2 U-Net from ImageNet, at the long budget
#   (BEST_EPOCHS, default 30, of the 367 training images as BEST_SIZE px crops, default 256), alone in
#   `models`, as one `dvc exp run` (its ensemble stage scores the model again as a one-member
#   ensemble), then `seglab report`.
# table: every model of the seed's comparison (U-Net, Attention U-Net, U-Net/ResNet50, DeepLabV3+
#   with Xception, ResNet50 and ResNet101, from scratch; DeepLabV3+/Xception from ImageNet) and the
#   ImageNet/scratch twins of every encoder with ImageNet weights here (U-Net and DeepLabV3+ on
#   MobileNetV2, U-Net on EfficientNet-Lite0), at one shorter budget (TABLE_EPOCHS, default 4, of
#   TABLE_SIZE px crops, default 192), in one `dvc exp run`.
#
# The CamVid settings are those of docs/labelmaps.md: images + label maps, void (11) -> ignore,
# stored at 480 px (CamVid's full 480x360), median-frequency class weights, TTA views identity and
# hflip. Evaluation is the README's full-resolution protocol: whole val images at 480x360, each
# scaled as training's crops were (the crop just covers the image's height) and predicted with
# sliding windows, scored against the stored 480x360 label maps.
#
# The experiment's params are written into params.yaml (round-trip YAML keeps comments and
# anchors) so `dvc exp run` records them; run it in a clone you can spare, e.g.
# `git clone . /tmp/camvid && cd /tmp/camvid && make install && experiments/camvid.sh best`.
set -euo pipefail
cd "$(dirname "$0")/.."
# The project's virtualenv (`make install`) first on PATH, as the Makefile puts it for its commands:
# python (with ruamel.yaml), dvc and seglab are the project's, whether or not it is activated.
if [ -x .venv/bin/python ]; then export PATH="$PWD/.venv/bin:$PATH"; fi

mode=${1:-best}
root=${2:-../shared/data/camvid}
report=${3:-docs/results/camvid-$mode.md}
case "$mode" in best|table) ;; *) echo "camvid.sh: mode must be best or table, got '$mode'" >&2; exit 2;; esac
[ -d "$root/trainannot" ] && [ -d "$root/valannot" ] || {
  echo "camvid.sh: $root is not a CamVid folder (expected train/, trainannot/, val/, valannot/)" >&2; exit 1; }
epochs=$([ "$mode" = best ] && echo "${BEST_EPOCHS:-30}" || echo "${TABLE_EPOCHS:-4}")
size=$([ "$mode" = best ] && echo "${BEST_SIZE:-256}" || echo "${TABLE_SIZE:-192}")

python - "$mode" "$root" "$epochs" "$size" <<'PY'
import sys
from ruamel.yaml import YAML

mode, root, epochs, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
yaml = YAML()
with open("params.yaml") as f:
    params = yaml.load(f)

data = params["data"]
data["format"] = "labelmaps"
data["root"] = root
data["splits"] = {"train": {"images": "train", "labels": "trainannot"},
                  "val": {"images": "val", "labels": "valannot"}}
data["labelmaps"] = {
    "class_set": "camvid11",
    "classes": ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
                "pedestrian", "bicyclist"],
    "value_map": None,
    "ignore": [11],
}
params["shard"]["max_side"] = 480          # CamVid's full resolution, which the papers score
params["profiles"]["cpu"].update(image_size=size, batch_size=8, epochs=epochs, learning_rate=1.0e-3)
params["train"]["class_weights"] = "median_frequency"
params["train"]["freeze_encoder_epochs"] = 2
params["evaluate"]["tta"] = ["identity", "hflip"]

models = params["models"]
# The whole pipeline runs (no `dvc exp run` targets), so the experiment holds every stage's outputs;
# `models` says what there is to train.
if mode == "best":
    for name in [n for n in models if n != "unet_mobilenetv2_imagenet"]:
        del models[name]
    params["ensemble"]["members"] = ["unet_mobilenetv2_imagenet"]  # the stage needs a member: the model itself
    params["ensemble"]["weights"] = [1.0]
if mode == "table":  # the twins of every encoder that has ImageNet weights here, and the seed's models
    for name in ("deeplabv3plus_mobilenetv2_scratch", "unet_efficientnet_lite0_imagenet",
                 "unet_efficientnet_lite0_scratch", "unet", "attention_unet", "unet_resnet50",
                 "deeplabv3plus_xception", "deeplabv3plus_resnet50", "deeplabv3plus_resnet101",
                 "deeplabv3plus_xception_imagenet"):
        models[name] = params["more_models"].pop(name)
    for name in [n for n in models if "+" in n]:  # the GAN variants are the sample's question
        del models[name]
    params["ensemble"]["members"] = ["unet_mobilenetv2_imagenet", "deeplabv3plus_mobilenetv2_imagenet"]
# gan.names stays (pix2pix): no model here trains on its samples (the augmenters are the embedded
# sample's question), but the ingest stage depends on the synthetic gate's report folder, so the
# pipeline needs one GAN; its gate's verdict on CamVid lands in the warehouse beside the runs.
with open("params.yaml", "w") as f:
    yaml.dump(params, f)
PY

name="camvid-$mode-$(git rev-parse --short HEAD)"
echo "+ dvc exp run -n $name"
dvc exp run -n "$name"
mkdir -p "$(dirname "$report")"
seglab report --dataset "$(basename "$(realpath "$root")")" --out "$report"  # runs.dataset: the root folder name
echo "report: $report"
