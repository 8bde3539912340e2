"""The DVC pipeline as a Prefect flow: one task per stage, DVC still deciding what runs.

`seglab_pipeline` asks DVC for the stage graph (`dvc dag --dot`), then runs every stage in
topological order with `dvc repro --single-item <stage>`. DVC compares each stage with
`dvc.lock`, skips it when nothing changed (or restores it from its run cache), and writes the lock
file itself, so the flow never bypasses DVC's caching. Prefect adds what DVC lacks: retries with
exponential backoff for *transient* failures only (see `classify_failure`), the stage's output
streamed into the run's logs, and artifacts: a summary of what ran and, when the warehouse
exists, its leaderboard as a table.

Run once from the project root: ``python -m flows.pipeline [TARGET ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import task_run as current_task_run
from prefect.tasks import exponential_backoff

__all__ = [
    "LEADERBOARD_ARTIFACT_KEY",
    "SUMMARY_ARTIFACT_KEY",
    "PipelineError",
    "PipelineFailed",
    "PipelineReport",
    "StageFailed",
    "StageResult",
    "TransientStageFailure",
    "classify_failure",
    "leaderboard_table",
    "markdown_table",
    "plan_stages",
    "read_leaderboard",
    "repro_stage",
    "resolve_repo",
    "run_dvc",
    "seglab_pipeline",
    "stage_environment",
    "stage_graph",
    "warehouse_path",
]

SUMMARY_ARTIFACT_KEY = "seglab-pipeline-summary"
LEADERBOARD_ARTIFACT_KEY = "seglab-leaderboard"

# Leaderboard columns worth a glance in the Prefect UI (the warehouse has more).
LEADERBOARD_COLUMNS = ("name", "variant", "miou", "mdice", "accuracy", "miou_fg", "dataset", "class_set",
                       "split", "eval_protocol", "param_count", "images_per_second", "latency_ms_p50",
                       "epochs_run", "run_id", "evaluated_at")

# ---- which failures are worth retrying --------------------------------------------------------
# A retry only helps when the cause is outside the stage's inputs: the machine, the network, or
# another process holding a lock. Bad params, bad data or a bug fail the same way every time.

TRANSIENT_EXIT_STATUSES: dict[int, str] = {
    -9: "was killed by SIGKILL (the kernel's OOM killer or an evicting scheduler)",
    137: "was killed by SIGKILL (exit 137: the kernel's OOM killer or an evicting scheduler)",
    -15: "was terminated by SIGTERM (preemption or a node drain)",
    143: "was terminated by SIGTERM (exit 143: preemption or a node drain)",
    75: "exited with 75 (EX_TEMPFAIL: the command reports a temporary failure)",
}

TRANSIENT_OUTPUT_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"Unable to acquire lock"), "another DVC process holds the repository lock"),
    (re.compile(r"is busy, it is being blocked by"), "another DVC process holds a lock on a stage's files"),
    (re.compile(r"opened by another process"), "another process holds the DuckDB warehouse open"),
    # The last line of an uncaught Python exception from the network stack.
    (re.compile(r"^(?:[\w.]+\.)?(?:ConnectionError|ConnectionResetError|ConnectionRefusedError|"
                r"ConnectionAbortedError|TimeoutError|RemoteDisconnected|ReadTimeout|ConnectTimeout)\b",
                re.MULTILINE),
     "a network error (connection refused, reset or timed out)"),
)

_DVC_STAGE_EXIT = re.compile(r"failed to run: .*, exited with (-?\d+)")


def classify_failure(output: str, returncode: int) -> str | None:
    """Why a failed `dvc repro` is worth retrying, or None when the failure is deterministic.

    `output` is what `dvc repro` printed (stdout and stderr); DVC reports the stage command's
    own exit status as "failed to run: <cmd>, exited with N".
    """
    stage_exit = _DVC_STAGE_EXIT.search(output)
    if stage_exit is not None and int(stage_exit.group(1)) in TRANSIENT_EXIT_STATUSES:
        return f"the stage command {TRANSIENT_EXIT_STATUSES[int(stage_exit.group(1))]}"
    if returncode in TRANSIENT_EXIT_STATUSES and returncode < 0:
        return f"dvc itself {TRANSIENT_EXIT_STATUSES[returncode]}"
    for pattern, reason in TRANSIENT_OUTPUT_PATTERNS:
        if pattern.search(output):
            return reason
    return None


_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit)\b:?.*$")


def _failure_summary(output: str, returncode: int) -> str:
    """DVC's own error line, plus the cause above it: the `seglab <stage>:` error message the CLI
    printed (with up to 3 detail lines), else the last Python exception line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    dvc_error = next((line for line in reversed(lines) if line.startswith("ERROR:")), None)
    cli_error = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("seglab ")), None)
    if cli_error is not None:
        detail = [line for line in lines[cli_error + 1:cli_error + 4] if not line.startswith("ERROR:")]
        cause = " ".join([lines[cli_error], *detail])
    else:
        cause = next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)), None)
    summary = dvc_error[len("ERROR:"):].strip() if dvc_error else f"dvc repro exited with {returncode}"
    if cause and len(cause) > 300:  # e.g. an exception that prints a whole tensor
        cause = cause[:300] + " …"
    return f"{summary} ({cause})" if cause and cause not in summary else summary


