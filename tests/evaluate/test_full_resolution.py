"""Full-resolution evaluation (sliding window over whole images, scored on the stored label maps) and
evaluation of a trained model on any dataset split (`seglab evaluate NAME --data --split`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from seglab.data.pipeline import stored_pairs
from seglab.evaluate.ensemble import run_ensemble
from seglab.evaluate.evaluate import output_folder, run_evaluate
from seglab.evaluate.inference import EvalTarget, TracedPredictor, evaluate_predictors, plain_and_tta
from seglab.evaluate.sliding import SlidingWindow, window_starts
from tests.evaluate.test_evaluate import BATCH, CLASSES, _config, _pixel_model, _save_trained
from tests.factories import run_id as factory_run_id, write_label_split

WIRE = ["background", "wire"]


def _write_split(shard_dir: Path, split: str, labels: list[np.ndarray], classes=CLASSES, source="tiny",
                 seed=0) -> list[np.ndarray]:
    return write_label_split(shard_dir, split, labels, classes, source=source, seed=seed)


def _boxes(count: int, shape=(40, 56)) -> list[np.ndarray]:
    labels = []
    for index in range(count):
        label = np.zeros(shape, np.uint8)
        label[4 + index: 20 + index, 6:26] = 1
        label[18:36, 30 + index: 50] = 2
        label[0:3, :] = 255
        labels.append(label)
    return labels


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _pixel_probabilities(model: keras.Model, image: np.ndarray) -> np.ndarray:
    """The 1x1 convolution of `_pixel_model` applied to a whole image of any size, in NumPy."""
    kernel, bias = model.get_layer("logits").get_weights()
    return _softmax((np.asarray(image, np.float64) / 255.0 - 0.5) @ kernel[0, 0].astype(np.float64) + bias)


# ---- the window grid --------------------------------------------------------------------------------


def test_windows_on_a_480x360_image_are_the_hand_computed_grid():
    # 64 px windows, a third overlap: stride at most floor(64 * 0.67) = 42 px.
    assert window_starts(480, 64, 0.33) == [0, 42, 83, 125, 166, 208, 250, 291, 333, 374, 416]  # 11 = ceil(416/42)+1
    assert window_starts(360, 64, 0.33) == [0, 37, 74, 111, 148, 185, 222, 259, 296]          # 9, evenly 37 apart
    assert window_starts(100, 64, 0.5) == [0, 18, 36]
    assert window_starts(64, 64, 0.5) == [0]
    sliding = SlidingWindow((64, 64), 0.33, 1.0)
    corners = sliding.corners(360, 480)
    assert len(corners) == 9 * 11
    covered = np.zeros((360, 480), int)
    for top, left in corners:
        assert 0 <= top <= 360 - 64 and 0 <= left <= 480 - 64
        covered[top:top + 64, left:left + 64] += 1
    assert covered.min() >= 1 and covered[0, 0] == 1 and covered[-1, -1] == 1


@pytest.mark.parametrize("length", [64, 65, 101, 127, 360, 480, 1001])
@pytest.mark.parametrize("overlap", [0.0, 0.33, 0.5, 0.9])
def test_windows_cover_every_pixel_end_on_the_edge_and_overlap_as_asked(length, overlap):
    starts = window_starts(length, 64, overlap)
    stride = max(1, math.floor(64 * (1 - overlap)))
    assert starts[0] == 0 and starts[-1] == length - 64
    steps = np.diff(starts)
    assert (steps > 0).all() and (steps <= stride).all()  # neighbours share >= overlap of a side
    assert len(starts) == (math.ceil((length - 64) / stride) + 1 if length > 64 else 1)  # no more than needed


def test_an_image_smaller_than_a_window_is_padded_at_its_end():
    sliding = SlidingWindow((64, 64), 0.33, 1.0)
    assert sliding.corners(37, 101) == [(0, 0), (0, 37)]  # height padded to one window, width 2 windows
    with pytest.raises(ValueError, match="window <= length"):
        window_starts(37, 64, 0.33)
    with pytest.raises(ValueError, match="overlap"):
        SlidingWindow((64, 64), 1.0, 1.0)
    with pytest.raises(ValueError, match="scale"):
        SlidingWindow((64, 64), 0.5, "half")


# ---- the merge ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(37, 101), (32, 32), (90, 130), (10, 53)])
def test_sliding_window_on_a_1x1_convolution_equals_the_model_on_the_whole_image(shape):
    # A 1x1 convolution sees one pixel at a time, so tiling cannot change it: every window's
    # prediction of a pixel is the whole image's, and so is their mean (padding dropped).
    model = _pixel_model(size=32)
    image = np.random.default_rng(1).integers(0, 256, (*shape, 3)).astype(np.float32)
    expected = _pixel_probabilities(model, image)
    predictors = plain_and_tta(model, ["identity", "hflip", "rot90"])
    sliding = SlidingWindow((32, 32), 0.33, 1.0, batch_size=3)
    for variant, predictor in predictors.items():
        merged = sliding.predict(predictor, image)
        assert merged.shape == (*shape, len(CLASSES)), variant
        np.testing.assert_allclose(merged, expected, atol=2e-6, err_msg=variant)
        np.testing.assert_array_equal(merged.argmax(-1), expected.argmax(-1))


def test_each_pixel_gets_the_mean_of_the_windows_covering_it():
    # A predictor whose every window says one number (its mean red value): the merge must be, pixel by
    # pixel, the mean of those numbers over the windows covering the pixel, computed here by hand.
    image = np.zeros((20, 100, 3), np.float32)
    image[..., 0] = np.arange(100)[None, :] * 2.0  # varies along the width
    window = (32, 32)

    def predict(windows: np.ndarray) -> np.ndarray:
        value = windows[..., 0].mean(axis=(1, 2)) / 255.0
        return np.broadcast_to(np.stack([value, 1 - value], -1)[:, None, None, :], (*windows.shape[:3], 2)).copy()

    sliding = SlidingWindow(window, 0.5, 1.0, batch_size=2)
    merged = sliding.predict(predict, image)
    padded = np.zeros((32, 100, 3), np.float32)  # height 20 < 32: zero-padded at the bottom
    padded[:20] = image
    total, count = np.zeros((32, 100)), np.zeros((32, 100))
    for left in window_starts(100, 32, 0.5):
        total[:, left:left + 32] += padded[:, left:left + 32, 0].mean() / 255.0
        count[:, left:left + 32] += 1
    assert window_starts(100, 32, 0.5) == [0, 14, 27, 41, 54, 68]  # 6 = ceil(68 / 16) + 1, 13.6 apart
    np.testing.assert_allclose(merged[..., 0], (total / count)[:20], rtol=1e-6)
    np.testing.assert_allclose(merged.sum(-1), 1.0, rtol=1e-6)


def test_scale_resizes_the_image_for_the_windows_and_the_probabilities_back_to_the_stored_size():
    seen = []

    def predict(windows: np.ndarray) -> np.ndarray:
        seen.append(windows.shape)
        return np.full((*windows.shape[:3], 3), 1 / 3, np.float32)

    image = np.full((40, 56, 3), 100.0, np.float32)
    cover = SlidingWindow((16, 16), 0.33, "cover", batch_size=8)
    assert cover.scale_for(40, 56) == pytest.approx(0.4)  # the windows just cover the shorter side
    assert cover.scaled_size(40, 56) == (16, 22)
    assert cover.predict(predict, image).shape == (40, 56, 3)
    assert seen[-1] == (2, 16, 16, 3)  # 16x22: two windows across
    half = SlidingWindow((16, 16), 0.33, 0.5)
    assert half.scaled_size(40, 56) == (20, 28)
    assert SlidingWindow((16, 16), 0.33, 2.0).scaled_size(40, 56) == (80, 112)
    # A constant image gives the model's one answer everywhere, whatever the resizing.
    model = _pixel_model(size=16)
    probabilities = half.predict(plain_and_tta(model, ["identity"])["plain"], image)
    np.testing.assert_allclose(probabilities, np.broadcast_to(_pixel_probabilities(model, image[:1, :1]),
                                                              probabilities.shape), atol=1e-6)


# ---- the evaluation at the stored resolution ------------------------------------------------------


def _wire_workspace(root: Path) -> list[np.ndarray]:
    """40x56 label maps with a 1-px 'wire' line that a 16 px thumbnail cannot keep, and a void strip."""
    labels = []
    for index in range(3):
        label = np.zeros((40, 56), np.uint8)
        label[21, 4:52] = 1           # 48 px of wire, one pixel high
        label[0:3, :] = 255           # void: never counted
        label[30 + index, 10] = 255
        labels.append(label)
    _write_split(root / "shards", "val", labels, classes=WIRE)
    return labels


def _confusion(out: Path, variant: str = "plain") -> np.ndarray:
    entries = {e["run"]["variant"]: e for e in json.loads((out / "eval.json").read_text())["runs"]}
    return np.array(entries[variant]["confusion"])


def test_full_protocol_scores_a_thin_class_at_the_stored_resolution_that_a_letterbox_thumbnail_loses(tmp_path):
    labels = _wire_workspace(tmp_path)
    model = _pixel_model(classes=2, size=16)
    _save_trained(tmp_path, "pixel", model, classes=WIRE)
    truth = sum(np.bincount(label[label != 255], minlength=2) for label in labels)
    assert list(truth) == [3 * (37 * 56 - 48) - 3, 3 * 48]

    run_evaluate(_config(tmp_path, tta=["identity"], protocol="letterbox"), "pixel", grid_images=0)
    thumbnail = _confusion(tmp_path / "eval" / "pixel")
    assert thumbnail.sum(axis=1)[1] == 0  # the letterbox thumbnail (16x22 of 40x56) lost the wire

    for scale in (1.0, "cover"):
        run_evaluate(_config(tmp_path, tta=["identity"], protocol="full", scale=scale), "pixel", grid_images=1)
        confusion = _confusion(tmp_path / "eval" / "pixel")
        # Every scored pixel of the stored label maps, and only those, is counted.
        np.testing.assert_array_equal(confusion.sum(axis=1), truth)
        if scale == 1.0:  # at the stored resolution the 1x1 model's argmax is known pixel by pixel
            expected = np.zeros((2, 2), np.int64)
            for image, label in stored_pairs(tmp_path / "shards", "val"):
                label = np.asarray(label)
                predicted = _pixel_probabilities(model, np.asarray(image, np.float32)).argmax(-1)
                scored = label != 255
                expected += np.bincount(label[scored] * 2 + predicted[scored], minlength=4).reshape(2, 2)
            np.testing.assert_array_equal(confusion, expected)
    run = json.loads((tmp_path / "eval" / "pixel" / "eval.json").read_text())["runs"][0]["run"]
    assert (run["eval_protocol"], run["eval_window"], run["eval_scale"], run["eval_overlap"]) == (
        "full", [16, 16], "cover", 0.33)
    # Not the original (letterbox) evaluation: the run id names the protocol.
    assert run["run_id"] != factory_run_id("pixel", "plain", run["params_hash"])


def test_full_protocol_latency_is_each_image_s_own_call():
    # Every image is one call (all its windows); its timing is a latency sample, so no extra calls run.
    model = _pixel_model(classes=3, size=16)
    predictors = plain_and_tta(model, ["identity", "hflip"])
    calls = {variant: 0 for variant in predictors}

    def counted(variant, base=None):
        inner = predictors[variant]

        def graph(images):
            calls[variant] += 1
            return inner.graph(images)
        return TracedPredictor(graph, inner.name, inner.transforms, base)

    pairs = [(np.full((h, w, 3), 100, np.uint8), label) for (h, w), label in
             zip([(40, 56), (16, 16), (33, 70)], [np.zeros((40, 56), np.uint8), np.ones((16, 16), np.uint8),
                                                  np.full((33, 70), 2, np.uint8)])]
    sliding = SlidingWindow((16, 16), overlap=0.33, scale=1.0, batch_size=64)  # one call per image
    plain = counted("plain")
    result = evaluate_predictors({"plain": plain, "tta": counted("tta", base=plain)}, pairs, CLASSES,
                                 latency_runs=20, grid_images=0, sliding=sliding)
    # The warm-up, then one per image; none for latency; the TTA takes the plain call's probabilities.
    assert calls == {"plain": 1 + 3, "tta": 1 + 3}
    for variant in predictors:
        latency = result.results[variant].latency_ms
        assert latency.shape == (3,) and np.all(latency > 0)
        assert result.results[variant].latency_percentile(50) <= result.results[variant].latency_percentile(90)
        assert np.isclose(latency.sum() / 1000.0, result.results[variant].predict_seconds)


def test_full_protocol_ensemble_with_weights_one_zero_equals_its_first_member(tmp_path):
    _write_split(tmp_path / "shards", "val", _boxes(3))
    _save_trained(tmp_path, "a", _pixel_model(seed=0))
    _save_trained(tmp_path, "b", _pixel_model(seed=1))
    settings = dict(models=("a", "b"), members=("a", "b"), tta=["identity"], protocol="full")
    run_evaluate(_config(tmp_path, **settings), "a", grid_images=0)
    run_ensemble(_config(tmp_path, weights=[1.0, 0.0], **settings), grid_images=0)
    np.testing.assert_array_equal(_confusion(tmp_path / "eval" / "ensemble", "ensemble"),
                                  _confusion(tmp_path / "eval" / "a"))
    run = json.loads((tmp_path / "eval" / "ensemble" / "eval.json").read_text())["runs"][0]["run"]
    assert run["eval_protocol"] == "full" and run["dataset"] == run["train_dataset"] == "tiny"


# ---- any dataset split --------------------------------------------------------------------------


CAMVID_LIKE = ["sky", "building", "road", "car"]  # no background class: label 0 is sky


def test_a_target_with_another_class_list_is_refused_naming_both_lists(tmp_path):
    _write_split(tmp_path / "shards", "val", _boxes(2))
    _write_split(tmp_path / "camvid_shards", "test", _boxes(2), classes=CAMVID_LIKE, source="camvid")
    _save_trained(tmp_path, "pixel", _pixel_model())
    with pytest.raises(ValueError) as refused:
        run_evaluate(_config(tmp_path), "pixel", data=tmp_path / "camvid_shards", split="test")
    message = str(refused.value)
    assert "class mismatch" in message and str(CLASSES) in message and str(CAMVID_LIKE) in message
    assert str(tmp_path / "models" / "pixel" / "train.json") in message
    assert "'test' shards in " + str(tmp_path / "camvid_shards") in message and "dataset camvid" in message
    assert not (tmp_path / "eval").exists()


def test_what_is_not_a_shard_split_is_refused_saying_what_to_do(tmp_path):
    _write_split(tmp_path / "shards", "val", _boxes(2))
    _save_trained(tmp_path, "pixel", _pixel_model())
    cfg = _config(tmp_path)
    raw = tmp_path / "camvid"  # CamVid as released: val/ holds images, valannot/ label maps
    for folder in ("val", "valannot"):
        (raw / folder).mkdir(parents=True)
        (raw / folder / "0016E5_07959.png").write_bytes(b"")
    for split in ("val", "test"):
        with pytest.raises(ValueError, match=r"camvid is a dataset root, not shards: .*Shard it first.*seglab "
                                             r"--params THAT_FILE shard.*--data"):
            run_evaluate(cfg, "pixel", data=raw, split=split)
    with pytest.raises(FileNotFoundError, match=r"no split 'test' in these shards; they hold \['val'\]"):
        run_evaluate(cfg, "pixel", split="test")
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        run_evaluate(cfg, "pixel", data=tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"split '\.\./val': a split name"):
        run_evaluate(cfg, "pixel", split="../val")
    assert not (tmp_path / "eval").exists()


def test_output_folder_is_the_stage_s_only_for_the_params_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _config(Path("."))  # relative paths, as params.yaml writes them

    def target(data, split, dataset="tiny"):
        return EvalTarget(Path(data), split, dataset, CLASSES, "custom", 1)

    assert output_folder(cfg, "m", target(tmp_path / "shards", "val")) == Path("eval/m")  # same folder, spelt apart
    assert output_folder(cfg, "m", target("shards", "test")) == Path("eval/m@tiny.test")
    assert output_folder(cfg, "m", target("other", "val", "coco/mini:1")) == Path("eval/m@coco_mini_1.val")


def _write_params(root: Path, **evaluate) -> Path:
    settings = {
        "seed": 0,
        "shard": {"out": str(root / "shards")},
        "profiles": {"cpu": {"image_size": 32, "batch_size": BATCH, "epochs": 2, "width": 0.125,
                             "learning_rate": 1e-3}},
        "models": {"pixel": {"arch": "unet", "train_data": str(root / "shards")}},
        "ensemble": {"members": [], "weights": None},
        "train": {"out": str(root / "models"), "metrics": str(root / "metrics")},
        "evaluate": {"out": str(root / "eval"), "batch_size": BATCH, "latency_runs": 2,
                     "tta": ["identity", "hflip"], **evaluate},
        "warehouse": {"path": str(root / "warehouse.duckdb"), "mirror": False},
        "validate_synthetic": {"report": str(root / "reports")},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_seglab_evaluate_split_lands_in_the_warehouse_and_leaves_the_default_outputs_alone(tmp_path, capsys):
    from seglab.cli import main
    from seglab.warehouse import connect_read_only
    from seglab.warehouse.queries import leaderboard

    _write_split(tmp_path / "shards", "val", _boxes(3))
    test_labels = _write_split(tmp_path / "shards", "test", _boxes(2, shape=(33, 47)), seed=1)
    _save_trained(tmp_path, "pixel", _pixel_model())
    params = _write_params(tmp_path, protocol="full")

    assert main(["--params", str(params), "evaluate", "pixel"]) == 0
    default = tmp_path / "eval" / "pixel"
    before = {p.name: p.read_bytes() for p in default.iterdir()}
    assert main(["--params", str(params), "evaluate", "pixel", "--split", "test"]) == 0
    printed = json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")
    split_out = tmp_path / "eval" / "pixel@tiny.test"
    assert printed["out"] == str(split_out) and (printed["dataset"], printed["split"]) == ("tiny", "test")
    assert {p.name: p.read_bytes() for p in default.iterdir()} == before  # the stage's outputs untouched
    runs = [e["run"] for e in json.loads((split_out / "eval.json").read_text())["runs"]]
    assert {(r["dataset"], r["split"], r["eval_protocol"], r["eval_images"]) for r in runs} == {("tiny", "test", "full", 2)}
    scored = sum(int((label != 255).sum()) for label in test_labels)  # at the stored 33x47
    assert json.loads((split_out / "eval.json").read_text())["runs"][0]["metrics"]["pixels"] == scored

    assert main(["--params", str(params), "ingest"]) == 0
    con = connect_read_only(tmp_path / "warehouse.duckdb")
    try:
        rows = con.execute("SELECT name, variant, dataset, train_dataset, split, eval_protocol, eval_images "
                           "FROM runs ORDER BY split, variant").fetchall()
        assert rows == [("pixel", "plain", "tiny", "tiny", "test", "full", 2), ("pixel", "tta", "tiny", "tiny", "test", "full", 2),
                        ("pixel", "plain", "tiny", "tiny", "val", "full", 3), ("pixel", "tta", "tiny", "tiny", "val", "full", 3)]
        board = leaderboard(con, split="test", protocol="full")
        assert sorted(board["variant"]) == ["plain", "tta"] and board["latest"].all()
        assert len(leaderboard(con, split="val")) == 2 and len(leaderboard(con, protocol="letterbox")) == 0
        assert con.execute("SELECT count(DISTINCT run_id) FROM runs").fetchone() == (4,)
    finally:
        con.close()
