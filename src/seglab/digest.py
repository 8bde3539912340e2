"""Content digests and JSON-safe values: the one definition each, shared by every stage's records."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

_BLOCK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in blocks (weights files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike]) -> str:
    """One hex sha256 over several files, each contributing its base name and bytes (order matters)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(os.fspath(path)).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """Hex sha256 of a JSON value in canonical form (sorted keys), e.g. a run's settings."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def json_safe(value: Any) -> Any:
    """`value` as plain JSON: numpy/tensor scalars and arrays -> Python, NaN/inf and pandas NA -> None.

    Containers are converted recursively; JSON has no NaN, and a null is what readers
    (DuckDB, the dashboard) take for "not measured".
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()
    if isinstance(value, np.ndarray):
        return json_safe(value.item() if value.ndim == 0 else value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if type(value).__name__ == "NAType":  # pandas.NA without importing pandas
        return None
    return value
