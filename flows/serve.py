"""The retraining deployment: `retrain_if_changed` on the cron schedule from params.yaml.

    python -m flows.serve                        # register and serve (runs flows here; Ctrl-C stops)
    python -m flows.serve --register-only        # register / update the deployment, then exit
    python -m flows.serve --work-pool NAME       # deploy to a work pool; a `prefect worker` runs it

The schedule is `schedule.cron` / `schedule.timezone` in params.yaml (read through
seglab.config); `--cron` / `--timezone` override them for a one-off. Needs a Prefect API:
`prefect server start` and `PREFECT_API_URL` (see docs/prefect.md).
"""

from __future__ import annotations

import argparse
import sys
import zoneinfo
from pathlib import Path
from typing import Any

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Schedule

from flows.pipeline import resolve_repo
from flows.retrain import retrain_if_changed

__all__ = ["DEPLOYMENT_NAME", "build_deployment", "deploy_to_work_pool", "retrain_schedule"]

DEPLOYMENT_NAME = "scheduled-retrain"
ENTRYPOINT = "flows/retrain.py:retrain_if_changed"
DESCRIPTION = ("Checks `dvc status` on the schedule from params.yaml and, if data, code or params changed, "
               "reproduces the pipeline and reports the leaderboard changes.")


def retrain_schedule(repo: str | Path = ".", params: str | Path = "params.yaml", cron: str | None = None,
                     timezone: str | None = None) -> Schedule:
    """The Prefect cron schedule from `schedule` in the repo's params.yaml (or the overrides)."""
    from seglab.config import load_config

    params_path = Path(params) if Path(params).is_absolute() else Path(repo) / params
    settings = load_config(params_path).schedule
    cron = cron or settings.cron
    timezone = timezone or settings.timezone
    source = "timezone override" if timezone != settings.timezone else f"{params_path}: schedule.timezone"
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{source}: {timezone!r} is not an IANA time zone (e.g. UTC, Europe/Paris)") from None
    try:
        return Cron(cron, timezone=timezone)
    except ValueError as e:
        raise ValueError(f"schedule.cron {cron!r} ({params_path}): not a valid cron expression: {e}") from None


def _deployment_settings(repo: str | Path, params: str | Path, cron: str | None, timezone: str | None,
                         targets: list[str] | None) -> dict[str, Any]:
    repo_path = resolve_repo(repo)
    return {
        "schedules": [retrain_schedule(repo_path, params, cron, timezone)],
        "parameters": {"repo": str(repo_path), "targets": targets},
        "description": DESCRIPTION,
        "tags": ["seglab", "retrain"],
        # Two retraining runs at once would only fight over DVC's repository lock: queue instead.
        "concurrency_limit": 1,
    }


def build_deployment(repo: str | Path = ".", *, name: str = DEPLOYMENT_NAME, params: str | Path = "params.yaml",
                     cron: str | None = None, timezone: str | None = None,
                     targets: list[str] | None = None) -> RunnerDeployment:
    """The deployment of `retrain_if_changed` for `repo`, scheduled from params.yaml.

    `.apply()` registers it with the Prefect API; `prefect.serve(deployment)` also runs it here.
    """
    return retrain_if_changed.to_deployment(name=name, **_deployment_settings(repo, params, cron, timezone, targets))


def deploy_to_work_pool(work_pool: str, repo: str | Path = ".", *, name: str = DEPLOYMENT_NAME,
                        params: str | Path = "params.yaml", cron: str | None = None, timezone: str | None = None,
                        targets: list[str] | None = None) -> Any:
    """Register the deployment on a work pool: the flow code is loaded from `repo` by whichever
    worker polls the pool (a `process` pool on this machine; another pool type elsewhere)."""
    settings = _deployment_settings(repo, params, cron, timezone, targets)
    source_flow = retrain_if_changed.from_source(source=settings["parameters"]["repo"], entrypoint=ENTRYPOINT)
    return source_flow.deploy(name=name, work_pool_name=work_pool, build=False, push=False,
                              print_next_steps=False, **settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="the DVC project root (default: .)")
    parser.add_argument("--params", default="params.yaml", help="settings file, relative to --repo")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help=f"deployment name (default: {DEPLOYMENT_NAME})")
    parser.add_argument("--cron", help="override schedule.cron for this deployment")
    parser.add_argument("--timezone", help="override schedule.timezone for this deployment")
    parser.add_argument("--target", action="append", dest="targets",
                        help="retrain only this stage and its upstreams (repeatable; default: all stages)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--register-only", action="store_true", help="register the deployment and exit")
    mode.add_argument("--work-pool", help="deploy to this work pool instead of serving from this process")
    args = parser.parse_args(argv)
    options = dict(name=args.name, params=args.params, cron=args.cron, timezone=args.timezone, targets=args.targets)

    if args.work_pool:
        deployment_id = deploy_to_work_pool(args.work_pool, args.repo, **options)
        print(f"deployment {retrain_if_changed.name}/{args.name} ({deployment_id}) on work pool {args.work_pool!r}; "
              f"start a worker with: prefect worker start --pool {args.work_pool}")
        return 0
    deployment = build_deployment(args.repo, **options)
    if args.register_only:
        deployment_id = deployment.apply()
        print(f"deployment {retrain_if_changed.name}/{args.name} ({deployment_id}) registered")
        return 0
    serve(deployment)  # blocks: polls for scheduled runs and executes them in subprocesses
    return 0


if __name__ == "__main__":
    sys.exit(main())
