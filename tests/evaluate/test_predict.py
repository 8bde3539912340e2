"""`seglab predict` / `seglab.evaluate.predict`: label maps and overlays of new images at their own size,
TTA recorded, bad inputs named per file while the others are written, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from PIL import Image

from seglab.data.coco import MAX_IMAGE_PIXELS
from seglab.data.palette import label_palette
from seglab.evaluate.predict import (
    ERRORS,
    LABELS_SUFFIX,
    OVERLAY_SUFFIX,
    list_inputs,
    load_segmenter,
    predict_images,
    run_predict,
)
from seglab.evaluate.sliding import SlidingWindow
from tests.evaluate.test_evaluate import ABSENT, CLASSES, SIZE, _config, _pixel_model, _save_trained

SEGLAB = Path(sys.executable).parent / "seglab"
ALPHA = 0.5


def _conv_model(classes=len(CLASSES), size=SIZE, seed=1) -> keras.Model:
    """A 5x5 convolution with random weights: unlike the 1x1 pixel model it is not equivariant to a
    horizontal flip, so the TTA merge changes its predictions."""
    rng = np.random.default_rng(seed)
    images = keras.Input((size, size, 3))
    conv = keras.layers.Conv2D(classes, 5, padding="same", name="logits")
    model = keras.Model(images, conv(images / 255.0 - 0.5))
    conv.set_weights([rng.normal(0, 1.0, (5, 5, 3, classes)).astype(np.float32),
                      np.zeros(classes, np.float32)])
    return model


def _image(path: Path, height: int, width: int, seed: int) -> np.ndarray:
    """A noise image saved losslessly (PNG) or as JPEG by its ending; returns the pixels as stored."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _pixel_labels(model: keras.Model, image: np.ndarray) -> np.ndarray:
    """The pixel model's argmax computed in NumPy: at scale 1.0 every window sees a pixel alike."""
    kernel, bias = model.get_layer("logits").get_weights()
    logits = (image.astype(np.float64) / 255.0 - 0.5) @ kernel[0, 0].astype(np.float64) + bias
    return logits.argmax(-1)


def _read(path: str | Path) -> tuple[str, np.ndarray]:
    with Image.open(path) as image:
        return image.mode, np.asarray(image)


@pytest.fixture
def pixel(tmp_path):
    """The 1x1 pixel model saved as a trained model, and the settings (full resolution, scale 1.0)."""
    model = _pixel_model()
    _save_trained(tmp_path, "pixel", model)
    return model, _config(tmp_path, protocol="full", scale=1.0)


def test_each_image_gets_its_label_map_and_overlay_at_its_own_size(tmp_path, pixel):
    model, cfg = pixel
    images = {"wide": _image(tmp_path / "in" / "wide.png", 40, 75, 0),   # windows: 1 x 3
              "tall": _image(tmp_path / "in" / "tall.png", 70, 21, 1)}   # 3 x 1, padded to the window
    report = run_predict(cfg, "pixel", [tmp_path / "in"], tmp_path / "out")
    assert not report.errors and report.tta is None and report.scale == 1.0
    assert [Path(p.file).name for p in report.written] == ["tall.png", "wide.png"]  # a folder in name order
    palette = label_palette()
    for written in report.written:
        stem = Path(written.file).stem
        image = images[stem]
        assert written.labels == str(tmp_path / "out" / f"{stem}{LABELS_SUFFIX}")
        mode, label = _read(written.labels)
        assert mode == "L" and label.shape == image.shape[:2] == (written.height, written.width)
        np.testing.assert_array_equal(label, _pixel_labels(model, image))
        assert label.max() < len(CLASSES) and ABSENT not in label  # the pixel model never predicts it
        assert written.classes == {CLASSES[v]: int(n) for v, n in enumerate(np.bincount(label.ravel())) if n}

        mode, overlay = _read(written.overlay)
        assert mode == "RGB" and overlay.shape[0] >= image.shape[0] and overlay.shape[1] > image.shape[1]
        blend = np.rint((1 - ALPHA) * image.astype(np.float32) + ALPHA * palette[label].astype(np.float32))
        np.testing.assert_array_equal(overlay[:image.shape[0], :image.shape[1]], blend.astype(np.uint8))
        # The legend, right of the image, shows the colour of each class present and of no other.
        legend = overlay[:, image.shape[1]:].reshape(-1, 3)
        shown = {v for v in range(len(CLASSES)) if (legend == palette[v]).all(axis=1).any()}
        assert shown == set(np.unique(label).tolist())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"{stem}{suffix}" for stem in ("tall", "wide") for suffix in (LABELS_SUFFIX, OVERLAY_SUFFIX)]


