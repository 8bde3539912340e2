"""The runs page's "Predict on an image": upload an image, see the chosen run's model's overlay and legend.

The prediction is `seglab predict`'s own function (`seglab.evaluate.predict.predict_images`) with
the trained model ``<models dir>/<name>/`` (dashboard_support's ``models_dir``: ``--models-dir``,
``SEGLAB_MODELS_DIR`` or params.yaml ``train.out``) and params.yaml's settings (the evaluate
protocol's scale, overlap and batch size, ``predict.overlay_alpha``); TTA (the ``evaluate.tta``
views) is on for a TTA run. The model is loaded once per process and settings and kept
(`st.cache_resource`), reloaded when its files change. TensorFlow is imported only when an image
is uploaded, so the page itself stays quick.
"""

from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path
from typing import Any

import streamlit as st

import dashboard_support as ds
from seglab.config import ConfigError, load_config


def _model_stamp(folder: Path) -> tuple[int, ...] | None:
    """(mtime_ns, size) of model.keras and train.json, None where either is missing."""
    stamp: tuple[int, ...] = ()
    for name in ("model.keras", "train.json"):
        try:
            info = (folder / name).stat()
        except FileNotFoundError:
            return None
        stamp += (info.st_mtime_ns, info.st_size)
    return stamp


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def _segmenter(models_dir: str, name: str, stamp: tuple[int, ...], tta: bool, settings: str, _cfg: Any):
    # `stamp` and `settings` (the params that shape the predictor) are the cache key: a retrained
    # model or changed params load anew. `_cfg` is not hashed.
    from seglab.evaluate.predict import load_segmenter

    return load_segmenter(_cfg, name, tta=tta, models_dir=models_dir)


def _legend(pixels: dict[str, int], classes: list[str]) -> str:
    """Markdown of the overlay's legend (`legend_entries`): a colour swatch, the class and its share."""
    from seglab.data.palette import label_palette
    from seglab.evaluate.predict import legend_entries

    palette = label_palette()
    rows = []
    for value, text in legend_entries(pixels, classes):
        red, green, blue = (int(c) for c in palette[value])
        rows.append(f'<span style="display:inline-block;width:1em;height:1em;border:1px solid #000;'
                    f'background:rgb({red},{green},{blue});vertical-align:middle"></span> {html.escape(text)}')
    return "  \n".join(rows)


def show(cfg: ds.Settings, details: dict[str, Any]) -> None:
    """The section for the run `details` (dashboard_queries.run_details)."""
    st.subheader("Predict on an image")
    name, variant = str(details["name"]), str(details["variant"])
    if variant == "ensemble":
        st.info("An ensemble has no single trained model to predict with; choose one of its members' runs.")
        return
    folder = cfg.models_dir / name
    stamp = _model_stamp(folder)
    if stamp is None:
        st.info(f"No trained model for {name} at `{folder}` (model.keras and train.json). Train it with "
                f"`dvc repro train@{name}`, or point the dashboard at the models with `--models-dir DIR`.")
        return
    try:
        params = load_config(ds.REPO_ROOT / "params.yaml")
    except ConfigError as e:
        st.error(f"Predicting needs the settings in params.yaml: {e}")
        return
    tta = variant == "tta"
    settings = json.dumps({"evaluate": params.evaluate.model_dump(mode="json"),
                           "predict": params.predict.model_dump(mode="json")}, sort_keys=True)
    upload = st.file_uploader(f"An image for {name}: its label map as an overlay, at the image's resolution",
                              key="runs_predict_upload",
                              help="The same prediction as `seglab predict` (README, \"Predict on new images\").")
    if upload is None:
        st.caption(f"Model `{folder}`; " + ("TTA with the evaluate.tta views, as this run." if tta else
                                             "plain softmax, as this run; a TTA run predicts with TTA."))
        return
    try:
        segmenter = _segmenter(str(cfg.models_dir), name, stamp, tta, settings, params)
    except (ValueError, FileNotFoundError) as e:  # a broken model folder: load_trained names the file
        ds.show_error(e)
        return
    if details.get("params_hash") and segmenter.trained.info.get("params_hash") != details["params_hash"]:
        st.warning(f"The model in `{folder}` was trained with other settings than this run (params hash "
                   f"{str(segmenter.trained.info.get('params_hash'))[:12]} vs {str(details['params_hash'])[:12]}): "
                   "the overlay is that model's.")
    from seglab.evaluate.predict import predict_images

    with tempfile.TemporaryDirectory(prefix="seglab-upload-") as tmp:
        # The upload's own file name (never a path), so messages and outputs are named after it.
        path = Path(tmp) / (Path(upload.name).name or "upload")
        path.write_bytes(upload.getvalue())
        report = predict_images(segmenter, [path], Path(tmp) / "out", overlay_alpha=params.predict.overlay_alpha)
        for error in report.errors:
            st.error(f"{upload.name}: {error.error}. " + error.message.replace(f"{tmp}/", ""))
        for written in report.written:
            overlay = Path(written.overlay).read_bytes()
            st.image(overlay, caption=f"{upload.name} ({written.width}x{written.height}): {name} "
                                      f"{'with TTA ' + ', '.join(report.tta) if report.tta else 'plain'}, "
                                      "overlay and legend")
            st.markdown("**Classes present**  \n" + _legend(written.classes, segmenter.classes),
                        unsafe_allow_html=True)
