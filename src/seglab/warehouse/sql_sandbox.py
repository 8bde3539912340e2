"""The dashboard's SQL page: one user-written query, run so that it can neither change nor starve anything.

- Guard (`check_read_only_sql`): exactly one statement, which DuckDB's own parser types as a
  SELECT (``SELECT``, ``WITH ... SELECT``, ``FROM t``, ``VALUES``, ``SHOW``, ``DESCRIBE``,
  ``SUMMARIZE``); anything else is refused with `SqlRefused` before it runs.
- Connection (`WarehouseSnapshots.connect`): read-only, with DuckDB's memory and thread limits
  (`SqlLimits`), no spilling to disk, no file or network access (a SELECT could otherwise
  ``read_csv('/etc/passwd')``), no extension loading, and the configuration locked, so that even
  a statement the guard let through cannot lift a limit.
- Result (`run_read_only_sql`): at most `max_rows` rows and `max_bytes` bytes (the rest is cut,
  and `SqlResult.cut_by` says which limit cut it), and interrupted after `timeout_s`: DuckDB has
  no statement timeout, so a timer calls ``con.interrupt()``.
- Snapshot: DuckDB lets one process write a file or others read it, never both, so a query that
  held the warehouse for its whole duration would make a concurrent `seglab ingest` fail. The page
  reads a private copy instead, made while a read-only connection guarantees no writer is
  mid-transaction, and remade when the file changes: the warehouse is held for a file copy, not
  for a query.
- Process (`SqlWorkers`): DuckDB's memory limit covers its buffer manager (hash tables, sorts,
  materialised results), not a single huge value built by a scalar function, which it allocates
  directly and does not interrupt until the function returns (``SELECT len(range(0, 100000000))``,
  ``list_resize``, ``printf`` widths, the list forms of ``generate_series``), and DuckDB has no
  setting that caps a value. So each page query runs in a worker process whose address space the
  OS caps (``RLIMIT_AS``, `SqlLimits.process_memory_mib` above the worker's idle size): an
  allocation past it fails inside DuckDB, and the query ends with `SqlOutOfMemory` whatever
  function made it; a worker that dies or overruns its time is killed and replaced, and the
  dashboard's own process only ever holds a capped result. Workers are started ahead and reused
  (a start imports DuckDB, pandas and pyarrow), at most `SqlWorkers.max_running` at a time.
- Values: the string amplifiers ``repeat``, ``lpad``, ``rpad`` (`CAPPED_FUNCTIONS`) are also
  shadowed on the page's connections by temporary macros that refuse, before building it, a value
  over the result limit (`SqlValueTooLarge`, a clearer message than the worker's memory error);
  the guard refuses calling them by a qualified name (``system.main.repeat``).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from seglab.warehouse.queries import connect_read_only
from seglab.warehouse.schema import WarehouseError

__all__ = [
    "CAPPED_FUNCTIONS",
    "SNAPSHOTS",
    "SqlLimits",
    "SqlOutOfMemory",
    "SqlRefused",
    "SqlResult",
    "SqlTimeout",
    "SqlValueTooLarge",
    "SqlWorkers",
    "WORKERS",
    "WarehouseSnapshots",
    "check_read_only_sql",
    "file_stamp",
    "harden",
    "run_read_only_sql",
    "run_sql",
]

MIB = 2**20


class SqlRefused(ValueError):
    """A query the SQL page does not run (not a single read-only SELECT, or not parseable)."""


class SqlTimeout(WarehouseError):
    """A query interrupted for running longer than its time limit."""


class SqlOutOfMemory(WarehouseError):
    """A query that needed more working memory than the SQL page allows."""


class SqlValueTooLarge(WarehouseError):
    """A query that would build one value (``repeat``, ``lpad``, ``rpad``) larger than a result may be."""


# Scalar functions whose one result can be far larger than their arguments, which DuckDB builds
# outside its memory limit; on SQL-page connections each is a temporary macro of the same name
# (unqualified calls and `x.repeat(n)` reach it) that refuses a value over the result limit.
CAPPED_FUNCTIONS = ("repeat", "lpad", "rpad")
_VALUE_CAP = "seglab value cap"  # marks the macros' errors
_SIZE = "strlen(CAST(x AS VARCHAR))::DOUBLE"  # bytes of a string; of a list's or blob's text form


def _value_caps(limit_bytes: int) -> list[str]:
    def refuse(function: str, size: str) -> str:
        return (f"error('{_VALUE_CAP}: {function} would build a value of about ' || ({size})::BIGINT || "
                f"' bytes, over the {limit_bytes} bytes a result may hold')")

    # The check guards the count *argument*: DuckDB evaluates (and constant-folds) arguments before
    # the call, so an oversized call fails before it builds anything. (A CASE around the call would
    # not do: the optimizer folds a constant ELSE branch too, building the value.)
    return [
        f"CREATE OR REPLACE TEMP MACRO repeat(x, n) AS system.main.repeat(x, CASE WHEN n > 0 AND "
        f"{_SIZE} * n > {limit_bytes} THEN {refuse('repeat', f'{_SIZE} * n')} ELSE n END)",
        *(f"CREATE OR REPLACE TEMP MACRO {f}(x, n, fill) AS system.main.{f}(x, CASE WHEN n > {limit_bytes} "
          f"THEN {refuse(f, 'n')} ELSE n END, fill)" for f in ("lpad", "rpad")),
    ]


def cap_values(con: duckdb.DuckDBPyConnection, limit_bytes: int) -> None:
    """Shadow `CAPPED_FUNCTIONS` on `con` (this connection only) by macros refusing a value over
    `limit_bytes` before it is built."""
    for statement in _value_caps(int(limit_bytes)):
        con.execute(statement)


_QUALIFIED_CAPPED = re.compile(r"\.\s*\"?(" + "|".join(CAPPED_FUNCTIONS) + r")\"?\s*\(", re.IGNORECASE)


def _qualified_capped_calls(con: duckdb.DuckDBPyConnection, statement: str) -> list[str]:
    """Calls of a capped function by a qualified name (``system.main.repeat(...)``), which would
    reach DuckDB's own function past the macro."""
    serialized = json.loads(con.execute("SELECT json_serialize_sql(?)", [statement]).fetchall()[0][0])
    if serialized.get("error"):  # statements DuckDB cannot serialise (PIVOT): read the text
        return [m.group(0) for m in _QUALIFIED_CAPPED.finditer(statement)]
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (node.get("class") == "FUNCTION" and str(node.get("function_name", "")).lower() in CAPPED_FUNCTIONS
                    and (node.get("schema") or node.get("catalog"))):
                found.append(".".join(p for p in (node.get("catalog"), node.get("schema"), node["function_name"]) if p))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(serialized)
    return found


