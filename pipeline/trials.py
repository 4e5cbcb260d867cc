"""The search trial a training in this process belongs to, when a hyperparameter search runs it.

Hydra's launcher calls the task function (`python -m pipeline`'s `main`) with the job's config
alone, in this process. So the search (`pipeline.search`) links the Optuna trial here for the
length of the job, and `train.run` asks for it: training reports each epoch's validation
accuracy to the trial, whose pruner may stop it (`TrialPruned`), and hands back the value of
the epoch whose weights it kept, the trial's objective. Without a search nothing is linked and
training runs as always.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.errors import TrialPruned
from pipeline.metric_names import VAL_ACCURACY

STUDY_TAG = "optuna.study"  # on each trial's MLflow run
TRIAL_TAG = "optuna.trial"  # the trial number
STATE_TAG = "optuna.state"  # COMPLETE, PRUNED or FAIL, set when the trial ends
RUN_ATTR = "mlflow.run_id"  # on the Optuna trial: its MLflow run


class TrialLink:
    """What one trial and its training share: the Optuna trial (`optuna.Trial`), the metric it
    is scored on, and what training hands back (the MLflow run, the objective, or the epoch it
    was pruned after)."""

    def __init__(self, trial: Any, study_name: str, monitor: str = VAL_ACCURACY):
        self.trial = trial
        self.study_name = study_name
        self.monitor = monitor
        self.run_id: str | None = None
        self.value: float | None = None  # the objective, once training has ended
        self.pruned_at: int | None = None

    def attach_run(self, run_id: str) -> dict[str, str]:
        """Record the trial's MLflow run on the trial; return the run's tags."""
        self.run_id = run_id
        self.trial.set_user_attr(RUN_ATTR, run_id)
        return {STUDY_TAG: self.study_name, TRIAL_TAG: str(self.trial.number)}

    def report(self, row: dict[str, float]) -> None:
        """Report one epoch's history row to the trial.

        Raises:
            TrialPruned: the pruner stops the trial after this epoch.
        """
        epoch = int(row["epoch"])
        self.trial.report(float(row[self.monitor]), epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            raise TrialPruned(epoch)

    def report_completed(self, rows: list[dict[str, float]]) -> None:
        """Report the epochs a resumed training completed before it was killed (the retry of
        an interrupted trial), as if it had run them."""
        for row in rows:
            self.report(row)

    def finish(self, row: dict[str, float]) -> None:
        """Training ended with the weights of the epoch of `row`: its value is the objective."""
        self.value = float(row[self.monitor])


_linked: list[TrialLink] = []  # the trial of the job running now, if a search runs it


@contextmanager
def linked(link: TrialLink) -> Iterator[TrialLink]:
    """Make `link` the active trial for the block (the search runs one job in it)."""
    _linked.append(link)
    try:
        yield link
    finally:
        _linked.remove(link)


def active() -> TrialLink | None:
    """The trial the training in this process belongs to, or None outside a search."""
    return _linked[-1] if _linked else None
