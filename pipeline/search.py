"""Hyperparameter search: an Optuna study whose trials are Hydra jobs of `python -m pipeline`.

    python -m pipeline -m hparams_search=optuna hparams_search.n_trials=30

`conf/hparams_search/optuna.yaml` selects the sweeper `pipeline_optuna` (hydra_plugins/
pipeline_search), which hands the study to `sweep`. Each trial is one job that Hydra's basic
launcher runs in this process: TPE (seeded) draws the trial's values from the search space
(`hydra.sweeper.params` and sweeps on the command line), training reports the validation
accuracy after every epoch (`pipeline.trials`) so that the pruner can stop a hopeless trial,
and the trial's value is the validation accuracy of the epoch whose weights training kept.
The test split is scored in each run's report and never chooses.

What survives what:
- The study lives in an RDB storage (`optuna.db` beside `mlflow.db` unless
  `hparams_search.storage` names another): the same command again continues it up to
  `n_trials`; completed trials are kept and never rerun.
- A trial whose process was killed (kill -9: found RUNNING by the next search on this host;
  Ctrl-C or SIGTERM: at once) ends FAIL in the study and is queued again with its values; its
  training resumes from its checkpoint, and its first MLflow run ends KILLED.
- A trial that fails (NaN loss, out of memory, a combination the config refuses) ends FAIL,
  its MLflow run FAILED, and the study goes on. A pruned trial ends PRUNED, its MLflow run
  KILLED with the tag `pipeline.pruned_at_epoch`.

In MLflow the study is one sweep (`pipeline.sweep`, sweep id = the study name): a parent run
with the study's settings as params and a child run per trial; at the end the parent gets the
best trial's values and metrics, Optuna's optimisation history and parameter importances as
PNG, and the comparison report of the finished runs; the best trial's model is registered as
`models:/<mlflow.experiment_name>@champion` (`pipeline.promote`).
"""

from __future__ import annotations

import gc
import os
import re
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from pipeline import project, tracking, trials
from pipeline.config import SEARCH_KEY, validate
from pipeline.errors import ConfigError, PipelineError, exiting_interrupted, fail
from pipeline.metric_names import VAL_ACCURACY
from pipeline.params import explain_override_error

DEFAULT_STORAGE = "optuna.db"  # at the project root, beside mlflow.db
STORAGE_ATTEMPTS = 3  # to open a new storage whose tables another machine is creating
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
PRUNERS = ("none", "median", "hyperband", "successive_halving")
OBJECTIVE = VAL_ACCURACY  # maximised; what `trials.TrialLink` reports
SPACE_ATTR = "search_space"  # on the study: the space it was created with
HOST_ATTR = tracking.HOST_TAG  # on each trial: the process that runs it, as on MLflow runs
PID_ATTR = tracking.PID_TAG
RETRY_OF_ATTR = "pipeline.retry_of"  # on a trial queued again: the interrupted trial's number
ENV_WORKER = "PIPELINE_SEARCH_WORKER"  # set for the extra processes of `n_jobs`: 1, 2, ...
WORKER_SEED_STRIDE = 7919  # between the sampler seeds of a search's processes
HISTORY_PNG = "optimization_history.png"
IMPORTANCE_PNG = "param_importances.png"
FIGURES_ARTIFACT_DIR = "optuna"
SIMPLE_VALUE = re.compile(r"[A-Za-z_][\w./-]*")  # a string written unquoted in an override
NOT_STRINGS = ("true", "false", "null", "nan", "inf")  # Hydra reads these unquoted as no string

Launch = Callable[[list[str], int], JobReturn]  # (overrides, job number) -> the job's return
Compose = Callable[[list[str]], DictConfig]  # overrides -> the job's config, as Hydra composes it


def _require(ok: bool, key: str, value: Any, rule: str, example: str) -> None:
    if not ok:
        raise ConfigError(f"{SEARCH_KEY}.{key}={value!r}: {rule}; "
                          f"for example {SEARCH_KEY}.{key}={example}")


