"""train_gan / synthesize stages: outputs, resume after SIGKILL, synthetic shards next to real ones."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from seglab.config import Config, load_config
from seglab.data.pipeline import make_dataset
from seglab.data.shards import SHARD_SCHEMA, decode_label, decode_rgb, read_classes, read_split
from seglab.gan.synthesize import SYNTHETIC_SCHEMA, synthesize, synthetic_image_id
from seglab.gan.settings import GanSettings, settings_from_config
from seglab.gan.train import run_train_gan, train_gan

CLASSES = ("background", "cat", "dog")  # the classes of conftest's tiny shards
TINY = {"image_size": 16, "width": 4, "latent_dim": 8, "batch_size": 8, "sample_count": 4}


def history(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def cfg_for(shards: Path, root: Path, **gan) -> Config:
    """A config whose GAN folders lie under `root`, with `gan` params on top of the defaults."""
    section = {"out": root / "gan", "state": root / "gan_state", "synthetic_out": root / "synthetic", **gan}
    return Config.model_validate({"shard": {"out": shards, "jpeg_quality": 90, "max_shard_mb": 16.0}, "gan": section})


# ------------------------------------------------------------------------------------ settings

def test_settings_layer_common_and_per_gan_params_over_paper_defaults():
    cfg = Config.model_validate({"seed": 7, "gan": {"names": ["sagan"], "out": "x", "epochs": 3, "width": 8,
                                                    "sagan": {"epochs": 5, "d_learning_rate": 1e-3}}})
    sagan = settings_from_config(cfg, "sagan")
    assert (sagan.epochs, sagan.width, sagan.d_learning_rate, sagan.seed) == (5, 8, 1e-3, 7)
    assert (sagan.learning_rate, sagan.beta_1, sagan.beta_2) == (1e-4, 0.0, 0.9)  # SAGAN's TTUR defaults
    dcgan = settings_from_config(cfg, "dcgan")
    assert (dcgan.epochs, dcgan.beta_1) == (3, 0.5)
    assert settings_from_config(Config(), "pix2pix") == GanSettings.for_gan("pix2pix")
    assert dcgan.params_hash != GanSettings.for_gan("dcgan", epochs=4, width=8).params_hash
    with pytest.raises(ValueError, match=r"dcgan.widht\s+Extra inputs are not permitted"):
        Config.model_validate({"gan": {"dcgan": {"widht": 3}}})
    with pytest.raises(ValueError, match="unknown GAN 'stylegan'"):
        GanSettings.for_gan("stylegan")
    with pytest.raises(ValueError, match=r"dcgan.epochs\s+Input should be greater than or equal to 1"):
        GanSettings.for_gan("dcgan", epochs=0)


def test_the_default_config_is_params_yaml():
    # params.yaml is the source: the typed defaults must say the same, so code run without it agrees.
    params = load_config(Path(__file__).parents[2] / "params.yaml")
    assert params.gan == Config().gan
    assert params.validate_synthetic == Config().validate_synthetic
    hashes = {gan: settings_from_config(params, gan).params_hash for gan in ("dcgan", "sagan", "pix2pix")}
    # The settings train.json and the synthetic shards record; a change here retrains every augmenter.
    assert hashes == {"dcgan": "6534366f2d485f09", "sagan": "34aeae523e1e850a", "pix2pix": "92e8741b2b15b9d5"}


# --------------------------------------------------------------------------------- train + synth

@pytest.fixture(scope="module")
def trained_dcgan(tiny_shards, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("dcgan_run")
    cfg = cfg_for(tiny_shards, root, **TINY, epochs=3, sample_every=2)
    # A stale work folder from a run with other settings must be discarded, not resumed.
    stale = root / "gan_state" / "dcgan"
    stale.mkdir(parents=True)
    (stale / "fingerprint.json").write_text(json.dumps({"params_hash": "other"}))
    (stale / "history.csv").write_text("epoch,d_loss\n1,0.5\n")
    info = run_train_gan(cfg, "dcgan")
    return SimpleNamespace(cfg=cfg, root=root, info=info, out=root / "gan" / "dcgan")


def test_train_gan_writes_history_samples_generator_and_train_json(trained_dcgan):
    out, info = trained_dcgan.out, trained_dcgan.info
    rows = history(out / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert list(rows[0]) == ["epoch", "d_loss", "g_loss", "d_real", "d_fake", "seconds"]
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("d_loss", "g_loss"))
    # Every `sample_every` epochs, and after the last one.
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_002.png", "epoch_003.png"]
    assert (out / "generator.keras").is_file()
    saved = json.loads((out / "train.json").read_text())
    assert saved == info
    assert {k: saved[k] for k in ("gan", "epochs", "image_size", "classes", "seed", "resumed_from_epoch")} == {
        "gan": "dcgan", "epochs": 3, "image_size": 16, "classes": list(CLASSES), "seed": 0, "resumed_from_epoch": 0}
    assert saved["params_hash"] == settings_from_config(trained_dcgan.cfg, "dcgan").params_hash
    assert saved["seconds"] > 0 and saved["train_images"] == 24 and saved["steps_per_epoch"] == 3
    assert not (trained_dcgan.root / "gan_state" / "dcgan").exists()  # work folder removed when done


def test_synthesize_writes_shards_readable_with_the_real_ones(trained_dcgan, tiny_shards, tmp_path):
    report = synthesize(trained_dcgan.root / "gan", tiny_shards, tmp_path / "synthetic", gan="dcgan", count=10,
                        seed=3, size=32)
    shard_dir = tmp_path / "synthetic" / "dcgan"
    files = sorted((shard_dir / "train").glob("part-*.parquet"))
    assert [f.name for f in files] == ["part-00000.parquet"] and report["files"][0]["rows"] == 10
    schema = pq.read_schema(files[0])
    assert schema.names == SHARD_SCHEMA.names + ["generator", "generator_seed"]
    assert schema.remove_metadata() == SYNTHETIC_SCHEMA
    meta = schema.metadata
    real_meta = pq.read_schema(next((tiny_shards / "train").glob("*.parquet"))).metadata
    assert read_classes(files[0]) == list(CLASSES) and meta[b"seglab.classes"] == real_meta[b"seglab.classes"]
    assert meta[b"seglab.generator"] == b"dcgan" and meta[b"seglab.generator_seed"] == b"3"

    table = read_split(shard_dir, "train").to_pylist()
    assert {r["source"] for r in table} == {"synthetic:dcgan"}
    assert {(r["generator"], r["generator_seed"], r["split"]) for r in table} == {("dcgan", 3, "train")}
    assert [r["image_id"] for r in table] == [synthetic_image_id("dcgan", i) for i in range(10)]
    for r in table:
        label, image = decode_label(r["label"]), decode_rgb(r["image"])
        assert label.shape == (32, 32) and image.shape == (32, 32, 3)  # enlarged from the GAN's 16 px
        assert (r["height"], r["width"]) == (32, 32)
        assert set(np.unique(label)) <= {0, 1, 2, 255}
        counts = np.bincount(label.ravel(), minlength=256)
        assert r["class_pixels"] == counts[:3].tolist() and r["ignore_pixels"] == counts[255]
    assert (shard_dir / "preview.png").is_file()
    assert json.loads((shard_dir / "synthesize.json").read_text())["images"] == 10

    # The input pipeline reads real and synthetic shards as one split with one class list.
    dataset = make_dataset([tiny_shards, shard_dir], "train", image_size=(16, 16), batch_size=64)
    images, labels = next(iter(dataset))
    assert images.shape == (34, 16, 16, 3) and labels.shape == (34, 16, 16)


def test_synthesize_is_deterministic_from_the_seed(trained_dcgan, tiny_shards, tmp_path):
    def payloads(out: Path, seed: int) -> list[tuple[bytes, bytes]]:
        synthesize(trained_dcgan.root / "gan", tiny_shards, out, gan="dcgan", count=6, seed=seed)
        return [(r["image"], r["label"]) for r in read_split(out / "dcgan", "train").to_pylist()]

    first = payloads(tmp_path / "a", 11)
    assert payloads(tmp_path / "b", 11) == first
    # Another seed draws other noise, so the samples differ, unless this 1-epoch generator has
    # collapsed to one output for all noise (seen in CI): then every sample of a seed is the same too.
    assert payloads(tmp_path / "c", 12) != first or len(set(first)) == 1


def test_synthesize_refuses_a_generator_trained_on_other_classes(trained_dcgan, make_tiny_shards, tmp_path):
    other = make_tiny_shards(tmp_path / "other", images=8, classes=("background", "cat", "bus"))
    with pytest.raises(ValueError, match=r"train.json: generator trained on classes .* retrain"):
        synthesize(trained_dcgan.root / "gan", other, tmp_path / "out", gan="dcgan", count=2, seed=0)
    with pytest.raises(FileNotFoundError, match=r"sagan/train.json: not found"):
        synthesize(trained_dcgan.root / "gan", other, tmp_path / "out", gan="sagan", count=2, seed=0)
    assert not (tmp_path / "out" / "dcgan").exists()  # nothing half-written


def test_sagan_and_pix2pix_train_and_synthesize(tiny_shards, tmp_path):
    cfg = cfg_for(tiny_shards, tmp_path, **TINY, epochs=1, sample_every=1, layout_mix=[1, 0, 0], synth_images=6)
    from seglab.gan.common import layouts_from_shards
    from seglab.gan.synthesize import run_synthesize

    for gan in ("sagan", "pix2pix"):
        info = run_train_gan(cfg, gan)
        assert info["gan"] == gan and (tmp_path / "gan" / gan / "samples" / "epoch_001.png").is_file()
        report = run_synthesize(cfg, gan)
        assert report["images"] == 6
    # pix2pix renders real layouts here (mix 1, 0, 0): each synthetic label map is one of them exactly.
    _, real_layouts, _ = layouts_from_shards(tiny_shards, "train", image_size=16, seed=0)
    rows = read_split(tmp_path / "synthetic" / "pix2pix", "train").to_pylist()
    assert report["layout_kinds"] == {"real": 6}
    for r in rows:
        label = decode_label(r["label"])
        assert any(np.array_equal(label, layout) for layout in real_layouts)


# ------------------------------------------------------------------------------------- resume

_KILLABLE_RUN = textwrap.dedent("""
    import sys, time
    import keras
    from seglab.gan.settings import GanSettings
    from seglab.gan.train import train_gan

    class Slow(keras.callbacks.Callback):  # leaves time to kill the run between epochs
        def on_epoch_end(self, epoch, logs=None):
            time.sleep(1.0)

    settings = GanSettings.for_gan("dcgan", epochs=6, sample_every=2, **{tiny})
    train_gan(sys.argv[1], sys.argv[2], settings, state_dir=sys.argv[3], verbose=0, callbacks=[Slow()])
