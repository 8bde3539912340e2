"""dashboards/dashboard_support.py loaded as a module for tests outside a Streamlit run (it is not in a
package: the dashboard's pages import it from their own folder)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DASHBOARD_SUPPORT = Path(__file__).resolve().parents[2] / "dashboards" / "dashboard_support.py"


def load_dashboard_support() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboard_support_under_test", DASHBOARD_SUPPORT)
    support = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = support  # dataclasses look their module up there
    try:
        spec.loader.exec_module(support)
    finally:
        del sys.modules[spec.name]
    return support