@dataclass
class SearchConfig:
    """The search's settings, `hparams_search` in conf/hparams_search/optuna.yaml."""

    study_name: str = MISSING  # names the MLflow sweep too
    storage: str | None = MISSING  # an RDB URL; null: sqlite optuna.db at the project root
    n_trials: int = MISSING  # trials that end (complete, pruned, failed), over every run
    timeout: float | None = MISSING  # seconds after which this process starts no new trial
    pruner: str = MISSING  # none | median | hyperband | successive_halving
    startup_trials: int = MISSING  # median: trials that complete before any is pruned
    warmup_epochs: int = MISSING  # median, successive_halving: epochs before any pruning
    reduction_factor: int = MISSING  # successive_halving, hyperband: 1 in this many go on
    sampler_seed: int = MISSING
    n_jobs: int = MISSING  # search processes on this machine, sharing the study

    def __post_init__(self) -> None:
        _require(re.fullmatch(r"[\w.:-]+", self.study_name) is not None, "study_name",
                 self.study_name, "must be letters, digits and _ . : - only", "lr-search")
        _require(self.n_trials > 0, "n_trials", self.n_trials,
                 "must be a positive number of trials", "20")
        _require(self.timeout is None or self.timeout > 0, "timeout", self.timeout,
                 "must be a positive number of seconds, or null for none", "3600")
        _require(self.pruner in PRUNERS, "pruner", self.pruner,
                 f"choose one of {', '.join(PRUNERS)}", "median")
        _require(self.startup_trials >= 0, "startup_trials", self.startup_trials,
                 "must be >= 0", "5")
        _require(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs,
                 "must be >= 0", "1")
        _require(self.reduction_factor >= 2, "reduction_factor", self.reduction_factor,
                 "must be >= 2 (the best 1 in that many trials at a rung go on)", "3")
        _require(self.n_jobs >= 1, "n_jobs", self.n_jobs,
                 "must be a positive number of search processes", "2")


def read_settings(raw: Any) -> SearchConfig:
    """Check the `hparams_search` settings against `SearchConfig`.

    Raises:
        ConfigError: one line naming the bad key or value and the fix.
    """
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SearchConfig), raw))
    except OmegaConfBaseException as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"{SEARCH_KEY}.{getattr(err, 'full_key', '')}: "
                          f"{str(err).splitlines()[0]}; see conf/hparams_search/optuna.yaml"
                          ) from None


@dataclass
class SearchSpace:
    """What each trial draws (`distributions`, with each as written in `sources`) and the
    overrides every trial gets (`fixed`)."""

    distributions: dict[str, BaseDistribution]
    sources: dict[str, str]
    fixed: list[str]