""")


def backed_up_epoch(metadata: Path) -> int:
    try:
        return int(json.loads(metadata.read_text())["epoch"])
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return 0


def test_killed_training_resumes_from_the_last_completed_epoch(tiny_shards, tmp_path):
    out, state = tmp_path / "gan", tmp_path / "state"
    metadata = state / "dcgan" / "backup" / "training_metadata.json"
    script = _KILLABLE_RUN.replace("{tiny}", repr(TINY))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen([sys.executable, "-c", script, str(tiny_shards), str(out), str(state)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None and backed_up_epoch(metadata) < 2:
            time.sleep(0.05)
        assert process.poll() is None, f"run ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not (out / "dcgan").exists()  # no output from a killed run
    backed_up = json.loads(metadata.read_text())["epoch"]
    before = history(state / "dcgan" / "history.csv")
    assert backed_up >= 2 and len(before) >= backed_up
    # As if the kill had struck after an epoch was logged but before its backup was written.
    with (state / "dcgan" / "history.csv").open("a") as f:
        f.write(f"{len(before) + 1},9,9,9,9,9\n")

    settings = GanSettings.for_gan("dcgan", epochs=6, sample_every=2, **TINY)
    info = train_gan(tiny_shards, out, settings, state_dir=state, verbose=0)
    assert info["resumed_from_epoch"] == backed_up
    rows = history(out / "dcgan" / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # each epoch once
    assert rows[:backed_up] == before[:backed_up]  # the killed run's epochs kept as logged
    assert all(float(r["d_loss"]) != 9 for r in rows)
    assert sorted(p.name for p in (out / "dcgan" / "samples").iterdir()) == [
        "epoch_002.png", "epoch_004.png", "epoch_006.png"]
    assert not (state / "dcgan").exists()
