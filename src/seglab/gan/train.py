"""The `train_gan@<gan>` stage: train one augmenter on the training shards, resumably.

`train_gan` drives a `GanTrainer` (a `keras.Model` with a custom `train_step`) through `fit`:

- work folder `<state_dir>/<gan>/` (not a DVC output, so a rerun after a kill finds it):
  `backup/` (`keras.callbacks.BackupAndRestore`: both networks, both optimizers and the epoch,
  saved after every epoch with a previous copy kept in case the kill hit a write),
  `history.csv` (one row per completed epoch) and `samples/epoch_NNN.png`. A killed run restarts
  from the last completed epoch; history rows past it (written just before the kill) are
  dropped, so every epoch appears once. The folder carries a fingerprint of the settings and the
  training shards: a rerun with other settings or data starts afresh instead of resuming.
- output `<out_dir>/<gan>/`, assembled atomically once training is done: `generator.keras` (the
  generator alone, all synthesis needs), `history.csv` (DVC plot: d_loss/g_loss per epoch),
  `samples/epoch_NNN.png` every `sample_every` epochs and after the last one (fixed noise or
  fixed real layouts, so grids of different epochs are comparable), and `train.json`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

import keras
import numpy as np

from seglab.atomic import atomic_dir, atomic_path, write_text_atomic
from seglab.config import Config
from seglab.digest import sha256_files
from seglab.gan.epoch_log import EpochLog
from seglab.gan.settings import GanSettings, is_conditional, settings_from_config

log = logging.getLogger(__name__)

__all__ = ["build_trainer", "load_train_info", "run_train_gan", "train_gan"]


def build_trainer(settings: GanSettings, num_classes: int, *, label_prior: np.ndarray | None = None):
    """The generator, discriminator and their `GanTrainer`, compiled with the settings' optimisers.

    `label_prior` (noise generators): the training data's label-channel shares, where the label
    logits start (`seglab.gan.common.label_prior`).
    """
    from seglab.gan import dcgan, pix2pix, sagan

    s = settings
    if s.gan == "dcgan":
        trainer = dcgan.DCGANTrainer(
            dcgan.build_generator(num_classes, s.image_size, latent_dim=s.latent_dim, width=s.width,
                                  label_prior=label_prior),
            dcgan.build_discriminator(num_classes, s.image_size, width=s.width),
            num_classes=num_classes, latent_dim=s.latent_dim, seed=s.seed)
    elif s.gan == "sagan":
        trainer = sagan.SAGANTrainer(
            sagan.build_generator(num_classes, s.image_size, latent_dim=s.latent_dim, width=s.width,
                                  attention_resolution=s.attention_resolution, label_prior=label_prior),
            sagan.build_discriminator(num_classes, s.image_size, width=s.width,
                                      attention_resolution=s.attention_resolution),
            num_classes=num_classes, latent_dim=s.latent_dim, seed=s.seed)
    else:
        trainer = pix2pix.Pix2PixTrainer(
            pix2pix.build_generator(num_classes, s.image_size, width=s.width),
            pix2pix.build_discriminator(num_classes, s.image_size, width=s.width),
            num_classes=num_classes, l1_weight=s.l1_weight, seed=s.seed)
    trainer.compile(
        g_optimizer=keras.optimizers.Adam(s.learning_rate, beta_1=s.beta_1, beta_2=s.beta_2),
        d_optimizer=keras.optimizers.Adam(s.d_learning_rate, beta_1=s.beta_1, beta_2=s.beta_2),
    )
    return trainer


# ---------------------------------------------------------------------------------------- train

def _data_digest(shard_dir: Path, split: str) -> str:
    from seglab.data.shards import shard_files

    return sha256_files(shard_files(shard_dir, split))[:16]


def sample_inputs(settings: GanSettings, num_classes: int, shard_dir: Path,
                  split: str) -> np.ndarray | list[np.ndarray]:
    """The fixed generator inputs of the sample grids: noise from the seed, or (pix2pix) the first real
    layouts rendered as synthesis renders them (into other real images' backgrounds, drawn from the seed)."""
    from seglab.gan.common import layouts_from_shards

    if is_conditional(settings.gan):
        from seglab.gan.pix2pix import synthesis_inputs

        images, labels, _ = layouts_from_shards(shard_dir, split, image_size=settings.image_size, seed=settings.seed)
        inputs, _ = synthesis_inputs(labels[:settings.sample_count], images, labels,
                                     np.random.default_rng(settings.seed), num_classes=num_classes)
        return inputs
    rng = np.random.default_rng(settings.seed)
    return rng.standard_normal((settings.sample_count, settings.latent_dim)).astype(np.float32)


def _prepare_work_dir(work: Path, fingerprint: dict) -> None:
    marker = work / "fingerprint.json"
    if work.exists():
        try:
            previous = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous == fingerprint:
            log.info("%s: resuming the interrupted run found there", work)
            return
        log.info("%s: settings or training data changed since the interrupted run; starting afresh", work)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    write_text_atomic(marker, json.dumps(fingerprint, indent=2) + "\n")


def _save_generator(generator: keras.Model, target: Path) -> None:
    # Keras insists on the `.keras` suffix, so save under that name in a private folder beside the
    # target and move it into place with one rename.
    with atomic_path(target) as tmp:
        staging = tmp.with_name(tmp.name + ".d")
        staging.mkdir()
        try:
            generator.save(staging / target.name)
            (staging / target.name).replace(tmp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def train_gan(
    shard_dir: str | Path,
    out_dir: str | Path,
    settings: GanSettings,
    *,
    state_dir: str | Path,
    split: str = "train",
    verbose: int = 2,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> dict:
    """Train `settings.gan` on `<shard_dir>/<split>`; write `<out_dir>/<gan>/`; return its train.json.

    Resumes from `<state_dir>/<gan>/` when an interrupted run with the same settings and data left
    one there; removes it once the output is complete. `callbacks` run after the epoch log and the
    backup (e.g. progress reporting to a flow runner).
    """
    from seglab.gan.common import gan_dataset, label_prior

    started = time.perf_counter()
    shard_dir, out_dir, state_dir = Path(shard_dir), Path(out_dir), Path(state_dir)
    keras.utils.set_random_seed(settings.seed)  # initial weights and dropout masks
    dataset, classes, rows = gan_dataset(shard_dir, split, image_size=settings.image_size,
                                         batch_size=settings.batch_size, seed=settings.seed)
    work = state_dir / settings.gan
    fingerprint = {"params_hash": settings.params_hash, "data": _data_digest(shard_dir, split), "classes": classes}
    _prepare_work_dir(work, fingerprint)

    prior = None if is_conditional(settings.gan) else label_prior(shard_dir, split)
    trainer = build_trainer(settings, len(classes), label_prior=prior)
    epoch_log = EpochLog(work / "history.csv", work / "samples", epochs=settings.epochs,
                         sample_every=settings.sample_every,
                         sample_inputs=sample_inputs(settings, len(classes), shard_dir, split),
                         loss_names=trainer.loss_names)
    # Kept after fit (delete_checkpoint=False) until the output is in place: a kill between the
    # two must not cost the training.
    backup = keras.callbacks.BackupAndRestore(str(work / "backup"), double_checkpoint=True, delete_checkpoint=False)
    log.info("training %s on %d images of %s at %dpx for %d epochs (%d classes)", settings.gan, rows,
             shard_dir / split, settings.image_size, settings.epochs, len(classes))
    # The dataset shuffles itself (seeded); `fit` cannot shuffle a tf.data.Dataset anyway.
    trainer.fit(dataset, epochs=settings.epochs, callbacks=[epoch_log, backup, *callbacks], verbose=verbose,
                shuffle=False)
    history = epoch_log.rows
    if len(history) != settings.epochs:
        raise RuntimeError(f"{work / 'history.csv'}: {len(history)} epochs logged, expected {settings.epochs}")

    last = {k: float(v) for k, v in history[-1].items() if k not in ("epoch", "seconds")}
    info = {
        "gan": settings.gan,
        "epochs": settings.epochs,
        "image_size": settings.image_size,
        "classes": classes,
        "num_classes": len(classes),
        "conditional": is_conditional(settings.gan),
        "latent_dim": None if is_conditional(settings.gan) else settings.latent_dim,
        "seed": settings.seed,
        "params_hash": settings.params_hash,
        "settings": settings.model_dump(),
        "train_images": rows,
        "steps_per_epoch": rows // settings.batch_size,
        "generator_params": int(trainer.generator.count_params()),
        "discriminator_params": int(trainer.discriminator.count_params()),
        "final_losses": last,
        "resumed_from_epoch": epoch_log.resumed_from_epoch or 0,
        # Training time over all attempts (epochs of a killed run included), and this call's wall time.
        "seconds": round(sum(float(row["seconds"]) for row in history), 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "shards": str(shard_dir / split),
    }
    with atomic_dir(out_dir / settings.gan) as tmp:
        shutil.copy2(work / "history.csv", tmp / "history.csv")
        shutil.copytree(work / "samples", tmp / "samples")
        _save_generator(trainer.generator, tmp / "generator.keras")
        (tmp / "train.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    log.info("%s: trained in %.1fs (%d epochs, resumed from epoch %d) -> %s", settings.gan, info["wall_seconds"],
             settings.epochs, info["resumed_from_epoch"], out_dir / settings.gan)
    return info


def run_train_gan(cfg: Config, gan_name: str, *, settings: GanSettings | None = None) -> dict:
    """The `train_gan@<gan>` stage: params -> `<gan.out>/<gan>/` (see the module docstring)."""
    settings = settings or settings_from_config(cfg, gan_name)
    return train_gan(cfg.shard.out, cfg.gan.out, settings, state_dir=cfg.gan.state)


def load_train_info(generator_dir: str | Path) -> dict:
    """`<generator_dir>/train.json`, checked for the fields synthesis relies on."""
    path = Path(generator_dir) / "train.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; train the augmenter first (`seglab train-gan <gan>`)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    required = ("gan", "image_size", "classes", "conditional", "latent_dim", "params_hash")
    missing = [key for key in required if not isinstance(info, dict) or key not in info]
    if missing:
        raise ValueError(f"{path}: lacks field(s) {missing}")
    return info
