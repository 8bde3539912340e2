"""The per-image profile of synthetic samples: one row per sample, what the per-image rules check."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from seglab.data.classes import IGNORE_INDEX
from seglab.data.expectations import ROW_KEYS

__all__ = ["PROFILE_COLUMNS", "synthetic_profile"]

PROFILE_COLUMNS = ROW_KEYS + (
    "image_height", "image_width", "image_channels",
    "label_height", "label_width",
    "non_finite_pixels", "pixel_min", "pixel_max", "pixel_std",
    "invalid_label_pixels", "labelled_share",
    "decode_error",
)


def _image_stats(image: Any) -> dict:
    array = np.asarray(image)
    if array.ndim not in (2, 3) or array.dtype.kind not in "uif" or array.size == 0:
        raise ValueError(f"expected an (H, W[, C]) numeric image, got shape {array.shape} dtype {array.dtype}")
    values = array.astype(np.float64, copy=False)
    finite = np.isfinite(values)
    stats = {"image_height": array.shape[0], "image_width": array.shape[1],
             "image_channels": array.shape[2] if array.ndim == 3 else 1,
             "non_finite_pixels": int(values.size - finite.sum()),
             "pixel_min": None, "pixel_max": None, "pixel_std": None}
    if finite.any():
        kept = values[finite]
        stats.update(pixel_min=float(kept.min()), pixel_max=float(kept.max()), pixel_std=float(kept.std()))
    return stats


def _label_stats(label: Any, num_classes: int) -> dict:
    values = np.asarray(label)
    if values.ndim != 2 or values.dtype.kind not in "ui":
        raise ValueError(f"expected a single-channel integer label map, got shape {values.shape} dtype {values.dtype}")
    values = values.astype(np.int64, copy=False)
    in_set = ((values >= 0) & (values < num_classes)) | (values == IGNORE_INDEX)
    labelled = (values > 0) & (values < num_classes) & (values != IGNORE_INDEX)
    return {"label_height": values.shape[0], "label_width": values.shape[1],
            "invalid_label_pixels": int(values.size - in_set.sum()),
            "labelled_share": float(labelled.mean()) if values.size else 0.0}


def _array_keys(count: int) -> list[dict]:
    return [{"shard_split": "train", "image_id": i, "file_name": f"sample-{i:05d}", "shard_file": "<arrays>",
             "shard_row": i} for i in range(count)]


def synthetic_profile(
    images: Sequence[Any],
    labels: Sequence[Any],
    *,
    num_classes: int,
    keys: Sequence[dict] | None = None,
    decode_errors: Sequence[str | None] | None = None,
) -> pd.DataFrame:
    """One row per sample (`PROFILE_COLUMNS`): what the per-image rules check.

    `images`: (H, W, 3) arrays, uint8 or float in [0, 255] (floats may hold NaN, which is
    reported); `labels`: (H, W) integer class maps. A None image/label, or an array of the
    wrong kind, becomes `decode_error` with the reason. `keys` identify each sample
    (`ROW_KEYS`; default: its index); `decode_errors` carries failures from decoding shards.
    """
    if len(images) != len(labels):
        raise ValueError(f"synthetic_profile: {len(images)} images but {len(labels)} labels")
    if num_classes < 1 or num_classes > IGNORE_INDEX:
        raise ValueError(f"num_classes must be in [1, {IGNORE_INDEX}], got {num_classes}")
    keys = list(keys) if keys is not None else _array_keys(len(images))
    rows = []
    for i, (image, label) in enumerate(zip(images, labels)):
        row: dict[str, Any] = dict.fromkeys(PROFILE_COLUMNS)
        row.update({k: keys[i][k] for k in ROW_KEYS})
        errors = [decode_errors[i]] if decode_errors is not None and decode_errors[i] else []
        for name, payload, stats in (("image", image, _image_stats),
                                     ("label", label, lambda v: _label_stats(v, num_classes))):
            if payload is None:
                if not errors:
                    errors.append(f"{name} missing")
                continue
            try:
                row.update(stats(payload))
            except ValueError as e:
                errors.append(f"{name}: {e}")
        row["decode_error"] = "; ".join(errors) or None
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(PROFILE_COLUMNS))
    # Integer columns stay nullable integers (a failed decode leaves them null).
    for column in ("image_height", "image_width", "image_channels", "label_height", "label_width",
                   "non_finite_pixels", "invalid_label_pixels", "image_id", "shard_row"):
        frame[column] = frame[column].astype("Int64")
    return frame
