"""Leaderboard: one row per evaluated run, sortable and filterable."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

import dashboard_support as ds

st.title("Leaderboard")
cfg = ds.settings()
wh = ds.require_warehouse(cfg)
board = ds.load_leaderboard(wh.path, wh.stamp)

SORTABLE = {
    "mIoU": "miou", "mean Dice": "mdice", "pixel accuracy": "accuracy",
    "parameters": "param_count", "seconds / epoch": "seconds_per_epoch",
    "images / s (eval)": "images_per_second", "latency p50 (ms)": "latency_ms_p50", "name": "name",
}
# Smaller is better for these; the sort direction defaults accordingly.
ASCENDING_BY_DEFAULT = {"param_count", "seconds_per_epoch", "latency_ms_p50", "name"}

# A warehouse from before schema version 5 (read-only, so never migrated here) has no protocols.
has_protocol = "eval_protocol" in board.columns
filters = st.columns(6 if has_protocol else 5)
datasets = filters[0].multiselect("Dataset", sorted(board["dataset"].dropna().unique()), key="lb_dataset",
                                  help="the evaluated shards' dataset")
splits = filters[1].multiselect("Split", sorted(board["split"].dropna().unique()), key="lb_split",
                                help="the evaluated split (`seglab evaluate NAME --split S` adds others)")
class_sets = filters[2].multiselect("Class set", sorted(board["class_set"].dropna().unique()),
                                    key="lb_class_set")
variants = filters[3].multiselect("Variant", sorted(board["variant"].dropna().unique()), key="lb_variant",
                                  help="plain: the model; tta: test-time augmentation; ensemble")
names = filters[4].multiselect("Runs", sorted(board["name"].unique()), key="lb_runs")
protocols = (filters[5].multiselect("Protocol", sorted(board["eval_protocol"].dropna().unique()),
                                    key="lb_protocol",
                                    help="full: whole images at their stored resolution, sliding window; "
                                         "letterbox: one thumbnail of the model's input size per image")
             if has_protocol else [])

shown = board
for column, chosen in (("dataset", datasets), ("split", splits), ("class_set", class_sets),
                       ("variant", variants), ("name", names), ("eval_protocol", protocols)):
    if chosen:
        shown = shown[shown[column].isin(chosen)]
scopes = shown[[c for c in ("dataset", "split", "eval_protocol") if c in shown.columns]].drop_duplicates()
if len(scopes) > 1:
    st.caption("These runs were scored on " + "; ".join(" / ".join(map(str, row)) for row in scopes.itertuples(
        index=False)) + ": compare scores within one dataset, split and protocol (filters above).")

order = st.columns([2, 2, 4], vertical_alignment="bottom")
sort_label = order[0].selectbox("Sort by", list(SORTABLE), key="lb_sort")
sort_column = SORTABLE[sort_label]
# One toggle per column, so each starts at its own sensible direction and remembers the user's.
descending = order[1].toggle("Descending", value=sort_column not in ASCENDING_BY_DEFAULT,
                             key=f"lb_desc_{sort_column}")
shown = shown.sort_values(sort_column, ascending=not descending, na_position="last", kind="stable")

if shown.empty:
    st.info("No run matches these filters.")
    st.stop()

best = shown.loc[shown["miou"].idxmax()] if shown["miou"].notna().any() else None
fastest = shown.loc[shown["images_per_second"].idxmax()] if shown["images_per_second"].notna().any() else None
tiles = st.columns(3)
tiles[0].metric("Runs shown", f"{len(shown)} of {len(board)}")
if best is not None:
    tiles[1].metric("Best mIoU", f"{best['miou']:.3f}", help=f"{best['name']} ({best['variant']})")
    tiles[1].caption(f"{best['name']} · {best['variant']}")
if fastest is not None:
    tiles[2].metric("Fastest inference", f"{fastest['images_per_second']:.1f} img/s")
    tiles[2].caption(f"{fastest['name']} · {fastest['variant']}")

COLUMNS = ["name", "variant", "miou", "mdice", "accuracy", "miou_fg", "param_count",
           "seconds_per_epoch", "images_per_second", "latency_ms_p50", "arch", "backbone",
           "weights", "weights_loaded", "dataset", "split", "eval_protocol", "train_dataset", "class_set",
           "image_size", "epochs_run",
           "best_epoch", "run_id"]
score = "%.3f"
st.dataframe(
    shown[[c for c in COLUMNS if c in shown.columns]],
    hide_index=True,
    width="stretch",
    column_config={
        "name": st.column_config.TextColumn("run", pinned=True),
        "miou": st.column_config.NumberColumn("mIoU", format=score),
        "mdice": st.column_config.NumberColumn("mean Dice", format=score),
        "accuracy": st.column_config.NumberColumn("pixel acc.", format=score),
        "miou_fg": st.column_config.NumberColumn("mIoU (fg)", format=score,
                                                 help="mean IoU over present classes except background"),
        "param_count": st.column_config.NumberColumn("parameters", format="compact"),
        "seconds_per_epoch": st.column_config.NumberColumn("s / epoch", format="%.1f"),
        "images_per_second": st.column_config.NumberColumn("img / s", format="%.1f",
                                                           help="evaluation throughput"),
        "latency_ms_p50": st.column_config.NumberColumn("latency p50 (ms)", format="%.1f"),
        "dataset": st.column_config.TextColumn("dataset", help="the evaluated shards' dataset"),
        "eval_protocol": st.column_config.TextColumn("protocol"),
        "train_dataset": st.column_config.TextColumn("trained on"),
    },
)
floor = ds.constant_prediction_caption(ds.load_constant_prediction(wh.path, wh.stamp), scopes)
if floor:
    st.caption(floor)
# Plain text twin of the ranking (the first runs of the table), for screen readers, copy-paste
# and text search.
ranked = shown.head(ds.CHART_RUNS)
st.caption("Ranking: " + "; ".join(
    f"{row.name} ({row.variant}) mIoU {row.miou:.3f}" if pd.notna(row.miou) else f"{row.name} ({row.variant}) mIoU n/a"
    for row in ranked.itertuples())
    + (f"; and {len(shown) - len(ranked)} more in the table" if len(shown) > len(ranked) else ""))

labels = ds.run_labels(shown)
# Only the columns the charts encode go to the browser (Altair embeds every column it is given).
plot = shown.assign(run=shown["run_id"].map(labels))[
    ["run", "variant", "miou", "mdice", "images_per_second", "param_count"]]
# One bar per run: the best CHART_RUNS by mIoU (the table has them all).
bars = plot.sort_values("miou", ascending=False, na_position="last", kind="stable").head(ds.CHART_RUNS)
left, right = st.columns(2)
with left:
    st.subheader("mIoU by run")
    if len(bars) < len(plot):
        st.caption(f"The best {len(bars)} of {len(plot)} runs by mIoU.")
    st.altair_chart(
        alt.Chart(bars).mark_bar().encode(
            x=alt.X("miou:Q", title="mIoU", scale=alt.Scale(domain=[0, 1])),
            y=alt.Y("run:N", sort="-x", title=None, axis=alt.Axis(labelLimit=360)),
            color=alt.Color("variant:N", title="variant"),
            tooltip=["run", alt.Tooltip("miou:Q", format=".3f"), alt.Tooltip("mdice:Q", format=".3f")],
        ).properties(height=alt.Step(22)),
        width="stretch",
    )
with right:
    st.subheader("Accuracy against cost")
    speed = plot.dropna(subset=["miou", "images_per_second"])
    if speed.empty:
        st.caption("No run has both an mIoU and an inference throughput.")
    else:
        st.altair_chart(
            alt.Chart(speed).mark_circle(opacity=0.8).encode(
                x=alt.X("images_per_second:Q", title="inference images / s", scale=alt.Scale(type="log")),
                y=alt.Y("miou:Q", title="mIoU"),
                size=alt.Size("param_count:Q", title="parameters"),
                color=alt.Color("variant:N"),
                tooltip=["run", alt.Tooltip("miou:Q", format=".3f"),
                         alt.Tooltip("images_per_second:Q", format=".1f"),
                         alt.Tooltip("param_count:Q", format=",")],
            ).properties(height=max(240, 22 * len(bars))),  # as tall as the bars beside it
            width="stretch",
        )
