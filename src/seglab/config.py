"""Typed view of params.yaml: the one source of truth for settings, validated once."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Section(BaseModel):
    # A typo in params.yaml must fail loudly, not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleConfig(_Section):
    out: Path = Path("data/sample")
    train_images: int = Field(120, ge=1)
    val_images: int = Field(40, ge=1)
    min_side: int = Field(160, ge=32)
    max_side: int = Field(320, ge=32)
    crowd_fraction: float = Field(0.15, ge=0.0, le=1.0)
    amodal_fraction: float = Field(0.1, ge=0.0, le=1.0)
    greyscale_fraction: float = Field(0.05, ge=0.0, le=1.0)

    @field_validator("max_side")
    @classmethod
    def _sides_ordered(cls, v: int, info) -> int:
        if v < info.data.get("min_side", 0):
            raise ValueError("sample.max_side must be >= sample.min_side")
        return v


class DataConfig(_Section):
    root: Path = Path("data/sample")
    splits: dict[str, str] = Field(default_factory=lambda: {"train": "train2017", "val": "val2017"})
    class_set: Literal["all80", "voc20"] | list[str] = "voc20"
    crowd: Literal["ignore", "label", "background"] = "ignore"
    overlap: Literal["ignore", "last"] = "ignore"
    min_train_area: int = Field(0, ge=0)
    on_bad_record: Literal["error", "skip"] = "error"

    @field_validator("splits")
    @classmethod
    def _splits_nonempty(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("data.splits must name at least one split")
        return v


class ShardConfig(_Section):
    out: Path = Path("data/shards")
    max_side: int = Field(320, ge=16)
    max_shard_mb: float = Field(16, gt=0)
    jpeg_quality: int = Field(95, ge=50, le=100)
    workers: int = Field(2, ge=0)


class ValidateConfig(_Section):
    report: Path = Path("data/reports/validation")
    min_side: int = Field(16, ge=1)
    max_side: int = Field(4096, ge=1)
    max_unlabelled_share: float = Field(0.2, ge=0.0, le=1.0)
    decode_images: bool = True


class Config(_Section):
    seed: int = 0
    sample: SampleConfig = SampleConfig()
    data: DataConfig = DataConfig()
    shard: ShardConfig = ShardConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


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
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None
