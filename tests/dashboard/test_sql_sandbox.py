"""The SQL page's limits on a real DuckDB warehouse: memory (DuckDB's and the worker process's),
result size, time, locked settings, and `seglab ingest` writing while a page query runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from seglab.config import Config
from seglab.warehouse import dashboard_queries as dq
from seglab.warehouse.ingest import open_warehouse, run_ingest
from seglab.warehouse.sql_sandbox import SNAPSHOTS, SqlWorkers, WarehouseSnapshots

from .conftest import build_fixture_warehouse

REPO = Path(__file__).resolve().parents[2]
# Runs until interrupted: a trillion-row cross join.
ENDLESS = "SELECT sum(a.range * b.range) FROM range(1000000) AS a, range(1000000) AS b"


@pytest.fixture
def own_warehouse(tmp_path):
    """A fixture warehouse of this test's own, with its eval.json files (ingest writes into it)."""
    return build_fixture_warehouse(tmp_path)


def _python(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_query_over_the_memory_cap_fails_clearly_and_the_process_stays_small(fixture_warehouse):
    # Without a cap this query grows the process by about 1 GB; measured in a fresh process, whose
    # peak RSS is this query's alone.
    child = _python("""
        import sys
        from seglab.warehouse import dashboard_queries as dq

        def peak_mib():
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM"))

        dq.run_sql(sys.argv[1], "SELECT 1", dq.SqlLimits(memory_mib=128))  # imports, snapshot
        before = peak_mib()
        try:
            dq.run_sql(sys.argv[1], "SELECT len(list(range)) AS n FROM range(60000000)",
                       dq.SqlLimits(memory_mib=128))
            print("RESULT no error")
        except dq.SqlOutOfMemory as e:
            print("RESULT", e)
        print("GROWTH", peak_mib() - before)
    """, str(fixture_warehouse.warehouse))
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0, out
    lines = dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("RESULT", "GROWTH")))
    assert "more working memory than the SQL page allows" in lines["RESULT"], out
    assert "temp_directory" not in lines["RESULT"]  # DuckDB's advice to spill does not apply here
    assert int(lines["GROWTH"]) < 350, out


def test_a_result_over_the_size_cap_is_cut_and_says_so(fixture_warehouse):
    limits = dq.SqlLimits(max_rows=100_000, max_result_mib=1)
    result = dq.run_sql(fixture_warehouse.warehouse, "SELECT range AS i, repeat('x', 1000) AS s FROM range(20000)",
                        limits)
    assert result.truncated and result.cut_by == "bytes"
    assert 0 < len(result.frame) < 20_000 and result.result_bytes <= 2**20
    assert list(result.frame["i"]) == list(range(len(result.frame)))  # the leading rows, in order
    rows = dq.run_sql(fixture_warehouse.warehouse, "SELECT range FROM range(20000)", limits)
    assert not rows.truncated and len(rows.frame) == 20_000
    by_rows = dq.run_sql(fixture_warehouse.warehouse, "SELECT range FROM range(20000)",
                         dq.SqlLimits(max_rows=300))
    assert by_rows.cut_by == "rows" and len(by_rows.frame) == 300


def test_a_single_row_over_the_size_cap_leaves_an_empty_cut_result(fixture_warehouse):
    # Built by an aggregate, which DuckDB's memory limit covers (repeat is refused outright, below).
    result = dq.run_sql(fixture_warehouse.warehouse, "SELECT string_agg('x', '') AS s FROM range(2000000)",
                        dq.SqlLimits(max_result_mib=1))
    assert result.cut_by == "bytes" and len(result.frame) == 0 and list(result.frame.columns) == ["s"]


def test_one_huge_value_is_refused_before_it_is_built(fixture_warehouse):
    # repeat('x', 5e8) took the process 1.5 GB whatever DuckDB's memory_limit (it builds the value
    # outside it, then copies it to Arrow); the page's macros refuse it first. In a fresh process,
    # whose peak RSS is this query's alone.
    child = _python("""
        import sys
        from seglab.warehouse import dashboard_queries as dq

        def peak_mib():
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM"))

        dq.run_sql(sys.argv[1], "SELECT 1", dq.SqlLimits())  # imports, snapshot
        before = peak_mib()
        for sql in ("SELECT repeat('x', 500000000) AS s", "SELECT 'ab'.repeat(300000000) AS s",
                    "SELECT lpad('x', 500000000, 'y') AS s", "SELECT rpad(name, 500000000, '.') FROM runs"):
            try:
                dq.run_sql(sys.argv[1], sql, dq.SqlLimits())
                print("RESULT no error")
            except dq.SqlValueTooLarge as e:
                print("RESULT", e)
        print("GROWTH", peak_mib() - before)
    """, str(fixture_warehouse.warehouse))
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0, out
    results = [line for line in out.splitlines() if line.startswith("RESULT")]
    assert len(results) == 4 and all("over the 16777216 bytes a result may hold" in r for r in results), out
    growth = int(next(line.split()[1] for line in out.splitlines() if line.startswith("GROWTH")))
    assert growth < 100, out


