"""`SyntheticChecks`: the thresholds of the synthetic-data gate and how its batch figures are computed.

The fields are params.yaml's `validate_synthetic` thresholds (seglab.config.SyntheticChecksConfig)
plus the seed; what the rules mean is in seglab.gan.validate's docstring, how the thresholds were
calibrated in docs/synthetic-validation.md.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np
from pydantic import field_validator

from seglab.config import Config, SyntheticChecksConfig

__all__ = ["SyntheticChecks", "checks_from_config", "resolve_checks"]


class SyntheticChecks(SyntheticChecksConfig):
    """The gate's settings; `image_size` is held as (height, width) (a side is squared). Left-out
    values come from params.yaml (`validate_synthetic`, the top-level `seed`)."""

    seed: int

    @field_validator("image_size", mode="after")
    @classmethod
    def _height_and_width(cls, value: int | tuple[int, int] | None) -> tuple[int, int] | None:
        if value is None or isinstance(value, tuple):
            return value
        return (value, value)

    @field_validator("image_size", mode="before")
    @classmethod
    def _positive_sides(cls, value: Any) -> Any:
        sides = (value,) if isinstance(value, (int, np.integer)) else tuple(value) if value is not None else ()
        if any(not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 1 for s in sides) or len(sides) > 2:
            raise ValueError(f"image_size must be a side, (height, width) or None, got {value!r}")
        return tuple(int(s) for s in sides) if len(sides) == 2 else (int(sides[0]) if sides else None)


def checks_from_config(cfg: Config) -> SyntheticChecks:
    """`SyntheticChecks` from params.yaml's `validate_synthetic` section and the top-level seed."""
    thresholds = cfg.validate_synthetic.model_dump(include=set(SyntheticChecksConfig.model_fields))
    return SyntheticChecks(**thresholds, seed=cfg.seed)


def resolve_checks(checks: SyntheticChecks, images: Sequence[Any]) -> SyntheticChecks:
    """Fill what `checks` leaves to the data: the expected size (the batch's most common (H, W))
    and the comparison resolution (the expected size's smaller side)."""
    image_size = checks.image_size
    if image_size is None:
        sizes = Counter(tuple(np.shape(im)[:2]) for im in images if im is not None and np.ndim(im) in (2, 3))
        # Ties go to the larger size, so the choice does not depend on sample order.
        image_size = max(sizes.items(), key=lambda kv: (kv[1], kv[0]))[0] if sizes else None
    resolution = checks.resolution
    if resolution is None and image_size is not None:
        resolution = min(image_size)
    return checks.model_copy(update={"image_size": image_size, "resolution": resolution})
