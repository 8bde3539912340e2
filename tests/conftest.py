"""Shared test settings: quiet TensorFlow, the real-data location, fixed seeds."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = (REPO / ".." / "shared" / "data" / "coco-mini").resolve()

requires_coco_mini = pytest.mark.skipif(
    not (COCO_MINI / "annotations" / "instances_val2017.json").is_file(),
    reason=f"real COCO subset not found at {COCO_MINI} (CI provides it; .ci/run fails without it)",
)


@pytest.fixture
def coco_mini() -> Path:
    if not COCO_MINI.is_dir():
        pytest.skip(f"real COCO subset not found at {COCO_MINI}")
    return COCO_MINI


def pytest_sessionstart(session):
    # CI sets this so that real-data tests can never pass by being skipped.
    if os.environ.get("SEGLAB_REQUIRE_COCO_MINI") == "1" and not COCO_MINI.is_dir():
        pytest.exit(f"SEGLAB_REQUIRE_COCO_MINI=1 but {COCO_MINI} is missing", returncode=1)
