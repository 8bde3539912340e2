"""`seglab report`: the warehouse's results as Markdown tables.

Seven sections, each over the latest run of every model (filters: dataset, class set, variant):
(a) every run, best mIoU first; (b) the floor they must beat, the constant prediction of the most
frequent class; (c) IoU per class of every run; (d) each trained run's validation mIoU per epoch;
(e) mean ± std over seed replicates (the ``seed_summary`` view); (f) what each GAN augmenter changes
in mIoU against the real-only runs of the same seeds (``augmenter_effect``); (g) the same per class
for IoU (``augmenter_effect_per_class``), classes as rows and one column per augmenter. The
warehouse is opened read-only: the report never changes it (DVC tracks the file).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from seglab.atomic import write_text_atomic
from seglab.warehouse import queries
from seglab.warehouse.schema import SchemaError, WarehouseError

__all__ = ["ReportError", "render_report", "run_report"]

MISSING = "—"
# The keys that tell apart results that must never be compared (other data, classes, split or
# protocol; the training data, which a model evaluated on another dataset does not share).
_SCOPE = (("dataset", "dataset"), ("class_set", "class set"), ("split", "split"),
          ("eval_protocol", "protocol"), ("train_dataset", "trained on"))
# What identifies a configuration besides its scope, variant and augmenter.
_MODEL_KEYS = ("arch", "weights", "width", "image_size", "batch_size", "epochs_planned")


class ReportError(WarehouseError, ValueError):
    """The report cannot be made from this warehouse (missing, locked, too old); a bad-input error."""


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


def _text(value: Any) -> str:
    if _missing(value):
        return MISSING
    return str(value).replace("|", "\\|")  # a pipe would end the Markdown cell


def _number(value: Any, digits: int = 3, *, signed: bool = False) -> str:
    if _missing(value):
        return MISSING
    return f"{float(value):{'+' if signed else ''}.{digits}f}"


def _integer(value: Any) -> str:
    return MISSING if _missing(value) else f"{int(value):,}"


def _width(value: Any) -> str:
    return MISSING if _missing(value) else f"{float(value):g}"


def _listed(values: Any) -> str:
    if values is None:
        return MISSING
    return ", ".join(_integer(v) if isinstance(v, (int, float)) else _text(v) for v in values)


def mean_std(mean: Any, std: Any, n: Any, *, signed: bool = False) -> str:
    """``0.412 ± 0.013 (n=3)``; without the ± part when the std is undefined (n = 1)."""
    count = 0 if _missing(n) else int(n)
    if _missing(mean):
        return f"{MISSING} (n={count})"
    if _missing(std):
        return f"{_number(mean, signed=signed)} (n={count})"
    return f"{_number(mean, signed=signed)} ± {_number(std)} (n={count})"


def _table(columns: Sequence[tuple[str, str, Callable[[pd.Series], str]]], frame: pd.DataFrame) -> str:
    """A Markdown table: one (header, alignment 'l'|'r', cell function of the row) per column."""
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
             "|" + "|".join("---:" if align == "r" else "---" for _, align, _ in columns) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(cell(row) for _, _, cell in columns) + " |")
    return "\n".join(lines)


def _scope_columns(frames: Sequence[pd.DataFrame]) -> list[tuple[str, str, Callable]]:
    """Dataset, class set and split columns, but only those that differ between rows."""
    columns = []
    for key, header in _SCOPE:
        values = set()
        for frame in frames:
            if key in frame:
                values.update(_text(v) for v in frame[key])
        if len(values) > 1:
            columns.append((header, "l", lambda row, key=key: _text(row[key])))
    return columns


def _model_columns() -> list[tuple[str, str, Callable]]:
    return [
        ("arch", "l", lambda r: _text(r["arch"])),
        ("weights", "l", lambda r: _text(r["weights"])),
        ("width", "r", lambda r: _width(r["width"])),
        ("size", "r", lambda r: _integer(r["image_size"])),
        ("batch", "r", lambda r: _integer(r["batch_size"])),
        ("epochs", "r", lambda r: _integer(r["epochs_planned"])),
    ]


def _latest_section(runs: pd.DataFrame, scope: list) -> str:
    if runs.empty:
        return "No runs in the warehouse for these filters."
    return _table([
        *scope,
        ("name", "l", lambda r: _text(r["name"])),
        ("variant", "l", lambda r: _text(r["variant"])),
        ("arch", "l", lambda r: _text(r["arch"])),
        ("weights", "l", lambda r: _text(r["weights"])),
        ("width", "r", lambda r: _width(r["width"])),
        ("augmenter", "l", lambda r: _text(r["augmenter"])),
        ("seed", "r", lambda r: _integer(r["seed"])),
        ("mIoU", "r", lambda r: _number(r["miou"])),
        ("mDice", "r", lambda r: _number(r["mdice"])),
        ("pixel acc", "r", lambda r: _number(r["accuracy"])),
        ("params", "r", lambda r: _integer(r["param_count"])),
        ("s/epoch", "r", lambda r: _number(r["seconds_per_epoch"], 1)),
        ("images/s", "r", lambda r: _number(r["images_per_second"], 1)),
    ], runs)


def _constant_section(constant: pd.DataFrame | None) -> str:
    if constant is None:
        return ("This warehouse predates schema version 5, which records how runs were scored; run "
                "`seglab ingest` (or `dvc repro`) to upgrade it.")
    if constant.empty:
        return "No per-class results to derive it from."
    table = _table([
        ("dataset", "l", lambda r: _text(r["dataset"])),
        ("class set", "l", lambda r: _text(r["class_set"])),
        ("split", "l", lambda r: _text(r["split"])),
        ("protocol", "l", lambda r: _text(r["eval_protocol"])),
        ("input", "r", lambda r: _integer(r["image_size"])),
        ("class predicted", "l", lambda r: _text(r["class_name"])),
        ("its pixel share", "r", lambda r: _number(r["share"])),
        ("classes in truth", "r", lambda r: _integer(r["classes_present"])),
        ("mIoU", "r", lambda r: _number(r["miou"], 4)),
    ], constant)
    return ("What predicting the most frequent truth class everywhere scores (its IoU is its pixel "
            "share, every other class present scores 0): a model at this mIoU has learnt nothing "
            "beyond the class frequencies. Input: the letterbox size the pixels were counted at "
            "(full-resolution runs count at the stored size).\n\n" + table)


def _per_class_iou_section(con, runs: pd.DataFrame, variant: str | None) -> str:
    if runs.empty:
        return "No runs in the warehouse for these filters."
    blocks = []
    for (dataset, class_set, split), _ in runs.groupby(["dataset", "class_set", "split"], sort=False):
        matrix = queries.per_class_matrix(con, "iou", dataset=dataset, class_set=class_set,
                                          split=split, variant=variant)
        if matrix.empty:
            continue
        frame = matrix.reset_index()
        classes = list(matrix.columns)
        table = _table([("name", "l", lambda r: _text(r["name"])),
                        ("variant", "l", lambda r: _text(r["variant"])),
                        *[(_text(c), "r", lambda r, c=c: _number(r[c])) for c in classes]], frame)
        blocks.append(f"### {_text(dataset)} / {_text(class_set)} ({_text(split)})\n\n{table}")
    if not blocks:
        return "No per-class results for these filters."
    return ("IoU of each class (— : the class is in neither truth nor prediction), best mIoU "
            "first.\n\n" + "\n\n".join(blocks))


def _curves_section(con, runs: pd.DataFrame) -> str:
    # TTA and ensemble rows have no training history of their own: only trained runs get a row.
    found = queries.curves(con, runs["run_id"].tolist()) if not runs.empty else pd.DataFrame()
    if found.empty:
        return "No run with a training history for these filters."
    rows = runs.merge(found, on="run_id")
    table = _table([("name", "l", lambda r: _text(r["name"])),
                    ("best epoch", "r", lambda r: _integer(r["best_epoch"])),
                    ("epochs", "r", lambda r: _integer(r["epochs"])),
                    ("val mIoU after each epoch", "l", lambda r: " ".join(_number(v) for v in r["values"]))],
                   rows)
    return ("The training's own validation after each epoch, which picks the best epoch (letterboxed "
            "thumbnails of the model's input size; the scores above are the evaluation's).\n\n" + table)


def _seed_section(summary: pd.DataFrame, scope: list) -> str:
    if summary.empty:
        return "No model runs for these filters."
    table = _table([
        *scope,
        ("variant", "l", lambda r: _text(r["variant"])),
        *_model_columns(),
        ("augmenter", "l", lambda r: _text(r["augmenter"])),
        ("models", "l", lambda r: _listed(r["models"])),
        ("seeds", "l", lambda r: _listed(r["seeds"])),
        ("mIoU", "r", lambda r: mean_std(r["miou_mean"], r["miou_std"], r["n"])),
        ("mDice", "r", lambda r: mean_std(r["mdice_mean"], r["mdice_std"], r["n"])),
        ("pixel acc", "r", lambda r: mean_std(r["accuracy_mean"], r["accuracy_std"], r["n"])),
    ], summary)
    return ("Mean ± sample standard deviation over the latest runs of the models that share a "
            "configuration (replicates differ only in seed).\n\n" + table)


def _no_effect_line(runs: pd.DataFrame) -> str:
    if runs.empty or runs["augmenter"].isna().all():
        return "No augmented runs."
    return ("No augmented run has a real-only run with the same configuration and seed to be "
            "compared with.")


def _effect_section(effect: pd.DataFrame, runs: pd.DataFrame, scope: list) -> str:
    if effect.empty:
        return _no_effect_line(runs)
    table = _table([
        *scope,
        ("variant", "l", lambda r: _text(r["variant"])),
        *_model_columns(),
        ("augmenter", "l", lambda r: _text(r["augmenter"])),
        ("seeds", "l", lambda r: _listed(r["seeds"])),
        ("real-only mIoU", "r", lambda r: mean_std(r["base_miou_mean"], r["base_miou_std"], r["n_pairs"])),
        ("augmented mIoU", "r",
         lambda r: mean_std(r["augmented_miou_mean"], r["augmented_miou_std"], r["n_pairs"])),
        ("Δ mIoU", "r",
         lambda r: mean_std(r["delta_miou_mean"], r["delta_miou_std"], r["n_pairs"], signed=True)),
        ("synthetic images", "r", lambda r: _number(r["synthetic_images_used"], 0)),
    ], effect)
    text = ("Augmented minus real-only mIoU, paired by seed (same configuration otherwise); "
            "mean ± sample std over the pairs.\n\n" + table)
    if (effect["synthetic_images_used"] == 0).any():
        text += ("\n\nSynthetic images 0: the gate accepted no synthetic sample, so those runs "
                 "trained on real data only; their Δ is no effect of synthetic data.")
    return text


def _group_title(keys: dict[str, Any]) -> str:
    parts = [f"{_text(keys['arch'])}"]
    parts.append(f"weights {_text(keys['weights'])}")
    parts.append(f"width {_width(keys['width'])}")
    parts.append(f"{_integer(keys['image_size'])} px")
    parts.append(f"batch {_integer(keys['batch_size'])}")
    parts.append(f"{_integer(keys['epochs_planned'])} epochs")
    protocol = f", {_text(keys['eval_protocol'])}" if "eval_protocol" in keys else ""
    return (f"{_text(keys['dataset'])} / {_text(keys['class_set'])} ({_text(keys['split'])}{protocol}), "
            f"{_text(keys['variant'])}: " + ", ".join(parts))


def _per_class_section(per_class: pd.DataFrame, runs: pd.DataFrame) -> str:
    if per_class.empty:
        return _no_effect_line(runs)
    # A warehouse from before schema 5 (read, never migrated, here) has no protocol or training data.
    group_keys = [key for key in ("train_dataset", "dataset", "class_set", "split", "eval_protocol")
                  if key in per_class] + ["variant", *_MODEL_KEYS]
    blocks = [("Augmented minus real-only IoU per class, mean ± sample std over the seed pairs "
               "where both IoUs are defined (n counts them).")]
    # dropna=False: NULL weights (random init) or width are configurations too.
    for key_values, group in per_class.groupby(group_keys, dropna=False, sort=False):
        keys = dict(zip(group_keys, key_values))
        augmenters = sorted(group["augmenter"].unique())
        classes = (group[["class_index", "class_name"]].drop_duplicates()
                   .sort_values("class_index").reset_index(drop=True))
        cells = {(row.augmenter, row.class_index): row for row in group.itertuples(index=False)}

        def cell(row: pd.Series, augmenter: str, cells: dict = cells) -> str:
            found = cells.get((augmenter, row["class_index"]))
            if found is None:
                return MISSING
            return mean_std(found.delta_iou_mean, found.delta_iou_std, found.n_pairs, signed=True)

        table = _table([("class", "l", lambda r: _text(r["class_name"])),
                        *[(_text(a), "r", lambda r, a=a: cell(r, a)) for a in augmenters]], classes)
        blocks.append(f"### {_group_title(keys)}\n\n{table}")
    return "\n\n".join(blocks)


def render_report(con, *, dataset: str | None = None, class_set: str | None = None,
                  variant: str | None = None, warehouse: str | Path | None = None) -> tuple[str, dict[str, int]]:
    """The report's Markdown, and how many rows each section has."""
    filters = {"dataset": dataset, "class_set": class_set, "variant": variant}
    runs = queries.latest_runs(con, **filters)
    summary = queries.seed_summary(con, **filters)
    effect = queries.augmenter_effect(con, **filters)
    per_class = queries.augmenter_effect_per_class(con, **filters)
    try:
        constant = queries.constant_prediction(con, **filters)
    except SchemaError:  # read-only: a warehouse from before schema 5 is never migrated here
        constant = None
    scope = _scope_columns([runs, summary, effect])
    shown = ", ".join(f"{label} {value if value is not None else 'all'}"
                      for label, value in (("dataset", dataset), ("class set", class_set),
                                           ("variant", variant)))
    header = "# seglab report\n\n"
    if warehouse is not None:
        header += f"Warehouse `{warehouse}`; "
    header += f"{shown}. Latest run of every model; scores on the evaluated split."
    sections = [
        header,
        "## Latest runs\n\n" + _latest_section(runs, scope),
        "## Constant-prediction reference\n\n" + _constant_section(constant),
        "## IoU per class\n\n" + _per_class_iou_section(con, runs, variant),
        "## Training curves\n\n" + _curves_section(con, runs),
        "## Seed replicates\n\n" + _seed_section(summary, scope),
        "## Augmenter effect on mIoU\n\n" + _effect_section(effect, runs, scope),
        "## Augmenter effect per class (IoU)\n\n" + _per_class_section(per_class, runs),
    ]
    counts = {"runs": len(runs), "configurations": len(summary), "augmenter_effects": len(effect)}
    return "\n\n".join(sections) + "\n", counts


def run_report(warehouse: str | Path, *, dataset: str | None = None, class_set: str | None = None,
               variant: str | None = None, out: str | Path | None = None) -> str | dict[str, Any]:
    """The report of the warehouse at `warehouse`: its Markdown, or with `out` a summary of the
    file written there (atomically, so a reader never sees half a report)."""
    path = Path(warehouse)
    if not path.is_file():
        raise ReportError(f"{path}: no warehouse there; run `dvc repro` to build it "
                          "(or `seglab ingest` after evaluating models)")
    try:
        con = queries.connect_read_only(path)
        try:
            markdown, counts = render_report(con, dataset=dataset, class_set=class_set,
                                             variant=variant, warehouse=path)
        finally:
            con.close()
    except ReportError:
        raise
    except WarehouseError as e:
        # Locked, too old or not a warehouse: the message says what to do; no traceback.
        raise ReportError(str(e)) from None
    if out is None:
        return markdown
    write_text_atomic(out, markdown)
    return {"report": str(out), "warehouse": str(path), **counts}
