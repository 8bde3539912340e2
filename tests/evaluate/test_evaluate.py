"""The evaluate and ensemble stages on tiny shards and tiny saved models: files, numbers, refusals."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from seglab.config import Config
from seglab.data.classes import ClassSet
from seglab.data.coco import LabelRules, encode_png
from seglab.data.pipeline import make_dataset
from seglab.data.shards import shard_metadata, write_shards
from seglab.evaluate.ensemble import ensemble_model, run_ensemble
from seglab.evaluate.evaluate import read_history, run_evaluate
from seglab.evaluate.plots import IGNORE_COLOR, colorize, label_palette
from seglab.models import build
from tests.dashboard.support_module import load_dashboard_support
from tests.factories import run_id as factory_run_id
from tests.factories import train_record, write_train_record

CLASSES = ["background", "cat", "dog", "bird"]  # "bird" never occurs in the val labels
ABSENT = 3
SIZE = 32
VAL_IMAGES = 5
BATCH = 2  # 5 images -> a last partial batch, padded by the evaluation
HISTORY = "epoch,loss,miou,val_loss,val_miou,lr\n0,1.5,0.2,1.4,0.25,0.001\n1,1.1,0.3,,nan,0.0005\n"
METRICS_KEYS = {
    "miou", "mdice", "mprecision", "mrecall", "accuracy", "miou_fg",
    "tta_miou", "tta_mdice", "tta_mprecision", "tta_mrecall", "tta_accuracy", "tta_miou_fg",
    "images_per_second", "tta_images_per_second", "latency_ms_p50", "latency_ms_p90",
}


def _write_val_shards(shard_dir: Path, classes=CLASSES) -> None:
    """Five 40x56 noise images (non-square: letterboxed, so padding is ignored) with cat/dog boxes."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(VAL_IMAGES):
        image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
        label = np.zeros((40, 56), np.uint8)
        label[4 + index : 20 + index, 6:26] = 1
        label[18:36, 30 + index : 50] = 2
        label[0:3, :] = 255  # an ignore strip inside the image
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        counts = np.bincount(label.ravel(), minlength=256)
        rows.append({
            "image_id": index, "file_name": f"{index:012d}.jpg", "split": "val", "source": "tiny",
            "height": 40, "width": 56, "orig_height": 40, "orig_width": 56,
            "image": buffer.getvalue(), "label": encode_png(label),
            "class_pixels": [int(c) for c in counts[: len(classes)]], "ignore_pixels": int(counts[255]),
        })
    class_set = ClassSet("custom", tuple(classes), tuple(range(len(classes))))
    write_shards(rows, shard_dir / "val", shard_metadata(class_set, "val", LabelRules()), max_shard_mb=16)


def _config(root: Path, models=("pixel",), members=(), weights=None, tta=None, protocol="letterbox",
            **evaluate_settings) -> Config:
    """Settings for the tiny workspace; letterbox by default, which these tests check pixel by pixel
    (the full-resolution protocol: test_full_resolution.py)."""
    evaluate = {"out": str(root / "eval"), "batch_size": BATCH, "latency_runs": 3, "protocol": protocol,
                **evaluate_settings}
    if tta is not None:
        evaluate["tta"] = list(tta)
    return Config.model_validate({
        "seed": 0,
        "shard": {"out": str(root / "shards")},
        "profiles": {"cpu": {"image_size": SIZE, "batch_size": BATCH, "epochs": 2, "width": 0.125,
                             "learning_rate": 1e-3}},
        "models": {name: {"arch": "unet"} for name in models},
        "train": {"out": str(root / "models"), "metrics": str(root / "metrics")},
        "evaluate": evaluate,
        "ensemble": {"members": list(members), "weights": weights},
    })


def _pixel_model(classes=len(CLASSES), size=SIZE, seed=0) -> keras.Model:
    """A 1x1 convolution (equivariant to flips and turns) that never predicts the absent class."""
    rng = np.random.default_rng(seed)
    images = keras.Input((size, size, 3))
    conv = keras.layers.Conv2D(classes, 1, name="logits")
    model = keras.Model(images, conv(images / 255.0 - 0.5))
    bias = rng.normal(0, 0.1, classes)
    if classes > ABSENT:
        bias[ABSENT] = -1e3
    conv.set_weights([rng.normal(0, 2.0, (1, 1, 3, classes)).astype(np.float32), bias.astype(np.float32)])
    return model