def search_space(params: dict[str, str], arguments: Sequence[str]) -> SearchSpace:
    """The space of `params` (`hydra.sweeper.params`) with the command line's `arguments` on
    top: a sweep there replaces or adds its key's entry, a plain value takes the key out of
    the search and fixes it.

    Raises:
        ConfigError: an override that does not parse, a range Optuna cannot search, or nothing
            left to search.
    """
    parser = OverridesParser.create()
    try:
        overrides = (parser.parse_overrides([f"{k}={v}" for k, v in params.items()])
                     + parser.parse_overrides(list(arguments)))
    except HydraException as err:
        raise ConfigError(explain_override_error(str(err))) from None
    distributions: dict[str, BaseDistribution] = {}
    sources: dict[str, str] = {}
    fixed: dict[str, str] = {}
    for override in overrides:
        key = override.get_key_element()
        if override.is_sweep_override():
            distributions[key] = distribution(override)
            sources[key] = override.input_line.partition("=")[2]
            fixed.pop(key, None)
        else:
            distributions.pop(key, None)
            sources.pop(key, None)
            fixed[key] = override.input_line
    if not distributions:
        raise ConfigError("the search space is empty: every key of hydra.sweeper.params is "
                          "fixed on the command line; sweep one, e.g. "
                          "'optimizer.learning_rate=tag(log, interval(1e-4, 1e-1))'")
    return SearchSpace(distributions, sources, list(fixed.values()))


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep: `choice(...)` categorical, `range(...)` of
    integers an integer range (else categorical), `interval(a, b)` floats (integers when cast,
    `int(interval(...))`), log-scaled when tagged: `tag(log, interval(1e-4, 1e-1))`.

    Raises:
        ConfigError: an empty or inverted range, a log range reaching 0, another sweep.
    """
    sweep = override.value()
    try:
        if isinstance(sweep, ChoiceSweep):
            return CategoricalDistribution(list(sweep.list))
        if isinstance(sweep, RangeSweep):
            values = list(override.sweep_iterator())
            if not values:
                raise ValueError("the range is empty")
            ints = all(isinstance(v, int) for v in values) and values == sorted(values)
            return (IntDistribution(values[0], values[-1], step=int(sweep.step or 1))
                    if ints and len(values) > 1 else CategoricalDistribution(values))
        if isinstance(sweep, IntervalSweep):
            if not sweep.start < sweep.end:
                raise ValueError("the interval is empty or inverted")
            log = "log" in sweep.tags
            if isinstance(sweep.start, int) and isinstance(sweep.end, int):
                return IntDistribution(sweep.start, sweep.end, log=log)
            return FloatDistribution(float(sweep.start), float(sweep.end), log=log)
    except ValueError as err:
        raise ConfigError(f"{override.input_line}: {str(err).splitlines()[0]}; give a range "
                          "with low < high (and low > 0 for a log scale)") from None
    raise ConfigError(f"{override.input_line}: not a range Optuna can search; use choice(...), "
                      "range(...) or interval(...), tagged log for a log scale")


def override_line(key: str, value: Any) -> str:
    """`key=value` as Hydra parses it back to `value`."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = repr(value)  # round-trips exactly
    elif isinstance(value, str) and (not SIMPLE_VALUE.fullmatch(value)
                                     or value.lower() in NOT_STRINGS):
        text = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    else:
        text = str(value)
    return f"{key}={text}"


def _corners(dist: BaseDistribution) -> list[Any]:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


def check_trials_compose(space: SearchSpace, compose: Compose) -> None:
    """Compose and validate the job config at the edges of the space (each choice, each
    bound) before any training, so that an unknown key or a value the config refuses fails
    now, in one line, rather than in every trial.

    Raises:
        ConfigError: naming the key or value and the fix.
    """
    corners = {key: _corners(dist) for key, dist in space.distributions.items()}
    for i in range(max(len(values) for values in corners.values())):
        overrides = [*space.fixed, *(override_line(key, values[min(i, len(values) - 1)])
                                     for key, values in corners.items())]
        try:
            job = compose(overrides)
            with read_write(job), open_dict(job):
                del job["hydra"]
            raw = OmegaConf.to_container(job, resolve=True)
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(explain_override_error(str(err))) from None
        validate(raw)


def check_launcher(config: DictConfig) -> None:
    """The trials run in this process, where training reports to them: Hydra's basic
    launcher."""
    target = config.hydra.launcher.get("_target_")
    if target != BASIC_LAUNCHER:
        raise ConfigError(f"hydra/launcher: {target} runs jobs elsewhere, and the search runs "
                          "its trials one after another in its own process, where training "
                          "reports to them; drop the hydra/launcher override")


def storage_url(configured: str | None, root: Path) -> str:
    return configured or f"sqlite:///{(root / DEFAULT_STORAGE).resolve()}"


def shown_storage(url: str) -> str:
    """The URL without its password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The study storage at `url`. Searches that start together on a new storage race in
    creating its tables: those of this machine take a file lock (beside a SQLite file, else
    in the project), and one that loses the race with another machine tries again once the
    tables exist. A local SQLite file is opened with a busy timeout, so that searches sharing
    it wait for each other's writes.

    Raises:
        ConfigError: the storage cannot be opened (an unreachable server, a bad URL, no driver,
            a folder that cannot be written).
    """
    from sqlalchemy.exc import IntegrityError, SQLAlchemyError

    database = tracking.sqlite_path(url)
    lock = (database.with_name(f"{database.name}.lock") if database
            else project.lock_path("optuna-storage.lock"))
    engine = {"connect_args": {"timeout": tracking.SQLITE_BUSY_TIMEOUT_S}} if database else {}
    for _ in range(STORAGE_ATTEMPTS):
        try:
            with project.file_lock(lock):
                return optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except IntegrityError as err:  # another machine created the same tables just before
            failure: Exception = err
            time.sleep(1.0)
        except (SQLAlchemyError, ImportError, ValueError, OSError) as err:
            failure = err
            break
    reason = str(failure).strip().splitlines()[0] if str(failure).strip() else ""
    raise ConfigError(f"{SEARCH_KEY}.storage={shown_storage(url)}: cannot open the study "
                      f"storage ({type(failure).__name__}: {reason}); check the URL and that "
                      f"its database server runs, or set {SEARCH_KEY}.storage=null for "
                      f"{DEFAULT_STORAGE} at the project root")