def test_the_windows_of_several_images_share_model_calls_with_the_same_result():
    sliding = SlidingWindow((SIZE, SIZE), 0.33, "cover", batch_size=8)
    images = [np.random.default_rng(i).uniform(0, 255, shape).astype(np.float32)
              for i, shape in enumerate([(40, 56, 3), (33, 90, 3), (64, 64, 3)])]
    rng = np.random.default_rng(5)
    weights = rng.normal(size=(3, 4)).astype(np.float32)
    calls = []

    def predict(windows):
        calls.append(len(windows))
        logits = windows @ weights
        return np.exp(logits - logits.max(-1, keepdims=True)) / np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)

    together = sliding.predict_many(predict, images)
    batched = list(calls)
    calls.clear()
    alone = [sliding.predict(predict, image) for image in images]
    assert len(batched) < len(calls) and sum(batched) == sum(calls)  # fewer, fuller calls
    for a, b, image in zip(together, alone, images):
        assert a.shape == (*image.shape[:2], 4)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_tta_changes_the_predictor_and_the_report_records_its_views(tmp_path):
    model = _conv_model()
    _save_trained(tmp_path, "conv", model)
    cfg = _config(tmp_path, protocol="full", scale=1.0, tta=["identity", "hflip"])
    image = _image(tmp_path / "in" / "square.png", SIZE, SIZE, 3)  # one window, no resize: easy to check

    plain = run_predict(cfg, "conv", [tmp_path / "in"], tmp_path / "plain", tta=False)
    merged = run_predict(cfg, "conv", [tmp_path / "in"], tmp_path / "tta", tta=True)
    assert plain.tta is None and plain.summary()["tta"] is None
    assert merged.tta == ["identity", "hflip"] == merged.summary()["tta"]

    batch = image[None].astype(np.float32)
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(model(batch), axis=-1))
    flipped = keras.ops.convert_to_numpy(keras.ops.softmax(model(batch[:, :, ::-1]), axis=-1))[:, :, ::-1]
    expected_plain = probabilities[0].argmax(-1)
    expected_tta = ((probabilities + flipped) / 2)[0].argmax(-1)
    assert (expected_plain != expected_tta).any()  # the model is not flip-equivariant
    np.testing.assert_array_equal(_read(plain.written[0].labels)[1], expected_plain)
    np.testing.assert_array_equal(_read(merged.written[0].labels)[1], expected_tta)
    # predict.tta is the default, the flag overrides it.
    assert cfg.predict.tta is False and load_segmenter(cfg, "conv").tta is None


def _bad_inputs(folder: Path) -> dict[str, str]:
    """Good and bad files in `folder`; returns file name -> the error each bad one must get."""
    _image(folder / "good.jpg", 30, 45, 0)
    (folder / "notes.png").write_text("not pixels, just a text file with an image name\n")
    _image(folder / "cut.jpg", 60, 80, 1)
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])  # a JPEG cut short
    # Just over the decoded-pixel cap; a 1-bit PNG of one colour stays a few kB.
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 100
    Image.new("1", (side, side)).save(folder / "huge.png")
    (folder / "readme.txt").write_text("skipped: not an image ending")
    (folder / "nested").mkdir()
    _image(folder / "nested" / "deeper.png", 20, 20, 2)
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    return {"notes.png": "not an image", "cut.jpg": "unreadable image", "huge.png": "image too large",
            "gone.png": "missing image file"}


def test_bad_inputs_are_named_per_file_while_the_others_are_written(tmp_path, pixel):
    _, cfg = pixel
    expected = _bad_inputs(tmp_path / "in")
    missing = tmp_path / "no-such.png"
    report = run_predict(cfg, "pixel", [tmp_path / "in", missing], tmp_path / "out")
    errors = {Path(e.file).name: e for e in report.errors}
    assert {name: e.error for name, e in errors.items()} == {**expected, "no-such.png": "missing image file"}
    assert set(e.error for e in report.errors) <= set(ERRORS)
    for name, error in errors.items():
        assert name in error.message  # the message names the file ...
    assert "expected an image file" in errors["notes.png"].message  # ... and what was expected
    assert "over the 50,000,000-pixel limit" in errors["huge.png"].message
    assert [Path(p.file).name for p in report.written] == ["good.jpg"]
    skipped = {Path(s["file"]).name: s["reason"] for s in report.skipped}
    assert set(skipped) == {"readme.txt", "nested"}
    # Nothing of the failed files, no temporary file left.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"good{LABELS_SUFFIX}", f"good{OVERLAY_SUFFIX}"]


