"""Typed view of params.yaml: the one source of truth for settings, validated once."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError


# The project's params.yaml: the one place defaults live. A settings mapping that leaves a key out
# (a test's partial config, an older params file) gets the value from here, never from a copy in code.
PROJECT_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@functools.cache
def project_params() -> dict:
    """The project's params.yaml as a mapping ({} where seglab runs outside its checkout)."""
    try:
        return yaml.safe_load(PROJECT_PARAMS.read_text()) or {}
    except FileNotFoundError:
        return {}


def _project_value(key: str) -> object:
    value: object = project_params()
    for part in key.split("."):
        value = value.get(part, {}) if isinstance(value, dict) else {}
    return value


class _Section(BaseModel):
    # A typo in params.yaml must fail loudly, not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Where this section sits in params.yaml; keys a mapping leaves out come from there.
    params_key: ClassVar[str | None] = None
    # Properties that stand for a field (a read of the property is a read of that key: seglab.stage_trace).
    derived_fields: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_project_params(cls, data: Any) -> Any:
        if cls.params_key is None or not isinstance(data, dict):
            return data
        defaults = _project_value(cls.params_key)
        return {**defaults, **data} if isinstance(defaults, dict) else data


class SampleConfig(_Section):
    params_key: ClassVar[str] = "sample"
    out: Path
    train_images: int = Field(ge=1)
    val_images: int = Field(ge=1)
    min_side: int = Field(ge=32)
    max_side: int = Field(ge=32)
    crowd_fraction: float = Field(ge=0.0, le=1.0)
    amodal_fraction: float = Field(ge=0.0, le=1.0)
    greyscale_fraction: float = Field(ge=0.0, le=1.0)

    @field_validator("max_side")
    @classmethod
    def _sides_ordered(cls, v: int, info) -> int:
        if v < info.data.get("min_side", 0):
            raise ValueError("sample.max_side must be >= sample.min_side")
        return v


# Split names become folder names under shard.out: no separators or '..' that could leave it.
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


class LabelMapLayout(BaseModel):
    """Where one split of an images + label maps dataset lies under `data.root` (`data.format: labelmaps`).

    Without `list_file`, each file in the `images` folder pairs with the file in `labels` that has the
    same name once the suffix is removed (CamVid: train/x.png + trainannot/x.png): `image_suffix` /
    `label_suffix` where given (which also select the files), else the extension. With `list_file`
    (Pascal VOC's ImageSets/Segmentation/<split>.txt), each line names one pair:
    `<images>/<line><image_suffix>` and `<labels>/<line><label_suffix>`. Paths are relative to data.root.
    """

    # Not a _Section: the mapping is read as a whole (`data.splits`, by the shard and validate stages).
    model_config = ConfigDict(extra="forbid", frozen=True)
    images: str = Field(min_length=1)
    labels: str = Field(min_length=1)
    list_file: str | None = None
    image_suffix: str | None = None
    label_suffix: str | None = None

    @model_validator(mode="after")
    def _pairs_can_be_told_apart(self) -> LabelMapLayout:
        if self.list_file is not None and (not self.image_suffix or not self.label_suffix):
            raise ValueError("a split with list_file needs image_suffix and label_suffix (e.g. .jpg and .png): "
                             "the list names each pair without its suffixes")
        if self.images == self.labels and (not self.image_suffix or not self.label_suffix
                                           or self.image_suffix == self.label_suffix):
            raise ValueError(f"images and labels are the same folder {self.images!r}: give two different "
                             "image_suffix and label_suffix to tell the files apart")
        return self