def pruner_spec(settings: SearchConfig) -> tuple[str, dict[str, Any]]:
    """The `optuna.pruners` class that `settings.pruner` names, and its arguments: the one
    home of both what the search builds and what it records on the MLflow parent run."""
    if settings.pruner == "median":
        return "MedianPruner", {"n_startup_trials": settings.startup_trials,
                                "n_warmup_steps": settings.warmup_epochs}
    if settings.pruner == "hyperband":  # epochs from 1 to those of the first completed trial
        return "HyperbandPruner", {"min_resource": 1, "max_resource": "auto",
                                   "reduction_factor": settings.reduction_factor}
    if settings.pruner == "successive_halving":  # ASHA: rungs at w, rw, r²w... epochs
        return "SuccessiveHalvingPruner", {"min_resource": max(1, settings.warmup_epochs),
                                           "reduction_factor": settings.reduction_factor}
    return "NopPruner", {}


def make_pruner(settings: SearchConfig) -> optuna.pruners.BasePruner:
    name, kwargs = pruner_spec(settings)
    return getattr(optuna.pruners, name)(**kwargs)


def describe_pruner(settings: SearchConfig) -> str:
    name, kwargs = pruner_spec(settings)
    arguments = ", ".join(f"{key}={value}" for key, value in kwargs.items())
    return f"{name}({arguments})" if kwargs else name


def check_study(study: optuna.Study, space: SearchSpace) -> None:
    """A study to go on with maximises and searches `space`.

    Raises:
        ConfigError: the study minimises, or searches another space.
    """
    name = study.study_name
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(f"{SEARCH_KEY}.study_name={name!r}: that study minimises; name a "
                          "new study")
    searched = study.user_attrs.get(SPACE_ATTR)
    if searched is not None and searched != space.sources:
        raise ConfigError(f"{SEARCH_KEY}.study_name={name!r}: that study searches "
                          f"{_spelled(searched)}, not {_spelled(space.sources)}; name a new "
                          "study, or search the same space to go on with it")


def open_study(settings: SearchConfig, storage: optuna.storages.BaseStorage,
               space: SearchSpace, worker: int = 0) -> optuna.Study:
    """Create the study, or load it to go on. The `n_jobs` processes seed their samplers
    apart (`worker` 0, 1, ...), so that their first, random draws differ.

    Raises:
        ConfigError: the study exists with another search space or direction.
    """
    study = optuna.create_study(study_name=settings.study_name, storage=storage,
                                direction="maximize", pruner=make_pruner(settings),
                                load_if_exists=True)
    check_study(study, space)
    study.set_user_attr(SPACE_ATTR, space.sources)
    # TPE's first trials are random draws from its seed: offset it by the trials there are,
    # so that a resumed study draws new values rather than its first trials' again
    study.sampler = optuna.samplers.TPESampler(
        seed=settings.sampler_seed + len(study.trials) + WORKER_SEED_STRIDE * worker)
    return study


