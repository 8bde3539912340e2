"""The run records the stages hand each other: train.json (`TrainRecord`) and eval.json (`EvalRecord`).

Each is defined once here: the writer validates it when writing, and every reader (evaluation,
the warehouse's ingest, the tests' factory) validates through the same definition. A bad value
raises `RecordError` naming the file and the field (``runs[1].per_class[3].iou``).

The JSON on disk is what the writers wrote before these types existed: a record keeps its keys in
the order it was given them, numbers keep their type (an integer width stays ``1``), and a field
an older file lacks is not added when it is read and written again.
"""

from __future__ import annotations

import json
import math
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PrivateAttr,
    ValidationError,
    model_serializer,
    model_validator,
)

from seglab.atomic import write_text_atomic
from seglab.digest import json_safe

__all__ = ["EvalEntry", "EvalRecord", "EvalRun", "PER_CLASS_COUNTS", "PER_CLASS_SCORES", "RecordError",
           "TrainRecord", "ClassScores", "git_revision", "utc_now"]

PER_CLASS_SCORES = ("iou", "dice", "precision", "recall", "accuracy")
PER_CLASS_COUNTS = ("support", "predicted")


def utc_now() -> str:
    """A record's timestamp: UTC, to the second, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_revision() -> str | None:
    """HEAD's commit for a record's provenance, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class RecordError(ValueError):
    """A record file (or a record about to be written) that does not follow its definition."""


class _At(ValueError):
    """A check failing below the model it runs on: `where` is relative to that model."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(problem)
        self.where, self.problem = where, problem


def _describe(value: Any) -> str:
    text = json.dumps(value, default=repr)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


# ---- value checks: they raise with the wording readers see, and never change a valid value's type

def _text(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {_describe(value)}")
    return value


def _integer(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():  # a JSON writer may emit 8.0 for 8
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_describe(value)}")
    return value


def _count(value: Any) -> Any:
    value = _integer(value)
    if value is None:
        raise ValueError("expected an integer, got null")
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {value}")
    return value


def _number(value: Any) -> Any:
    """A finite int or float; null and NaN (the contract's "undefined") are None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number or null, got {_describe(value)}")
    if isinstance(value, float) and math.isnan(value):
        return None
    if math.isinf(value):
        raise ValueError(f"expected a finite number, got {value}")
    return value


def _history_number(value: Any) -> Any:
    # history rows come from history.csv, whose cells may still be text.
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            return _number(float(value))
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    return _number(value)


def _fraction(value: Any) -> Any:
    value = _number(value)
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"expected a value in [0, 1], got {value}")
    return value


def _timestamp(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO 8601 timestamp string, got {_describe(value)}")
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"expected an ISO 8601 timestamp, got {value!r}") from None
    return value


def _bool(value: Any) -> Any:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"expected true, false or null, got {_describe(value)}")
    return value


def _list(value: Any) -> Any:
    if value is not None and not isinstance(value, list):
        raise ValueError(f"expected a list, got {_describe(value)}")
    return value


def _no_null_items(items: list | None) -> list | None:
    if items is not None and any(item is None for item in items):
        raise ValueError(f"holds a null or NaN entry: {items!r}")
    return items


Text = Annotated[str, BeforeValidator(_text)]
OptText = Annotated[str | None, BeforeValidator(_text)]
OptInt = Annotated[int | None, BeforeValidator(_integer)]
Count = Annotated[int, BeforeValidator(_count)]
# `int | float`, not `float`: an integer stays an integer, so the JSON written is the JSON given.
OptNumber = Annotated[int | float | None, BeforeValidator(_number)]
Fraction = Annotated[int | float | None, BeforeValidator(_fraction)]
HistoryNumber = Annotated[int | float | None, BeforeValidator(_history_number)]
Timestamp = Annotated[str | None, BeforeValidator(_timestamp)]
OptBool = Annotated[bool | None, BeforeValidator(_bool)]
TextList = Annotated[list[Text] | None, BeforeValidator(_list)]
NumberList = Annotated[list[OptNumber] | None, BeforeValidator(_list)]