class LabelMapsConfig(_Section):
    """Classes of an images + label maps dataset (`data.format: labelmaps`) and how stored label
    values become them: `value_map` (stored value -> class index; null: stored value i is class i
    for every class) and `ignore` (stored values that become 255, e.g. CamVid's void 11, VOC's border
    255). Any other stored value is a bad record."""

    class_set: str = Field(min_length=1)  # the class list's name, stored with the shards (seglab.class_set)
    classes: list[str]                    # class names by label value 0..N-1
    value_map: dict[int, int] | None = None
    ignore: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> LabelMapsConfig:
        if not self.classes:
            raise ValueError("data.labelmaps.classes must name at least one class")
        if len(self.classes) > 255:
            raise ValueError(f"data.labelmaps.classes has {len(self.classes)} classes; at most 255 fit in a uint8 "
                             "label map (values 0..254; 255 is ignore)")
        dupes = sorted({c for c in self.classes if self.classes.count(c) > 1})
        if dupes:
            raise ValueError(f"data.labelmaps.classes: classes listed twice: {dupes}")
        stored = list(self.ignore) + list(self.value_map or {})
        if any(v < 0 for v in stored):
            raise ValueError("data.labelmaps: stored label values (value_map keys, ignore) must be >= 0")
        both = sorted(set(self.ignore) & set(self.value_map or {}))
        if both:
            raise ValueError(f"data.labelmaps: stored values {both} are both in value_map and in ignore")
        if self.value_map is None:
            both = sorted(set(self.ignore) & set(range(len(self.classes))))
            if both:
                raise ValueError(f"data.labelmaps: stored values {both} are classes (value_map null: value i is "
                                 f"class i for i < {len(self.classes)}) and in ignore; give a value_map")
        else:
            bad = {k: v for k, v in self.value_map.items() if not 0 <= v < len(self.classes)}
            if bad:
                raise ValueError(f"data.labelmaps.value_map: {bad} map to no class (class indices are "
                                 f"0..{len(self.classes) - 1}; stored values to ignore go in data.labelmaps.ignore)")
        return self


class DataConfig(_Section):
    params_key: ClassVar[str] = "data"
    format: Literal["coco", "labelmaps"]
    root: Path
    # Split name -> a COCO image folder (format coco) or a LabelMapLayout (format labelmaps).
    splits: dict[str, str | LabelMapLayout]
    class_set: Literal["all80", "voc20"] | list[str]
    crowd: Literal["ignore", "label", "background"]
    overlap: Literal["ignore", "last"]
    min_train_area: int = Field(ge=0)
    on_bad_record: Literal["error", "skip"]
    labelmaps: LabelMapsConfig | None

    @field_validator("splits")
    @classmethod
    def _splits_nonempty(cls, v: dict[str, str | LabelMapLayout]) -> dict[str, str | LabelMapLayout]:
        if not v:
            raise ValueError("data.splits must name at least one split")
        for name in v:
            if not SPLIT_NAME.fullmatch(name):
                raise ValueError(f"data.splits: split name {name!r} may use only letters, digits, '_' and '-' "
                                 "(it becomes a folder under shard.out)")
        return v

    @model_validator(mode="after")
    def _splits_fit_the_format(self) -> DataConfig:
        if self.format == "coco":
            odd = sorted(name for name, where in self.splits.items() if not isinstance(where, str))
            if odd:
                raise ValueError(f"data.splits: {odd} give images/labels folders, but data.format is coco (a COCO "
                                 "image folder per split); set data.format: labelmaps for images + label maps")
        else:
            odd = sorted(name for name, where in self.splits.items() if not isinstance(where, LabelMapLayout))
            if odd:
                raise ValueError(f"data.splits: {odd} name a COCO image folder, but data.format is labelmaps: give "
                                 "{images: FOLDER, labels: FOLDER} (and list_file, image_suffix, label_suffix)")
            if self.labelmaps is None:
                raise ValueError("data.format is labelmaps but data.labelmaps is null: give its class_set, classes "
                                 "and the stored values to ignore (docs/labelmaps.md has CamVid and VOC)")
        return self


class ShardConfig(_Section):
    params_key: ClassVar[str] = "shard"
    out: Path
    max_side: int = Field(ge=16)
    max_shard_mb: float = Field(gt=0)
    jpeg_quality: int = Field(ge=50, le=100)
    workers: int = Field(ge=0)


class ValidateConfig(_Section):
    params_key: ClassVar[str] = "validate"
    report: Path
    min_side: int = Field(ge=1)
    max_side: int = Field(ge=1)
    max_unlabelled_share: float = Field(ge=0.0, le=1.0)
    decode_images: bool


class ProfileConfig(_Section):
    """Size and budget of a training run; `profile` in params picks one."""

    image_size: int = Field(ge=32)
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    width: float = Field(gt=0)
    learning_rate: float = Field(gt=0)