def _save_trained(root: Path, name: str, model: keras.Model, classes=CLASSES, history=HISTORY) -> dict:
    """What the train stage leaves behind (file contract), written by hand."""
    folder = root / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    info = train_record(name, classes=classes, width=0.125, image_size=int(model.input_shape[1]), batch_size=BATCH,
                        epochs_planned=2, epochs_run=2, best_epoch=0, best_val_miou=0.25,
                        param_count=model.count_params(), trainable_param_count=model.count_params(),
                        class_set="custom", dataset="tiny", train_images=10, val_images=VAL_IMAGES)
    write_train_record(folder / "train.json", info)
    metrics = root / "metrics" / name
    metrics.mkdir(parents=True, exist_ok=True)
    (metrics / "history.csv").write_text(history)
    return info


@pytest.fixture
def workspace(tmp_path) -> Path:
    _write_val_shards(tmp_path / "shards")
    return tmp_path


def _val_batches(root: Path):
    return list(make_dataset(root / "shards", "val", image_size=(SIZE, SIZE), batch_size=BATCH, training=False,
                             seed=0, deterministic=True))


def _expected_confusion(root: Path, model: keras.Model) -> np.ndarray:
    """The confusion matrix computed independently: NumPy 1x1 conv, argmax, bincount over scored pixels."""
    kernel, bias = model.get_layer("logits").get_weights()
    matrix = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
    for images, labels in _val_batches(root):
        logits = (np.asarray(images, np.float64) / 255.0 - 0.5) @ kernel[0, 0].astype(np.float64) + bias
        predicted, truth = logits.argmax(-1), np.asarray(labels)
        scored = truth != 255
        matrix += np.bincount(truth[scored] * len(CLASSES) + predicted[scored],
                              minlength=len(CLASSES) ** 2).reshape(len(CLASSES), len(CLASSES))
    return matrix


