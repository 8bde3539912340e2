"""seglab.records: one typed definition per run record, the JSON on disk unchanged by a round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from seglab.records import EvalRecord, RecordError, TrainRecord
from tests.factories import eval_entry, eval_run, train_record


def test_a_train_record_round_trips_byte_for_byte(tmp_path):
    info = train_record("unet", width=1, best_val_miou=np.float32(0.5))  # an int width stays an int
    path = TrainRecord.of(info).write(tmp_path / "train.json")
    text = path.read_text()
    assert json.loads(text) == info and list(json.loads(text)) == list(info)
    assert '"width": 1,' in text
    TrainRecord.load(path).write(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == text


def test_a_train_record_is_complete_when_written_but_older_files_still_load(tmp_path):
    older = {k: v for k, v in train_record("unet").items()
             if k not in ("encoder_batchnorm", "augmenter", "class_weights")}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(older))
    record = TrainRecord.load(path)
    assert record.to_json() == older  # nothing added on reading
    with pytest.raises(RecordError, match=r"lacks field\(s\) \['augmenter', 'encoder_batchnorm', 'class_weights'\]"):
        record.write(tmp_path / "new.json")


@pytest.mark.parametrize(("change", "message"), [
    ({"image_size": "big"}, r"train.json: image_size: expected an integer"),
    ({"classes": ["a", "a"]}, r"train.json: classes: class names must be unique"),
    ({"created_at": "yesterday"}, r"train.json: created_at: expected an ISO 8601"),
    ({"typo": 1}, r"train.json: typo: is not a field"),
    ({"class_weights": [1.0]}, r"train.json: class_weights: expected one weight >= 0 per class \(2\)"),
    ({"class_weights": [1.0, None]}, r"train.json: class_weights: holds a null"),
])
def test_a_bad_train_json_names_file_and_field(tmp_path, change, message):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(train_record("unet") | change))
    with pytest.raises(RecordError, match=message):
        TrainRecord.load(path)


def test_an_eval_record_keeps_the_writers_key_order_and_refuses_an_inconsistent_entry(tmp_path):
    run = eval_run("unet", classes=["background", "cat"])
    entry = eval_entry(run, np.array([[5, 1], [2, 7]]))
    path = EvalRecord.of({"runs": [entry]}).write(tmp_path / "eval.json")
    document = json.loads(path.read_text())
    assert document == {"runs": [entry]} and list(document["runs"][0]["run"]) == list(run)
    entry["confusion"][0][0] += 1  # no longer the per-class support
    with pytest.raises(RecordError, match=r"runs\[0\]\.confusion\[0\]: row sums to 7 pixels"):
        EvalRecord.of({"runs": [entry]})