def test_capped_functions_still_work_and_cannot_be_called_past_their_cap(fixture_warehouse):
    small = dq.run_sql(fixture_warehouse.warehouse, "SELECT repeat('ab', 3) AS a, repeat([1, 2], 2) AS b, "
                                                   "lpad('7', 3, '0') AS c, rpad('x', 2, '-') AS d")
    assert small.frame.iloc[0]["a"] == "ababab" and list(small.frame.iloc[0]["b"]) == [1, 2, 1, 2]
    assert (small.frame.iloc[0]["c"], small.frame.iloc[0]["d"]) == ("007", "x-")
    for sql in ("SELECT system.main.repeat('x', 500000000)", "SELECT main.lpad('x', 9, 'y')",
                'SELECT "system"."main"."rpad"(\'x\', 9, \'y\')'):
        with pytest.raises(dq.SqlRefused, match="by its plain name"):
            dq.run_sql(fixture_warehouse.warehouse, sql)


def test_a_long_query_is_interrupted_at_the_timeout_and_leaves_the_warehouse_free(own_warehouse):
    start = time.monotonic()
    with pytest.raises(dq.SqlTimeout, match="longer than 0.5 s"):
        dq.run_sql(own_warehouse.warehouse, ENDLESS, dq.SqlLimits(timeout_s=0.5))
    assert time.monotonic() - start < 5
    open_warehouse(own_warehouse.warehouse, lock_wait_s=0).close()  # nothing holds the file


def test_the_configuration_cannot_be_changed_from_the_sql_page(fixture_warehouse):
    limits = dq.SqlLimits(memory_mib=200, threads=1)
    for statement in ("SET memory_limit = '100GB'", "RESET memory_limit", "SET lock_configuration = false",
                      "SET enable_external_access = true"):
        with pytest.raises(dq.SqlRefused, match="SET statement|RESET"):
            dq.run_sql(fixture_warehouse.warehouse, statement, limits)
    settings = dq.run_sql(fixture_warehouse.warehouse, """
        SELECT current_setting('memory_limit') AS memory, current_setting('threads') AS threads,
               current_setting('max_temp_directory_size') AS spill, current_setting('lock_configuration') AS locked,
               current_setting('enable_external_access') AS external
    """, limits).frame.iloc[0]
    assert settings["memory"] == "200.0 MiB" and settings["threads"] == 1
    assert settings["spill"] == "0 bytes" and settings["locked"] and not settings["external"]
    # Even a statement that got past the guard could not lift a limit: the database refuses it.
    with SNAPSHOTS.connect(fixture_warehouse.warehouse, limits) as con:
        for statement in ("SET memory_limit = '100GB'", "SET GLOBAL threads = 16", "RESET memory_limit",
                          "SET temp_directory = '/tmp'", "SET lock_configuration = false"):
            with pytest.raises(Exception, match="configuration has been locked|disabled by configuration"):
                con.execute(statement)


def test_the_existing_refusals_still_hold(fixture_warehouse):
    with pytest.raises(dq.SqlRefused, match="DELETE statement"):
        dq.run_sql(fixture_warehouse.warehouse, "DELETE FROM runs")
    with pytest.raises(Exception, match="disabled by configuration"):
        dq.run_sql(fixture_warehouse.warehouse, f"SELECT * FROM read_text('{fixture_warehouse.eval_dir}/unet/eval.json')")
    with pytest.raises(Exception, match="disabled by configuration"):
        dq.run_sql(fixture_warehouse.warehouse, "SELECT * FROM read_csv('https://example.com/x.csv')")


def test_the_snapshot_follows_a_reingest(tmp_path, own_warehouse):
    snapshots = WarehouseSnapshots(tmp_path / "snapshots")
    count = "SELECT count(*) AS n FROM runs"
    runs = len(own_warehouse.runs)
    assert dq.run_sql(own_warehouse.warehouse, count, snapshots=snapshots).frame["n"][0] == runs
    con = open_warehouse(own_warehouse.warehouse)
    try:
        con.execute("DELETE FROM runs WHERE name = 'ensemble'")
    finally:
        con.close()
    assert dq.run_sql(own_warehouse.warehouse, count, snapshots=snapshots).frame["n"][0] == runs - 1
    assert len(list((tmp_path / "snapshots").glob("*.duckdb"))) == 1  # the stale copy is gone


def _ingest_cfg(fixture, tmp_path) -> Config:
    # One eval.json changed (a byte more, same runs), so the ingest rewrites its runs: the others
    # are unchanged and left as they are.
    with (fixture.eval_dir / "unet" / "eval.json").open("a") as changed:
        changed.write("\n")
    return Config.model_validate({"evaluate": {"out": str(fixture.eval_dir)},
                                  "validate_synthetic": {"report": str(tmp_path / "no_reports")},
                                  "warehouse": {"path": str(fixture.warehouse)}})


