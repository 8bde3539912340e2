"""Resuming a killed run: atomic commits, at epoch ends, of everything the rest of the run depends on.

A run's state lives in one folder (``<train.state>/<name>/``): ``run.json`` (the run's key: params
hash and shard fingerprints) and ``backup/``, written by `ResumableBackup` at the end of an epoch:
model and optimizer weights, the epoch, and the state of every stateful part of the recipe
(history, plateau counters and scale, early-stopping counters and the best epoch's weights, whether
the encoder trains) form one commit, published by an atomic rename of a pointer file. A run killed
at any point restarts from the last committed epoch with exactly the state it had then; epochs
that ran after the commit are run again. A state left by other settings or data is discarded.

A commit writes the whole optimizer state, which costs about as much as a short epoch's training
steps (benchmarks/README.md, "Fixed costs"): `train.commit_every_seconds` spaces the commits, so a
kill costs at most that much training time plus one epoch; 0 commits after every epoch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import keras
import numpy as np

from seglab.atomic import write_text_atomic

log = logging.getLogger(__name__)

__all__ = ["ArrayState", "AttributeState", "BestWeightsState", "ResumableBackup", "Stateful", "VariableState",
           "clear_state", "open_state_dir"]

_COMMIT_PATTERN = re.compile(r"^epoch-(\d+)$")


class Stateful(Protocol):
    """A part of the recipe whose state is committed with each epoch and restored on resume."""

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: Mapping[str, Any]) -> None: ...


class AttributeState:
    """Saves/restores named attributes of a library callback (its counters and best score)."""

    def __init__(self, obj: Any, names: Sequence[str]):
        self.obj, self.names = obj, tuple(names)

    def get_state(self) -> dict[str, Any]:
        return {name: getattr(self.obj, name) for name in self.names}

    def set_state(self, state: Mapping[str, Any]) -> None:
        for name in self.names:
            setattr(self.obj, name, state[name])


class VariableState:
    """Saves/restores a scalar `keras.Variable` (e.g. the learning-rate plateau scale)."""

    def __init__(self, variable: keras.Variable, key: str = "value"):
        self.variable, self.key = variable, key

    def get_state(self) -> dict[str, Any]:
        return {self.key: float(self.variable.numpy())}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.variable.assign(float(state[self.key]))


class ArrayState(Protocol):
    """A part of the recipe whose state is a list of arrays (or None), committed as one ``.npz`` file."""

    def get_arrays(self) -> list[np.ndarray] | None: ...

    def set_arrays(self, arrays: list[np.ndarray] | None) -> None: ...


class BestWeightsState:
    """The best epoch's weights that `keras.callbacks.EarlyStopping(restore_best_weights=True)` holds."""

    def __init__(self, stopping: keras.callbacks.EarlyStopping):
        self.stopping = stopping

    def get_arrays(self) -> list[np.ndarray] | None:
        return self.stopping.best_weights

    def set_arrays(self, arrays: list[np.ndarray] | None) -> None:
        self.stopping.best_weights = arrays


