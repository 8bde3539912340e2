"""One run in detail: what it is, its training curves, confusion matrix and prediction grid."""

from __future__ import annotations

import json
import math

import altair as alt
import pandas as pd
import streamlit as st

import dashboard_support as ds
from seglab.warehouse.schema import WarehouseError

st.title("Runs")
cfg = ds.settings()
wh = ds.require_warehouse(cfg)

# The picker offers the best `PICKER_RUNS` runs that match the filter, chosen in DuckDB.
# ?run=<run_id> preselects a run (so a run's view can be linked, and the run shown stays offered
# while the filter changes); otherwise the best plain run (it has training curves, unlike TTA and
# ensemble runs).
search = st.text_input("Find a run", key="runs_filter",
                       placeholder="part of a name, variant, dataset, split or run id").strip()
choices, more = ds.best_runs(wh, search)
matches = len(choices)
requested = st.query_params.get("run")
if requested is not None and requested not in set(choices["run_id"]):
    choices = pd.concat([ds.load_board_rows(wh.path, wh.stamp, run_id=requested, latest_only=False), choices],
                        ignore_index=True)
if choices.empty:
    st.info(f"No run's name, variant, dataset, split or run id contains “{search}”.")
    st.stop()
labels = ds.run_labels(choices)
ids = list(choices["run_id"])
plain = choices.index[choices["variant"] == "plain"]
default = ids.index(requested) if requested in ids else (int(plain[0]) if len(plain) else 0)
run_id = st.selectbox("Run", ids, index=default, format_func=labels.get, key="runs_run")
st.caption(ds.picker_caption(matches, more, search))
st.query_params["run"] = run_id
row = choices.set_index("run_id").loc[run_id]
try:
    details = ds.load_run_details(wh.path, wh.stamp, run_id)
except WarehouseError as e:
    ds.show_error(e)
    st.stop()


def _fmt(value: object, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, pattern)


tiles = st.columns(6)
tiles[0].metric("mIoU", _fmt(row["miou"], ".3f"))
tiles[1].metric("mean Dice", _fmt(row["mdice"], ".3f"))
tiles[2].metric("pixel accuracy", _fmt(row["accuracy"], ".3f"))
tiles[3].metric("parameters", _fmt(row["param_count"], ","))
tiles[4].metric("s / epoch", _fmt(row["seconds_per_epoch"], ".1f"))
tiles[5].metric("images / s", _fmt(row["images_per_second"], ".1f"))

FACTS = ["name", "variant", "run_id", "arch", "backbone", "weights", "weights_loaded", "members",
         "member_weights", "tta", "dataset", "split", "eval_protocol", "train_dataset", "class_set",
         "num_classes", "image_size", "batch_size",
         "width", "epochs_planned", "epochs_run", "best_epoch", "best_val_miou", "train_seconds",
         "train_images", "val_images", "mixed_precision", "strategy", "replicas",
         "latency_ms_p50", "latency_ms_p90", "seed", "params_hash", "git_rev", "created_at",
         "evaluated_at", "source_file"]


def _text(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), default=str)
    return str(value)


with st.expander("Run details", expanded=False):
    st.table(pd.DataFrame({"field": FACTS, "value": [_text(details.get(f)) for f in FACTS]})
             .set_index("field"))

# ---- training curves ---------------------------------------------------------------------------
st.subheader("Training curves")
history = ds.load_history(wh.path, wh.stamp, run_id)
if len(history) == 0:
    plain = ds.load_board_rows(wh.path, wh.stamp, name=row["name"], variant="plain", limit=1)
    hint = (f" The training history is stored with the plain run: {ds.run_labels(plain)[plain['run_id'].iloc[0]]}."
            if len(plain) and row["variant"] != "plain" else
            f" It comes from `data/metrics/{row['name']}/history.csv`; rerun "
            f"`{ds.eval_command(details)}` and `seglab ingest`.")
    st.info(f"No training history for this run ({row['variant']}).{hint}")