@dataclass(frozen=True)
class SqlLimits:
    """What one SQL-page query may use. Concurrent queries on one snapshot share memory and threads."""

    memory_mib: int = 512          # DuckDB memory_limit; nothing spills to disk beyond it
    threads: int = 2
    max_rows: int = 1000
    max_result_mib: float = 16.0   # the result as Arrow columns; pandas and the browser hold copies
    timeout_s: float = 30.0
    # The OS cap on the query's worker process: address space above its idle size (RLIMIT_AS).
    # Covers what memory_mib cannot (one huge value) plus DuckDB's working memory and the result.
    process_memory_mib: int = 1024

    def __post_init__(self) -> None:
        for name in ("memory_mib", "threads", "max_rows", "process_memory_mib"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        for name in ("max_result_mib", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)!r}")

    def duckdb_config(self) -> dict[str, Any]:
        # enable_external_access and lock_configuration are set after connecting: with them in
        # the startup config DuckDB refuses the temp_directory setting.
        return {
            "memory_limit": f"{self.memory_mib}MiB",
            "threads": self.threads,
            "temp_directory": "",
            "max_temp_directory_size": "0B",
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
            "allow_persistent_secrets": False,
        }


@dataclass(frozen=True)
class SqlResult:
    frame: pd.DataFrame
    truncated: bool     # more rows existed than `frame` holds
    seconds: float
    statement: str      # the statement as DuckDB's parser split it out
    cut_by: str | None = None  # "rows" (max_rows) or "bytes" (max_bytes) when truncated
    result_bytes: int = 0      # the Arrow size of `frame`'s rows