class PipelineError(RuntimeError):
    """The DVC project cannot be read or planned (not a DVC repo, bad dvc.yaml, unknown target)."""


class StageFailed(RuntimeError):
    """`dvc repro --single-item <stage>` failed; the message ends with the tail of its output."""

    def __init__(self, stage: str, returncode: int, output_tail: str, attempt: int,
                 transient_reason: str | None = None) -> None:
        self.stage = stage
        self.returncode = returncode
        self.output_tail = output_tail
        self.attempt = attempt
        self.transient_reason = transient_reason
        kind = f"transient: {transient_reason}" if transient_reason else "deterministic, not retried"
        last_lines = "\n".join(output_tail.splitlines()[-15:])
        super().__init__(f"stage {stage!r} failed on attempt {attempt} ({kind}): "
                         f"{_failure_summary(output_tail, returncode)}\n{last_lines}")


class TransientStageFailure(StageFailed):
    """A stage failure that the task's retry policy retries (see `classify_failure`)."""


# ---- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageResult:
    """What happened to one stage: ran | skipped (unchanged) | restored (DVC run cache) |
    failed | blocked (an upstream stage failed) | not run (stopped after a failure)."""

    stage: str
    status: str
    attempts: int = 0
    seconds: float = 0.0
    detail: str = ""


@dataclass
class PipelineReport:
    repo: str
    targets: list[str] | None
    stages: list[StageResult] = field(default_factory=list)
    leaderboard: Any = None  # pandas DataFrame of the warehouse leaderboard, when it exists

    def with_status(self, *statuses: str) -> list[str]:
        return [s.stage for s in self.stages if s.status in statuses]

    @property
    def ran(self) -> list[str]:
        return self.with_status("ran", "restored")

    @property
    def failed(self) -> list[str]:
        return self.with_status("failed")

    @property
    def ok(self) -> bool:
        return not self.with_status("failed", "blocked", "not run")

    def headline(self) -> str:
        counts: dict[str, int] = {}
        for s in self.stages:
            counts[s.status] = counts.get(s.status, 0) + 1
        parts = ", ".join(f"{n} {status}" for status, n in counts.items())
        return f"{len(self.stages)} stage(s): {parts}" if self.stages else "no stages"

    def to_markdown(self) -> str:
        target_text = ", ".join(f"`{t}`" for t in self.targets) if self.targets else "all stages"
        rows = [{"#": i + 1, "stage": f"`{s.stage}`", "result": s.status, "attempts": s.attempts or "",
                 "seconds": f"{s.seconds:.1f}" if s.attempts else "", "note": s.detail}
                for i, s in enumerate(self.stages)]
        lines = [f"# seglab pipeline: {'succeeded' if self.ok else 'FAILED'}", "",
                 f"Repository `{self.repo}`, targets: {target_text}. {self.headline()}.", "",
                 markdown_table(rows, ["#", "stage", "result", "attempts", "seconds", "note"])]
        return "\n".join(lines) + "\n"