class ModelEntry(_Section):
    arch: str
    weights: str | None = None
    width: float | None = Field(None, gt=0)  # None: the profile's width
    # What train@<name> trains on: `shard.out` (real data only) or `<validate_synthetic.out>/<gan>`
    # (real data plus that GAN's validated synthetic shards). dvc.yaml lists it as a dependency, so
    # params.yaml gives it on every entry; None (possible outside DVC) means `shard.out`.
    train_data: Path | None = None
    # A replicate of the same model with another seed (initial weights, shuffling, augmentation):
    # e.g. `-S 'models.unet_mobilenetv2_imagenet_s1={..., seed: 1}'` for mean +- std over seeds.
    # None: the top-level `seed`.
    seed: int | None = Field(None, ge=0)
    _gan: str | None = PrivateAttr(None)  # resolved by `Config` (it needs the other sections)
    derived_fields: ClassVar[dict[str, str]] = {"gan": "train_data"}

    @property
    def gan(self) -> str | None:
        """The GAN whose validated synthetic data this model also trains on, or None (real data only)."""
        return self._gan


class AugmentConfig(_Section):
    params_key: ClassVar[str] = "train.augment"
    rotate_deg: float = Field(ge=0, le=180)
    scale: tuple[float, float]
    hflip: bool
    vflip: bool
    brightness: float = Field(ge=0)
    contrast: float = Field(ge=0)
    saturation: float = Field(ge=0)

    @field_validator("scale")
    @classmethod
    def _scale_ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("train.augment.scale must be [low, high] with 0 < low <= high")
        return v


class TrainConfig(_Section):
    params_key: ClassVar[str] = "train"
    out: Path
    metrics: Path
    state: Path
    optimizer: Literal["adam", "adamw"]
    weight_decay: float = Field(ge=0)
    warmup_epochs: int = Field(ge=0)
    output_stride: Literal[8, 16]
    # BatchNormalization's moving-average momentum while training; null keeps each architecture's own.
    batchnorm_momentum: float | None = Field(gt=0, lt=1)
    loss: Literal["ce", "focal", "dice", "focal_dice"]
    focal_gamma: float = Field(ge=0)
    focal_weight: float = Field(ge=0)
    dice_weight: float = Field(ge=0)
    # null, one weight per class, or "median_frequency": computed from the run's training shards
    # (`seglab.train.plan.plan_run`).
    class_weights: list[float] | Literal["median_frequency"] | None
    mixed_precision: Literal["auto", "off", "mixed_float16", "mixed_bfloat16"]
    freeze_encoder_epochs: int = Field(ge=0)
    prior_init: bool  # classifier bias starts at the log class frequencies of the training pixels
    encoder_lr_multiplier: float = Field(gt=0)
    encoder_batchnorm: Literal["frozen", "train"]
    early_stopping_patience: int = Field(ge=1)
    # null: no plateau reductions, the warmup/cosine schedule alone sets the learning rate.
    reduce_lr_patience: int | None = Field(ge=1)
    commit_every_seconds: float = Field(ge=0)  # resume commits at most this often (0: every epoch)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("class_weights", mode="before")
    @classmethod
    def _class_weight_mode(cls, v: Any) -> Any:
        # One readable error for a misspelt mode, not one per member of the union.
        if isinstance(v, str) and v != "median_frequency":
            raise ValueError(f"train.class_weights is {v!r}; expected null, a list of one weight per class, "
                             "or 'median_frequency'")
        return v


class EvaluateConfig(_Section):
    """What `evaluate@<name>` (and `ensemble`) score, and how (README, "Evaluation protocol").

    `data` and `split`: the shards evaluated (a shard root: `<split>/part-*.parquet` + manifest.json).
    params.yaml writes `data` as the alias of `shard.out`, so the models' own shards; a settings
    mapping that gives `shard.out` but not `evaluate.data` gets the same (`Config`).
    `protocol`: `full` (whole images at their stored resolution, sliding window, `scale` and
    `overlap`) or `letterbox` (each image shrunk into one input of the model's size).
    """

    params_key: ClassVar[str] = "evaluate"
    out: Path
    data: Path
    split: str
    protocol: Literal["full", "letterbox"]
    # full: the image's scale before the windows: "cover" (the scale training's crops have: the
    # model's input just covers the image) or a factor (1.0: the stored resolution).
    scale: Literal["cover"] | Annotated[float, Field(gt=0, le=16)]
    overlap: float = Field(ge=0, lt=1)  # full: neighbouring windows share at least this part of a side
    batch_size: int = Field(ge=1)
    tta: list[Literal["identity", "hflip", "vflip", "rot90", "rot180", "rot270"]]
    latency_runs: int = Field(ge=1)

    @field_validator("split")
    @classmethod
    def _split_name(cls, v: str) -> str:
        if not SPLIT_NAME.fullmatch(v):
            raise ValueError(f"evaluate.split {v!r}: a split name uses only letters, digits, '_' and '-'")
        return v