class _Record(BaseModel):
    """Validated on construction; serialised with its keys in the order they were given."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    _key_order: list[str] | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_key_order(cls, data: Any, handler: Any) -> Any:
        record = handler(data)
        if isinstance(data, dict):
            record._key_order = list(data)
        return record

    @model_serializer(mode="wrap")
    def _in_given_order(self, handler: Any) -> dict[str, Any]:
        dumped = handler(self)
        order = self._key_order or []
        return {k: dumped[k] for k in order if k in dumped} | {k: v for k, v in dumped.items() if k not in order}

    def to_json(self) -> dict[str, Any]:
        """The record as JSON values, only the fields it was given (none added on a round trip)."""
        return self.model_dump(mode="json", exclude_unset=True)

    # -- file I/O ----------------------------------------------------------------------------

    # A record written today must carry every field; reading accepts older files without these.
    _ADDED_LATER: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_data(cls, data: Any, *, source: str | Path = "record") -> _Record:
        """Validate JSON values `data` (NaN reads as null, as json.loads gives it)."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RecordError(_first_problem(source, e)) from None

    @classmethod
    def of(cls, data: Any, *, source: str | Path = "record") -> _Record:
        """A writer's record: `data` made plain JSON first (NumPy values unwrapped, NaN -> null)."""
        return cls.from_data(json_safe(data), source=source)

    @classmethod
    def load(cls, path: str | Path) -> _Record:
        """Read and validate a record file; RecordError names the file and the field."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise RecordError(f"{path}: not found") from None
        except OSError as e:
            raise RecordError(f"{path}: cannot be read: {e}") from None
        try:
            document = json.loads(raw)
        except UnicodeDecodeError as e:
            raise RecordError(f"{path}: not UTF-8 text: {e}") from None
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if not isinstance(document, dict):
            raise RecordError(f"{path}: top level: expected an object, got {_describe(document)}")
        return cls.from_data(document, source=path)

    def write(self, path: str | Path) -> Path:
        """Write the record as indented JSON in one atomic rename, after checking it is complete."""
        path = Path(path)
        missing = [name for name in type(self).model_fields if name not in self.model_fields_set]
        if missing:
            raise RecordError(f"{path}: {type(self).__name__} lacks field(s) {missing}")
        write_text_atomic(path, json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")
        return path


_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _location(loc: tuple[Any, ...]) -> str:
    where = ""
    for part in loc:
        if isinstance(part, int):
            where += f"[{part}]"
        elif "[" in str(part) or "(" in str(part) or part in _UNION_TAGS:  # pydantic's tags: not a place
            continue
        else:
            where += f".{part}" if where else str(part)
    return where or "top level"


def _first_problem(source: str | Path, error: ValidationError) -> str:
    """The first error as ``<file>: <where>: <problem>``."""
    first = error.errors(include_url=False)[0]
    loc = tuple(first["loc"])
    cause = (first.get("ctx") or {}).get("error")
    if first["type"] == "missing":
        return f"{source}: {_location(loc[:-1])}: field {loc[-1]!r} is missing"
    if isinstance(cause, _At):
        where = _location(loc)
        where = cause.where if where == "top level" else f"{where}{'' if cause.where.startswith('[') else '.'}{cause.where}"
        return f"{source}: {where}: {cause.problem}"
    if isinstance(cause, ValueError):
        problem = str(cause)
    elif first["type"] == "model_type" or first["type"] == "dict_type":
        problem = f"expected an object, got {_describe(first['input'])}"
    elif first["type"] == "list_type":
        problem = f"expected a list, got {_describe(first['input'])}"
    elif first["type"] == "extra_forbidden":
        problem = "is not a field of this record"
    else:
        problem = first["msg"]
    return f"{source}: {_location(loc)}: {problem}"


# ---- train.json -----------------------------------------------------------------------------

class TrainRecord(_Record):
    """``<train.out>/<name>/train.json``: what was trained, on what data, how, and how it went."""

    model: Text
    arch: Text
    backbone: OptText
    weights: OptText  # requested: imagenet | imagenet-offline | a path | null
    weights_loaded: OptText  # what was actually loaded
    width: OptNumber
    image_size: Count
    batch_size: Count
    epochs_planned: Count
    epochs_run: Count
    best_epoch: OptInt
    best_val_miou: OptNumber
    seconds_per_epoch: OptNumber
    train_seconds: OptNumber
    train_images_per_second: OptNumber
    param_count: Count
    trainable_param_count: Count
    classes: list[Text]
    class_set: Text | list[Text]
    dataset: Text
    train_images: Count
    val_images: Count
    # GAN augmentation: the GAN (null: real data only by design), whether its gate accepted any
    # synthetic sample (null without an augmenter) and how many were trained on.
    augmenter: OptText = None
    train_data: OptText = None
    synthetic_accepted: OptBool = None
    synthetic_images_used: OptInt = None
    synthetic_decision: str | None = None
    seed: OptInt
    params_hash: Text
    mixed_precision: OptText
    strategy: OptText
    replicas: OptInt
    git_rev: OptText
    created_at: Timestamp
    resumed_from_epoch: OptInt
    stopped_early: OptBool
    output_stride: OptInt
    optimizer: OptText
    loss: OptText
    freeze_encoder_epochs: OptInt
    encoder_lr_multiplier: OptNumber
    encoder_batchnorm: OptText = None
    # The loss's weight per class (train.class_weights as given, or as median_frequency computed
    # them); null: unweighted. Files from before this field lack it.
    class_weights: NumberList = None

    @model_validator(mode="after")
    def _classes_and_weights(self) -> TrainRecord:
        _check_classes(self.classes)
        weights = self.class_weights
        if weights is not None:
            try:
                _no_null_items(weights)
            except ValueError as e:
                raise _At("class_weights", str(e)) from None
            if len(weights) != len(self.classes) or any(w < 0 for w in weights):
                raise _At("class_weights", f"expected one weight >= 0 per class ({len(self.classes)}), got {weights}")
        return self


def _check_classes(classes: list[str]) -> None:
    if not classes:
        raise _At("classes", "expected a non-empty list of class names")
    if len(set(classes)) != len(classes):
        raise _At("classes", "class names must be unique")


# ---- eval.json ------------------------------------------------------------------------------

class EvalRun(_Record):
    """One evaluated variant of a model (or the ensemble): its train.json fields and the evaluation's.

    Fields beyond these (the rest of train.json, an ensemble's member hashes) are kept as given.
    """

    model_config = ConfigDict(extra="allow")

    run_id: Text  # sha256("name|variant|params_hash" + "|dataset|split|protocol" for other than the original)[:16]
    name: Text
    variant: Text  # plain | tta | ensemble
    split: Text
    dataset: Text  # the evaluated shards' dataset
    class_set: Text | list[Text]  # a named set, or the explicit list of categories
    classes: list[Text]
    model: OptText = None
    arch: OptText = None
    backbone: OptText = None
    # A model's requested pretrained weights; the ensemble's run gives its members' weights here.
    weights: OptText | NumberList = None
    weights_loaded: OptText = None
    members: TextList = None
    member_weights: NumberList = None
    params_hash: OptText = None
    git_rev: OptText = None
    image_size: OptInt = None
    batch_size: OptInt = None
    width: OptNumber = None
    epochs_planned: OptInt = None
    epochs_run: OptInt = None
    best_epoch: OptInt = None
    best_val_miou: OptNumber = None
    seconds_per_epoch: OptNumber = None
    train_seconds: OptNumber = None
    train_images_per_second: OptNumber = None
    param_count: OptInt = None
    trainable_param_count: OptInt = None
    train_images: OptInt = None
    val_images: OptInt = None
    seed: OptInt = None
    mixed_precision: OptText = None
    strategy: OptText = None
    replicas: OptInt = None
    tta: TextList = None  # TTA transforms merged (variant "tta")
    eval_images: OptInt = None
    images_per_second: OptNumber = None
    latency_ms_p50: OptNumber = None
    latency_ms_p90: OptNumber = None
    created_at: Timestamp = None
    evaluated_at: Timestamp = None
    augmenter: OptText = None
    synthetic_images_used: OptInt = None
    # What the model trained on, and how the images were scored: full | letterbox. Files from before
    # these existed lack both: their models were evaluated on their own data, letterboxed.
    train_dataset: OptText = None
    eval_protocol: OptText = None

    @model_validator(mode="after")
    def _consistent(self) -> EvalRun:
        _check_classes(self.classes)
        for name in ("members", "member_weights", "tta"):
            try:
                _no_null_items(getattr(self, name))
            except ValueError as e:
                raise _At(name, str(e)) from None
        if isinstance(self.weights, list):
            _no_null_items(self.weights)
            if self.member_weights is not None:
                raise _At("weights", "a list, but member_weights is given as well")
        member_weights = self.member_weights if self.member_weights is not None else (
            self.weights if isinstance(self.weights, list) else None)
        if member_weights is not None and (self.members is None or len(self.members) != len(member_weights)):
            raise ValueError(f"member weights {member_weights} do not match members {self.members}")
        return self


class ClassScores(_Record):
    """One class's scores (null: undefined) and pixel counts over the evaluated split."""

    class_index: Count
    class_name: Text
    iou: Fraction
    dice: Fraction
    precision: Fraction
    recall: Fraction
    accuracy: Fraction  # one-vs-rest pixel accuracy (TP + TN) / N
    support: Count  # truth pixels of the class
    predicted: Count  # pixels predicted as the class


class HistoryEpoch(_Record):
    """One epoch of the training curves: the epoch and any metric columns of history.csv."""

    model_config = ConfigDict(extra="allow")

    epoch: Count

    @model_validator(mode="before")
    @classmethod
    def _csv_epoch(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("epoch"), str) and data["epoch"].strip().isdigit():
            data = {**data, "epoch": int(data["epoch"])}
        return data

    @model_validator(mode="after")
    def _numbers(self) -> HistoryEpoch:
        for metric, value in (self.model_extra or {}).items():
            try:
                self.model_extra[metric] = _history_number(value)
            except ValueError as e:
                raise _At(metric, str(e)) from None
        return self

    def metrics(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EvalEntry(_Record):
    """One eval.json entry: the run, its mean metrics, per-class scores, confusion matrix and history."""

    run: EvalRun
    metrics: dict[str, OptNumber]
    per_class: list[ClassScores]
    confusion: list[list[Count]]  # C x C pixel counts, rows the truth
    history: list[HistoryEpoch]  # empty for variants other than the plain one

    @model_validator(mode="after")
    def _consistent(self) -> EvalEntry:
        if "miou" not in self.metrics:
            raise _At("metrics", "field 'miou' is missing (expected a number or null)")
        classes = self.run.classes
        by_index: dict[int, ClassScores] = {}
        for i, row in enumerate(self.per_class):
            if row.class_index >= len(classes):
                raise _At(f"per_class[{i}].class_index",
                          f"{row.class_index} is outside the run's {len(classes)} classes")
            if row.class_index in by_index:
                raise _At(f"per_class[{i}].class_index", f"class {row.class_index} is listed twice")
            if row.class_name != classes[row.class_index]:
                raise _At(f"per_class[{i}].class_name", f"{row.class_name!r} but the run's class "
                                                        f"{row.class_index} is {classes[row.class_index]!r}")
            by_index[row.class_index] = row
        missing = sorted(set(range(len(classes))) - set(by_index))
        if missing:
            raise _At("per_class", f"no entry for class index(es) {missing} "
                                   f"(expected one per class, {len(classes)} in all)")
        # per_class and the matrix must describe the same evaluation.
        size = len(classes)
        if len(self.confusion) != size:
            raise _At("confusion", f"expected {size} rows (one per class), got {len(self.confusion)}")
        for t, row in enumerate(self.confusion):
            if len(row) != size:
                raise _At(f"confusion[{t}]", f"expected {size} counts, got {len(row)}")
            if sum(row) != by_index[t].support:
                raise _At(f"confusion[{t}]", f"row sums to {sum(row)} pixels but per_class support of "
                                             f"class {t} is {by_index[t].support}")
        for p in range(size):
            total = sum(row[p] for row in self.confusion)
            if total != by_index[p].predicted:
                raise _At("confusion", f"column {p} sums to {total} pixels but per_class predicted "
                                       f"of class {p} is {by_index[p].predicted}")
        seen: set[int] = set()
        for i, epoch in enumerate(self.history):
            if epoch.epoch in seen:
                raise _At(f"history[{i}].epoch", f"epoch {epoch.epoch} is listed twice")
            seen.add(epoch.epoch)
        return self

    def class_scores(self) -> list[ClassScores]:
        """per_class ordered by class index."""
        return sorted(self.per_class, key=lambda row: row.class_index)


class EvalRecord(_Record):
    """``<evaluate.out>/<name>/eval.json``: one entry per evaluated variant, run ids unique."""

    runs: list[EvalEntry]

    @model_validator(mode="after")
    def _runs_unique(self) -> EvalRecord:
        if not self.runs:
            raise _At("runs", "is empty (expected one entry per evaluated variant)")
        seen: set[str] = set()
        for i, entry in enumerate(self.runs):
            if entry.run.run_id in seen:
                raise _At(f"runs[{i}].run.run_id", f"{entry.run.run_id!r} appears twice in the file")
            seen.add(entry.run.run_id)
        return self
