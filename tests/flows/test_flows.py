"""The Prefect flows against a real temporary Prefect server (prefect_test_harness) and real DVC.

Every flow runs the project's own dvc.yaml/params.yaml/src in a scratch git+DVC repo (a smaller
embedded sample for speed), restricted to the fast data stages. What the server recorded (task
runs, retries, logs, artifacts, deployments) is read back through the Prefect client.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # flows/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(REPO))

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.sorting import LogSort, TaskRunSort  # noqa: E402
from prefect.logging.handlers import APILogHandler  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.pipeline import (  # noqa: E402
    LEADERBOARD_ARTIFACT_KEY,
    SUMMARY_ARTIFACT_KEY,
    PipelineError,
    PipelineFailed,
    _parse_dag_dot,
    classify_failure,
    plan_stages,
    resolve_repo,
    seglab_pipeline,
    stage_graph,
)
from flows.retrain import REPORT_ARTIFACT_KEY, compare_leaderboards, pending_changes, retrain_if_changed  # noqa: E402
from flows.serve import DEPLOYMENT_NAME, build_deployment, retrain_schedule  # noqa: E402

from ..conftest import edit_params, make_scratch_repo  # noqa: E402

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
DATA_STAGES = ["sample", "shard", "validate_data"]


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_server():
    """A real Prefect API server on a temporary SQLite database, for this module."""
    saved = {k: os.environ.get(k) for k in ("PREFECT_SERVER_ANALYTICS_ENABLED", "GX_ANALYTICS_ENABLED")}
    os.environ.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", GX_ANALYTICS_ENABLED="false")
    try:
        with prefect_test_harness(server_startup_timeout=90):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def template_repo(tmp_path_factory) -> Path:
    """A git+DVC repo holding this project's pipeline files; nothing reproduced yet."""
    return make_scratch_repo(tmp_path_factory.mktemp("template") / "repo",
                             lambda p: p["sample"].update(train_images=16, val_images=8))


def _copy(repo: Path, tmp_path: Path) -> Path:
    target = tmp_path / "repo"
    shutil.copytree(repo, target, symlinks=True)
    return target


@pytest.fixture(scope="module")
def first_run(prefect_server, template_repo, tmp_path_factory):
    """The pipeline flow run once on a fresh copy of the template, up to validate_data."""
    repo = _copy(template_repo, tmp_path_factory.mktemp("first"))
    state = seglab_pipeline(targets=["validate_data"], repo=str(repo), retry_backoff_seconds=0.1, return_state=True)
    return repo, state


# ---- reading back what the server recorded ---------------------------------------------------


def _task_runs(flow_run_id):
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC)
    return sorted(runs, key=lambda r: r.start_time or r.expected_start_time)


def _log_text(flow_run_id) -> str:
    APILogHandler().flush()  # logs travel to the API in batches: send what is queued
    messages, offset = [], 0
    with get_client(sync_client=True) as client:
        while True:
            batch = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                     limit=200, offset=offset, sort=LogSort.TIMESTAMP_ASC)
            messages += [log.message for log in batch]
            offset += len(batch)
            if len(batch) < 200:
                return "\n".join(messages)


def _artifact(key: str, flow_run_id):
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return found[0] if found else None


def _child_flow_runs(flow_run_id):
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))


def _lock_stages(repo: Path) -> set[str]:
    return set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"])


# ---- the pipeline flow ------------------------------------------------------------------------