class PipelineFailed(RuntimeError):
    """At least one stage failed; `report` says which, and what ran before."""

    def __init__(self, report: PipelineReport) -> None:
        self.report = report
        details = "; ".join(f"{s.stage}: {s.detail}" for s in report.stages if s.status == "failed")
        super().__init__(f"pipeline failed ({report.headline()}): {details}")


def markdown_table(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub-flavoured Markdown table; cells are str()-ed, pipes and newlines escaped."""

    def cell(value: Any) -> str:
        text = "" if value is None else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# ---- talking to DVC --------------------------------------------------------------------------


def stage_environment(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for `dvc` and the stage commands.

    This interpreter's bin folder goes on PATH (after what is there), so `dvc` and `seglab` are
    found when the flow runs from a virtualenv that is not activated, e.g. under a Prefect worker.
    `extra_env` (e.g. TF_CONFIG, CUDA_VISIBLE_DEVICES, or a whole PATH) is applied last.
    """
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    path_entries = env.get("PATH", "").split(os.pathsep) if env.get("PATH") else []
    if bin_dir not in path_entries:
        env["PATH"] = os.pathsep.join([*path_entries, bin_dir])
    env.update(extra_env or {})
    return env


def _dvc(env: dict[str, str]) -> str:
    found = shutil.which("dvc", path=env.get("PATH"))
    if found is None:
        raise PipelineError(f"`dvc` not found on PATH ({env.get('PATH')!r}); install seglab's environment "
                            "(pip install -e .) or activate it")
    return found


def resolve_repo(repo: str | Path) -> Path:
    """The DVC project root as an absolute path; an error when `repo` is not one."""
    path = Path(repo).expanduser().resolve()
    if not (path / ".dvc").is_dir():
        raise PipelineError(f"{path}: not a DVC project (no .dvc/ folder); pass the project root as `repo`")
    return path


def run_dvc(args: list[str], repo: Path, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a read-only DVC command (dag, status) in `repo`; a failure raises PipelineError."""
    env = env if env is not None else stage_environment()
    proc = subprocess.run([_dvc(env), *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise PipelineError(f"`dvc {' '.join(args)}` in {repo} failed ({proc.returncode}):\n"
                            f"{(proc.stderr or proc.stdout).strip()}")
    return proc


_DOT_NODE = re.compile(r'^"(?P<node>[^"]+)"\s*(?:\[[^\]]*\])?\s*;?$')
_DOT_EDGE = re.compile(r'^"(?P<up>[^"]+)"\s*->\s*"(?P<down>[^"]+)"\s*(?:\[[^\]]*\])?\s*;?$')
_DOT_FRAME = re.compile(r"^(?:strict\s+)?digraph\s*(?:\w+\s*)?\{$|^\}$")


def _parse_dag_dot(text: str) -> dict[str, list[str]]:
    """`dvc dag --dot` output -> {stage: [upstream stages]}, stages in the order DVC lists them."""
    graph: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or _DOT_FRAME.match(line):
            continue
        if edge := _DOT_EDGE.match(line):
            graph.setdefault(edge["up"], [])
            graph.setdefault(edge["down"], []).append(edge["up"])
        elif node := _DOT_NODE.match(line):
            graph.setdefault(node["node"], [])
        else:
            raise PipelineError(f"unexpected line in `dvc dag --dot` output: {raw!r}")
    return graph


def stage_graph(repo: Path, targets: list[str] | None = None,
                env: dict[str, str] | None = None) -> dict[str, list[str]]:
    """The stages DVC would reproduce for `targets` (all stages when None), with their upstreams.

    Comes from `dvc dag --dot`, so foreach stages (`train@unet`), params and outputs-as-deps are
    resolved by DVC itself, exactly as `dvc repro` sees them.
    """
    graph: dict[str, list[str]] = {}
    for target in (targets or [None]):
        args = ["dag", "--dot"] + ([target] if target else [])
        for stage, upstream in _parse_dag_dot(run_dvc(args, repo, env).stdout).items():
            merged = graph.setdefault(stage, [])
            merged.extend(u for u in upstream if u not in merged)
    if not graph:
        raise PipelineError(f"{repo}: DVC lists no stages" + (f" for {targets}" if targets else ""))
    return graph


def plan_stages(graph: dict[str, list[str]]) -> list[str]:
    """A topological order of `graph`; among stages ready together, DVC's own order wins."""
    order: list[str] = []
    done: set[str] = set()
    pending = list(graph)
    while pending:
        ready = next((s for s in pending if all(u in done for u in graph[s])), None)
        if ready is None:
            raise PipelineError(f"the stage graph has a cycle among {pending}")
        order.append(ready)
        done.add(ready)
        pending.remove(ready)
    return order


def _upstream_closure(graph: dict[str, list[str]], stage: str) -> set[str]:
    seen: set[str] = set()
    stack = list(graph.get(stage, []))
    while stack:
        s = stack.pop()
        if s not in seen:
            seen.add(s)
            stack.extend(graph.get(s, []))
    return seen


# ---- the stage task ---------------------------------------------------------------------------


def _retry_only_transient(task_, task_run, state) -> bool:
    # Prefect consults this before applying the retry policy: a deterministic failure ends the task.
    return isinstance(state.result(raise_on_failure=False), TransientStageFailure)


@task(name="dvc-repro-stage", task_run_name="dvc repro {stage}", retry_condition_fn=_retry_only_transient,
      retry_jitter_factor=0.2)
def repro_stage(stage: str, repo: str, extra_env: dict[str, str] | None = None) -> StageResult:
    """`dvc repro --single-item <stage>`: DVC checks the stage against dvc.lock, runs or skips it,
    and updates the lock. Output lines go to the Prefect log as they come."""
    logger = get_run_logger()
    attempt = max(int(current_task_run.run_count or 1), 1)
    env = stage_environment(extra_env)
    command = [_dvc(env), "repro", "--single-item", stage]
    status = "skipped"
    tail: deque[str] = deque(maxlen=200)
    started = time.monotonic()
    # Text mode reads '\r' as a line end too, so progress-bar redraws arrive as separate lines.
    proc = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if not line:
                continue
            tail.append(line)
            logger.info(line)
            if line.startswith(f"Running stage '{stage}'"):
                status = "ran"
            elif line.startswith(f"Stage '{stage}' is cached"):
                status = "restored"
        returncode = proc.wait()
    finally:
        if proc.poll() is None:  # the task was cancelled or interrupted: do not orphan the stage
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    seconds = time.monotonic() - started
    if returncode != 0:
        output = "\n".join(tail)
        reason = classify_failure(output, returncode)
        if reason is not None:
            logger.warning("stage %s failed on attempt %d: transient (%s); the retry policy applies",
                           stage, attempt, reason)
            raise TransientStageFailure(stage, returncode, output, attempt, reason)
        logger.error("stage %s failed on attempt %d: deterministic, not retried", stage, attempt)
        raise StageFailed(stage, returncode, output, attempt)
    logger.info("stage %s %s in %.1f s (attempt %d)", stage, status, seconds, attempt)
    return StageResult(stage=stage, status=status, attempts=attempt, seconds=round(seconds, 3))


# ---- the warehouse leaderboard ---------------------------------------------------------------


def warehouse_path(repo: Path) -> Path:
    """`warehouse.path` from the repo's params.yaml, resolved against the repo."""
    from seglab.config import load_config

    path = Path(load_config(repo / "params.yaml").warehouse.path)
    return path if path.is_absolute() else repo / path


def read_leaderboard(path: Path):
    """The warehouse's leaderboard (pandas DataFrame, best mIoU first), or None if there is no file."""
    if not Path(path).is_file():
        return None
    from seglab.warehouse.queries import connect_read_only, leaderboard

    con = connect_read_only(path)
    try:
        return leaderboard(con)
    finally:
        con.close()


def leaderboard_table(board) -> list[dict[str, Any]]:
    """JSON-ready rows (NaN -> None, timestamps -> ISO text, scores rounded) for a table artifact."""
    frame = board[[c for c in LEADERBOARD_COLUMNS if c in board.columns]].copy()
    numeric = frame.select_dtypes("number").columns
    frame[numeric] = frame[numeric].round(4)
    return json.loads(frame.to_json(orient="records", date_format="iso"))


def _publish(report: PipelineReport, repo: Path) -> None:
    logger = get_run_logger()
    create_markdown_artifact(key=SUMMARY_ARTIFACT_KEY, markdown=report.to_markdown(),
                             description=f"seglab pipeline in {repo}: {report.headline()}")
    try:
        board = read_leaderboard(warehouse_path(repo))
    except Exception as e:  # the run's outcome stands even if the warehouse cannot be read now
        logger.warning("leaderboard not published: %s", e)
        return
    if board is None:
        logger.info("no warehouse yet (%s); leaderboard not published", warehouse_path(repo))
        return
    report.leaderboard = board
    create_table_artifact(key=LEADERBOARD_ARTIFACT_KEY, table=leaderboard_table(board),
                          description=f"Leaderboard of {warehouse_path(repo)}: {len(board)} run(s), best mIoU first")


# ---- the flow ---------------------------------------------------------------------------------


@flow(name="seglab-pipeline", description="The DVC pipeline stage by stage, with retries for transient failures")
def seglab_pipeline(targets: list[str] | None = None, repo: str = ".", retries: int = 3,
                    retry_backoff_seconds: float = 30.0, keep_going: bool = False,
                    env: dict[str, str] | None = None) -> PipelineReport:
    """Reproduce `targets` (stage names or dvc.yaml paths; all stages when None) and their upstreams.

    retries / retry_backoff_seconds: transient failures are retried up to `retries` times, waiting
        retry_backoff_seconds x 1, 2, 4, ... (+-20% jitter) in between.
    keep_going: after a failure, still run the stages that do not depend on it (like
        `dvc repro --keep-going`); by default the flow stops at the first failed stage.
    env: extra environment variables for the stage commands (e.g. TF_CONFIG).
    Raises PipelineFailed (after publishing the summary) when any stage failed.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if retry_backoff_seconds < 0:
        raise ValueError(f"retry_backoff_seconds must be >= 0, got {retry_backoff_seconds}")
    logger = get_run_logger()
    repo_path = resolve_repo(repo)
    graph = stage_graph(repo_path, targets, stage_environment(env))
    order = plan_stages(graph)
    logger.info("plan (%d stages): %s", len(order), " -> ".join(order))

    run_stage = repro_stage.with_options(retries=retries,
                                         retry_delay_seconds=exponential_backoff(retry_backoff_seconds))
    report = PipelineReport(repo=str(repo_path), targets=list(targets) if targets else None)
    outcome: dict[str, StageResult] = {}
    stopped_by: str | None = None
    for stage in order:
        if stopped_by is not None:
            result = StageResult(stage, "not run", detail=f"stopped after {stopped_by} failed")
        elif broken := sorted(u for u in _upstream_closure(graph, stage)
                              if outcome.get(u) and outcome[u].status in ("failed", "blocked")):
            result = StageResult(stage, "blocked", detail=f"upstream failed: {', '.join(broken)}")
        else:
            state = run_stage(stage, str(repo_path), env, return_state=True)
            if state.is_completed():
                result = state.result()
            else:
                error = state.result(raise_on_failure=False)
                attempts = error.attempt if isinstance(error, StageFailed) else 0
                first_line = str(error).splitlines()[0] if str(error) else repr(error)
                result = StageResult(stage, "failed", attempts=attempts, detail=first_line)
                if not keep_going:
                    stopped_by = stage
        outcome[stage] = result
        report.stages.append(result)

    logger.info("pipeline %s: %s", "succeeded" if report.ok else "FAILED", report.headline())
    _publish(report, repo_path)
    if not report.ok:
        raise PipelineFailed(report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help="stages to reproduce with their upstreams (default: all)")
    parser.add_argument("--repo", default=".", help="the DVC project root (default: .)")
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--retry-backoff-seconds", type=float, default=30.0)
    parser.add_argument("--keep-going", action="store_true", help="run stages independent of a failed one")
    args = parser.parse_args(argv)
    state = seglab_pipeline(targets=args.targets or None, repo=args.repo, retries=args.retries,
                            retry_backoff_seconds=args.retry_backoff_seconds, keep_going=args.keep_going,
                            return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
