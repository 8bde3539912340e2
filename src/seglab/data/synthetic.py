"""Where validated synthetic shards live, and whether training may use them.

`validate_synthetic` (seglab.gan.validate) writes a verdict file beside the accepted shards;
training only reads it here, so the training code needs nothing from the GAN package.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

VALIDATION_FILE = "validation.json"
NONE_ACCEPTED = "NONE_ACCEPTED"


def accepted_synthetic_shards(valid_dir: str | Path) -> Path | None:
    """The validated synthetic shard folder (holding `train/part-*.parquet`) for training, or None
    (logged: "training on real data only") when validation accepted no sample."""
    valid_dir = Path(valid_dir)
    verdict_path = valid_dir / VALIDATION_FILE
    if not verdict_path.is_file():
        raise FileNotFoundError(f"{verdict_path}: no validation verdict; run `dvc repro validate_synthetic@<gan>` "
                                "(synthetic data is used only after it passed validation)")
    verdict = json.loads(verdict_path.read_text())
    if not verdict.get("accepted"):
        log.warning("%s: no synthetic sample passed validation (%s): training on real data only", valid_dir,
                    verdict.get("decision"))
        return None
    return valid_dir