def test_pipeline_runs_the_stages_in_dag_order_and_dvc_writes_the_lock(first_run):
    repo, state = first_run
    assert state.is_completed(), state
    report = state.result()
    assert [(s.stage, s.status, s.attempts) for s in report.stages] == [(s, "ran", 1) for s in DATA_STAGES]

    flow_run_id = state.state_details.flow_run_id
    task_runs = _task_runs(flow_run_id)
    assert [t.name for t in task_runs] == [f"dvc repro {s}" for s in DATA_STAGES]
    assert all(t.state.is_completed() and t.run_count == 1 for t in task_runs)
    # Each stage started only after its upstream finished.
    for upstream, downstream in zip(task_runs, task_runs[1:]):
        assert upstream.end_time <= downstream.start_time

    # DVC, not the flow, recorded the stages: the lock holds them and reports nothing to do.
    assert _lock_stages(repo) >= set(DATA_STAGES)
    assert pending_changes(repo, ["validate_data"]) == {}
    assert json.loads((repo / "data/reports/shard.json").read_text())["splits"]["train"]["images"] == 16

    logs = _log_text(flow_run_id)
    assert "Running stage 'shard'" in logs and '"class_set": "voc20"' in logs  # the stage's own output

    summary = _artifact(SUMMARY_ARTIFACT_KEY, flow_run_id)
    assert summary is not None and "succeeded" in summary.data and "| `validate_data` | ran |" in summary.data
    assert _artifact(LEADERBOARD_ARTIFACT_KEY, flow_run_id) is None  # no warehouse in this repo


def test_second_run_skips_every_stage(first_run, tmp_path):
    repo = _copy(first_run[0], tmp_path)
    lock_before = (repo / "dvc.lock").read_bytes()
    state = seglab_pipeline(targets=["validate_data"], repo=str(repo), return_state=True)
    assert state.is_completed(), state
    assert [(s.stage, s.status) for s in state.result().stages] == [(s, "skipped") for s in DATA_STAGES]
    assert (repo / "dvc.lock").read_bytes() == lock_before
    assert "Stage 'shard' didn't change, skipping" in _log_text(state.state_details.flow_run_id)


