"""Opening the warehouse while another process holds it: wait briefly, then name the file."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from seglab.warehouse import ingest_eval, open_warehouse
from seglab.warehouse.schema import WarehouseError
from tests.factories import eval_entry, eval_run, write_eval


def _hold(path, *, read_only: bool, seconds: float) -> subprocess.Popen:
    """A process that opens `path` (read-only or read-write), says so, and keeps it `seconds`."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == '1'); "
                               "print('open', flush=True); time.sleep(float(sys.argv[3]))",
         str(path), "1" if read_only else "0", str(seconds)], stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"open"
    return holder


@pytest.fixture
def warehouse(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    open_warehouse(path).close()
    return path


def test_ingest_waits_for_a_reader_that_lets_go(tmp_path, warehouse):
    eval_json = write_eval(tmp_path / "eval" / "unet" / "eval.json",
                           [eval_entry(eval_run("unet", "plain"), [[5, 1], [2, 7]])])
    holder = _hold(warehouse, read_only=True, seconds=1.5)
    try:
        start = time.monotonic()
        summary = ingest_eval(warehouse, eval_json)
        assert summary["runs"] and time.monotonic() - start < 10
    finally:
        holder.kill()
        holder.wait()


def test_ingest_names_the_file_when_the_lock_is_not_released(warehouse):
    holder = _hold(warehouse, read_only=False, seconds=60)
    try:
        start = time.monotonic()
        with pytest.raises(WarehouseError, match=r"warehouse\.duckdb: opened by another process "
                                                 r"\(reading or writing\).*\(waited 0\.5 s\)"):
            open_warehouse(warehouse, lock_wait_s=0.5)
        assert 0.5 <= time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait()
