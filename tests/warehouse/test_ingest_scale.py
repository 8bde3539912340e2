"""What `seglab ingest` reads and holds as the warehouse grows (issue 13, item 8; benchmarks/load.py
measures it with 3,000 runs): a re-ingest reads only new or changed eval.json files, and the rows
waiting for the transaction are Arrow tables, not a Python dict per confusion cell."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

from seglab.config import Config
from seglab.warehouse import ingest
from seglab.warehouse.ingest import run_ingest
from tests.factories import eval_entry, eval_run, write_eval

CLASSES = ["background", *(f"class{i}" for i in range(1, 21))]


def _write_model(eval_dir, name: str, seed: int):
    rng = np.random.default_rng(seed)
    entries = []
    for variant in ("plain", "tta"):
        matrix = rng.integers(1, 500, size=(len(CLASSES), len(CLASSES)))  # dense, as real runs are
        history = [{"epoch": e, "loss": 1.0 / e, "val_miou": 0.1 * e} for e in range(1, 5)] if variant == "plain" else []
        entries.append(eval_entry(eval_run(name, variant, classes=CLASSES, seed=seed), matrix, history=history))
    return write_eval(eval_dir / name / "eval.json", entries)


def _cfg(tmp_path, mirror: bool = False) -> Config:
    return Config.model_validate({"evaluate": {"out": str(tmp_path / "eval")},
                                  "validate_synthetic": {"report": str(tmp_path / "reports")},
                                  "warehouse": {"path": str(tmp_path / "warehouse.duckdb"), "mirror": mirror}})


@pytest.fixture
def counted_loads(monkeypatch):
    loaded = []
    real = ingest.load_eval
    monkeypatch.setattr(ingest, "load_eval", lambda path: loaded.append(path.parent.name) or real(path))
    return loaded


@pytest.mark.parametrize("mirror", [False, True])
def test_adding_one_model_reads_only_its_eval_json(tmp_path, counted_loads, mirror):
    for i in range(12):
        _write_model(tmp_path / "eval", f"model{i}", i)
    first = run_ingest(_cfg(tmp_path, mirror))
    assert len(counted_loads) == 12 and first["runs"] == 24 and first["rows"]["runs"] == 24

    counted_loads.clear()
    again = run_ingest(_cfg(tmp_path, mirror))
    assert counted_loads == [] and again["unchanged_files"] == 12 and again["runs"] == 0
    assert again["rows"] == first["rows"]  # nothing dropped, nothing doubled

    _write_model(tmp_path / "eval", "model12", 12)
    _write_model(tmp_path / "eval", "model3", 99)  # rewritten: other scores, same run ids
    summary = run_ingest(_cfg(tmp_path, mirror))
    assert sorted(counted_loads) == ["model12", "model3"]
    assert summary["unchanged_files"] == 11 and summary["runs"] == 4 and summary["removed_runs"] == 0
    assert summary["rows"]["runs"] == 26 and summary["rows"]["confusion"] == 26 * len(CLASSES) ** 2


def test_a_files_rows_wait_as_arrow_tables_not_python_dicts(tmp_path):
    # 2 runs x 21 x 21 confusion cells per file: as one dict per cell the rows took 6.5x the file's size (2.5x now).
    paths = [_write_model(tmp_path / "eval", f"model{i}", i) for i in range(6)]
    size = sum(p.stat().st_size for p in paths)
    arrow_before = pa.total_allocated_bytes()
    tracemalloc.start()
    try:
        files = [ingest.load_eval(p) for p in paths]
        held = tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes() - arrow_before
    finally:
        tracemalloc.stop()
    assert held < 4.0 * size, f"{held / size:.1f}x the files' {size:,} bytes"
    confusion = files[0].tables["confusion"]
    assert isinstance(confusion, pa.Table) and confusion.num_rows == 2 * len(CLASSES) ** 2


def test_the_rows_of_many_files_reach_duckdb_as_one_chunk_per_table(tmp_path, monkeypatch):
    # An Arrow table of one chunk per file made DuckDB's insert of 3,000 runs ~5x slower and
    # ~600 MB larger (benchmarks/load.py).
    for i in range(5):
        _write_model(tmp_path / "eval", f"model{i}", i)
    chunks = {}
    real = ingest._insert
    monkeypatch.setattr(ingest, "_insert", lambda con, table, rows: chunks.update(
        {table: max((c.num_chunks for c in rows.columns), default=0)}) or real(con, table, rows))
    run_ingest(_cfg(tmp_path))
    assert set(chunks) == set(ingest.TABLES) and max(chunks.values()) == 1, chunks