def _wrapper(tmp_path: Path, script: str) -> dict[str, str]:
    """A `seglab` earlier on PATH than the real one, for the stage commands only."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "seglab"
    wrapper.write_text("#!/bin/sh\n" + script)
    wrapper.chmod(0o755)
    return {"PATH": os.pathsep.join([str(bin_dir), str(BIN), os.environ["PATH"]]),
            "REAL_SEGLAB": str(BIN / "seglab"), "PYTHON": sys.executable}


def test_transient_failure_is_retried_and_the_flow_succeeds(prefect_server, template_repo, tmp_path):
    repo = _copy(template_repo, tmp_path)
    marker = tmp_path / "killed-once"
    # The first `seglab sample` is SIGKILLed, as the OOM killer would; the retry runs the real command.
    env = _wrapper(tmp_path, f'if [ "$1" = sample ] && [ ! -e {marker} ]; then : > {marker}; kill -KILL $$; fi\n'
                             'exec "$REAL_SEGLAB" "$@"\n')
    state = seglab_pipeline(targets=["sample"], repo=str(repo), retries=2, retry_backoff_seconds=0.2, env=env,
                            return_state=True)
    assert marker.exists()
    assert state.is_completed(), state
    [result] = state.result().stages
    assert (result.stage, result.status, result.attempts) == ("sample", "ran", 2)

    flow_run_id = state.state_details.flow_run_id
    [task_run] = _task_runs(flow_run_id)
    assert task_run.run_count == 2 and task_run.state.is_completed()
    logs = _log_text(flow_run_id)
    # DVC reports the kill as -9 or, when a shell sits between it and the command, as 137.
    assert re.search(r"exited with (-9|137)", logs) and "transient (the stage command was killed by SIGKILL" in logs
    assert "Retry 1/2" in logs
    assert "sample" in _lock_stages(repo)


def test_deterministic_failure_is_not_retried_and_blocks_downstream(prefect_server, template_repo, tmp_path):
    repo = _copy(template_repo, tmp_path)
    edit_params(repo, lambda p: p["data"].update(crowd="maybe"))  # every `seglab` command rejects it
    state = seglab_pipeline(targets=["validate_data"], repo=str(repo), retries=3, retry_backoff_seconds=0.1,
                            keep_going=True, return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PipelineFailed)
    statuses = [(s.stage, s.status, s.attempts) for s in error.report.stages]
    assert statuses == [("sample", "failed", 1), ("shard", "blocked", 0), ("validate_data", "blocked", 0)]
    assert "exited with 2" in error.report.stages[0].detail and "data.crowd" in error.report.stages[0].detail

    flow_run_id = state.state_details.flow_run_id
    [task_run] = _task_runs(flow_run_id)  # shard and validate_data never started
    assert task_run.name == "dvc repro sample" and task_run.run_count == 1 and task_run.state.is_failed()
    logs = _log_text(flow_run_id)
    assert "data.crowd" in logs and "deterministic, not retried" in logs and "Retry" not in logs
    summary = _artifact(SUMMARY_ARTIFACT_KEY, flow_run_id)
    assert "FAILED" in summary.data and "upstream failed: sample" in summary.data
    assert not (repo / "dvc.lock").exists()


@pytest.mark.parametrize(("output", "returncode", "transient"), [
    ("ERROR: failed to reproduce 'train@unet': failed to run: seglab train unet, exited with -9", 255, True),
    ("ERROR: failed to reproduce 'shard': failed to run: seglab shard, exited with 137", 255, True),
    ("ERROR: failed to reproduce 'ingest': failed to run: seglab ingest, exited with 75", 255, True),
    ("ERROR: Unable to acquire lock. Most likely another DVC process is running", 255, True),
    ("Traceback (most recent call last):\n  ...\nrequests.exceptions.ConnectionError: reset by peer\n"
     "ERROR: failed to reproduce 'x': failed to run: seglab x, exited with 1", 255, True),
    ("seglab ingest: error: data/warehouse.duckdb: opened by another process (reading or writing); close it",
     255, True),
    ("ERROR: failed to reproduce 'shard': failed to run: seglab shard, exited with 1", 255, False),
    ("seglab shard: params.yaml: invalid settings:\n  data.crowd: ...\n"
     "ERROR: failed to reproduce 'shard': failed to run: seglab shard, exited with 2", 255, False),
    ("ERROR: failed to reproduce 'validate_data': [Errno 2] No such file or directory: 'data/shards'", 255, False),
    ("ValueError: the message mentions a TimeoutError later on the line", 255, False),
])
def test_failures_are_classified_transient_or_deterministic(output, returncode, transient):
    assert (classify_failure(output, returncode) is not None) is transient


def test_stage_graph_comes_from_dvc_with_foreach_stages_expanded(template_repo):
    order = plan_stages(stage_graph(template_repo))
    models = yaml.safe_load((REPO / "params.yaml").read_text())["models"]
    assert order[:3] == DATA_STAGES and order[-1] == "ingest"
    for name in models:
        assert order.index(f"train@{name}") < order.index(f"evaluate@{name}") < order.index("ingest")
        assert order.index(f"train@{name}") < order.index("ensemble")
    assert plan_stages(stage_graph(template_repo, ["shard"])) == ["sample", "shard"]
    with pytest.raises(PipelineError, match="no_such_stage"):
        stage_graph(template_repo, ["no_such_stage"])
    with pytest.raises(PipelineError, match="not a DVC project"):
        resolve_repo(template_repo / "src")
    with pytest.raises(PipelineError, match="unexpected line"):
        _parse_dag_dot('strict digraph {\n"a" => "b";\n}')
    with pytest.raises(PipelineError, match="cycle"):
        plan_stages({"a": ["b"], "b": ["a"]})


# ---- retraining -------------------------------------------------------------------------------


def test_retrain_is_a_noop_when_dvc_status_is_clean(first_run, tmp_path):
    repo = _copy(first_run[0], tmp_path)
    lock_before = (repo / "dvc.lock").read_bytes()
    state = retrain_if_changed(repo=str(repo), targets=["validate_data"], return_state=True)
    assert state.is_completed(), state
    report = state.result()
    assert report.retrained is False and report.status == {} and report.pipeline is None
    flow_run_id = state.state_details.flow_run_id
    assert _child_flow_runs(flow_run_id) == [] and _task_runs(flow_run_id) == []  # nothing ran
    assert (repo / "dvc.lock").read_bytes() == lock_before
    artifact = _artifact(REPORT_ARTIFACT_KEY, flow_run_id)
    assert artifact.data.startswith("# seglab retraining: nothing changed")
    assert "nothing changed" in _log_text(flow_run_id)


CLASSES = ["background", "person", "car"]
CONFUSION = [[60, 6, 4], [5, 30, 5], [2, 3, 25]]


def _eval_file(path: Path, name: str, arch: str, miou: float, params_hash: str, evaluated_at: str) -> Path:
    """A minimal eval.json following the warehouse contract (issue 4)."""
    cm = pd.DataFrame(CONFUSION)
    per_class = []
    for i, class_name in enumerate(CLASSES):
        tp, support, predicted = int(cm.iloc[i, i]), int(cm.iloc[i].sum()), int(cm[i].sum())
        total = int(cm.values.sum())
        per_class.append({"class_index": i, "class_name": class_name, "iou": tp / (support + predicted - tp),
                          "dice": 2 * tp / (support + predicted), "precision": tp / predicted, "recall": tp / support,
                          "accuracy": (total - support - predicted + 2 * tp) / total, "support": support,
                          "predicted": predicted})
    run = {"run_id": hashlib.sha256(f"{name}plain{params_hash}".encode()).hexdigest()[:16], "name": name,
           "variant": "plain", "split": "val", "model": name, "arch": arch, "weights": None, "dataset": "sample",
           "class_set": "voc20", "classes": CLASSES, "params_hash": params_hash, "evaluated_at": evaluated_at}
    document = {"runs": [{"run": run, "metrics": {"miou": miou, "mdice": miou + 0.1}, "per_class": per_class,
                          "confusion": CONFUSION, "history": []}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def test_retrain_runs_when_a_param_changed_and_reports_the_leaderboard(first_run, tmp_path):
    from seglab.warehouse import ingest_eval

    repo = _copy(first_run[0], tmp_path)
    warehouse = repo / "data" / "warehouse.duckdb"
    evals = tmp_path / "evals"
    ingest_eval(warehouse, _eval_file(evals / "unet/eval.json", "unet", "unet", 0.40, "a" * 8, "2026-01-01T00:00:00"))
    ingest_eval(warehouse, _eval_file(evals / "deeplab/eval.json", "deeplabv3plus_resnet50", "deeplabv3plus_resnet50",
                                      0.50, "b" * 8, "2026-01-01T00:00:00"))
    retrained = _eval_file(tmp_path / "retrained-unet.json", "unet", "unet", 0.60, "c" * 8, "2026-02-01T00:00:00")
    edit_params(repo, lambda p: p["shard"].update(jpeg_quality=90))
    # The train -> evaluate -> ingest stages take minutes; here the re-run shard stage stands in
    # for them by also recording a retrained unet in the warehouse, the way `seglab ingest` does.
    env = _wrapper(tmp_path, '"$REAL_SEGLAB" "$@" || exit $?\n'
                             f'if [ "$1" = shard ]; then cp {retrained} {evals}/unet/eval.json && '
                             '"$PYTHON" -c "import sys; from seglab.warehouse import ingest_eval; '
                             f'ingest_eval(sys.argv[1], sys.argv[2])" {warehouse} {evals}/unet/eval.json; fi\n')

    state = retrain_if_changed(repo=str(repo), targets=["shard"], retry_backoff_seconds=0.1, env=env,
                               return_state=True)
    assert state.is_completed(), state
    report = state.result()
    assert report.retrained is True
    assert report.status == {"shard": [{"changed deps": {"params.yaml": {"shard": "modified"}}}]}
    assert [(s.stage, s.status) for s in report.pipeline.stages] == [("sample", "skipped"), ("shard", "ran")]
    assert pending_changes(repo, ["shard"]) == {}

    models = report.leaderboard.models.set_index("name")
    assert models.loc["unet", "change"] == "retrained"
    assert models.loc["unet", "miou_delta"] == pytest.approx(0.20)
    assert (models.loc["unet", "rank_before"], models.loc["unet", "rank_after"]) == (2, 1)
    assert models.loc["deeplabv3plus_resnet50", "change"] == "rank changed"
    assert list(report.leaderboard.new_runs["name"]) == ["unet"]
    assert list(report.leaderboard.removed_runs["name"]) == ["unet"]  # the same eval.json, re-ingested

    flow_run_id = state.state_details.flow_run_id
    markdown = _artifact(REPORT_ARTIFACT_KEY, flow_run_id).data
    assert "shard: changed deps: params.yaml (shard: modified)" in markdown
    assert "| `unet` | plain | sample | retrained | 0.4000 | 0.6000 | +0.2000 | 2 → 1 |" in markdown
    assert "| `deeplabv3plus_resnet50` | plain | sample | rank changed | 0.5000 | 0.5000 | +0.0000 | 1 → 2 |" in markdown
    [pipeline_run] = _child_flow_runs(flow_run_id)
    board = _artifact(LEADERBOARD_ARTIFACT_KEY, pipeline_run.id).data
    board = json.loads(board) if isinstance(board, str) else board
    assert [(row["name"], row["miou"]) for row in board] == [("unet", 0.6), ("deeplabv3plus_resnet50", 0.5)]


def test_compare_leaderboards_ranks_within_a_dataset_and_names_each_change():
    def board(rows):
        frame = pd.DataFrame(rows, columns=["run_id", "name", "variant", "dataset", "class_set", "miou",
                                            "evaluated_at"])
        frame["evaluated_at"] = pd.to_datetime(frame["evaluated_at"], utc=True)
        return frame

    before = board([("r1", "unet", "plain", "sample", "voc20", 0.3, "2026-01-01"),
                    ("r2", "unet", "tta", "sample", "voc20", 0.35, "2026-01-01"),
                    ("r3", "old", "plain", "sample", "voc20", 0.1, "2026-01-01"),
                    ("r4", "unet", "plain", "coco-mini", "all80", 0.2, "2026-01-01")])
    after = board([("r1", "unet", "plain", "sample", "voc20", 0.3, "2026-01-01"),
                   ("r2", "unet", "tta", "sample", "voc20", 0.25, "2026-01-02"),  # same run, re-evaluated
                   ("r5", "lite", "plain", "sample", "voc20", None, "2026-01-02"),  # mIoU undefined: last
                   ("r4", "unet", "plain", "coco-mini", "all80", 0.2, "2026-01-01")])
    changes = compare_leaderboards(before, after)
    rows = {(r["dataset"], r["name"], r["variant"]): r for _, r in changes.models.iterrows()}
    assert rows[("sample", "unet", "tta")]["change"] == "re-evaluated"
    assert rows[("sample", "unet", "tta")]["miou_delta"] == pytest.approx(-0.10)
    assert rows[("sample", "unet", "plain")]["change"] == "rank changed"  # 2 -> 1 as tta fell behind
    assert rows[("sample", "lite", "plain")]["change"] == "new model"
    assert rows[("sample", "lite", "plain")]["rank_after"] == 3
    assert rows[("sample", "old", "plain")]["change"] == "removed"
    assert rows[("coco-mini", "unet", "plain")]["change"] == "unchanged"
    assert rows[("coco-mini", "unet", "plain")]["rank_after"] == 1  # ranked only against its own dataset
    assert list(changes.new_runs["run_id"]) == ["r5"] and list(changes.removed_runs["run_id"]) == ["r3"]
    assert compare_leaderboards(None, None).empty and compare_leaderboards(before, before).empty


# ---- the deployment ---------------------------------------------------------------------------


def test_deployment_is_registered_with_the_cron_schedule_from_params(prefect_server, template_repo, tmp_path):
    repo = _copy(template_repo, tmp_path)
    edit_params(repo, lambda p: p["schedule"].update(cron="30 4 * * 2", timezone="Europe/Paris"))
    deployment_id = build_deployment(repo, targets=["validate_data"]).apply()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"seglab-retrain/{DEPLOYMENT_NAME}")
    assert deployment.id == deployment_id
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("30 4 * * 2", "Europe/Paris", True)
    assert deployment.parameters == {"repo": str(repo.resolve()), "targets": ["validate_data"]}
    assert deployment.entrypoint.endswith("flows/retrain.py:retrain_if_changed")

    # The project's own params.yaml carries the default weekly schedule.
    default = retrain_schedule(REPO)
    assert (default.cron, default.timezone) == (yaml.safe_load((REPO / "params.yaml").read_text())["schedule"]["cron"],
                                                "UTC")
    with pytest.raises(ValueError, match="schedule.timezone.*Mars/Olympus"):
        edit_params(repo, lambda p: p["schedule"].update(timezone="Mars/Olympus"))
        retrain_schedule(repo)
