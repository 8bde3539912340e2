"""What one augmenter's training run is: its resolved params section plus the GAN and the seed."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from seglab.config import GAN_NAMES, Config, GanTrainingConfig
from seglab.digest import sha256_json

__all__ = ["GanSettings", "is_conditional", "settings_from_config"]

_CONDITIONAL = ("pix2pix",)  # generators that render a label layout instead of sampling noise


class GanSettings(GanTrainingConfig):
    """Everything that shapes one augmenter's training run (hashed into `params_hash`)."""

    gan: Literal["dcgan", "sagan", "pix2pix"]
    seed: int

    @model_validator(mode="after")
    def _size_fits_the_networks(self) -> GanSettings:
        from seglab.gan.common import check_image_size

        check_image_size(self.image_size)
        return self

    @classmethod
    def for_gan(cls, gan: str, **overrides: Any) -> GanSettings:
        """`gan`'s settings from params.yaml (seglab.config), with `overrides` (`seed` included)."""
        if gan not in GAN_NAMES:
            raise ValueError(f"unknown GAN {gan!r}; expected one of {list(GAN_NAMES)}")
        top = {"seed": overrides.pop("seed")} if "seed" in overrides else {}
        return settings_from_config(Config.model_validate({**top, "gan": {gan: overrides}}), gan)

    @property
    def params_hash(self) -> str:
        return sha256_json(self.model_dump())[:16]


def settings_from_config(cfg: Config, gan: str) -> GanSettings:
    """`GanSettings` for `gan`: its resolved `gan.<gan>` section and the top-level seed."""
    return GanSettings(gan=gan, seed=cfg.seed, **cfg.gan.training(gan).model_dump())


def is_conditional(gan: str) -> bool:
    """True for augmenters that render a given label layout (their generator input is a layout)."""
    return gan in _CONDITIONAL
