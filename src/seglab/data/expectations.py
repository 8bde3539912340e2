"""What every Great Expectations gate here shares: an in-memory context whose only output is an HTML
Data Docs site, one Checkpoint run over a pandas frame, and results summarised as JSON entries.

Used by `validate_data` (seglab.data.validate) and `validate_synthetic` (seglab.gan.validate).
GX takes ~2 s to import, so only the functions that run it import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import great_expectations as gx
    import pandas as pd

__all__ = ["DATA_DOCS_SITE", "MAX_ROWS_IN_SUMMARY", "ROW_KEYS", "annotate", "ephemeral_context", "run_checkpoint",
           "summarise_result"]

DATA_DOCS_SITE = "seglab_validation"
# The profile columns that identify a row (a shard image or a synthetic sample) in GX results.
ROW_KEYS = ("shard_split", "image_id", "file_name", "shard_file", "shard_row")
MAX_ROWS_IN_SUMMARY = 100


def annotate(expectation, rule: str, description: str):
    """`expectation` named `rule` (the key summary.json reports it by) and described for the Data Docs."""
    expectation.description = description
    expectation.meta = {"rule": rule}
    return expectation


def ephemeral_context(docs_dir: Path):
    """An in-memory GX context whose only output is the Data Docs site in `docs_dir`."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            DATA_DOCS_SITE: {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def run_checkpoint(context, name: str, suite: "gx.ExpectationSuite", frame: "pd.DataFrame",
                   index_columns: Sequence[str] = ()) -> tuple[Any, list[dict]]:
    """Validate `frame` against `suite` through a Checkpoint `name` that updates the Data Docs.

    Returns the validation result and its summarised entries in suite order (GX returns results
    grouped by metric, not as listed). `index_columns` identify offending rows in the results.
    """
    import great_expectations as gx

    suite = context.suites.add(suite)
    batch = context.data_sources.add_pandas(f"{name}_source").add_dataframe_asset(name) \
        .add_batch_definition_whole_dataframe(f"{name}_all")
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    result_format: dict[str, Any] = {"result_format": "COMPLETE"}
    if index_columns:
        result_format["unexpected_index_column_names"] = list(index_columns)
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=name, validation_definitions=[definition], result_format=result_format,
        actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs", site_names=[DATA_DOCS_SITE])]))
    outcome = checkpoint.run(batch_parameters={"dataframe": frame})
    (validation,) = outcome.run_results.values()
    order = {e.meta["rule"]: i for i, e in enumerate(suite.expectations)}
    entries = sorted((summarise_result(r) for r in validation.results), key=lambda e: order.get(e["rule"], 1e9))
    return validation, entries


def _offending_rows(result: dict) -> list[dict]:
    rows = []
    for entry in result.get("unexpected_index_list") or []:
        if not isinstance(entry, dict):  # GX gives bare indices when no index columns were usable
            rows.append({"row_index": entry})
            continue
        row = {"split": entry.get("shard_split"), "image_id": entry.get("image_id"),
               "file_name": entry.get("file_name"), "shard_file": entry.get("shard_file"),
               "row": entry.get("shard_row")}
        values = {k: v for k, v in entry.items() if k not in ROW_KEYS}
        if values:
            row["values"] = values
        rows.append(row)
    return rows


def summarise_result(result) -> dict:
    """One expectation's result as a JSON entry: rule, success, observed value, offending rows."""
    d = result.to_json_dict()
    config, res = d["expectation_config"], d.get("result") or {}
    exception = d.get("exception_info") or {}
    # GX nests exceptions by metric when a metric fails (e.g. a missing column).
    messages = [exception.get("exception_message")] if exception.get("raised_exception") else []
    messages += [v.get("exception_message") for v in exception.values() if isinstance(v, dict)]
    rows = _offending_rows(res)
    entry = {
        "rule": (config.get("meta") or {}).get("rule", config["type"]),
        "expectation": config["type"],
        "description": config.get("description"),
        "kwargs": {k: v for k, v in config["kwargs"].items() if k != "batch_id"},
        "success": bool(d["success"]),
        "observed": res.get("observed_value"),
        "element_count": res.get("element_count"),
        "unexpected_count": res.get("unexpected_count"),
        "unexpected_percent": res.get("unexpected_percent"),
        "exception": "; ".join(m for m in messages if m) or None,
        "offending_rows": rows[:MAX_ROWS_IN_SUMMARY],
        "offending_rows_total": len(rows),
    }
    if "details" in res:
        entry["details"] = res["details"]
    if "partial_missing_list" in res:
        entry["missing"] = sorted(res["partial_missing_list"], key=str)
    return entry
