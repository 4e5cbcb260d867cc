"""Training that survives interruption: resumable checkpoints, clean stops, a guard on the loss.

A training's checkpoint lives in `.checkpoints/<fingerprint>/` at the project root, outside
DVC's outputs (which DVC deletes before a stage runs) and outside Hydra's per-run folders. The
fingerprint covers everything the training depends on (config, the built model, the prepared
data), so the same command after a `kill -9` resumes from the last completed epoch (weights,
optimizer state, epoch counter: Keras's BackupAndRestore) while any change starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import keras

from pipeline.config import Config, to_dict
from pipeline.errors import Interrupted, TrainingError
from pipeline.files import read_json, write_json
from pipeline.metric_names import LOSS

CHECKPOINTS_DIR = ".checkpoints"
TRAINING_KEYS = ("seed", "data", "model", "augment", "optimizer", "trainer")


class TrainingInterrupted(Interrupted):
    """SIGTERM or Ctrl-C stopped training after a completed step; the checkpoint is kept."""


def fingerprint(cfg: Config, model: keras.Model, *inputs: Path) -> str:
    """A digest of the training config, the initial model (architecture and weights; a saved
    `.keras` file also holds its save date) and the input files' contents."""
    config = {key: to_dict(cfg)[key] for key in TRAINING_KEYS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    digest.update(json.dumps(model.get_config(), sort_keys=True, default=str).encode())
    for weights in model.get_weights():
        digest.update(weights.tobytes())
    for path in inputs:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


class Checkpoint:
    """The checkpoint folder of one training: Keras's backup, the epochs so far, the run id."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.backup_dir = self.folder / "backup"
        self._history = self.folder / "history.json"
        self._run = self.folder / "mlflow_run.json"

    def completed_epochs(self) -> list[dict[str, float]]:
        return read_json(self._history) if self._history.is_file() else []

    def save_epochs(self, rows: list[dict[str, float]]) -> None:
        write_json(self._history, rows)

    def previous_run_id(self) -> str | None:
        return read_json(self._run)["run_id"] if self._run.is_file() else None

    def save_run_id(self, run_id: str) -> None:
        write_json(self._run, {"run_id": run_id})

    def callback(self) -> keras.callbacks.Callback:
        # kept on train end: a clean stop (SIGTERM) must leave it for the resume
        return keras.callbacks.BackupAndRestore(str(self.backup_dir), save_freq="epoch",
                                                delete_checkpoint=False)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class LossGuard(keras.callbacks.Callback):
    """Fails training at the first step whose loss is NaN or infinite.

    Keras's TerminateOnNaN stops training but lets `fit` return normally with NaN weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get(LOSS, 0.0))
        if not math.isfinite(loss):
            raise TrainingError(f"the loss became {loss} in epoch {self.epoch}, step {batch + 1}: "
                                "training diverged; lower optimizer.learning_rate (e.g. by 10x)")


class StopOnSignal(keras.callbacks.Callback):
    """Ends `fit` at the end of the step during which a signal came, before the epoch's end:
    `model.stop_training` alone would let `fit` run the epoch-end callbacks, which would
    checkpoint and log the cut-short epoch as completed, so the resume would skip its rest."""

    def __init__(self, received: list[int]):
        super().__init__()
        self.received = received

    def on_train_batch_end(self, batch, logs=None):
        if self.received:
            raise TrainingInterrupted(self.received[0])


@contextmanager
def stop_cleanly_on_signals(model: keras.Model) -> Iterator[keras.callbacks.Callback]:
    """SIGTERM and SIGINT stop `fit` after the current step, then raise TrainingInterrupted;
    a second signal interrupts at once. Give `fit` the callback this yields: a signal during
    a step ends training there, one between steps (validation, epoch end) after that epoch."""
    received: list[int] = []

    def handler(signum, frame):
        if received:
            raise TrainingInterrupted(signum)
        received.append(signum)
        model.stop_training = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield StopOnSignal(received)
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    if received:
        raise TrainingInterrupted(received[0])