def _spelled(sources: dict[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in sources.items())


def requeue(study: optuna.Study, number: int, params: dict[str, Any],
            run_id: str | None) -> None:
    """Trial `number` stopped with its process: FAIL in the study (and so tagged on its MLflow
    run `run_id`, which ends KILLED), and queued again with the same values: the retry trains
    the same config, so it resumes the checkpoint."""
    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    study.enqueue_trial(params, user_attrs={RETRY_OF_ATTR: number})
    if run_id:
        tag_state(run_id, TrialState.FAIL)


def tag_state(run_id: str, state: TrialState) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().set_tag(run_id, trials.STATE_TAG, state.name)


def retry_interrupted(study: optuna.Study) -> list[int]:
    """Requeue the trials left RUNNING by processes of this host that are gone (kill -9);
    return their numbers. A trial of another host is never taken for gone."""
    with project.file_lock(study_lock(study.study_name)):  # one process requeues each
        gone = [trial
                for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if tracking.process_gone(trial.user_attrs.get(HOST_ATTR),
                                         trial.user_attrs.get(PID_ATTR))]
        for trial in gone:
            requeue(study, trial.number, trial.params, trial.user_attrs.get(trials.RUN_ATTR))
    return [trial.number for trial in gone]


def trials_counted(study: optuna.Study) -> int:
    """The trials that count toward `n_trials`: those that ended (complete, pruned, failed),
    except the interrupted ones that were queued again, and those running now."""
    every = study.get_trials(deepcopy=False)
    retried = {trial.user_attrs.get(RETRY_OF_ATTR) for trial in every}
    return sum(1 for trial in every
               if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
               or (trial.state == TrialState.FAIL and trial.number not in retried))


def study_lock(study_name: str) -> Path:
    """The lock that the search processes of this machine take to count and start trials."""
    return project.lock_path(f"optuna-{study_name}.lock")


def next_trial(study: optuna.Study, settings: SearchConfig,
               space: SearchSpace) -> optuna.Trial | None:
    """Start the next trial, or None once `n_trials` have ended or are running. The processes
    of one machine count and ask under a lock, so that together they start exactly `n_trials`;
    processes of several machines can overshoot by a trial each when they ask at the same
    moment (as Optuna's own `MaxTrialsCallback` does)."""
    with project.file_lock(study_lock(study.study_name)):
        if trials_counted(study) >= settings.n_trials:
            return None
        trial = study.ask(space.distributions)
        trial.set_user_attr(HOST_ATTR, socket.gethostname())
        trial.set_user_attr(PID_ATTR, str(os.getpid()))
    return trial


def optimise(study: optuna.Study, settings: SearchConfig, space: SearchSpace,
             launch: Launch) -> None:
    """Run trials one after another until `n_trials` have ended or `timeout` has passed."""
    started = time.monotonic()
    while True:
        if settings.timeout is not None and time.monotonic() - started > settings.timeout:
            print(f"search {study.study_name}: {settings.timeout:g} s passed "
                  f"({SEARCH_KEY}.timeout); {trials_counted(study)} of {settings.n_trials} "
                  "trials ended or running", flush=True)
            return
        trial = next_trial(study, settings, space)
        if trial is None:
            return
        run_trial(study, trial, space.fixed, launch)


def run_trial(study: optuna.Study, trial: optuna.Trial, fixed: list[str],
              launch: Launch) -> TrialState:
    """Launch the trial's job, then tell the study how it ended; return that state.

    The job's `main` turns a failure it knows into one line and `sys.exit` (what one run
    wants): here that is a failed trial and the study goes on, unless a signal (Ctrl-C,
    SIGTERM) stops the whole search, which requeues the trial and exits.
    """
    drawn = [override_line(key, value) for key, value in trial.params.items()]
    retry = trial.user_attrs.get(RETRY_OF_ATTR)
    print(f"\nsearch {study.study_name}: trial {trial.number}"
          f"{f' (retry of trial {retry})' if retry is not None else ''}: {' '.join(drawn)}",
          flush=True)
    link = trials.TrialLink(trial, study.study_name, OBJECTIVE)
    result: JobReturn | None = None
    try:
        with trials.linked(link):
            result = launch([*fixed, *drawn], trial.number)
    except (SystemExit, KeyboardInterrupt) as stop:
        if isinstance(stop, KeyboardInterrupt) or exiting_interrupted():
            requeue(study, trial.number, trial.params, link.run_id)
            raise
    finally:
        free_memory()
    state, value, note = outcome(link, result)
    if link.run_id:
        tag_state(link.run_id, state)
    study.tell(trial, value, state=state)
    print(f"search {study.study_name}: trial {trial.number} {state.name}: {note}", flush=True)
    return state


def outcome(link: trials.TrialLink, result: JobReturn | None
            ) -> tuple[TrialState, float | None, str]:
    """(state, value, what to print) of a trial's job."""
    if link.pruned_at is not None:
        return TrialState.PRUNED, None, f"pruned after epoch {link.pruned_at}"
    if result is None:  # the job exited with its one-line error, printed above
        return TrialState.FAIL, None, "failed (the error above)"
    if result.status != JobStatus.COMPLETED:
        try:
            _ = result.return_value  # raises the job's exception
        except Exception as err:  # noqa: BLE001 - the trial failed; the study goes on
            if os.environ.get("PIPELINE_DEBUG"):
                traceback.print_exception(err)
            first = (str(err).strip().splitlines() or [""])[0]
            return TrialState.FAIL, None, (f"failed: {type(err).__name__}: {first} "
                                           "(PIPELINE_DEBUG=1 shows the traceback)")
    if link.value is None:
        return TrialState.FAIL, None, f"failed: the job ended without a {OBJECTIVE}"
    return TrialState.COMPLETE, link.value, f"{OBJECTIVE} {link.value:.4f}"


def free_memory() -> None:
    """Drop the finished trial's models: the trials share this process."""
    import keras

    keras.backend.clear_session()
    gc.collect()


def log_study_params(parent_run_id: str, settings: SearchConfig, url: str,
                     space: SearchSpace) -> None:
    """The study's settings as params of its parent run. A resumed study keeps the values its
    first run logged (MLflow params do not change); `n_trials` is a tag, which may."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    params = {"optuna.study_name": settings.study_name,
              "optuna.storage": shown_storage(url),
              "optuna.direction": "maximize",
              "optuna.objective": OBJECTIVE,
              "optuna.sampler": f"TPESampler(seed={settings.sampler_seed})",
              "optuna.pruner": describe_pruner(settings),
              **{f"optuna.space.{key}": source for key, source in space.sources.items()}}
    logged = client.get_run(parent_run_id).data.params
    changed = sorted(key for key, value in params.items()
                     if key in logged and logged[key] != str(value))
    if changed:
        print(f"search {settings.study_name}: the parent run keeps the values its first run "
              f"logged for {', '.join(changed)}", flush=True)
    client.log_batch(parent_run_id, params=[Param(key, str(value))
                                            for key, value in params.items()
                                            if key not in logged])
    client.set_tag(parent_run_id, "optuna.n_trials", str(settings.n_trials))


def count_states(study: optuna.Study) -> str:
    counts = Counter(trial.state for trial in study.get_trials(deepcopy=False))
    return ", ".join(f"{counts[state]} {name}" for state, name in (
        (TrialState.COMPLETE, "complete"), (TrialState.PRUNED, "pruned"),
        (TrialState.FAIL, "failed")))


def report_study(study: optuna.Study, parent_run_id: str | None, out_dir: Path) -> None:
    """Print the best trial and log it, with Optuna's plots, to the study's parent run; promote
    its model (`promote_best`)."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    print(f"\nsearch {study.study_name}: {count_states(study)}", flush=True)
    if not completed:
        print(f"search {study.study_name}: no trial completed, so there is no best one yet",
              flush=True)
        return
    best = study.best_trial
    run_id = best.user_attrs.get(trials.RUN_ATTR)
    print(f"search {study.study_name}: best trial {best.number}, {OBJECTIVE} {best.value:.4f}: "
          f"{' '.join(override_line(k, v) for k, v in best.params.items())}"
          f"{f' (MLflow run {run_id})' if run_id else ''}", flush=True)
    figures = plot_study(study, out_dir)
    if parent_run_id:
        log_best(parent_run_id, best, figures)
    if run_id:
        promote_best(study.study_name, best.number, run_id)


def promote_best(study_name: str, number: int, run_id: str) -> None:
    """Register the best trial's model as `models:/<experiment>@champion` (pipeline.promote),
    unless the champion scored at least as well on the same validation split
    (`standing_champion`: another study, or an earlier run of this one, found a better model);
    a best trial without a model is left out with a line, and the study ends as it would."""
    from pipeline.promote import promote, standing_champion, summary

    standing = standing_champion(run_id)
    if standing is not None:
        print(f"search {study_name}: best trial {number} not promoted: the champion, version "
              f"{standing.version.version} (run {standing.version.run_id}), has val_accuracy "
              f"{standing.val_accuracy:.4f} on the same validation split, the trial "
              f"{standing.challenger_val_accuracy:.4f}; python -m pipeline.promote {run_id} "
              "promotes it anyway", flush=True)
        return
    try:
        version = promote(run_id)
    except PipelineError as err:
        print(f"search {study_name}: best trial {number} not promoted: {err}", flush=True)
        return
    print(f"search {study_name}: {summary(version)}", flush=True)


def log_best(parent_run_id: str, best: FrozenTrial, figures: list[Path]) -> None:
    """On the parent run: the best trial's values as tags `best.<key>` (the best changes as the
    study goes on; params cannot), its value and its run's final metrics as `best.<metric>`,
    and the figures under `optuna/`."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    now = int(time.time() * 1000)
    metrics = {OBJECTIVE: best.value, "trial": best.number}
    tags = {f"best.{key}": str(value) for key, value in best.params.items()}
    tags["best.trial"] = str(best.number)
    run_id = best.user_attrs.get(trials.RUN_ATTR)
    if run_id:
        tags["best.run_id"] = run_id
        metrics = {**client.get_run(run_id).data.metrics, **metrics}
    client.log_batch(parent_run_id,
                     metrics=[Metric(f"best.{key}", float(value), now, 0)
                              for key, value in metrics.items()],
                     tags=[RunTag(key, value) for key, value in tags.items()])
    for figure in figures:
        client.log_artifact(parent_run_id, str(figure), FIGURES_ARTIFACT_DIR)


def plot_study(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optuna's optimisation history and, from 2 completed trials on, its parameter
    importances, as PNG files in `out_dir`; return the files written."""
    from optuna.visualization.matplotlib import (
        plot_optimization_history,
        plot_param_importances,
    )

    written = []
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    with warnings.catch_warnings():  # Optuna's matplotlib plots are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = plot_optimization_history(study, target_name=OBJECTIVE)
        written.append(_save(axes, out_dir / HISTORY_PNG))
        if len(completed) < 2:
            print(f"search {study.study_name}: parameter importances need 2 completed trials; "
                  f"there is {len(completed)}", flush=True)
            return written
        try:
            axes = plot_param_importances(study, target_name=OBJECTIVE)
        except (ValueError, RuntimeError) as err:  # e.g. every completed trial drew the same
            print(f"search {study.study_name}: no parameter importances: {err}", flush=True)
            return written
        written.append(_save(axes, out_dir / IMPORTANCE_PNG))
    return written


def _save(axes, path: Path) -> Path:
    """Save the figure of Optuna's `axes`, sized so that long parameter names fit."""
    from pipeline.figures import save_figure

    axes.figure.set_size_inches(9, 5)
    axes.figure.tight_layout()
    save_figure(axes.figure, path)
    return path


def plan(raw_settings: Any, params: dict[str, str], arguments: Sequence[str],
         config: DictConfig, compose: Compose) -> tuple[SearchConfig, SearchSpace, str]:
    """Check what needs no training: the settings, the launcher, the space and the config at
    its edges; return the settings, the space and the storage URL.

    Raises:
        ConfigError: one line naming the bad value and the fix.
    """
    settings = read_settings(raw_settings)
    check_launcher(config)
    space = search_space(params, arguments)
    check_trials_compose(space, compose)
    return settings, space, storage_url(settings.storage, project.project_root())


def preflight(overrides: Sequence[str], composed: Sequence[str]) -> None:
    """The search's checks for a `python -m pipeline` command line, before Hydra starts and
    so before an MLflow parent run exists (`params.check_command_line`): `plan`, the storage,
    and an existing study's direction and space. `overrides` are the command line's,
    `composed` them with each sweep at its first value.

    Raises:
        ConfigError: one line naming the bad value and the fix.
    """
    from hydra import compose, initialize_config_dir

    from pipeline.config import CONF_DIR

    parser = OverridesParser.create()
    hydra_own = [o.input_line for o in parser.parse_overrides(list(overrides))
                 if o.key_or_group.startswith("hydra")]
    arguments = [o.input_line for o in parser.parse_overrides(list(overrides))
                 if not o.key_or_group.startswith("hydra")]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        config = compose("config", overrides=[*composed, *hydra_own], return_hydra_config=True)
        sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=True)
        settings, space, url = plan(sweeper["search"], sweeper.get("params") or {}, arguments,
                                    config, lambda lines: compose("config", overrides=lines,
                                                                  return_hydra_config=True))
    try:
        study = optuna.load_study(study_name=settings.study_name, storage=open_storage(url))
    except KeyError:  # no such study yet
        return
    check_study(study, space)