def harden(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """Cut `con`'s database off from files and the network (irreversible while it is open).

    The warehouse itself stays readable; table functions such as read_csv/read_parquet, COPY,
    ATTACH and extension downloads fail with DuckDB's permission error.
    """
    con.execute("SET enable_external_access = false")
    return con


def _lock(con: duckdb.DuckDBPyConnection) -> None:
    """Harden and lock the configuration of `con`'s database, once (a locked one refuses SET)."""
    if not con.execute("SELECT current_setting('lock_configuration')").fetchall()[0][0]:
        harden(con)
        con.execute("SET lock_configuration = true")


def check_read_only_sql(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The single SELECT statement in `sql`, or `SqlRefused` saying why it will not run."""
    if not isinstance(sql, str) or not sql.strip():
        raise SqlRefused("the query is empty: enter one SELECT (or WITH ... SELECT) statement")
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise SqlRefused(f"the query does not parse: {e}") from None
    if not statements:
        raise SqlRefused("the query holds no statement (only comments?): enter one SELECT")
    if len(statements) > 1:
        kinds = ", ".join(_kind(s) for s in statements)
        raise SqlRefused(f"one statement at a time: the query holds {len(statements)} ({kinds}); "
                         "remove all but one SELECT")
    statement = statements[0]
    if statement.type != duckdb.StatementType.SELECT:
        raise SqlRefused(f"only read-only SELECT queries run here (SELECT, WITH ... SELECT, SHOW, "
                         f"DESCRIBE, SUMMARIZE); this is a {_kind(statement)} statement. The "
                         "warehouse is opened read-only: it changes only through `seglab ingest`")
    query = statement.query.strip().rstrip(";").strip()
    qualified = _qualified_capped_calls(con, query)
    if qualified:
        raise SqlRefused(f"call {', '.join(sorted(set(qualified)))} by its plain name ({', '.join(CAPPED_FUNCTIONS)}): "
                         "on this page they refuse to build a value larger than a result may hold")
    return query


def _kind(statement: Any) -> str:
    return str(statement.type.name)


def _rows_within(batch: pa.RecordBatch, budget: int) -> int:
    """The most leading rows of `batch` whose Arrow size stays within `budget` bytes."""
    low, high = 0, batch.num_rows
    while low < high:
        middle = (low + high + 1) // 2
        if batch.slice(0, middle).nbytes <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    # Through DuckDB, so the frame has the dtypes `.df()` gives (HUGEINT and DECIMAL as floats,
    # dates as datetimes); a private in-memory database holding nothing but this table.
    with duckdb.connect(config={"threads": 1}) as converter:
        return converter.from_arrow(table).df()


# How DuckDB words an allocation the OS refused (RLIMIT_AS), as against its buffer manager's
# "could not allocate block of size ... (x/y used)".
_ALLOCATION_FAILED = re.compile(r"bad.alloc|Allocation failure", re.IGNORECASE)


def _timeout_message(timeout_s: float) -> str:
    return f"the query ran longer than {timeout_s:g} s and was stopped; narrow it (WHERE, LIMIT) or aggregate first"


def run_read_only_sql(con: duckdb.DuckDBPyConnection, sql: str, *, max_rows: int = 1000,
                      timeout_s: float = 30.0, max_bytes: int | None = None) -> SqlResult:
    """Run one checked SELECT, returning at most `max_rows` rows and `max_bytes` bytes of them;
    interrupt it after `timeout_s`.

    `con` should be read-only, hardened and limited (`WarehouseSnapshots.connect`); the check here
    is the first line, the connection the second.
    """
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive integer; got {max_rows!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive; got {timeout_s!r}")
    if max_bytes is not None and not max_bytes > 0:
        raise ValueError(f"max_bytes must be positive; got {max_bytes!r}")
    statement = check_read_only_sql(con, sql)
    budget = max_bytes if max_bytes is not None else float("inf")
    if max_bytes is not None:
        cap_values(con, max_bytes)
    timer = threading.Timer(timeout_s, con.interrupt)
    start = time.perf_counter()
    timer.start()
    batches: list[pa.RecordBatch] = []
    rows = size = 0
    cut_by = None
    try:
        # One row past the limit tells whether the result was cut; small batches let the byte
        # limit stop the stream before DuckDB produces much more than it allows.
        with contextlib.closing(con.sql(statement).limit(max_rows + 1).to_arrow_reader(256)) as reader:
            schema = reader.schema
            for batch in reader:
                if rows + batch.num_rows > max_rows:
                    batch, cut_by = batch.slice(0, max_rows - rows), "rows"
                if size + batch.nbytes > budget:
                    batch, cut_by = batch.slice(0, _rows_within(batch, int(budget - size))), "bytes"
                batches.append(batch)
                rows, size = rows + batch.num_rows, size + batch.nbytes
                if cut_by:
                    break
    except duckdb.InterruptException:
        raise SqlTimeout(_timeout_message(timeout_s)) from None
    except duckdb.InvalidInputException as e:
        if _VALUE_CAP not in str(e):
            raise
        message = str(e).split(f"{_VALUE_CAP}: ", 1)[1].splitlines()[0]
        raise SqlValueTooLarge(f"{message}; DuckDB would build it outside the page's memory limit, so it "
                               "is refused before it is built") from None
    except duckdb.OutOfMemoryException as e:
        # DuckDB's message goes on to suggest a temp_directory, which the page deliberately lacks.
        first_line = str(e).splitlines()[0]
        if _ALLOCATION_FAILED.search(first_line):  # the process's OS limit, not DuckDB's memory_limit
            raise MemoryError(first_line) from None
        raise SqlOutOfMemory(f"the query needed more working memory than the SQL page allows "
                             f"({first_line}); filter or aggregate before joining or sorting, "
                             "or select fewer columns") from None
    finally:
        timer.cancel()
    frame = _to_pandas(pa.Table.from_batches(batches, schema=schema))
    return SqlResult(frame=frame, truncated=cut_by is not None, seconds=time.perf_counter() - start,
                     statement=statement, cut_by=cut_by, result_bytes=size)


def file_stamp(path: Path) -> tuple[int, ...] | None:
    """(inode, mtime_ns, size) of a DuckDB file and of its write-ahead log; None if it is missing."""
    stamp: tuple[int, ...] = ()
    for part in (path, path.with_name(path.name + ".wal")):
        try:
            stat = part.stat()
        except FileNotFoundError:
            if part == path:
                return None
            continue
        stamp += (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    return stamp


@dataclass(frozen=True)
class _Snapshot:
    stamp: tuple[int, ...]
    path: Path


def _open_limited(path: Path, limits: SqlLimits, source: str | Path) -> duckdb.DuckDBPyConnection:
    """A limited, hardened, configuration-locked read-only connection to the copy at `path`."""
    try:
        con = duckdb.connect(str(path), read_only=True, config=limits.duckdb_config())
    except duckdb.Error as e:
        raise WarehouseError(f"{source}: cannot open the SQL page's copy of the warehouse: {e}") from None
    try:
        _lock(con)
    except BaseException:
        con.close()
        raise
    return con


class WarehouseSnapshots:
    """Private copies of warehouse files, one per warehouse, remade when the warehouse changes.

    The copies live in a folder only this process uses (removed at exit). A copy being replaced is
    deleted once no query checked it out any more (`checkout`): a worker process opens it by path.
    """

    def __init__(self, folder: Path | None = None) -> None:
        self._folder = folder
        self._lock = threading.Lock()
        self._copies: dict[Path, _Snapshot] = {}
        self._numbers = itertools.count()
        self._users: Counter[Path] = Counter()
        self._stale: set[Path] = set()

    def _private_folder(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="seglab-sql-"))
            atexit.register(shutil.rmtree, self._folder, ignore_errors=True)
        self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder

    def _current(self, source: Path) -> _Snapshot:
        stamp = file_stamp(source)
        if stamp is None:
            raise WarehouseError(f"{source}: no warehouse there; build it with `seglab ingest` "
                                 "(or `dvc repro`) first")
        known = self._copies.get(source)
        if known is not None and known.stamp == stamp and known.path.exists():
            return known
        # A read-only connection holds the file's shared lock: no writer is mid-transaction while
        # the bytes are copied. It also refuses files that are not a warehouse this code reads.
        reader = connect_read_only(source)
        try:
            stamp = file_stamp(source)
            target = self._private_folder() / f"warehouse-{next(self._numbers)}.duckdb"
            shutil.copyfile(source, target)
            wal = source.with_name(source.name + ".wal")
            if wal.exists():  # a writer that died before its checkpoint: the log holds commits
                shutil.copyfile(wal, target.with_name(target.name + ".wal"))
        finally:
            reader.close()
        self._copies[source] = fresh = _Snapshot(stamp, target)
        if known is not None:
            self._stale.add(known.path)
        return fresh

    def _drop_unused_stale(self) -> None:
        for path in [p for p in self._stale if not self._users[p]]:
            for old in (path, path.with_name(path.name + ".wal")):
                old.unlink(missing_ok=True)
            self._stale.discard(path)
            del self._users[path]

    @contextlib.contextmanager
    def checkout(self, source: str | Path) -> Iterator[Path]:
        """The current copy of `source`, kept on disk until the block ends."""
        with self._lock:
            path = self._current(Path(source).resolve()).path
            self._users[path] += 1
            self._drop_unused_stale()
        try:
            yield path
        finally:
            with self._lock:
                self._users[path] -= 1
                self._drop_unused_stale()

    @contextlib.contextmanager
    def connect(self, source: str | Path, limits: SqlLimits) -> Iterator[duckdb.DuckDBPyConnection]:
        """A limited, hardened, configuration-locked read-only connection to the current copy of
        `source` in this process, closed on exit (the page's queries run in `SqlWorkers`)."""
        with self.checkout(source) as path:
            con = _open_limited(path, limits, source)
            try:
                yield con
            finally:
                con.close()


SNAPSHOTS = WarehouseSnapshots()


# --- the worker process ------------------------------------------------------------------------

# Exceptions a worker hands back by class name (anything else arrives as a WarehouseError).
_OWN_ERRORS = {e.__name__: e for e in (SqlRefused, SqlTimeout, SqlOutOfMemory, SqlValueTooLarge, WarehouseError,
                                       ValueError)}
# Seconds the parent waits past a query's own time limit (the worker interrupts DuckDB itself)
# before it kills the worker: a scalar function building one value does not see the interrupt.
_KILL_GRACE_S = 5.0
# A worker whose address space stays this much above its idle size after a query (allocator
# arenas kept) is replaced, so that the next query gets the whole limit.
_RETIRE_GROWTH_MIB = 64
_START_TIMEOUT_S = 120.0


def _vm_size_mib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmSize:"))


def _memory_message(limit_mib: int, detail: str) -> str:
    return (f"the query exceeded the SQL page's memory limit of {limit_mib} MiB ({detail}) and was stopped; "
            "build smaller values (lists, strings), filter or aggregate first")


def _serve(fd: int, process_memory_mib: int) -> None:
    """A worker's loop: (snapshot path, sql, limits) in, ("ok", SqlResult) or ("error", class name,
    message) out, each with the address space the worker kept above its idle size (MiB)."""
    conn = Connection(fd)
    # Warm up before measuring the idle size: DuckDB's threads, pandas' lazy imports.
    with duckdb.connect(config={"threads": 2}) as warm:
        _to_pandas(warm.sql("SELECT sum(range) AS s FROM range(1000000)").arrow())
    idle = _vm_size_mib()
    limit = (idle + process_memory_mib) * MIB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send(("ready", idle))
    while True:
        try:
            path, sql, limits = conn.recv()
        except EOFError:  # the dashboard closed the pipe or died
            return
        try:
            with contextlib.closing(_open_limited(Path(path), limits, path)) as con:
                answer: tuple = ("ok", run_read_only_sql(con, sql, max_rows=limits.max_rows,
                                                         timeout_s=limits.timeout_s,
                                                         max_bytes=int(limits.max_result_mib * MIB)))
        except MemoryError as e:
            answer = ("error", "SqlOutOfMemory", _memory_message(process_memory_mib, str(e) or "MemoryError"))
        except Exception as e:  # noqa: BLE001 - handed to the dashboard process by name
            name = type(e).__name__
            if _ALLOCATION_FAILED.search(str(e)):
                answer = ("error", "SqlOutOfMemory", _memory_message(process_memory_mib, str(e).splitlines()[0]))
            else:
                answer = ("error", name, str(e))
        conn.send((*answer, _vm_size_mib() - idle))


def _error(name: str, message: str) -> Exception:
    if name in _OWN_ERRORS:
        return _OWN_ERRORS[name](message)
    duckdb_error = getattr(duckdb, name, None)
    if isinstance(duckdb_error, type) and issubclass(duckdb_error, duckdb.Error):
        return duckdb_error(message)
    return WarehouseError(f"{name}: {message}")


class _Worker:
    """One worker process and its end of the pipe."""

    def __init__(self, process_memory_mib: int) -> None:
        import seglab

        self.process_memory_mib = process_memory_mib
        ours, theirs = socket.socketpair()
        env = {**os.environ,
               # seglab importable as in this process (a checkout run by PYTHONPATH, say)
               "PYTHONPATH": os.pathsep.join([str(Path(seglab.__file__).resolve().parents[1]),
                                              *filter(None, [os.environ.get("PYTHONPATH")])]),
               # glibc reserves 64 MiB of address space per thread arena; two do for two threads
               "MALLOC_ARENA_MAX": "2"}
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "import sys; from seglab.warehouse.sql_sandbox import _serve; "
                                       "_serve(int(sys.argv[1]), int(sys.argv[2]))",
                 str(theirs.fileno()), str(process_memory_mib)],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        try:
            if not self.conn.poll(_START_TIMEOUT_S):
                raise WarehouseError(f"the SQL page's worker process did not start within {_START_TIMEOUT_S:g} s")
            self.conn.recv()  # ("ready", idle MiB)
        except (EOFError, OSError):
            self.close()
            raise WarehouseError(f"the SQL page's worker process failed to start "
                                 f"(exit status {self.process.wait()})") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.conn.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def ended(self) -> str:
        """How the process ended (after it did)."""
        code = self.process.wait()
        if code < 0:
            return f"signal {signal.Signals(-code).name}"
        return f"exit status {code}"


class SqlWorkers:
    """The page's query processes: started on demand, reused, replaced when killed or grown.

    At most `max_running` queries run at once (a query waits up to its time limit for a turn), so
    concurrent page sessions cannot multiply the memory limit beyond that.
    """

    def __init__(self, max_running: int = 2) -> None:
        self.max_running = max_running
        self._turns = threading.BoundedSemaphore(max_running)
        self._ready = threading.Condition()  # guards _idle and _starting
        self._idle: dict[int, list[_Worker]] = {}
        self._starting: Counter[int] = Counter()
        self._busy: set[_Worker] = set()
        atexit.register(self.close)

    def close(self) -> None:
        """End the idle workers (running ones end with their query)."""
        with self._ready:
            idle = [w for workers in self._idle.values() for w in workers]
            self._idle.clear()
        for worker in idle:
            worker.close()

    def busy_pids(self) -> set[int]:
        """Process ids of the workers running a query now."""
        with self._ready:
            return {worker.process.pid for worker in self._busy}

    def _take(self, process_memory_mib: int) -> _Worker:
        with self._ready:
            # A spare on its way is nearer than a fresh start.
            self._ready.wait_for(lambda: self._idle.get(process_memory_mib) or not self._starting[process_memory_mib],
                                 timeout=_START_TIMEOUT_S)
            idle = self._idle.get(process_memory_mib)
            worker = idle.pop() if idle else None
        if worker is None:
            worker = _Worker(process_memory_mib)
        with self._ready:
            self._busy.add(worker)
        return worker

    def _give_back(self, worker: _Worker) -> None:
        with self._ready:
            idle = self._idle.setdefault(worker.process_memory_mib, [])
            if len(idle) < self.max_running:
                idle.append(worker)
                self._ready.notify_all()
                return
        worker.close()

    def prepare(self, limits: SqlLimits) -> None:
        """Start a worker for `limits` in the background when none is idle or starting, so that the
        next query does not wait for one (the SQL page calls this when it opens)."""
        process_memory_mib = limits.process_memory_mib
        with self._ready:
            if self._idle.get(process_memory_mib) or self._starting[process_memory_mib]:
                return
            self._starting[process_memory_mib] += 1

        def start() -> None:
            try:
                self._give_back(_Worker(process_memory_mib))
            except Exception:  # noqa: BLE001 - the next query starts its own and reports why
                pass
            finally:
                with self._ready:
                    self._starting[process_memory_mib] -= 1
                    self._ready.notify_all()

        threading.Thread(target=start, name="seglab-sql-spare", daemon=True).start()

    def run(self, snapshot: Path, sql: str, limits: SqlLimits) -> SqlResult:
        """Run `sql` on the copy at `snapshot` in a worker under `limits`."""
        if not self._turns.acquire(timeout=limits.timeout_s):
            raise SqlTimeout(f"{self.max_running} other SQL-page queries kept running for {limits.timeout_s:g} s; "
                             "try again when they have finished")
        try:
            return self._run(snapshot, sql, limits)
        finally:
            self._turns.release()
            self.prepare(limits)

    def _run(self, snapshot: Path, sql: str, limits: SqlLimits) -> SqlResult:
        worker = self._take(limits.process_memory_mib)
        keep = False
        try:
            try:
                worker.conn.send((str(snapshot), sql, limits))
                if not worker.conn.poll(limits.timeout_s + _KILL_GRACE_S):
                    raise SqlTimeout(_timeout_message(limits.timeout_s))
                kind, *answer, grown_mib = worker.conn.recv()
            except (EOFError, OSError):
                # The OS limit ends most runaway queries inside DuckDB; one that fails where
                # nothing can report it (an allocation in a destructor, say) ends the process.
                raise SqlOutOfMemory(_memory_message(limits.process_memory_mib, f"its process ended: {worker.ended()}")
                                     ) from None
            keep = grown_mib < _RETIRE_GROWTH_MIB and not (kind == "error" and answer[0] == "SqlOutOfMemory")
            if kind == "ok":
                return answer[0]
            raise _error(*answer)
        finally:
            with self._ready:
                self._busy.discard(worker)
            if keep:
                self._give_back(worker)
            else:
                worker.close()


WORKERS = SqlWorkers()


def run_sql(path: str | Path, sql: str, limits: SqlLimits = SqlLimits(), *,
            snapshots: WarehouseSnapshots = SNAPSHOTS, workers: SqlWorkers = WORKERS) -> SqlResult:
    """The SQL page's query: `sql` checked and run under `limits` on a snapshot of the warehouse, in
    a worker process (`SqlWorkers`)."""
    with snapshots.checkout(path) as snapshot:
        return workers.run(snapshot, sql, limits)
