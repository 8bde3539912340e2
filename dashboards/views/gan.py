"""GAN augmenters: sample galleries, synthetic-data validation, per-class effect on segmenters.

Works before the GAN stages have run: each section says what it is waiting for and what to run.
"""

from __future__ import annotations

import streamlit as st

import dashboard_support as ds
from seglab.warehouse.schema import SchemaError

GALLERY_SIZE = 12  # earlier sample grids shown under the latest one

st.title("GAN augmenters")
cfg = ds.settings()

# ---- sample galleries ---------------------------------------------------------------------------
st.subheader("Samples")
samples = ds.gan_samples(cfg.gan_dir)
missing = [g for g in ds.GAN_NAMES if g not in samples]
if not samples:
    st.info(f"No GAN sample grids under `{cfg.gan_dir}` (expected `<gan>/samples/*.png`). Train the "
            "augmenters: " + ", ".join(f"`dvc repro train_gan@{g}`" for g in ds.GAN_NAMES) + ".")
else:
    tabs = st.tabs(list(samples))
    for tab, (gan, images) in zip(tabs, samples.items()):
        with tab:
            latest = images[-1]
            st.image(str(latest), caption=f"{gan}: {latest.name} (latest of {len(images)})")
            earlier = images[-1 - GALLERY_SIZE:-1]
            if earlier:
                st.caption(f"Earlier samples ({len(earlier)} of {len(images) - 1}):")
                columns = st.columns(4)
                for i, image in enumerate(earlier):
                    columns[i % 4].image(str(image), caption=image.stem)
    if missing:
        st.caption("No samples yet for " + ", ".join(missing) + ": "
                   + ", ".join(f"`dvc repro train_gan@{g}`" for g in missing) + ".")

# ---- synthetic validation -----------------------------------------------------------------------
st.subheader("Synthetic-data validation")
found = ds.check_warehouse(cfg)
if isinstance(found, ds.WarehouseProblem):
    getattr(st, found.severity)(found.message)
    st.stop()
wh = found
validation = ds.load_synthetic_validation(wh.path, wh.stamp)
if validation is None:
    st.info("The warehouse has no `synthetic_validation` table yet: it was built by an older seglab. "
            "Run `seglab ingest` (or `dvc repro`) to upgrade it.")
elif validation.empty:
    st.info("No synthetic-data validation in the warehouse yet. It is written when the GAN stages "
            "synthesize and validate data: run `dvc repro` after "
            + ", ".join(f"`train_gan@{g}`" for g in ds.GAN_NAMES) + ".")
else:
    st.dataframe(validation, hide_index=True)
    st.caption(f"{len(validation)} rows; columns: " + ", ".join(map(str, validation.columns)))

# ---- per-class effect ---------------------------------------------------------------------------
st.subheader("Per-class effect of each augmenter")
metric = st.selectbox("Score", ["iou", "dice", "precision", "recall"],
                      format_func=ds.PER_CLASS_LABELS.get, key="gan_metric")
try:
    # Per pair, aggregated in DuckDB; the per-class rows of the first CHART_RUNS pairs only.
    summary = ds.load_augmenter_effect_summary(wh.path, wh.stamp, metric)
    effects = ds.load_augmenter_effects(wh.path, wh.stamp, metric, ds.CHART_RUNS)
except SchemaError as e:  # a warehouse older than the pairing view: it says how to upgrade
    st.warning(str(e))
    st.stop()
if effects.empty:
    st.info("No run in the warehouse was trained with a GAN augmenter yet (an augmented run names it "
            "in its train.json / eval.json as `augmenter`; params.yaml's `<model>+<gan>` entries, e.g. "
            "`dvc repro 'train@unet_mobilenetv2_imagenet+pix2pix'`, train them). Its effect is measured "
            "against the run of the same configuration and seed trained without one, as in `seglab report`.")
else:
    effects["pair"] = (effects["augmenter"] + ": " + effects["name"] + " vs " + effects["baseline_name"]
                       + " (" + effects["variant"] + ")")
    classes = list(dict.fromkeys(effects.sort_values("class_index")["class_name"]))
    pairs = list(dict.fromkeys(effects["pair"]))
    label = f"{ds.PER_CLASS_LABELS[metric]} change"
    if len(pairs) < len(summary):
        st.caption(f"The first {len(pairs)} of {len(summary)} pairs (by augmenter and run); the table "
                   "below has every pair.")
    st.altair_chart(
        ds.heatmap(effects, x="class_name", y="pair", value="delta", x_order=classes, y_order=pairs,
                   title=label, diverging=True,
                   tooltip=["pair", "class_name", "augmented", "baseline", "delta"]),
        width="content",
    )
    st.dataframe(summary, hide_index=True,
                 column_config={"mean_change": st.column_config.NumberColumn(format="%+.3f")})
    st.caption("Change = augmented - baseline, per class; red: the augmenter hurt the class.")
    # A variant whose synthetic data was all rejected trained on real data only: its difference to
    # the baseline is not the augmenter's doing, and the page must not let it pass for that.
    real_only = sorted(set(summary.loc[summary["synthetic_images_used"].eq(0), "name"]))
    if real_only:
        st.warning("Trained on real data only (the synthetic-data gate accepted no sample, so these are "
                   "not augmenter effects): " + ", ".join(f"`{name}`" for name in real_only) + ".")
