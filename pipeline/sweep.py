"""Hydra multiruns as MLflow sweeps: one parent run per sweep, each job a child of it.

Registered in `conf/config.yaml` under `hydra.callbacks`. At the start of a multirun the
callback creates the parent run (tag `sweep.id`) and hands its id to the jobs through the
environment (inherited by launcher subprocesses too); at the end it writes the comparison
report into the sweep folder, logs it to the parent and ends the parent FINISHED. A sweep that
dies on the way ends its parent FAILED when the process exits (KILLED on SIGTERM or Ctrl-C),
and ends KILLED the runs of jobs whose processes were killed (a parallel launcher kills the
other jobs when one fails). A sweep named by `mlflow.sweep_id` keeps one parent: a second
multirun under the same name adds its runs to it, and first ends KILLED the runs that a killed
process left RUNNING there (an Optuna study resumed after kill -9, `pipeline.search`).
"""

from __future__ import annotations

import atexit
import os
import signal
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline import project, tracking
from pipeline.errors import exiting_interrupted, raise_interrupted


def new_sweep_id() -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


class MlflowSweep(Callback):
    """Hydra callback: an MLflow parent run around each multirun."""

    def __init__(self) -> None:
        self.parent_run_id: str | None = None
        self.sweep_id: str | None = None
        self.experiment_id: str | None = None
        self.status_at_exit = "FAILED"  # KILLED once a signal came between the jobs
        self.previous_handlers: dict[int, Any] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        root = project.project_root()
        tracking.connect(tracking.tracking_uri(config.mlflow.tracking_uri, root))
        self.experiment_id = tracking.ensure_experiment(config.mlflow.experiment_name)
        self.sweep_id = config.mlflow.sweep_id or new_sweep_id()
        joined = os.environ.get(tracking.ENV_JOIN_PARENT_RUN_ID)
        if joined:  # another process owns the parent: add runs to it, leave it to that one
            self._set_parent(joined)
            return
        overrides = " ".join(config.hydra.overrides.task)
        with project.file_lock(tracking.sweep_lock(root)):  # searches started together
            self.parent_run_id = tracking.reopen_sweep_parent(
                self.experiment_id, self.sweep_id) if config.mlflow.sweep_id else None
            if self.parent_run_id is None:
                self.parent_run_id = tracking.create_sweep_parent(
                    self.experiment_id, self.sweep_id,
                    {"pipeline.entry_point": "python -m pipeline -m",
                     "sweep.overrides": overrides})
            else:  # runs a kill -9 left RUNNING before this resume
                killed = tracking.end_orphaned_runs(self.experiment_id, self.sweep_id)
                if killed:
                    print(f"sweep {self.sweep_id}: {len(killed)} run(s) of killed processes "
                          "ended KILLED in MLflow", flush=True)
        self._set_parent(self.parent_run_id)
        atexit.register(lambda: self._end_parent(
            "KILLED" if exiting_interrupted() else self.status_at_exit))
        self.previous_handlers = {s: signal.signal(s, self._interrupted)
                                  for s in (signal.SIGTERM, signal.SIGINT)}
        print(f"sweep {self.sweep_id}: MLflow parent run {self.parent_run_id}", flush=True)

    def _set_parent(self, parent_run_id: str) -> None:
        """The jobs' runs become children of `parent_run_id`."""
        os.environ[tracking.ENV_SWEEP_ID] = self.sweep_id
        os.environ[tracking.ENV_PARENT_RUN_ID] = parent_run_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is None:  # a joined parent: its own process reports and ends it
            return
        from pipeline import compare

        out_dir = Path(config.hydra.sweep.dir)
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        runs = compare.select_runs(client, sweep_id=self.sweep_id)
        table, figure = compare.write_report(client, runs, out_dir)
        compare.log_to_parent(client, runs, [table, figure])
        print(f"\nsweep {self.sweep_id}: {len(runs)} runs compared in {table} and {figure}",
              flush=True)
        self._end_parent("FINISHED")

    def _interrupted(self, signum: int, frame) -> None:
        """SIGTERM or Ctrl-C outside a job's run: the parent ends KILLED when the process
        exits (within a run, the run's own handling ends the job KILLED and says so)."""
        self.status_at_exit = "KILLED"
        raise_interrupted(signum, frame)

    def _end_parent(self, status: str) -> None:
        if self.parent_run_id is None:
            return
        from mlflow.tracking import MlflowClient

        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}
        if status != "FINISHED":
            killed = tracking.end_orphaned_runs(self.experiment_id, self.sweep_id)
            if killed:
                print(f"sweep {self.sweep_id}: {len(killed)} killed job(s) ended KILLED in MLflow",
                      flush=True)
        MlflowClient().set_terminated(self.parent_run_id, status)
        self.parent_run_id = None
        for name in (tracking.ENV_SWEEP_ID, tracking.ENV_PARENT_RUN_ID):
            os.environ.pop(name, None)