class EnsembleConfig(_Section):
    # No project default: the ensemble is part of the comparison (`models`), which a settings
    # mapping names itself.
    members: list[str] = Field(default_factory=list)
    weights: list[float] | None = None

    @field_validator("weights")
    @classmethod
    def _weights_match(cls, v, info):
        members = info.data.get("members", [])
        if v is not None and len(v) != len(members):
            raise ValueError(f"ensemble.weights has {len(v)} entries for {len(members)} members")
        if v is not None and (any(w < 0 for w in v) or sum(v) <= 0):
            raise ValueError("ensemble.weights must be non-negative with a positive sum")
        return v


class PredictConfig(_Section):
    """`seglab predict` (and the dashboard's upload): the predictor is the evaluation's full-resolution
    one (evaluate.scale, overlap, batch_size; with `tta` the evaluate.tta views)."""

    params_key: ClassVar[str] = "predict"
    tta: bool  # merge the evaluate.tta views by default (`--tta` / `--no-tta` override)
    overlay_alpha: float = Field(gt=0, le=1)  # the class colour's share of an overlay pixel


class WarehouseConfig(_Section):
    params_key: ClassVar[str] = "warehouse"
    path: Path
    mirror: bool  # true: drop runs whose eval.json is gone (false: runs accumulate)


class GanTrainingConfig(_Section):
    """One augmenter's training knobs as `train_gan@<gan>` runs them (seglab.gan.settings.GanSettings)."""

    image_size: int = Field(ge=8)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    latent_dim: int = Field(ge=1)
    width: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    d_learning_rate: float = Field(gt=0)
    beta_1: float = Field(ge=0, lt=1)
    beta_2: float = Field(ge=0, lt=1)
    l1_weight: float = Field(ge=0)
    attention_resolution: int | None = Field(ge=1)
    sample_every: int = Field(ge=1)
    sample_count: int = Field(ge=1)


GAN_NAMES = ("dcgan", "sagan", "pix2pix")


class GanConfig(_Section):
    """`gan.<key>` sets a training knob for every augmenter, `gan.<gan>.<key>` for one. Each `gan.<gan>`
    section is resolved here, so `cfg.gan.<gan>` is what `train_gan@<gan>` runs with: a value the
    settings give beats params.yaml's, and within each, the augmenter's own beats the common one."""

    params_key: ClassVar[str] = "gan"
    names: list[Literal["dcgan", "sagan", "pix2pix"]]
    out: Path
    state: Path
    synthetic_out: Path
    synth_images: int = Field(ge=1)
    synth_size: int | None = Field(ge=8)
    layout_mix: tuple[float, float, float]
    # The common knobs, as params.yaml gives them (None: not set there).
    image_size: int | None = Field(None, ge=8)
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    latent_dim: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0)
    d_learning_rate: float | None = Field(None, gt=0)
    beta_1: float | None = Field(None, ge=0, lt=1)
    beta_2: float | None = Field(None, ge=0, lt=1)
    l1_weight: float | None = Field(None, ge=0)
    attention_resolution: int | None = Field(None, ge=1)
    sample_every: int | None = Field(None, ge=1)
    sample_count: int | None = Field(None, ge=1)
    dcgan: GanTrainingConfig
    sagan: GanTrainingConfig
    pix2pix: GanTrainingConfig

    @model_validator(mode="before")
    @classmethod
    def _resolve_per_gan(cls, data: Any) -> Any:
        # Runs before the section's params.yaml defaults are merged in, so `data` is what was given.
        if not isinstance(data, dict):
            return data
        params = _project_value(cls.params_key)
        params = params if isinstance(params, dict) else {}

        def common(source: dict) -> dict:
            return {k: source[k] for k in GanTrainingConfig.model_fields if k in source}

        def own(source: dict, gan: str) -> dict:
            value = source.get(gan) or {}
            return value.model_dump() if isinstance(value, BaseModel) else value

        resolved = dict(data)
        for gan in GAN_NAMES:
            layers = [own(params, gan), common(data), own(data, gan)]
            if all(isinstance(layer, dict) for layer in layers):  # else pydantic reports the wrong type
                resolved[gan] = {**common(params), **layers[0], **layers[1], **layers[2]}
        return resolved

    def training(self, gan: str) -> GanTrainingConfig:
        """The resolved `gan.<gan>` section."""
        if gan not in GAN_NAMES:
            raise ConfigError(f"unknown GAN {gan!r}; expected one of {list(GAN_NAMES)}")
        return getattr(self, gan)