def worker_command(config: DictConfig) -> list[str]:
    """This search's command line for one more process of it: the same overrides, one job."""
    key = f"{SEARCH_KEY}.n_jobs"
    given = [*config.hydra.overrides.hydra, *config.hydra.overrides.task]
    kept = [line for line in given if line.split("=", 1)[0].lstrip("+~") != key]
    return [sys.executable, "-m", "pipeline", "-m", *kept, f"{key}=1"]


def start_workers(config: DictConfig, settings: SearchConfig,
                  parent_run_id: str | None) -> list[subprocess.Popen]:
    """The `n_jobs - 1` other processes of the search on this machine: each runs the same
    command with one job against the same storage; their runs join this process's parent run,
    which this process reports on and ends once they are done."""
    workers = []
    for number in range(1, settings.n_jobs):
        env = {**os.environ, ENV_WORKER: str(number)}
        if parent_run_id:
            env[tracking.ENV_JOIN_PARENT_RUN_ID] = parent_run_id
        workers.append(subprocess.Popen(worker_command(config), env=env))
    if workers:
        print(f"search {settings.study_name}: {len(workers)} more process(es) share the study: "
              f"pid {', '.join(str(w.pid) for w in workers)}", flush=True)
    return workers


def stop_workers(workers: list[subprocess.Popen], study_name: str, interrupted: bool) -> None:
    """Wait for the other processes to end their trials; when this one was interrupted, stop
    them first (SIGTERM: each ends its trial KILLED and requeues it)."""
    for worker in workers:
        if interrupted and worker.poll() is None:
            worker.terminate()
    for worker in workers:
        code = worker.wait()
        if code != 0 and not interrupted:
            print(f"search {study_name}: process {worker.pid} ended with exit code {code}",
                  flush=True)