class ResumableBackup(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` whose end-of-epoch backup is one atomic commit, history and callbacks included.

    Layout of `backup_dir`::

        LATEST                  name of the committed folder (replaced atomically)
        epoch-0003/             latest.weights.h5, training_metadata.json, state.json, <array state>.npz

    A commit is written into a temporary folder, renamed to ``epoch-NNNN`` and published by
    rewriting ``LATEST``; a kill before that leaves the previous commit in force, and leftovers
    of the unfinished one are removed on restore. `stateful` maps names to `Stateful` objects and
    `arrays` names to `ArrayState` objects (the best epoch's weights, kept in memory between
    commits): every one the run's outcome depends on must be given here, since only these are saved
    with each commit; they are restored at the start of `fit` (after the other callbacks'
    ``on_train_begin``, since this callback must come last).
    """

    def __init__(self, backup_dir: str | Path, stateful: Mapping[str, Stateful],
                 run_key: Mapping[str, Any] | None = None, *, arrays: Mapping[str, ArrayState] | None = None,
                 commit_every_seconds: float = 0.0):
        super().__init__(str(backup_dir), save_freq="epoch", delete_checkpoint=False)
        self.root = Path(backup_dir)
        self.stateful = dict(stateful)
        self.arrays = dict(arrays or {})
        self.run_key = dict(run_key or {})
        self.commit_every_seconds = float(commit_every_seconds)
        self.restored_epoch = 0
        self._last_commit = time.monotonic()

    def committed(self) -> tuple[Path, dict[str, Any]] | None:
        """(folder, state.json) of the committed backup, or None if there is none."""
        pointer = self.root / "LATEST"
        if not pointer.is_file():
            return None
        folder = self.root / pointer.read_text().strip()
        try:
            state = json.loads((folder / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RuntimeError(f"{folder}: the committed training state is unreadable ({err}); "
                               f"delete {self.root} to start this run from scratch") from None
        return folder, state

    # ---------------------------------------------------------------------------- keras hooks

    def on_train_begin(self, logs=None):
        # Replaces the parent's: its fallback to a ".bkp" copy is not needed with atomic commits.
        self._load_model()
        self._last_commit = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        self._current_epoch = epoch + 1
        if time.monotonic() - self._last_commit >= self.commit_every_seconds:
            self._save_model()
            self._last_commit = time.monotonic()

    def _load_model(self):
        self._remove_uncommitted()
        found = self.committed()
        if found is None:
            self.restored_epoch = 0
            return
        folder, state = found
        if self.run_key and state.get("run_key") != self.run_key:
            raise RuntimeError(f"{folder}: training state of another run (key {state.get('run_key')}, expected "
                               f"{self.run_key}); clear it with seglab.train.resume.clear_state")
        self._weights_path = str(folder / "latest.weights.h5")
        self._training_metadata_path = str(folder / "training_metadata.json")
        super()._load_model()
        for name, obj in self.stateful.items():
            if name not in state["states"]:
                raise RuntimeError(f"{folder}/state.json: no state for {name!r}; delete {self.root} to start "
                                   "this run from scratch")
            obj.set_state(state["states"][name])
        for name, obj in self.arrays.items():
            if name not in state.get("arrays", {}):
                raise RuntimeError(f"{folder}/state.json: no entry for {name!r}; delete {self.root} to start "
                                   "this run from scratch")
            if state["arrays"][name] is None:
                obj.set_arrays(None)
                continue
            with np.load(folder / state["arrays"][name]) as stored:
                obj.set_arrays([stored[f"arr_{i}"] for i in range(len(stored.files))])
        self.restored_epoch = int(state["epoch"])
        self._current_epoch = self.restored_epoch
        log.info("resumed from %s: %d epoch(s) done", folder, self.restored_epoch)

    def _remove_uncommitted(self) -> None:
        if not self.root.is_dir():
            return
        pointer = self.root / "LATEST"
        current = pointer.read_text().strip() if pointer.is_file() else None
        for path in self.root.iterdir():
            if path.name.endswith(".tmp") or (_COMMIT_PATTERN.match(path.name) and path.name != current):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def _save_model(self):
        epoch = self._current_epoch
        name = f"epoch-{epoch:04d}"
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.model.save_weights(str(tmp / "latest.weights.h5"))
        (tmp / "training_metadata.json").write_text(json.dumps({"epoch": epoch, "batch": 0}))
        arrays = {}
        for name_, obj in self.arrays.items():
            values = obj.get_arrays()
            arrays[name_] = None if values is None else f"{name_}.npz"
            if values is not None:
                np.savez(tmp / f"{name_}.npz", *values)
        state = {
            "run_key": self.run_key,
            "epoch": epoch,
            "stop_training": bool(self.model.stop_training),
            "states": {name_: obj.get_state() for name_, obj in self.stateful.items()},
            "arrays": arrays,
        }
        # Infinity stays Infinity (an unset best score): Python's json reads it back.
        (tmp / "state.json").write_text(json.dumps(state, default=lambda value: value.item()))
        target = self.root / name
        if target.exists():  # an uncommitted leftover of the same epoch
            shutil.rmtree(target)
        os.replace(tmp, target)
        write_text_atomic(self.root / "LATEST", name)
        # Committed: older commits can go.
        for path in self.root.iterdir():
            if _COMMIT_PATTERN.match(path.name) and path.name != name:
                shutil.rmtree(path, ignore_errors=True)


def open_state_dir(state_dir: str | Path, run_key: Mapping[str, Any]) -> Path:
    """Create a run's state folder keyed by `run_key`; a state another configuration or other shards
    left there is removed first (logged), since it would resume the wrong run."""
    state_dir = Path(state_dir)
    if state_dir.exists():
        try:
            previous = json.loads((state_dir / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != dict(run_key):
            log.warning("%s: discarding a training state from other settings or data (%s; this run is %s)",
                        state_dir, previous, dict(run_key))
            clear_state(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(state_dir / "run.json", json.dumps(dict(run_key)) + "\n")
    return state_dir


def clear_state(state_dir: str | Path) -> None:
    """Delete a run's resume state (after its outputs are written, or to force a fresh start)."""
    shutil.rmtree(state_dir, ignore_errors=True)
