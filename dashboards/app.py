"""seglab results dashboard: leaderboard, per-class scores, runs, GAN augmenters and SQL.

    streamlit run dashboards/app.py                                  # data/warehouse.duckdb
    streamlit run dashboards/app.py -- --warehouse PATH [--eval-dir DIR] [--gan-dir DIR]
    SEGLAB_WAREHOUSE=PATH streamlit run dashboards/app.py

The warehouse is only ever opened read-only and only for the moment of a query, so
`dvc repro` / `seglab ingest` can rewrite it while the dashboard runs; the next page view shows
the new data. Pages live in views/ (not pages/: Streamlit would also auto-register a pages/
folder next to st.navigation).
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import streamlit as st

# Streamlit puts this folder on sys.path for `streamlit run`; AppTest and other runners may not.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import dashboard_support as ds  # noqa: E402  (needs the path above)

st.set_page_config(page_title="seglab results", page_icon=":bar_chart:", layout="wide")

PAGES = [
    st.Page("views/leaderboard.py", title="Leaderboard", icon=":material/leaderboard:",
            url_path="leaderboard", default=True),
    st.Page("views/per_class.py", title="Per class", icon=":material/grid_on:", url_path="per-class"),
    st.Page("views/runs.py", title="Runs", icon=":material/show_chart:", url_path="runs"),
    st.Page("views/gan.py", title="GAN augmenters", icon=":material/auto_awesome:", url_path="gan"),
    st.Page("views/sql.py", title="SQL", icon=":material/terminal:", url_path="sql"),
]

page = st.navigation(PAGES)

cfg = ds.settings()
with st.sidebar:
    st.caption(f"Warehouse: `{cfg.warehouse}`")
    stamp = ds.warehouse_stamp(cfg.warehouse)
    if stamp is not None:
        st.caption(f"Updated {datetime.fromtimestamp(stamp[0] / 1e9):%Y-%m-%d %H:%M:%S}")
    if cfg.params_error:
        st.warning(f"params.yaml not read, using default paths: {cfg.params_error}")
    if st.button("Reload data", help="Forget cached query results and read the warehouse again"):
        st.cache_data.clear()

page.run()
