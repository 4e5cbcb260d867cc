"""Training that survives interruption: resumable checkpoints, clean stops, a guard on the loss.

A training's checkpoint lives in `.checkpoints/<fingerprint>/` at the project root, outside
DVC's outputs (which DVC deletes before a stage runs) and outside Hydra's per-run folders. The
fingerprint covers everything the training depends on (config, the built model, the prepared
data), so the same command after a `kill -9` resumes from the last completed epoch, and ends
with the weights an uninterrupted run ends with, while any change starts afresh.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import math
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import keras
import numpy as np

from pipeline.config import Config, to_dict
from pipeline.errors import Interrupted, TrainingError, TrialPruned
from pipeline.files import atomic_dir, read_arrays, read_json, write_arrays, write_json
from pipeline.metric_names import LOSS
from pipeline.processes import is_running

CHECKPOINTS_DIR = ".checkpoints"
TRAINING_KEYS = ("seed", "data", "model", "augment", "optimizer", "trainer")
WEIGHTS_FILE = "state.weights.h5"
RANDOM_STATES_FILE = "random_states.npz"
HISTORY_JSON = "history.json"
BEST_WEIGHTS_FILE = "best_epoch.npz"  # early stopping: the best epoch's weights and its number


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
    """The checkpoint folder of one training: the state after each completed epoch, the run id.

    An epoch's state is everything the rest of the training depends on: the weights (BatchNorm
    statistics included), the optimizer's variables (its step, and with it the learning-rate
    schedule), the random states of the layers that draw (dropout, augmentation), and the
    per-epoch history. Keras's `BackupAndRestore` keeps the first two only, so a resumed run
    drew the first epoch's dropout masks again. The data order is no state: `pipeline.stream`
    derives it from the seed and the epoch. Each epoch is written whole into a folder of its
    own before `latest.json` names it, so a kill at any moment leaves the last complete one.
    Under early stopping the folder also keeps the best epoch's weights (`save_best`).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._latest = self.folder / "latest.json"
        self._run = self.folder / "mlflow_run.json"

    def _epoch_dir(self) -> Path | None:
        if not self._latest.is_file():
            return None
        folder = self.folder / read_json(self._latest)["folder"]
        return folder if folder.is_dir() else None

    def completed_epochs(self) -> list[dict[str, float]]:
        folder = self._epoch_dir()
        return read_json(folder / HISTORY_JSON) if folder else []

    def previous_run_id(self) -> str | None:
        return read_json(self._run)["run_id"] if self._run.is_file() else None

    def save_run_id(self, run_id: str) -> None:
        write_json(self._run, {"run_id": run_id})

    def save(self, model: keras.Model, rows: list[dict[str, float]]) -> None:
        """Write the state after epoch `len(rows)`, then make it the one to resume from."""
        name = f"epoch-{len(rows)}"
        with atomic_dir(self.folder / name) as tmp:
            model.save_weights(tmp / WEIGHTS_FILE)  # the model's and the optimizer's variables
            write_arrays(tmp / RANDOM_STATES_FILE, **{
                f"{i:04d}": keras.ops.convert_to_numpy(v)
                for i, v in enumerate(random_states(model))})
            write_json(tmp / HISTORY_JSON, rows)
        write_json(self._latest, {"folder": name})
        for old in self.folder.glob("epoch-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def save_best(self, weights: list[np.ndarray], epoch: int) -> None:
        """Keep `weights`, those of epoch `epoch`, the best so far: early stopping puts them
        back at the end of training, also of a training resumed after a kill."""
        write_arrays(self.folder / BEST_WEIGHTS_FILE, epoch=np.asarray(epoch),
                     **{f"w{i:04d}": w for i, w in enumerate(weights)})

    def best_weights(self) -> tuple[int, list[np.ndarray]] | None:
        """(epoch, weights) as `save_best` kept them, or None."""
        path = self.folder / BEST_WEIGHTS_FILE
        if not path.is_file():
            return None
        arrays = read_arrays(path)
        epoch = int(arrays.pop("epoch"))
        return epoch, [arrays[key] for key in sorted(arrays)]

    def restore(self, model: keras.Model) -> int:
        """Load the last saved state into the compiled `model`; return its epoch (0: none)."""
        return self._restore(model, with_optimizer=True)

    def restore_model(self, model: keras.Model) -> int:
        """Load the last saved state but the optimizer's variables into `model`; return its
        epoch (0: none). For a resume at the start of a training phase with an optimizer of
        its own (fine-tuning after the frozen epochs of transfer learning): the saved
        optimizer state belongs to the phase before, and the new phase starts afresh."""
        return self._restore(model, with_optimizer=False)

    def _restore(self, model: keras.Model, with_optimizer: bool) -> int:
        folder = self._epoch_dir()
        if folder is None:
            return 0
        skip = None
        if model.optimizer is not None:
            if not with_optimizer:
                skip = [model.optimizer]
            elif not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
        model.load_weights(folder / WEIGHTS_FILE, objects_to_skip=skip)
        saved = read_arrays(folder / RANDOM_STATES_FILE)
        states = random_states(model)
        if len(saved) != len(states):
            raise TrainingError(f"the checkpoint in {folder} holds {len(saved)} random states "
                                f"and the model has {len(states)}; delete {self.folder} to "
                                "train from the start")
        for variable, key in zip(states, sorted(saved)):
            variable.assign(saved[key])
        return len(read_json(folder / HISTORY_JSON))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def claimed(folder: Path) -> Iterator[Checkpoint]:
    """The checkpoint in `folder`, held by this process for the block. Two trainings of one
    config at the same time (two search processes that drew the same values, two terminals)
    would resume each other's epochs: the second gets a folder of its own and starts from the
    first epoch. Such folders of processes that died are removed first: nothing resumes them."""
    remove_orphans(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            own = folder.with_name(f"{folder.name}-{os.getpid()}")
            print(f"train: another process trains the same config with the checkpoint {folder};"
                  f" this one keeps its own, {own}", flush=True)
            yield Checkpoint(own)
            return
        yield Checkpoint(folder)


def remove_orphans(folder: Path) -> list[Path]:
    """Delete the folders `<folder>-<pid>` (see `claimed`) whose process is gone; return them."""
    removed = []
    for other in folder.parent.glob(f"{glob.escape(folder.name)}-*"):
        pid = other.name[len(folder.name) + 1:]
        if pid.isdigit() and not is_running(int(pid)):
            shutil.rmtree(other, ignore_errors=True)
            removed.append(other)
    return removed


@contextmanager
def removed_if_pruned(checkpoint: Checkpoint) -> Iterator[None]:
    """Delete the checkpoint when a search's pruner stops the training in the block: a pruned
    trial is over, and nothing will resume it."""
    try:
        yield
    except TrialPruned:
        checkpoint.remove()
        raise


def random_states(model: keras.Model) -> list:
    """The states of the model's seed generators (dropout masks, augmentation draws), which
    `save_weights` leaves out, in the model's own order. Keras names each such variable
    `seed_generator_state`; the rest of `model.variables` is weights and metric totals."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


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
