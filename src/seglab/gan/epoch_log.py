"""`EpochLog`: the per-epoch history CSV and sample grids of a resumable GAN run."""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path

import keras
import numpy as np

from seglab.atomic import write_text_atomic
from seglab.gan.common import render, save_sample_grid

log = logging.getLogger(__name__)

__all__ = ["EpochLog"]


class EpochLog(keras.callbacks.Callback):
    """Per-epoch history CSV and sample grids in the work folder, consistent across resumes.

    Place it before `BackupAndRestore`, so an epoch is logged before it is backed up: a kill
    between the two leaves one history row too many, never one too few. The first epoch `fit`
    starts (after the backup was restored in `on_train_begin`) tells where the run stands; rows
    from that epoch on are dropped before it runs again.
    """

    def __init__(self, history_path: Path, samples_dir: Path, *, epochs: int, sample_every: int,
                 sample_inputs: np.ndarray, loss_names: tuple[str, ...]):
        super().__init__()
        self.history_path, self.samples_dir = Path(history_path), Path(samples_dir)
        self.epochs, self.sample_every = epochs, sample_every
        self.sample_inputs = sample_inputs
        self.columns = ["epoch", *loss_names, "seconds"]
        self.rows: list[dict] = []
        self.resumed_from_epoch: int | None = None
        self._epoch_started = 0.0

    def _read_rows(self) -> list[dict]:
        if not self.history_path.is_file():
            return []
        with self.history_path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and list(rows[0]) != self.columns:
            raise ValueError(f"{self.history_path}: columns {list(rows[0])} differ from {self.columns}; "
                             "delete the work folder to start afresh")
        return rows

    def _write_rows(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.history_path, buffer.getvalue())

    def on_train_begin(self, logs=None):
        self.rows = self._read_rows()

    def on_epoch_begin(self, epoch, logs=None):
        if self.resumed_from_epoch is None:
            self.resumed_from_epoch = epoch
            kept = [row for row in self.rows if int(row["epoch"]) <= epoch]
            if len(kept) != epoch:
                raise ValueError(f"{self.history_path}: has {len(kept)} rows before epoch {epoch + 1}, where the "
                                 "backup resumes; delete the work folder to start afresh")
            if len(kept) != len(self.rows):
                log.info("dropping %d history row(s) logged after the last backup", len(self.rows) - len(kept))
                self.rows = kept
                self._write_rows()
        self._epoch_started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - self._epoch_started, 3)}
        row.update({name: float(logs[name]) for name in self.columns[1:-1]})
        self.rows.append(row)
        self._write_rows()
        if (epoch + 1) % self.sample_every == 0 or epoch + 1 == self.epochs:
            self.write_samples(epoch + 1)

    def write_samples(self, epoch: int) -> Path:
        images, labels = render(self.model.generator, self.sample_inputs)
        return save_sample_grid(self.samples_dir / f"epoch_{epoch:03d}.png", images, labels)