def test_ingest_writes_while_a_page_query_runs_in_another_process(tmp_path, own_warehouse):
    page = _python("""
        import sys
        from seglab.warehouse import dashboard_queries as dq
        print("ready", flush=True)
        try:
            dq.run_sql(sys.argv[1], sys.argv[2], dq.SqlLimits(timeout_s=8))
        except dq.SqlTimeout:
            print("timed out", flush=True)
    """, str(own_warehouse.warehouse), ENDLESS)
    try:
        assert page.stdout.readline().strip() == "ready"
        time.sleep(1.5)  # the query is running
        summary = run_ingest(_ingest_cfg(own_warehouse, tmp_path))
        assert page.poll() is None, page.stdout.read()  # ingest did not wait for the query to end
        assert summary["runs"] == 2 and summary["unchanged_files"] == summary["files"] - 1
        out, _ = page.communicate(timeout=60)
        assert "timed out" in out, out
    finally:
        page.kill()
        page.wait()


def test_ingest_writes_while_a_page_query_runs_in_another_thread(tmp_path, own_warehouse):
    outcome: list[BaseException] = []

    def page_query() -> None:
        try:
            dq.run_sql(own_warehouse.warehouse, ENDLESS, dq.SqlLimits(timeout_s=6))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome.append(e)

    query = threading.Thread(target=page_query)
    query.start()
    try:
        time.sleep(1.0)
        summary = run_ingest(_ingest_cfg(own_warehouse, tmp_path))
        assert query.is_alive()
        assert summary["runs"] == 2 and summary["unchanged_files"] == summary["files"] - 1
    finally:
        query.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], dq.SqlTimeout), outcome


def test_one_huge_value_from_any_function_ends_at_the_process_memory_limit(fixture_warehouse):
    # DuckDB's memory_limit does not cover one value a scalar function builds: `len(range(0, 10^8))`
    # grew the dashboard's process to 7 GB under a 512 MiB limit. The page's queries now run in a
    # worker process under an OS limit. The dashboard's side runs in a fresh process, whose peak
    # RSS is then its own alone.
    child = _python("""
        import sys, time
        from seglab.warehouse import dashboard_queries as dq

        def peak_mib():
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM"))

        limits = dq.SqlLimits(process_memory_mib=256)
        dq.run_sql(sys.argv[1], "SELECT 1", limits)  # imports, snapshot, a worker
        before = peak_mib()
        for sql in ("SELECT len(range(0, 100000000)) AS n",
                    "SELECT len(list_resize([1], 1000000000)) AS n",
                    "SELECT length(printf('%1000000000d', 1)) AS n",
                    "SELECT max(x) FROM unnest(generate_series(0, 1000000000)) AS t(x)",
                    "SELECT sum(len(generate_series(0, range * 100000000))) FROM range(1, 4)",
                    "SELECT length(repeat('x', 1000000000)) AS n"):
            start = time.monotonic()
            try:
                dq.run_sql(sys.argv[1], sql, limits)
                print("RESULT no error")
            except (dq.SqlOutOfMemory, dq.SqlValueTooLarge) as e:
                print("RESULT", type(e).__name__, round(time.monotonic() - start, 1), e)
        print("AFTER", dq.run_sql(sys.argv[1], "SELECT count(*) AS n FROM runs", limits).frame["n"][0])
        print("GROWTH", peak_mib() - before)
    """, str(fixture_warehouse.warehouse))
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0, out
    results = [line.split(" ", 3)[1:] for line in out.splitlines() if line.startswith("RESULT")]
    assert len(results) == 6, out
    for kind, seconds, message in results[:5]:
        assert kind == "SqlOutOfMemory" and "exceeded the SQL page's memory limit of 256 MiB" in message, out
        assert float(seconds) < 15, out  # a new worker may be starting; the query itself fails at once
    assert results[5][0] == "SqlValueTooLarge", out  # repeat's macro refuses before building
    runs = len(fixture_warehouse.runs)
    assert f"AFTER {runs}" in out
    growth = int(next(line.split()[1] for line in out.splitlines() if line.startswith("GROWTH")))
    assert growth < 100, out


def test_a_killed_worker_fails_its_query_clearly_and_is_replaced(own_warehouse):
    workers = SqlWorkers()
    try:
        outcome: list[BaseException] = []

        def page_query() -> None:
            try:
                dq.run_sql(own_warehouse.warehouse, ENDLESS, dq.SqlLimits(timeout_s=60), workers=workers)
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                outcome.append(e)

        query = threading.Thread(target=page_query)
        query.start()
        deadline = time.monotonic() + 60
        while not workers.busy_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # the query is running
        (pid,) = workers.busy_pids()
        start = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        query.join(30)
        assert time.monotonic() - start < 5
        assert len(outcome) == 1 and isinstance(outcome[0], dq.SqlOutOfMemory), outcome
        assert "its process ended: signal SIGKILL" in str(outcome[0])
        again = dq.run_sql(own_warehouse.warehouse, "SELECT 42 AS x", workers=workers)
        assert again.frame["x"][0] == 42
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone, not a zombie: the pool waited for it
    finally:
        workers.close()