def test_a_failed_write_leaves_neither_output_of_that_image_and_the_old_ones_intact(tmp_path, pixel):
    _, cfg = pixel
    _image(tmp_path / "in" / "a.png", 30, 40, 0)
    _image(tmp_path / "in" / "b.png", 30, 40, 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / f"a{LABELS_SUFFIX}").write_bytes(b"an earlier run's label map")
    (out / f"a{OVERLAY_SUFFIX}").mkdir()  # the overlay cannot be renamed into place
    report = run_predict(cfg, "pixel", [tmp_path / "in"], out)
    assert [(Path(e.file).name, e.error) for e in report.errors] == [("a.png", "write failed")]
    assert (out / f"a{LABELS_SUFFIX}").read_bytes() == b"an earlier run's label map"
    assert [Path(p.file).name for p in report.written] == ["b.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"a{LABELS_SUFFIX}", f"a{OVERLAY_SUFFIX}", f"b{LABELS_SUFFIX}", f"b{OVERLAY_SUFFIX}"])


def test_inputs_follow_links_once_and_refuse_output_clashes(tmp_path):
    folder = tmp_path / "in"
    for name in ("a.jpg", "a.png", "b.PNG"):
        _image(folder / name, 8, 8, 0)
    (tmp_path / "link.png").symlink_to(folder / "b.PNG")
    (tmp_path / "linked").symlink_to(folder, target_is_directory=True)
    images, skipped, errors = list_inputs([folder, folder / "b.PNG", tmp_path / "link.png", tmp_path / "linked"],
                                          tmp_path / "out")
    assert [p.name for p in images] == ["a.jpg", "b.PNG"]  # endings in any case
    assert [(Path(e.file).name, e.error) for e in errors] == [("a.png", "output name clash")]
    assert "a.jpg" in errors[0].message
    assert {Path(s["file"]).name for s in skipped} == {"b.PNG", "link.png", "a.jpg", "a.png"}  # reached again
    assert all("the same file as" in s["reason"] for s in skipped)
    # An --out that would overwrite an input.
    _image(folder / f"c{LABELS_SUFFIX}", 8, 8, 0)
    _image(folder / "c.png", 8, 8, 0)
    images, _, errors = list_inputs([folder / "c.png", folder / f"c{LABELS_SUFFIX}"], folder)
    assert [p.name for p in images] == [f"c{LABELS_SUFFIX}"] and errors[0].error == "output name clash"


def test_nothing_to_predict_and_a_file_as_out_are_refused(tmp_path, pixel):
    _, cfg = pixel
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image to predict.*empty: a folder without image files"):
        run_predict(cfg, "pixel", [tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "file").write_text("")
    segmenter = load_segmenter(cfg, "pixel")
    with pytest.raises(ValueError, match="is a file; expected a folder"):
        predict_images(segmenter, [tmp_path / "empty"], tmp_path / "file", overlay_alpha=ALPHA)


def test_the_cli_and_the_function_agree_and_the_cli_fails_naming_the_bad_files(tmp_path, pixel):
    _, cfg = pixel
    _image(tmp_path / "in" / "one.png", 40, 56, 0)
    _image(tmp_path / "in" / "two.jpg", 50, 33, 1)
    (tmp_path / "in" / "bad.png").write_text("text")
    inputs = [tmp_path / "in"]
    expected = run_predict(cfg, "pixel", inputs, tmp_path / "function").summary()

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"out": str(tmp_path / "models")},
                                      "evaluate": {"scale": 1.0, "batch_size": cfg.evaluate.batch_size}}))
    proc = subprocess.run([str(SEGLAB), "--params", str(params), "predict", "pixel", *map(str, inputs),
                           "--out", str(tmp_path / "cli")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 1, proc.stderr
    assert "1 input(s) failed" in proc.stderr and f"not an image: {tmp_path / 'in' / 'bad.png'} is not an image" in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary == json.loads(json.dumps(expected).replace(str(tmp_path / "function"), str(tmp_path / "cli")))
    for written in expected["written"]:
        for key in ("labels", "overlay"):
            cli_file = tmp_path / "cli" / Path(written[key]).name
            assert cli_file.read_bytes() == Path(written[key]).read_bytes()


def test_predictions_run_their_graphs_without_grappler_on_a_cpu_whoever_calls(tmp_path, pixel):
    """`predict_images` as the dashboard calls it (not through `run_predict`): the graphs' calls run with
    the evaluation's graph options (`inference_graph_options`), and the setting is restored after."""
    import dataclasses

    import tensorflow as tf

    from seglab.evaluate.inference import TracedPredictor

    def disabled() -> bool:
        return tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)

    _, cfg = pixel
    segmenter = load_segmenter(cfg, "pixel")
    seen = []

    def recording(images):
        seen.append(disabled())
        return segmenter.predictor.graph(images)

    recorder = dataclasses.replace(segmenter, predictor=TracedPredictor(recording, "recording"))
    _image(tmp_path / "in" / "a.png", 20, 30, 0)
    before = disabled()
    report = predict_images(recorder, [tmp_path / "in"], tmp_path / "out", overlay_alpha=ALPHA)
    assert not report.errors and len(report.written) == 1
    assert seen and set(seen) == {not tf.config.list_physical_devices("GPU")}
    assert disabled() == before