def sweep(raw_settings: Any, params: dict[str, str], arguments: Sequence[str],
          config: DictConfig, compose: Compose, launch: Launch) -> None:
    """Run the study: check everything first (a bad setting, key, range, launcher or storage
    ends the process with one line before any training), requeue the trials a killed search
    left behind, run trials up to `n_trials` (with `n_jobs - 1` more processes of this search
    beside this one), then report the best on the parent run."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the search prints its own lines
    worker = int(os.environ.get(ENV_WORKER, "0"))
    try:
        settings, space, url = plan(raw_settings, params, arguments, config, compose)
        study = open_study(settings, open_storage(url), space, worker)
    except PipelineError as err:
        fail(err)
    out_dir = Path(config.hydra.sweep.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, out_dir / "multirun.yaml")
    parent_run_id = os.environ.get(tracking.ENV_PARENT_RUN_ID)  # pipeline.sweep's parent run
    if parent_run_id and not worker:
        log_study_params(parent_run_id, settings, url, space)
    requeued = retry_interrupted(study)
    if requeued:
        print(f"search {settings.study_name}: trial(s) {', '.join(map(str, requeued))} of a "
              "killed search ended FAIL and run again", flush=True)
    if not worker:
        print(f"search {settings.study_name}: {trials_counted(study)} of {settings.n_trials} "
              f"trials done before, in {shown_storage(url)}", flush=True)
    workers = start_workers(config, settings, parent_run_id) if not worker else []
    interrupted = True
    try:
        optimise(study, settings, space, launch)
        interrupted = False
    finally:
        stop_workers(workers, settings.study_name, interrupted)
    if not worker:
        report_study(study, parent_run_id, out_dir)