_Threshold = Annotated[float, Field(ge=0)] | Literal["auto"]


class SyntheticChecksConfig(_Section):
    """Thresholds of the GX gate on synthetic data (seglab.gan.validate; calibration: docs/synthetic-validation.md)."""

    params_key: ClassVar[str] = "validate_synthetic"
    image_size: int | tuple[int, int] | None  # None: from synthesize.json beside the shards
    resolution: int | None = Field(ge=4)      # compare real and synthetic at this side (None: the GAN's)
    min_std: float = Field(ge=0)
    min_labelled_share: float = Field(ge=0, le=1)
    min_images: int = Field(ge=2)
    diversity_min: float = Field(ge=0)
    diversity_size: int = Field(ge=4)
    # Per image: inside some real training image's k-NN feature ball (None: rule off; seglab.gan.suites).
    realism_k: int | None = Field(ge=1)
    # Per image: no earlier sample nearer than this x the two closest real images are (None: rule off).
    distinct_real_fraction: float | None = Field(gt=0)
    # A number, or "auto": calibrated on real-vs-real figures each run (seglab.gan.calibration).
    mean_tol: _Threshold
    std_tol: _Threshold
    kid_max: _Threshold
    calibration_split: str             # held-out real images the "auto" thresholds are calibrated on
    calibration_quantile: float = Field(gt=0, lt=1)
    calibration_batches: int = Field(ge=10)
    kid_real_multiple: float = Field(gt=0)
    channel_real_multiple: float = Field(gt=0)
    kid_subsets: int = Field(ge=1)
    kid_subset_size: int = Field(ge=2)
    feature_size: int = Field(ge=32)
    reference_images: int = Field(ge=2)

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_project_params(cls, data: Any) -> Any:
        # Replaces _Section's: the thresholds alone (no out/report) also make SyntheticChecks, which
        # takes the top-level seed.
        if not isinstance(data, dict):
            return data
        section = _project_value(cls.params_key)
        defaults = {k: v for k, v in section.items() if k in cls.model_fields} if isinstance(section, dict) else {}
        if "seed" in cls.model_fields and "seed" in project_params():
            defaults["seed"] = project_params()["seed"]
        return {**defaults, **data}


class ValidateSyntheticConfig(SyntheticChecksConfig):
    out: Path
    report: Path


class ScheduleConfig(_Section):
    params_key: ClassVar[str] = "schedule"
    cron: str
    timezone: str

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"schedule.cron must have 5 fields (minute hour day month weekday), got {v!r}")
        return v