def _assert_png(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_evaluation_writes_every_contract_file_with_correct_contents(workspace):
    model = _pixel_model()
    info = _save_trained(workspace, "pixel", model)
    summary = run_evaluate(_config(workspace), "pixel")
    out = workspace / "eval" / "pixel"
    assert summary["out"] == str(out)

    metrics = json.loads((out / "metrics.json").read_text())
    assert METRICS_KEYS <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["images_per_second"] > 0 and metrics["tta_images_per_second"] > 0
    assert 0 < metrics["latency_ms_p50"] <= metrics["latency_ms_p90"]

    document = json.loads((out / "eval.json").read_text())
    plain, tta = document["runs"]
    assert [plain["run"]["variant"], tta["run"]["variant"]] == ["plain", "tta"]
    for entry in (plain, tta):
        run = entry["run"]
        assert re.fullmatch(r"[0-9a-f]{16}", run["run_id"])
        assert run["name"] == "pixel" and run["split"] == "val" and run["eval_images"] == VAL_IMAGES
        assert {k: run[k] for k in info} == info  # every train.json field is carried over
        assert run["dataset"] == run["train_dataset"] == "tiny" and run["eval_protocol"] == "letterbox"
        assert run["eval_window"] is None and run["eval_data"] == str(workspace / "shards")
    assert plain["run"]["run_id"] != tta["run"]["run_id"]
    # The original evaluation (the model's own val split, letterboxed) keeps the run id it always had.
    assert [e["run"]["run_id"] for e in (plain, tta)] == [
        factory_run_id("pixel", variant, info["params_hash"]) for variant in ("plain", "tta")]
    assert tta["run"]["tta"] == list(_config(workspace).evaluate.tta) and plain["run"]["tta"] is None

    # The confusion counts exactly the scored pixels, and matches an independent computation.
    expected = _expected_confusion(workspace, model)
    scored_pixels = sum(int((np.asarray(labels) != 255).sum()) for _, labels in _val_batches(workspace))
    confusion = np.array(plain["confusion"])
    assert confusion.sum() == scored_pixels < VAL_IMAGES * SIZE * SIZE  # letterbox padding is not counted
    np.testing.assert_array_equal(confusion, expected)
    # A 1x1 convolution commutes with flips and quarter turns: TTA changes nothing.
    np.testing.assert_array_equal(np.array(tta["confusion"]), confusion)
    assert tta["metrics"] == plain["metrics"]

    diagonal = np.diag(expected)
    with np.errstate(invalid="ignore"):  # the absent class: 0 / 0
        iou = diagonal / (expected.sum(0) + expected.sum(1) - diagonal)
    assert plain["metrics"]["miou"] == pytest.approx(np.mean(iou[:ABSENT]))  # absent class left out
    assert metrics["miou"] == pytest.approx(plain["metrics"]["miou"])
    assert plain["metrics"]["accuracy"] == pytest.approx(diagonal.sum() / scored_pixels)

    per_class = plain["per_class"]
    assert [row["class_name"] for row in per_class] == CLASSES
    absent = per_class[ABSENT]
    assert absent["support"] == 0 and absent["predicted"] == 0
    assert all(absent[k] is None for k in ("iou", "dice", "precision", "recall"))
    assert absent["accuracy"] == pytest.approx(1.0)  # one-vs-rest: never predicted, never true
    cat = per_class[1]
    tp, fp, fn = expected[1, 1], expected[:, 1].sum() - expected[1, 1], expected[1].sum() - expected[1, 1]
    assert cat["support"] == expected[1].sum() and cat["predicted"] == expected[:, 1].sum()
    assert cat["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert cat["accuracy"] == pytest.approx((scored_pixels - fp - fn) / scored_pixels)

    assert plain["history"] == read_history(workspace / "metrics" / "pixel" / "history.csv")
    assert plain["history"][1] == {"epoch": 1, "loss": 1.1, "miou": 0.3, "val_loss": None, "val_miou": None,
                                   "lr": 0.0005}
    assert tta["history"] == []

    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert len(rows) == 2 * len(CLASSES) and rows[ABSENT]["iou"] == "" and rows[0]["variant"] == "plain"
    table = list(csv.reader((out / "confusion.csv").open()))
    assert table[0][1:] == CLASSES and [r[0] for r in table[1:]] == CLASSES
    np.testing.assert_array_equal(np.array([r[1:] for r in table[1:]], int), expected)
    for png in ("confusion.png", "confusion_tta.png", "predictions.png"):
        _assert_png(out / png)
    # The dashboard looks for each variant's heatmap under the name the stage wrote it with (above).
    dashboard = load_dashboard_support()
    assert {v: dashboard.confusion_png(v) for v in ("plain", "tta")} == {"plain": "confusion.png",
                                                                         "tta": "confusion_tta.png"}
    assert not list(workspace.glob("eval/.*"))  # no temporary folder left behind


def test_the_augmenter_goes_from_train_json_through_eval_json_into_the_warehouse(workspace):
    from seglab.warehouse import connect_read_only, run_ingest

    _save_trained(workspace, "pixel", _pixel_model())
    info = _save_trained(workspace, "pixel+pix2pix", _pixel_model(seed=1))
    info.update(augmenter="pix2pix", synthetic_accepted=True, synthetic_images_used=12)
    write_train_record(workspace / "models" / "pixel+pix2pix" / "train.json", info)
    cfg = _config(workspace, models=("pixel", "pixel+pix2pix"))
    cfg = cfg.model_copy(update={"warehouse": cfg.warehouse.model_copy(update={"path": workspace / "wh.duckdb"})})
    for name in ("pixel", "pixel+pix2pix"):
        run_evaluate(cfg, name, grid_images=0)
        runs = [e["run"] for e in json.loads((workspace / "eval" / name / "eval.json").read_text())["runs"]]
        expected = ("pix2pix", 12) if name == "pixel+pix2pix" else (None, None)
        assert [(r["augmenter"], r["synthetic_images_used"]) for r in runs] == [expected, expected]
    run_ingest(cfg)
    con = connect_read_only(workspace / "wh.duckdb")
    try:
        assert con.execute("SELECT name, variant, augmenter, synthetic_images_used FROM runs ORDER BY name, variant"
                           ).fetchall() == [("pixel", "plain", None, None), ("pixel", "tta", None, None),
                                            ("pixel+pix2pix", "plain", "pix2pix", 12),
                                            ("pixel+pix2pix", "tta", "pix2pix", 12)]
    finally:
        con.close()


def test_zoo_model_is_evaluated_and_ensemble_with_weights_one_zero_equals_the_first_member(workspace):
    keras.utils.set_random_seed(1)
    first = build("unet", len(CLASSES), (SIZE, SIZE, 3), width=0.125)
    keras.utils.set_random_seed(2)
    second = build("unet", len(CLASSES), (SIZE, SIZE, 3), width=0.125)
    _save_trained(workspace, "first", first)
    _save_trained(workspace, "second", second)
    names = ("first", "second")

    member = run_evaluate(_config(workspace, models=names, tta=["identity", "hflip"]), "first")
    summary = run_ensemble(_config(workspace, models=names, members=names, weights=[1.0, 0.0]))
    assert summary["member_weights"] == [1.0, 0.0]
    single = json.loads((workspace / "eval" / "first" / "eval.json").read_text())["runs"][0]
    ensembled = json.loads((workspace / "eval" / "ensemble" / "eval.json").read_text())["runs"]
    assert len(ensembled) == 1
    (entry,) = ensembled
    assert entry["run"]["variant"] == "ensemble" and entry["run"]["members"] == list(names)
    assert entry["confusion"] == single["confusion"]
    assert entry["per_class"] == single["per_class"]
    assert entry["metrics"] == single["metrics"]
    assert summary["miou"] == member["miou"]
    for png in ("confusion.png", "predictions.png"):
        _assert_png(workspace / "eval" / "ensemble" / png)
    assert (workspace / "eval" / "ensemble" / load_dashboard_support().confusion_png("ensemble")).is_file()

    # The other member alone differs (else the comparison above proves nothing); weights are normalised.
    summary = run_ensemble(_config(workspace, models=names, members=names, weights=[0.0, 3.0]))
    assert summary["member_weights"] == [0.0, 1.0]
    other = json.loads((workspace / "eval" / "ensemble" / "eval.json").read_text())["runs"][0]
    assert other["confusion"] != single["confusion"]
    assert other["run"]["run_id"] != entry["run"]["run_id"]


def test_model_trained_on_other_classes_is_refused(workspace):
    swapped = ["background", "dog", "cat", "bird"]
    _save_trained(workspace, "pixel", _pixel_model(), classes=swapped)
    with pytest.raises(ValueError, match=r"class mismatch.*label 1 is 'dog' in one and 'cat' in the other"):
        run_evaluate(_config(workspace), "pixel")
    assert not (workspace / "eval" / "pixel").exists()


def test_train_json_that_disagrees_with_the_model_is_refused(workspace):
    _save_trained(workspace, "pixel", _pixel_model(classes=3), classes=CLASSES)
    with pytest.raises(ValueError, match="outputs 3 classes but .*train.json lists 4"):
        run_evaluate(_config(workspace), "pixel")


def test_a_bad_train_json_is_refused_naming_the_file_and_field(workspace):
    _save_trained(workspace, "pixel", _pixel_model())
    path = workspace / "models" / "pixel" / "train.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"image_size": "big"}))
    with pytest.raises(ValueError, match=r"pixel/train.json: image_size: expected an integer"):
        run_evaluate(_config(workspace), "pixel")


def test_a_trained_zoo_model_loads_without_the_training_package(workspace):
    # Training saves an uncompiled inference view; evaluation must not need seglab.train to load it.
    keras.utils.set_random_seed(1)
    _save_trained(workspace, "zoo", build("deeplabv3plus_mobilenetv2", len(CLASSES), (SIZE, SIZE, 3), width=0.35))
    script = ("import sys; from seglab.evaluate.inference import load_trained; "
              f"trained = load_trained({str(workspace / 'models')!r}, 'zoo'); "
              "assert trained.model.output_shape[-1] == 4; "
              "print(sorted(m for m in sys.modules if m.startswith('seglab.train')))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_missing_training_outputs_are_named(workspace):
    with pytest.raises(FileNotFoundError, match=r"models/pixel/train.json.*seglab train pixel"):
        run_evaluate(_config(workspace), "pixel")
    _save_trained(workspace, "pixel", _pixel_model())
    (workspace / "metrics" / "pixel" / "history.csv").write_text("epoch,loss\n0,oops\n")
    with pytest.raises(ValueError, match=r"history.csv line 2, column 'loss': expected a number"):
        run_evaluate(_config(workspace), "pixel")


def test_ensemble_members_that_do_not_line_up_are_refused(workspace):
    _save_trained(workspace, "a", _pixel_model())
    _save_trained(workspace, "b", _pixel_model(classes=3), classes=CLASSES[:3])
    _save_trained(workspace, "c", _pixel_model(size=2 * SIZE))
    names = ("a", "b", "c")
    with pytest.raises(ValueError, match=r"different classes.*a: \[.*'bird'\]; b: \['background', 'cat', 'dog'\]"):
        run_ensemble(_config(workspace, models=names, members=("a", "b")))
    with pytest.raises(ValueError, match=r"different input sizes \(a: 32x32, c: 64x64\)"):
        run_ensemble(_config(workspace, models=names, members=("a", "c")))
    with pytest.raises(ValueError, match="ensemble.members is empty"):
        run_ensemble(_config(workspace, models=names, members=()))
    assert not (workspace / "eval" / "ensemble").exists()


def test_ensemble_accepts_member_names_keras_refuses_as_scopes():
    # params.yaml names a GAN variant `<model>+<gan>`; `+` is not allowed in a Keras name scope.
    names = ["unet_mobilenetv2_imagenet+pix2pix", "unet_mobilenetv2_imagenet_pix2pix"]
    model = ensemble_model([_pixel_model(seed=0), _pixel_model(seed=1)], [0.5, 0.5], names=names)
    probabilities = np.asarray(model.predict_on_batch(np.zeros((1, SIZE, SIZE, 3), np.float32)))  # traced: scopes
    assert probabilities.shape == (1, SIZE, SIZE, len(CLASSES))
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-5)


def test_failed_evaluation_leaves_the_previous_outputs_untouched(workspace, monkeypatch):
    _save_trained(workspace, "pixel", _pixel_model())
    cfg = _config(workspace, tta=["identity"])
    run_evaluate(cfg, "pixel")
    out = workspace / "eval" / "pixel"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError("killed while drawing")

    monkeypatch.setattr("seglab.evaluate.evaluate.plot_prediction_grid", crash)
    with pytest.raises(RuntimeError, match="killed while drawing"):
        run_evaluate(cfg, "pixel")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in (workspace / "eval").iterdir()] == ["pixel"]  # no temporary folder left


def test_a_model_producing_nan_is_refused(workspace):
    model = _pixel_model()
    kernel, bias = model.get_layer("logits").get_weights()
    bias[1] = np.nan
    model.get_layer("logits").set_weights([kernel, bias])
    _save_trained(workspace, "pixel", model)
    with pytest.raises(ValueError, match="plain: the model produced NaN or infinite probabilities on batch 0"):
        run_evaluate(_config(workspace, tta=["identity"]), "pixel")
    with pytest.raises(ValueError, match="plain: the model produced NaN or infinite probabilities on image 0"):
        run_evaluate(_config(workspace, tta=["identity"], protocol="full"), "pixel")


def test_palette_shows_only_ignore_as_grey_and_colours_classes_apart():
    palette = label_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert tuple(palette[0]) == (0, 0, 0) and tuple(palette[255]) == IGNORE_COLOR
    assert len({tuple(c) for c in palette}) == 256
    spread = palette[1:255].astype(int).max(axis=1) - palette[1:255].astype(int).min(axis=1)
    assert spread.min() > 25  # no class colour is a grey
    label = np.array([[0, 1], [2, 255]], np.uint8)
    np.testing.assert_array_equal(colorize(label), palette[label])
    with pytest.raises(ValueError, match=r"\(H, W\) label map"):
        colorize(np.zeros((2, 2, 1), np.uint8))


def test_the_evaluation_graphs_run_without_grappler_on_a_cpu_and_the_setting_is_restored():
    import tensorflow as tf

    from seglab.evaluate.inference import inference_graph_options

    def disabled() -> bool:
        return tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)

    on_cpu = not tf.config.list_physical_devices("GPU")
    before = disabled()
    with pytest.raises(RuntimeError, match="inside"):
        with inference_graph_options():
            assert disabled() is on_cpu
            raise RuntimeError("inside")
    assert disabled() == before