else:
    metrics = [c for c in history.columns if c != "epoch"]
    groups = {
        "loss": [m for m in metrics if "loss" in m],
        "mIoU": [m for m in metrics if "iou" in m],
        "learning rate": [m for m in metrics if m in ("lr", "learning_rate")],
    }
    grouped = {m for ms in groups.values() for m in ms}
    groups["other"] = [m for m in metrics if m not in grouped]
    best_epoch = details.get("best_epoch")
    columns = st.columns(2)
    shown = 0
    for title, group in groups.items():
        if not group:
            continue
        long = history.melt(id_vars="epoch", value_vars=group, var_name="metric").dropna()
        lines = alt.Chart(long).mark_line(point=True).encode(
            x=alt.X("epoch:Q", title="epoch", axis=alt.Axis(tickMinStep=1)),
            y=alt.Y("value:Q", title=title,
                    scale=alt.Scale(zero=False, type="log" if title == "learning rate" else "linear"),
                    axis=alt.Axis(format=".0e") if title == "learning rate" else alt.Axis()),
            color=alt.Color("metric:N", title=None),
            tooltip=["epoch", "metric", alt.Tooltip("value:Q", format=".4g")],
        )
        if best_epoch is not None and title == "mIoU":
            rule = alt.Chart(pd.DataFrame({"epoch": [best_epoch]})).mark_rule(strokeDash=[4, 4]).encode(
                x="epoch:Q", tooltip=[alt.Tooltip("epoch:Q", title="best epoch")])
            lines = lines + rule
        with columns[shown % 2]:
            st.altair_chart(lines.properties(height=240, title=title), width="stretch")
        shown += 1
    st.caption(f"{len(history)} epochs logged: " + ", ".join(metrics)
               + (f"; best checkpoint at epoch {best_epoch} (dashed)." if best_epoch is not None else "."))

# ---- confusion matrix --------------------------------------------------------------------------
st.subheader("Confusion matrix")
matrix = ds.load_confusion(wh.path, wh.stamp, run_id)
normalise = st.toggle("Normalise each row (share of the true class's pixels)", value=True,
                      key="runs_normalise")
classes = list(matrix.index)
counts = matrix.rename_axis(index="true", columns="predicted").stack().rename("pixels").reset_index()
row_totals = matrix.sum(axis=1)
counts["share"] = counts["pixels"] / counts["true"].map(row_totals).where(lambda s: s > 0)
value = "share" if normalise else "pixels"
st.altair_chart(
    ds.heatmap(counts, x="predicted", y="true", value=value, x_order=classes, y_order=classes,
               title="share of row" if normalise else "pixels",
               domain=(0.0, 1.0) if normalise else None, annotate=normalise and len(classes) <= 25,
               tooltip=["true", "predicted", alt.Tooltip("pixels:Q", format=","),
                        alt.Tooltip("share:Q", format=".1%")]),
    width="content",
)
total = int(matrix.to_numpy().sum())
correct = int(sum(matrix.iat[i, i] for i in range(len(classes))))
st.caption(f"Rows: true class, columns: predicted; {total:,} labelled pixels, "
           f"{correct / total:.1%} on the diagonal." if total else "No labelled pixels.")
# The heatmap the stage drew for this run's variant (a TTA run's is confusion_tta.png, not the plain one).
confusion_png, looked = ds.artifact_file(details, cfg.eval_dir, ds.confusion_png(row["variant"]))
if confusion_png is not None:
    with st.expander(f"{confusion_png.name} (as written by the evaluate stage)"):
        st.image(str(confusion_png), caption=str(confusion_png))

# ---- prediction grid ---------------------------------------------------------------------------
st.subheader("Predictions")
predictions_png, looked = ds.artifact_file(details, cfg.eval_dir, "predictions.png")
if predictions_png is None:
    st.info(f"No prediction grid for {row['name']} (looked for "
            + ", ".join(f"`{p}`" for p in looked)
            + f"). The evaluation draws it: `{ds.eval_command(details)}`.")
else:
    st.image(str(predictions_png), caption=f"image / truth / prediction — {predictions_png}")

# ---- predict on an uploaded image (dashboards/predict_panel.py) ---------------------------------
import predict_panel  # noqa: E402  (beside dashboard_support, on the app's path)

predict_panel.show(cfg, details)
