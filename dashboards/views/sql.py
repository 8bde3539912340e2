"""Ad-hoc SQL over the warehouse: one read-only SELECT at a time, within row, size, memory and time limits."""

from __future__ import annotations

import dataclasses

import duckdb
import streamlit as st

import dashboard_support as ds
from seglab.warehouse import dashboard_queries as dq
from seglab.warehouse.schema import WarehouseError

DEFAULT_ROW_LIMIT = 1000
MAX_ROW_LIMIT = 100_000
LIMITS = dq.SqlLimits(max_rows=DEFAULT_ROW_LIMIT)

EXAMPLES = {
    "Five worst classes of every run": """\
SELECT name, variant, class_name, round(iou, 3) AS iou, support
FROM class_scores
WHERE iou IS NOT NULL
QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY iou, class_index) <= 5
ORDER BY name, variant, iou""",
    "Accuracy, size and speed": """\
SELECT name, variant, round(miou, 3) AS miou, round(mdice, 3) AS mdice, param_count,
       round(seconds_per_epoch, 1) AS seconds_per_epoch,
       round(images_per_second, 1) AS images_per_second
FROM leaderboard
ORDER BY miou DESC NULLS LAST""",
    "ImageNet weights against training from scratch, per class": """\
WITH pairs AS (
    SELECT p.run_id AS pretrained_id, p.name AS pretrained, s.run_id AS scratch_id, s.name AS scratch
    FROM runs AS p
    JOIN runs AS s ON s.arch = p.arch AND s.variant = p.variant AND s.dataset = p.dataset
                  AND s.class_set = p.class_set AND s.weights IS NULL
    WHERE p.variant = 'plain' AND p.weights IS NOT NULL
)
SELECT pretrained, scratch, a.class_name, round(a.iou, 3) AS iou_pretrained,
       round(b.iou, 3) AS iou_scratch, round(a.iou - b.iou, 3) AS gain
FROM pairs
JOIN per_class AS a ON a.run_id = pretrained_id
JOIN per_class AS b ON b.run_id = scratch_id AND b.class_index = a.class_index
ORDER BY pretrained, gain DESC NULLS LAST""",
    "Best validation mIoU per epoch of each run": """\
SELECT r.name, h.epoch, round(h.value, 4) AS val_miou
FROM history AS h JOIN runs AS r USING (run_id)
WHERE h.metric = 'val_miou'
ORDER BY r.name, h.epoch""",
}

st.title("SQL")
cfg = ds.settings()
wh = ds.require_warehouse(cfg)
dq.WORKERS.prepare(LIMITS)  # the process the first query runs in starts while the page is read
st.caption(f"One `SELECT` (or `WITH … SELECT`, `SHOW`, `DESCRIBE`, `SUMMARIZE`) over the warehouse, "
           f"read-only; files and network are off. A query may use {LIMITS.memory_mib} MiB of working "
           f"memory ({LIMITS.process_memory_mib} MiB for its whole process) and {LIMITS.timeout_s:g} s, "
           f"and return {LIMITS.max_result_mib:g} MiB (`repeat`, `lpad` and `rpad` refuse to build a "
           "larger value). Tables: "
           "`runs`, `metrics`, `per_class`, `confusion`, `history`; views: `leaderboard`, "
           "`class_scores`.")

if "sql_text" not in st.session_state:
    st.session_state["sql_text"] = next(iter(EXAMPLES.values()))


def _load_example() -> None:
    st.session_state["sql_text"] = EXAMPLES[st.session_state["sql_example"]]


st.selectbox("Start from an example", list(EXAMPLES), key="sql_example", on_change=_load_example)

with st.form("sql_form"):
    st.text_area("Query", key="sql_text", height=200)
    row_limit = st.number_input("Row limit", min_value=1, max_value=MAX_ROW_LIMIT,
                                value=DEFAULT_ROW_LIMIT, step=100, key="sql_limit")
    if st.form_submit_button("Run query", type="primary"):
        st.session_state["sql_submitted"] = (st.session_state["sql_text"], int(row_limit))

submitted = st.session_state.get("sql_submitted")
if submitted is not None:
    sql, limit = submitted
    try:
        result = ds.load_sql(wh.path, wh.stamp, sql, dataclasses.replace(LIMITS, max_rows=limit))
    except dq.SqlRefused as e:
        st.error(f"Refused: {e}")
    except (duckdb.Error, WarehouseError) as e:  # e.g. an unknown column: shown, not raised
        st.error(f"Query failed: {e}")
    else:
        cut = {
            "rows": f" — cut at the row limit of {limit:,}; raise it or narrow the query",
            "bytes": f" — cut at the result size limit of {LIMITS.max_result_mib:g} MiB; select fewer "
                     "columns or rows",
        }.get(result.cut_by, "")
        st.success(f"{len(result.frame):,} rows in {result.seconds * 1000:.0f} ms{cut}")
        st.dataframe(result.frame, hide_index=True)
        st.download_button("Download CSV", result.frame.to_csv(index=False).encode("utf-8"),
                           file_name="seglab_query.csv", mime="text/csv")

with st.expander("Tables and columns"):
    st.dataframe(ds.load_schema(wh.path, wh.stamp), hide_index=True)
