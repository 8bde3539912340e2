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

import csv
import hashlib
import io
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import keras
import numpy as np

from seglab.atomic import atomic_dir, atomic_path, write_text_atomic

log = logging.getLogger(__name__)

__all__ = [
    "GANS",
    "GanSettings",
    "build_trainer",
    "gan_paths",
    "gan_section",
    "is_conditional",
    "run_train_gan",
    "settings_from_config",
    "train_gan",
]

from seglab.gan import GANS  # noqa: E402  (re-exported)
_CONDITIONAL = ("pix2pix",)  # generators that render a label layout instead of sampling noise

# Per-augmenter defaults. Optimisers from the papers: DCGAN and pix2pix Adam(2e-4, beta_1 0.5);
# SAGAN's two time-scale rule, Adam(beta_1 0, beta_2 0.9) with D at 4x G's rate. Epochs sized
# for the CPU budget of the default run (each stage well under a minute on 2 cores, 120 images).
_GAN_DEFAULTS: dict[str, dict[str, Any]] = {
    "dcgan": {"epochs": 30, "learning_rate": 2e-4, "d_learning_rate": 2e-4, "beta_1": 0.5, "beta_2": 0.999},
    "sagan": {"epochs": 16, "learning_rate": 1e-4, "d_learning_rate": 4e-4, "beta_1": 0.0, "beta_2": 0.9},
    "pix2pix": {"epochs": 15, "learning_rate": 2e-4, "d_learning_rate": 2e-4, "beta_1": 0.5, "beta_2": 0.999},
}


