#!/usr/bin/env bash
# The published comparison on real COCO (../shared/data/coco-mini, class set voc20), as one DVC
# experiment: every model of params.yaml, the ImageNet/scratch twins and DeepLabV3+/Xception from
# ImageNet out of more_models, the three GAN augmenters, plus seed replicates (SEEDS, default "1 2")
# for the transfer-learning pair and for the GAN-effect study, then `seglab report` over the
# warehouse.
#
#   experiments/coco-mini.sh [table|transfer] [COCO_ROOT] [REPORT.md]
#
# table (default): every model and replicate at the CPU profile (one `dvc exp run`).
# transfer: only the MobileNetV2 U-Net pair (ImageNet vs scratch, every seed) at a longer budget
# (TRANSFER_EPOCHS, default 30, at IMAGE_SIZE default 128), since at the profile's epochs no model
# gets past background on COCO; then `seglab ingest` adds those runs beside the table's (runs differ
# by epochs_planned and image size).
#
# Replicates are extra `models` entries that differ only in `seed`, so
# `seed_summary` / `augmenter_effect` in the warehouse group them. Everything not set here is
# params.yaml's CPU profile except the image size (IMAGE_SIZE, default 96 for the table and 128 for
# transfer: COCO objects are too small at the default data's 64 px).
set -euo pipefail
cd "$(dirname "$0")/.."
# The project's virtualenv (`make install`) first on PATH, as the Makefile puts it for its commands:
# python (with ruamel.yaml), dvc and seglab are the project's, whether or not it is activated.
if [ -x .venv/bin/python ]; then export PATH="$PWD/.venv/bin:$PATH"; fi

mode=${1:-table}
root=${2:-../shared/data/coco-mini}
report=${3:-docs/results/coco-mini.md}
case "$mode" in table|transfer) ;; *) echo "coco-mini.sh: mode must be table or transfer, got '$mode'" >&2; exit 2;; esac
image_size=${IMAGE_SIZE:-$([ "$mode" = transfer ] && echo 128 || echo 96)}
seeds=${SEEDS:-"1 2"}

[ -d "$root/annotations" ] || { echo "coco-mini.sh: $root is not a COCO root (no annotations/)" >&2; exit 1; }

# Replicate entries go into params.yaml itself (round-trip YAML keeps comments and anchors): `-S`
# cannot add keys holding '+', and `dvc exp run` records the edited params.yaml with the experiment.
python - "$seeds" "$mode" <<'PY'
import sys
from ruamel.yaml import YAML

seeds = [int(s) for s in sys.argv[1].split()]
mode = sys.argv[2]
yaml = YAML()
with open("params.yaml") as f:
    params = yaml.load(f)
models = params["models"]

def entry(name, weights, train_data, seed):
    models[name] = {"arch": "unet_mobilenetv2", "weights": weights, "width": 1.0,
                    "train_data": train_data, "seed": seed}

for seed in seeds:  # the transfer-learning pair, mean +- std over seeds 0 (params.yaml) and these
    entry(f"unet_mobilenetv2_imagenet_s{seed}", "imagenet-offline", "data/shards", seed)
    entry(f"unet_mobilenetv2_scratch_s{seed}", None, "data/shards", seed)
# The ImageNet/scratch twins and the seed's headline DeepLabV3+/Xception (ImageNet weights offline),
# which the default comparison leaves in more_models for time.
for name in ("unet_efficientnet_lite0_imagenet", "unet_efficientnet_lite0_scratch",
             "deeplabv3plus_mobilenetv2_scratch", "deeplabv3plus_xception_imagenet"):
    if name in params["more_models"]:
        models[name] = params["more_models"].pop(name)
params["gan"]["names"] = ["dcgan", "sagan", "pix2pix"]
for gan in ("dcgan", "sagan", "pix2pix"):  # the GAN effect, paired by seed with the runs above
    for seed in [0, *seeds]:
        name = f"unet_mobilenetv2_imagenet+{gan}" if seed == 0 else f"unet_mobilenetv2_imagenet_s{seed}+{gan}"
        if name not in models:
            entry(name, "imagenet-offline", f"data/synthetic_valid/{gan}", seed)
if mode == "transfer":
    # Only the pair and its replicates: the whole pipeline is the experiment (a `dvc exp run` with
    # targets cannot commit in a fresh clone, whose cache lacks the other stages' locked outputs).
    # pix2pix's stages stay, since ingest depends on the synthetic gate's report.
    pair = [n for n in models if n.startswith(("unet_mobilenetv2_imagenet", "unet_mobilenetv2_scratch"))
            and "+" not in n]
    for name in [n for n in models if n not in pair]:
        del models[name]
    params["gan"]["names"] = ["pix2pix"]
    params["ensemble"]["members"] = ["unet_mobilenetv2_imagenet", "unet_mobilenetv2_scratch"]
with open("params.yaml", "w") as f:
    yaml.dump(params, f)
PY

args=(-S "data.root=$root" -S "data.class_set=voc20" -S "profiles.cpu.image_size=$image_size")
if [ "$mode" = transfer ]; then
  args+=(-S "profiles.cpu.epochs=${TRANSFER_EPOCHS:-30}")
fi
echo "+ dvc exp run ${args[*]}"
dvc exp run "${args[@]}"
mkdir -p "$(dirname "$report")"
seglab report --dataset "$(basename "$(realpath "$root")")" --out "$report"  # runs.dataset: the root folder name
echo "report: $report"
