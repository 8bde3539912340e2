"""Scheduled retraining: run the pipeline only when `dvc status` says data, code or params changed.

`retrain_if_changed` asks DVC what is out of date (`dvc status --json`). Nothing: it logs
"nothing changed", publishes a Markdown artifact saying so and returns without running a stage.
Otherwise it snapshots the warehouse leaderboard, runs `seglab_pipeline` (whose `ingest` stage
records the new runs in DuckDB), snapshots again, and publishes what changed: the stages DVC
found out of date and why, the new runs, the mIoU delta and rank change of every model.

Run once: ``python -m flows.retrain [--target STAGE ...]``; on a schedule: ``python -m flows.serve``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import (
    PipelineReport,
    markdown_table,
    read_leaderboard,
    resolve_repo,
    run_dvc,
    seglab_pipeline,
    stage_environment,
    warehouse_path,
)

__all__ = [
    "REPORT_ARTIFACT_KEY",
    "LeaderboardChanges",
    "RetrainReport",
    "compare_leaderboards",
    "describe_changes",
    "pending_changes",
    "render_retrain_report",
    "retrain_if_changed",
    "standings",
]

REPORT_ARTIFACT_KEY = "seglab-retrain-report"

# A model's place on the leaderboard: runs are only comparable on the same data and class list,
# and on the same split under the same protocol, where the leaderboard has those (SCOPE_KEYS: a
# warehouse from schema version 5 on has both).
MODEL_KEY = ["dataset", "class_set", "name", "variant"]
SCOPE_KEYS = ("split", "eval_protocol")


def _model_key(*boards: pd.DataFrame | None) -> list[str]:
    """MODEL_KEY plus the SCOPE_KEYS every given board has."""
    present = [b for b in boards if b is not None and not b.empty]
    return MODEL_KEY[:2] + [k for k in SCOPE_KEYS if present and all(k in b.columns for b in present)] + MODEL_KEY[2:]


# ---- what DVC says is out of date -----------------------------------------------------------


def pending_changes(repo: Path, targets: list[str] | None = None,
                    env: dict[str, str] | None = None) -> dict[str, list[Any]]:
    """`dvc status --json` (for `targets` and their upstream stages, or the whole project):
    {stage: [change entries]}, empty when everything is up to date."""
    args = ["status", "--json"] + (["--with-deps", *targets] if targets else [])
    text = run_dvc(args, repo, env).stdout.strip()
    try:
        status = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise RuntimeError(f"`dvc {' '.join(args)}` in {repo} printed no JSON ({e}): {text[:300]!r}") from None
    if not isinstance(status, dict):
        raise RuntimeError(f"`dvc {' '.join(args)}` in {repo}: expected a JSON object, got {text[:300]!r}")
    return status


def describe_changes(status: dict[str, list[Any]]) -> list[str]:
    """One readable line per out-of-date stage, e.g.
    "shard: changed deps: params.yaml (shard: modified); changed outs: data/shards (deleted)"."""

    def item(path: str, what: Any) -> str:
        if isinstance(what, dict):  # params: {"params.yaml": {"shard": "modified"}}
            return f"{path} ({', '.join(f'{k}: {v}' for k, v in what.items())})"
        return f"{path} ({what})"

    lines = []
    for stage, entries in status.items():
        parts = []
        for entry in entries if isinstance(entries, list) else [entries]:
            if isinstance(entry, dict):
                for kind, changed in entry.items():
                    if isinstance(changed, dict):
                        parts.append(f"{kind}: " + ", ".join(item(p, w) for p, w in changed.items()))
                    else:
                        parts.append(f"{kind}: {changed}")
            else:
                parts.append(str(entry))  # e.g. "always changed", "changed checksum"
        lines.append(f"{stage}: {'; '.join(parts) or 'changed'}")
    return lines


# ---- leaderboard before / after ---------------------------------------------------------------


def standings(board: pd.DataFrame | None, key: list[str] | None = None) -> pd.DataFrame:
    """Each model's latest run (by evaluated_at) and its rank by mIoU (1 = best) within its
    dataset and class set (and split and protocol: `_model_key`). One row per model key."""
    key = key if key is not None else _model_key(board)
    columns = [*key, "run_id", "miou", "rank"]
    if board is None or board.empty:
        return pd.DataFrame({c: pd.Series(dtype="float64" if c == "miou" else "object") for c in columns})
    latest = (board.sort_values(["evaluated_at", "run_id"], na_position="first")
              .groupby(key, dropna=False, sort=False).tail(1).copy())
    scope = [k for k in key if k not in ("name", "variant")]
    latest["rank"] = (latest.groupby(scope, dropna=False)["miou"]
                      .rank(ascending=False, method="min", na_option="bottom").astype("Int64"))
    return latest[columns].reset_index(drop=True)


@dataclass
class LeaderboardChanges:
    new_runs: pd.DataFrame      # leaderboard rows whose run_id was not there before
    removed_runs: pd.DataFrame  # rows that were there before and are gone (e.g. replaced by a retrain)
    models: pd.DataFrame        # one row per model: run ids, mIoU and rank before/after, delta, change

    @property
    def changed_models(self) -> pd.DataFrame:
        return self.models[self.models["change"] != "unchanged"]

    @property
    def empty(self) -> bool:
        return self.new_runs.empty and self.removed_runs.empty and self.changed_models.empty


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)) or (isinstance(b, float) and math.isnan(b)):
        return pd.isna(a) and pd.isna(b)
    return a == b


def compare_leaderboards(before: pd.DataFrame | None, after: pd.DataFrame | None) -> LeaderboardChanges:
    """What changed between two snapshots of the warehouse leaderboard.

    A model's `change` is: new model | removed | retrained (a new run, e.g. params changed) |
    re-evaluated (same run, new scores) | rank changed (others moved) | unchanged.
    """
    empty = pd.DataFrame(columns=["run_id"])
    before = before if before is not None else empty
    after = after if after is not None else empty
    new_runs = after[~after["run_id"].isin(before["run_id"])].reset_index(drop=True)
    removed_runs = before[~before["run_id"].isin(after["run_id"])].reset_index(drop=True)

    key = _model_key(before, after)
    merged = standings(before, key).merge(standings(after, key), on=key, how="outer", suffixes=("_before", "_after"))
    merged["miou_delta"] = merged["miou_after"] - merged["miou_before"]

    def change(row: pd.Series) -> str:
        if pd.isna(row["run_id_before"]):
            return "new model"
        if pd.isna(row["run_id_after"]):
            return "removed"
        if row["run_id_before"] != row["run_id_after"]:
            return "retrained"
        if not _same(row["miou_before"], row["miou_after"]):
            return "re-evaluated"
        if not _same(row["rank_before"], row["rank_after"]):
            return "rank changed"
        return "unchanged"

    merged["change"] = merged.apply(change, axis=1) if not merged.empty else pd.Series(dtype="object")
    merged = merged.sort_values(["dataset", "class_set", "rank_after", "name", "variant"],
                                na_position="last").reset_index(drop=True)
    return LeaderboardChanges(new_runs=new_runs, removed_runs=removed_runs, models=merged)


def _number(value: Any, signed: bool = False) -> str:
    if value is None or pd.isna(value):
        return "–"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _rank(value: Any) -> str:
    return "–" if value is None or pd.isna(value) else str(int(value))


def render_retrain_report(status: dict[str, list[Any]], pipeline: PipelineReport | None,
                          changes: LeaderboardChanges | None, error: BaseException | None = None,
                          leaderboard_note: str | None = None) -> str:
    """The Markdown of the retraining artifact; `leaderboard_note` replaces the leaderboard section."""
    if not status:
        return ("# seglab retraining: nothing changed\n\n`dvc status` reports every stage up to date "
                "(data, code and params as recorded in dvc.lock), so nothing was run.\n")
    lines = [f"# seglab retraining: {'FAILED' if error else 'done'}", "",
             f"## Why: {len(status)} stage(s) out of date (`dvc status`)", ""]
    lines += [f"- {line}" for line in describe_changes(status)]
    if pipeline is not None:
        lines += ["", "## Stages", "", f"{pipeline.headline()}.", ""]
        lines.append(markdown_table([{"stage": f"`{s.stage}`", "result": s.status, "attempts": s.attempts or "",
                                      "note": s.detail} for s in pipeline.stages],
                                    ["stage", "result", "attempts", "note"]))
    if error is not None:
        lines += ["", "## Error", "", "```", str(error)[:4000], "```"]
    lines += ["", "## Leaderboard"]
    if leaderboard_note is not None:
        lines += ["", leaderboard_note]
    elif changes is None:
        lines += ["", "Not compared (the warehouse could not be read)."]
    elif changes.empty:
        lines += ["", f"Unchanged: {len(changes.models)} model(s), no new runs."]
    else:
        lines += ["", f"{len(changes.new_runs)} new run(s) recorded in the warehouse, "
                      f"{len(changes.removed_runs)} replaced or removed.", ""]
        rows = [{"model": f"`{r['name']}`", "variant": r["variant"], "dataset": r["dataset"],
                 "change": r["change"], "mIoU before": _number(r["miou_before"]),
                 "mIoU after": _number(r["miou_after"]), "Δ mIoU": _number(r["miou_delta"], signed=True),
                 "rank": f"{_rank(r['rank_before'])} → {_rank(r['rank_after'])}",
                 "run": r["run_id_after"] if not pd.isna(r["run_id_after"]) else r["run_id_before"]}
                for _, r in changes.changed_models.iterrows()]
        lines.append(markdown_table(rows, ["model", "variant", "dataset", "change", "mIoU before", "mIoU after",
                                           "Δ mIoU", "rank", "run"]))
    return "\n".join(lines) + "\n"


@dataclass
class RetrainReport:
    retrained: bool
    status: dict[str, list[Any]]
    pipeline: PipelineReport | None = None
    leaderboard: LeaderboardChanges | None = None
    markdown: str = ""


def _snapshot(path: Path, logger) -> tuple[pd.DataFrame | None, bool]:
    # A warehouse that cannot be read must not stop retraining (the ingest stage rebuilds it).
    try:
        return read_leaderboard(path), True
    except Exception as e:
        logger.warning("cannot read the leaderboard from %s: %s", path, e)
        return None, False


@flow(name="seglab-retrain", description="Retrain when `dvc status` reports changed data, code or params")
def retrain_if_changed(repo: str = ".", targets: list[str] | None = None, retries: int = 3,
                       retry_backoff_seconds: float = 30.0, keep_going: bool = False,
                       env: dict[str, str] | None = None) -> RetrainReport:
    """Run `seglab_pipeline(targets)` if `dvc status` finds anything out of date; report what changed."""
    logger = get_run_logger()
    repo_path = resolve_repo(repo)
    status = pending_changes(repo_path, targets, stage_environment(env))
    if not status:
        logger.info("nothing changed: dvc status reports every stage up to date; not retraining")
        markdown = render_retrain_report(status, None, None)
        create_markdown_artifact(key=REPORT_ARTIFACT_KEY, markdown=markdown,
                                 description="seglab retraining: nothing changed")
        return RetrainReport(retrained=False, status=status, markdown=markdown)

    for line in describe_changes(status):
        logger.info("out of date: %s", line)
    warehouse = warehouse_path(repo_path)
    before, before_ok = _snapshot(warehouse, logger)
    state = seglab_pipeline(targets=targets, repo=str(repo_path), retries=retries,
                            retry_backoff_seconds=retry_backoff_seconds, keep_going=keep_going, env=env,
                            return_state=True)
    outcome = state.result(raise_on_failure=False)
    error = None if state.is_completed() else outcome
    pipeline = outcome if isinstance(outcome, PipelineReport) else getattr(outcome, "report", None)
    after, after_ok = _snapshot(warehouse, logger)
    changes = compare_leaderboards(before, after) if before_ok and after_ok else None
    note = None
    if before_ok and after_ok and before is None and after is None:
        note = f"No warehouse at `{warehouse}` yet (the `ingest` stage creates it)."
    markdown = render_retrain_report(status, pipeline, changes, error, leaderboard_note=note)
    create_markdown_artifact(key=REPORT_ARTIFACT_KEY, markdown=markdown,
                             description=f"seglab retraining: {len(status)} stage(s) out of date")
    if changes is not None:
        logger.info("leaderboard: %d new run(s), %d model(s) changed", len(changes.new_runs),
                    len(changes.changed_models))
    if error is not None:
        if isinstance(error, BaseException):
            raise error
        raise RuntimeError(f"the pipeline ended in state {state.type.value}: {error!r}")
    return RetrainReport(retrained=True, status=status, pipeline=pipeline, leaderboard=changes,
                         markdown=markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="the DVC project root (default: .)")
    parser.add_argument("--target", action="append", dest="targets",
                        help="limit to this stage and its upstreams (repeatable; default: all stages)")
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--retry-backoff-seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    state = retrain_if_changed(repo=args.repo, targets=args.targets, retries=args.retries,
                               retry_backoff_seconds=args.retry_backoff_seconds, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
