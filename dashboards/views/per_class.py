"""Per-class scores: a runs x classes heatmap, and a class-by-class comparison of two runs."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

import dashboard_support as ds
from seglab.warehouse.schema import WarehouseError

st.title("Per-class scores")
cfg = ds.settings()
wh = ds.require_warehouse(cfg)
board = ds.load_leaderboard(wh.path, wh.stamp)
labels = ds.run_labels(board)

# One heatmap needs one class list, and scores that compare: runs are picked per dataset, class
# set, split and protocol (a warehouse from before schema version 5 has no protocols).
has_protocol = "eval_protocol" in board.columns
controls = st.columns(6 if has_protocol else 5)
with controls[0]:
    metric = st.selectbox("Score", list(ds.PER_CLASS_LABELS), format_func=ds.PER_CLASS_LABELS.get,
                          key="pc_metric")
with controls[1]:
    dataset = ds.choose_one("Dataset", sorted(board["dataset"].dropna().unique()), key="pc_dataset")
scope = board[board["dataset"] == dataset]
with controls[2]:
    class_set = ds.choose_one("Class set", sorted(scope["class_set"].dropna().unique()), key="pc_class_set")
scope = scope[scope["class_set"] == class_set]
with controls[3]:
    split = ds.choose_one("Split", sorted(scope["split"].dropna().unique()), key="pc_split")
scope = scope[scope["split"] == split]
protocol = None
if has_protocol:
    with controls[5]:
        protocol = ds.choose_one("Protocol", sorted(scope["eval_protocol"].dropna().unique()), key="pc_protocol")
    scope = scope[scope["eval_protocol"] == protocol]
with controls[4]:
    variants = st.multiselect("Variant", sorted(board["variant"].unique()), key="pc_variant",
                              placeholder="all variants")

st.subheader(f"{ds.PER_CLASS_LABELS[metric]} per class and run")
selected = scope[scope["variant"].isin(variants)] if variants else scope
top = None
if len(selected) > ds.CHART_RUNS:
    # No max_value: a count kept from a larger selection must not make the widget fail.
    top = min(int(st.number_input("Runs shown (best mIoU first)", min_value=1, value=ds.CHART_RUNS, step=10,
                                  key="pc_top")), len(selected))
# Only the runs shown are read: DuckDB picks the best `top`.
matrix = ds.load_per_class_matrix(wh.path, wh.stamp, metric, dataset, class_set, split, protocol,
                                  tuple(variants) if variants else None, top)
if matrix.empty:
    st.info("No per-class scores for this selection.")
else:
    classes = list(matrix.columns)
    run_ids = list(matrix.index.get_level_values("run_id"))
    long = (matrix.reset_index()
            .melt(id_vars=["name", "variant", "run_id"], var_name="class", value_name="value"))
    long["run"] = long["run_id"].map(labels)
    st.altair_chart(
        ds.heatmap(long, x="class", y="run", value="value", x_order=classes,
                   y_order=[labels[r] for r in run_ids], title=ds.PER_CLASS_LABELS[metric]),
        width="content",
    )
    shown_of = f" (the best {len(run_ids)} of {len(selected)})" if len(run_ids) < len(selected) else ""
    st.caption(f"{len(run_ids)} runs{shown_of}, best mIoU first, x {len(classes)} classes: "
               + ", ".join(classes) + ". Blank cells: the class is absent from both truth and "
               "prediction, so the score is undefined.")
    with st.expander("As a table"):
        table = matrix.copy()
        table.index = [labels[r] for r in run_ids]
        st.dataframe(table, column_config={c: st.column_config.NumberColumn(format="%.3f")
                                           for c in classes})

st.subheader("Compare two runs")
if len(scope) < 2:
    st.info("Comparing needs two runs on the same dataset, class set, split and protocol; this selection "
            f"has {len(scope)}.")
    st.stop()
# As on the runs page: the pickers offer the best `PICKER_RUNS` runs of the selection that match
# the filter, chosen in DuckDB; the filter finds the others.
search = st.text_input("Find runs to compare", key="pc_filter",
                       placeholder="part of a name, variant or run id").strip()
candidates, more = ds.best_runs(wh, search, dataset=dataset, class_set=class_set, split=split, protocol=protocol)
if len(candidates) < 2:
    matching = f" matching “{search}”" if search else ""
    st.info(f"Comparing needs two runs; {len(candidates)} of this selection{matching}.")
    st.stop()
ids = list(candidates["run_id"])
pick = st.columns(2)
run_a = pick[0].selectbox("Run A (baseline)", ids, index=1, format_func=labels.get, key="pc_run_a")
run_b = pick[1].selectbox("Run B", ids, index=0, format_func=labels.get, key="pc_run_b")
st.caption(ds.picker_caption(len(candidates), more, search, " of this selection"))
if run_a == run_b:
    st.info("Pick two different runs.")
    st.stop()
try:
    comparison = ds.load_comparison(wh.path, wh.stamp, run_a, run_b)
except WarehouseError as e:
    ds.show_error(e)
    st.stop()

deltas = comparison["iou_delta"].dropna()
tiles = st.columns(4)
miou = board.set_index("run_id")["miou"]
mean_a, mean_b = miou[run_a], miou[run_b]
tiles[0].metric("mIoU A", f"{mean_a:.3f}")
tiles[1].metric("mIoU B", f"{mean_b:.3f}", delta=f"{mean_b - mean_a:+.3f}")
tiles[2].metric("Classes B wins", int((deltas > 0).sum()))
tiles[3].metric("Classes A wins", int((deltas < 0).sum()))
st.caption(f"A = {labels[run_a]}, B = {labels[run_b]}; delta = B - A.")

chart_data = comparison.assign(
    winner=pd.Series(["B" if d > 0 else "A" if d < 0 else "tie" for d in comparison["iou_delta"].fillna(0)],
                     index=comparison.index))
st.altair_chart(
    alt.Chart(chart_data.dropna(subset=["iou_delta"])).mark_bar().encode(
        x=alt.X("class_name:N", sort=list(comparison["class_name"]), title=None,
                axis=alt.Axis(labelAngle=-45)),
        y=alt.Y("iou_delta:Q", title="IoU B - A"),
        color=alt.Color("winner:N", scale=alt.Scale(domain=["A", "B", "tie"],
                                                    range=["#d62728", "#2ca02c", "#999999"])),
        tooltip=["class_name", alt.Tooltip("iou_a:Q", format=".3f"),
                 alt.Tooltip("iou_b:Q", format=".3f"), alt.Tooltip("iou_delta:Q", format="+.3f")],
    ).properties(height=260, title="IoU difference per class"),
    width="stretch",
)
score = st.column_config.NumberColumn(format="%.3f")
signed = st.column_config.NumberColumn(format="%+.3f")
st.dataframe(
    comparison, hide_index=True,
    column_config={**{c: score for c in comparison.columns if c.endswith(("_a", "_b"))},
                   **{c: signed for c in comparison.columns if c.endswith("_delta")},
                   "support_a": st.column_config.NumberColumn("support (pixels)", format="compact"),
                   "support_b": None},
)
