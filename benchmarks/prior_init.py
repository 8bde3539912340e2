"""Why `train.prior_init`: cross-entropy over the first steps, with and without the prior bias.

Builds the width-0.25 U-Net twice with the same seed, trains each for a few epochs of 10 steps on
the training shards (no augmentation, plain Keras sparse cross-entropy, Adam 1e-3, 64 px), once
with the classifier bias at zero and once at the log class prior (`init_logits_from_prior`).
Run from the repository root after `dvc repro shard`: `.venv/bin/python benchmarks/prior_init.py`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from environment import machine  # noqa: E402
from seglab.data.pipeline import classes_of, make_dataset  # noqa: E402
from seglab.data.stats import pixel_counts  # noqa: E402
from seglab.models import build  # noqa: E402
from seglab.train.plan import init_logits_from_prior  # noqa: E402


def losses(shards: Path, *, prior: bool, epochs: int, steps: int, size: int) -> list[float]:
    num_classes = len(classes_of(shards, "train"))
    data = make_dataset(shards, "train", image_size=(size, size), batch_size=8, training=True, seed=0,
                        deterministic=True, repeat=True)
    keras.utils.set_random_seed(0)
    model = build("unet", num_classes, (size, size, 3), width=0.25)
    if prior:
        init_logits_from_prior(model, pixel_counts(shards, "train", num_classes).classes)
    model.compile(keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255))
    history = model.fit(data, steps_per_epoch=steps, epochs=epochs, verbose=0)
    return history.history["loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=Path, default=Path("data/shards"))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    print(f"{dt.date.today()} on {machine()}; {args.shards}, {args.epochs} epochs x {args.steps} steps, "
          f"{args.size} px\n\n| classifier bias | cross-entropy after each epoch |\n|---|---|")
    for prior in (False, True):
        values = losses(args.shards, prior=prior, epochs=args.epochs, steps=args.steps, size=args.size)
        print(f"| {'log class prior' if prior else 'zero'} | {' → '.join(f'{v:.2f}' for v in values)} |")


if __name__ == "__main__":
    main()