class Config(_Section):
    seed: int
    sample: SampleConfig = Field(default_factory=SampleConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    profiles: dict[str, ProfileConfig]
    profile: str  # after `profiles`, so its validator can see them
    # The comparison (models, ensemble) has no project default: a settings mapping names its own.
    models: dict[str, ModelEntry] = Field(default_factory=dict)
    # Models outside the default comparison, kept valid and one edit away: an entry moved into
    # `models` gets its train@/evaluate@ stages.
    more_models: dict[str, ModelEntry] = Field(default_factory=dict)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    warehouse: WarehouseConfig = Field(default_factory=WarehouseConfig)
    gan: GanConfig = Field(default_factory=GanConfig)
    validate_synthetic: ValidateSyntheticConfig = Field(default_factory=ValidateSyntheticConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @model_validator(mode="before")
    @classmethod
    def _top_level_defaults(cls, data: Any) -> Any:
        # Sections fill their own keys; the top level takes the scalars and sections a mapping
        # leaves out, except the comparison.
        if not isinstance(data, dict):
            return data
        # params.yaml writes evaluate.data as the alias of shard.out (`*real_shards`): a mapping that
        # moves shard.out without naming evaluate.data evaluates the shards it names, as the alias does.
        shard, evaluate = data.get("shard"), data.get("evaluate", {})
        if isinstance(shard, dict) and "out" in shard and isinstance(evaluate, dict) and "data" not in evaluate:
            data = {**data, "evaluate": {**evaluate, "data": shard["out"]}}
        defaults = {k: v for k, v in project_params().items() if k not in ("models", "more_models", "ensemble")}
        present = set(data) | {"validate"} if "validate_" in data else set(data)
        return {**{k: v for k, v in defaults.items() if k not in present}, **data}

    @field_validator("profile")
    @classmethod
    def _profile_known(cls, v: str, info) -> str:
        profiles = info.data.get("profiles")
        if profiles is not None and v not in profiles:
            raise ValueError(f"profile {v!r} is not one of profiles: {sorted(profiles)}")
        return v

    @model_validator(mode="after")
    def _train_data_known(self) -> "Config":
        # Only two kinds of training data exist: a path anywhere else would be a dependency in
        # dvc.yaml that no stage produces, or synthetic data that skipped the validation gate.
        synthetic_root = Path(self.validate_synthetic.out)
        for key in self.models.keys() & self.more_models.keys():
            raise PydanticCustomError("models", "models.{key} is also in more_models; keep one entry", {"key": key})
        entries = [(f"models.{k}", e) for k, e in self.models.items()]
        entries += [(f"more_models.{k}", e) for k, e in self.more_models.items()]
        for key, entry in entries:
            if entry.train_data is None or Path(entry.train_data) == Path(self.shard.out):
                entry._gan = None
                continue
            path = Path(entry.train_data)
            if path.parent == synthetic_root and path.name in self.gan.names:
                entry._gan = path.name
                continue
            raise PydanticCustomError(
                "train_data",
                "{key}.train_data is {value}; expected shard.out ({shards}: real data only) or "
                "validate_synthetic.out/<gan> with a gan in gan.names ({options}: real plus that GAN's "
                "validated synthetic data)",
                {"key": key, "value": repr(str(entry.train_data)), "shards": repr(str(self.shard.out)),
                 "options": ", ".join(str(synthetic_root / name) for name in self.gan.names) or "gan.names is empty"})
        return self

    def model_train_data(self, name: str) -> Path:
        """The folder `models.<name>.train_data` names (`shard.out` where it is unset)."""
        entry = self.model(name)
        return Path(entry.train_data) if entry.train_data is not None else Path(self.shard.out)

    @property
    def run_profile(self) -> ProfileConfig:
        """The size/budget block that `profile` selects."""
        return self.profiles[self.profile]

    def model(self, name: str) -> ModelEntry:
        """The `models.<name>` entry, or an error listing the configured names."""
        try:
            return self.models[name]
        except KeyError:
            if name in self.more_models:
                raise ConfigError(f"model {name!r} is in params.yaml `more_models`, outside the comparison; move its "
                                  f"entry into `models` to train and evaluate it") from None
            raise ConfigError(f"no model {name!r} in params.yaml `models`; configured: {sorted(self.models)}") from None

    def model_seed(self, name: str) -> int:
        """The seed train@<name> uses: its entry's `seed`, else the top-level one."""
        entry = self.model(name)
        return entry.seed if entry.seed is not None else self.seed

    def model_width(self, name: str) -> float:
        entry = self.model(name)
        return entry.width if entry.width is not None else self.run_profile.width

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def settings_snapshot(section: BaseModel) -> dict:
    """`section` as JSON-ready data, for a provenance hash (a resume key, a record of the settings).

    Unlike `section.model_dump()` this is not a read of the keys (seglab.stage_trace): a hash that
    only names the settings must not become a dvc.yaml params dependency of the stage."""
    return BaseModel.model_dump(section, mode="json")


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or has a wrong value."""


def load_config(path: str | Path = "params.yaml") -> Config:
    """Read and validate params.yaml; errors name the file and the offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run from the project root or pass --params)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        lines = [f"{path}: invalid settings:"]
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            # Errors across sections (no location of their own) name their keys in the message.
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})" if key else f"  {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