@dataclass(frozen=True)
class GanSettings:
    """Everything that shapes one augmenter's training run (hashed into `params_hash`)."""

    gan: str
    image_size: int = 64
    epochs: int = 20
    batch_size: int = 8
    latent_dim: int = 64
    width: int = 16                          # channels of the widest-resolution layer
    learning_rate: float = 2e-4
    d_learning_rate: float = 2e-4
    beta_1: float = 0.5
    beta_2: float = 0.999
    l1_weight: float = 100.0                 # pix2pix only
    attention_resolution: int | None = None  # sagan only; None: image_size / 4
    sample_every: int = 5
    sample_count: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.gan not in GANS:
            raise ValueError(f"unknown GAN {self.gan!r}; expected one of {list(GANS)}")
        from seglab.gan.common import check_image_size

        check_image_size(self.image_size)
        for name in ("epochs", "batch_size", "latent_dim", "width", "sample_every", "sample_count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"gan.{name} must be a positive integer, got {value!r}")
        for name in ("learning_rate", "d_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"gan.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("beta_1", "beta_2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"gan.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.l1_weight < 0:
            raise ValueError(f"gan.l1_weight must be >= 0, got {self.l1_weight!r}")

    @classmethod
    def for_gan(cls, gan: str, **overrides: Any) -> GanSettings:
        """The defaults for `gan` (its paper's optimiser settings) with `overrides` applied."""
        if gan not in GANS:
            raise ValueError(f"unknown GAN {gan!r}; expected one of {list(GANS)}")
        known = {f.name for f in fields(cls)} - {"gan"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown GAN setting(s) {unknown}; known: {sorted(known)}")
        return cls(gan=gan, **{**_GAN_DEFAULTS[gan], **overrides})

    @property
    def params_hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _as_mapping(section: Any) -> dict[str, Any]:
    """A params section (pydantic model, mapping, plain object or None) as a dict."""
    if section is None:
        return {}
    if isinstance(section, Mapping):
        return dict(section)
    if hasattr(section, "model_dump"):  # a pydantic section of seglab.config
        return section.model_dump()
    return dict(vars(section))


# Keys of the `gan` params section that are not training settings.
_NON_TRAINING_KEYS = {"names", "out", "state", "synthetic_out", "synth_images", "synth_size", "layout_mix",
                      "jpeg_quality", "max_shard_mb", *GANS}


def gan_section(cfg: Any) -> dict[str, Any]:
    """The `gan` section of params as a dict ({} where params has none: every default applies)."""
    return _as_mapping(getattr(cfg, "gan", None))


def settings_from_config(cfg: Any, gan: str) -> GanSettings:
    """`GanSettings` for `gan` from params: `gan.<key>` for all augmenters, `gan.<gan>.<key>` for one.

    Without a `gan` section every setting keeps its default. `seed` is the top-level one.
    """
    section = gan_section(cfg)
    common = {k: v for k, v in section.items() if k not in _NON_TRAINING_KEYS and v is not None}
    specific = {k: v for k, v in _as_mapping(section.get(gan)).items() if v is not None}
    return GanSettings.for_gan(gan, **{**common, **specific, "seed": int(getattr(cfg, "seed", 0))})


def gan_paths(cfg: Any) -> dict[str, Path]:
    """Output, work and synthetic folders from the `gan` params section (defaults where absent)."""
    section = gan_section(cfg)
    return {
        "out": Path(section.get("out") or "data/gan"),
        "state": Path(section.get("state") or "data/gan_state"),
        "synthetic_out": Path(section.get("synthetic_out") or "data/synthetic"),
    }


def is_conditional(gan: str) -> bool:
    """True for augmenters that render a given label layout (their generator input is a layout)."""
    return gan in _CONDITIONAL


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


# ------------------------------------------------------------------------------------ epoch log

class EpochLog(keras.callbacks.Callback):
    """Per-epoch history CSV and sample grids in the work folder, consistent across resumes.

    Place it before `BackupAndRestore`, so an epoch is logged before it is backed up: a kill
    between the two leaves one history row too many, never one too few. The first epoch `fit`
    starts (after the backup was restored in `on_train_begin`) tells where the run stands; rows
    from that epoch on are dropped before it runs again.
    """

    def __init__(self, history_path: Path, samples_dir: Path, *, epochs: int, sample_every: int,
                 sample_inputs: np.ndarray, loss_names: tuple[str, ...]):
        super().__init__()
        self.history_path, self.samples_dir = Path(history_path), Path(samples_dir)
        self.epochs, self.sample_every = epochs, sample_every
        self.sample_inputs = sample_inputs
        self.columns = ["epoch", *loss_names, "seconds"]
        self.rows: list[dict] = []
        self.resumed_from_epoch: int | None = None
        self._epoch_started = 0.0

    def _read_rows(self) -> list[dict]:
        if not self.history_path.is_file():
            return []
        with self.history_path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and list(rows[0]) != self.columns:
            raise ValueError(f"{self.history_path}: columns {list(rows[0])} differ from {self.columns}; "
                             "delete the work folder to start afresh")
        return rows

    def _write_rows(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.history_path, buffer.getvalue())

    def on_train_begin(self, logs=None):
        self.rows = self._read_rows()

    def on_epoch_begin(self, epoch, logs=None):
        if self.resumed_from_epoch is None:
            self.resumed_from_epoch = epoch
            kept = [row for row in self.rows if int(row["epoch"]) <= epoch]
            if len(kept) != epoch:
                raise ValueError(f"{self.history_path}: has {len(kept)} rows before epoch {epoch + 1}, where the "
                                 "backup resumes; delete the work folder to start afresh")
            if len(kept) != len(self.rows):
                log.info("dropping %d history row(s) logged after the last backup", len(self.rows) - len(kept))
                self.rows = kept
                self._write_rows()
        self._epoch_started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - self._epoch_started, 3)}
        row.update({name: float(logs[name]) for name in self.columns[1:-1]})
        self.rows.append(row)
        self._write_rows()
        if (epoch + 1) % self.sample_every == 0 or epoch + 1 == self.epochs:
            self.write_samples(epoch + 1)

    def write_samples(self, epoch: int) -> Path:
        from seglab.gan.common import render, save_sample_grid

        images, labels = render(self.model.generator, self.sample_inputs)
        return save_sample_grid(self.samples_dir / f"epoch_{epoch:03d}.png", images, labels)


# ---------------------------------------------------------------------------------------- train

def _data_digest(shard_dir: Path, split: str) -> str:
    from seglab.data.shards import shard_files

    digest = hashlib.sha256()
    for path in shard_files(shard_dir, split):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def sample_inputs(settings: GanSettings, num_classes: int, shard_dir: Path, split: str) -> np.ndarray:
    """The fixed generator inputs of the sample grids: noise from the seed, or real layouts."""
    from seglab.gan.common import labels_to_one_hot, layouts_from_shards

    if is_conditional(settings.gan):
        _, labels, _ = layouts_from_shards(shard_dir, split, image_size=settings.image_size, seed=settings.seed,
                                           limit=settings.sample_count)
        return np.asarray(labels_to_one_hot(labels, num_classes))
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
    state_dir: str | Path = "data/gan_state",
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
        "settings": asdict(settings),
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


def run_train_gan(cfg: Any, gan_name: str, *, settings: GanSettings | None = None) -> dict:
    """The `train_gan@<gan>` stage: params -> `<gan.out>/<gan>/` (see the module docstring)."""
    settings = settings or settings_from_config(cfg, gan_name)
    paths = gan_paths(cfg)
    return train_gan(cfg.shard.out, paths["out"], settings, state_dir=paths["state"])


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
