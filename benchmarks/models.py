"""Parameters and FLOPs of every registry model at the seed's settings; writes benchmarks/models.md.

    .venv/bin/python benchmarks/models.py [--out benchmarks/models.md] [--models unet deeplabv3plus_resnet50]

Settings: input 256x256x3, 91 classes, width 1.0, output stride 16 for DeepLabV3+.
FLOPs: TensorFlow's profiler (`tf.compat.v1.profiler`, float_operation) on the graph of one
inference forward pass (batch 1, training=False) traced with `tf.function`. It counts a
multiply-add as 2 FLOPs and covers convolutions (dilated, depthwise, separable, transposed),
BatchNorm arithmetic, bias adds, pooling and element-wise adds/multiplies; ops without a
registered FLOP count (ReLU/ReLU6/sigmoid, bilinear resizing) count 0.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from environment import cpu_model_name  # noqa: E402
from seglab import models  # noqa: E402
from seglab.atomic import write_text_atomic  # noqa: E402

INPUT_SHAPE = (256, 256, 3)
NUM_CLASSES = 91
OUTPUT_STRIDE = 16
# The only count the seed states; every other seed count is unknown to us.
SEED_CLAIMED_PARAMS = {"unet": 31_061_147}


def forward_flops(model) -> int:
    """FLOPs of one inference forward pass at batch 1, counted by TF's profiler on the traced graph."""

    @tf.function(autograph=False)
    def forward(images):
        return model(images, training=False)

    graph = forward.get_concrete_function(tf.TensorSpec((1, *model.input_shape[1:]), tf.float32)).graph
    options = (tf.compat.v1.profiler.ProfileOptionBuilder(tf.compat.v1.profiler.ProfileOptionBuilder.float_operation())
               .with_empty_output().build())
    return int(tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops)


def measure(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        options = {"output_stride": OUTPUT_STRIDE} if name.startswith("deeplabv3plus_") else {}
        model = models.build(name, NUM_CLASSES, INPUT_SHAPE, width=1.0, **options)
        rows.append({
            "name": name,
            "params": model.count_params(),
            "encoder_params": model.get_layer("encoder").count_params() if models.spec(name).backbone else None,
            "gflops": forward_flops(model) / 1e9,
        })
        print(f"{name}: {rows[-1]['params']:,} params, {rows[-1]['gflops']:.2f} GFLOPs", file=sys.stderr)
        keras.utils.clear_session()  # drop the graph of the previous model before building the next
    return rows


def render(rows: list[dict]) -> str:
    date = datetime.date.today().isoformat()
    lines = [
        "# Model zoo: parameters and FLOPs",
        "",
        f"Settings: input {INPUT_SHAPE[0]}x{INPUT_SHAPE[1]}x{INPUT_SHAPE[2]} (float32 RGB), {NUM_CLASSES} classes, "
        f"width 1.0, output stride {OUTPUT_STRIDE} for DeepLabV3+ (U-Nets on backbones use output stride 32).",
        "",
        "| model | parameters | of which encoder | GFLOPs (forward, batch 1) | seed's claimed parameters |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        encoder = f"{row['encoder_params']:,}" if row["encoder_params"] is not None else "—"
        seed = SEED_CLAIMED_PARAMS.get(row["name"])
        seed_text = f"{seed:,} ({'matches' if seed == row['params'] else 'DIFFERS'})" if seed else "not known"
        lines.append(f"| `{row['name']}` | {row['params']:,} | {encoder} | {row['gflops']:.2f} | {seed_text} |")
    lines += [
        "",
        "The seed's only stated count is U-Net's 31,061,147 parameters; we do not have the seed's code, so",
        "its counts for the other architectures are not known and not compared.",
        "",
        "Method: parameters are `model.count_params()` (trainable + BatchNorm moving statistics). FLOPs are",
        "counted by TensorFlow's profiler (`tf.compat.v1.profiler.profile`, `float_operation()`) on the graph",
        "of one inference forward pass at batch 1 traced with `tf.function`; a multiply-add counts as 2 FLOPs.",
        "Convolutions of every kind (dilated, depthwise, separable, transposed), BatchNorm arithmetic, bias",
        "adds, pooling and element-wise adds/multiplies are counted; ops without a registered FLOP count",
        "(ReLU/ReLU6/sigmoid, bilinear resizing) count 0.",
        "",
        f"Measured {date} with `.venv/bin/python benchmarks/models.py` on {cpu_model_name()} "
        f"({os.cpu_count()} cores), TensorFlow {tf.__version__}, Keras {keras.__version__}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("models.md"))
    parser.add_argument("--models", nargs="*", default=None, help="subset of seglab.models.available()")
    args = parser.parse_args(argv)
    names = args.models or models.available()
    unknown = sorted(set(names) - set(models.available()))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; available: {', '.join(models.available())}")
    write_text_atomic(args.out, render(measure(names)))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
