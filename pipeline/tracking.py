"""MLflow: where runs go, what identifies them, and runs that always end in a final state.

Every run carries the whole resolved config as dotted params and the lineage as tags: the git
commit and dirty flag, the md5 of the data from its `.dvc` file, the DVC experiment name when
DVC runs it, and the entry point. The runs of one sweep are children of one parent run that
carries the sweep id.

Many processes may log at once (a Hydra multirun, `dvc queue start -j 2`): a local SQLite store
is created and migrated by one process at a time under a file lock, and opened with a busy
timeout, so neither the first-use migration nor a write can race.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import Config, flatten, to_dict
from pipeline.errors import ConfigError, PipelineError, TrialPruned, sigterm_interrupts
from pipeline.processes import is_running
from pipeline.project import _git, data_md5, file_lock, lock_path, project_root

DEFAULT_STORE = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
SQLITE_BUSY_TIMEOUT_S = 120
MLFLOW_SCHEME_NAMES = ("databricks", "databricks-uc", "uc")  # URIs with no `:`, not paths
SWEEP_ID_TAG = "sweep.id"
SWEEP_PARENT_TAG = "sweep.parent"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests the run under its parent
ENV_SWEEP_ID = "PIPELINE_SWEEP_ID"  # set by the Hydra multirun callback for its jobs
ENV_PARENT_RUN_ID = "PIPELINE_PARENT_RUN_ID"
# a multirun whose runs join a parent run another process owns (the other processes of a
# search with `n_jobs`): that process reports on the parent and ends it
ENV_JOIN_PARENT_RUN_ID = "PIPELINE_JOIN_PARENT_RUN_ID"
HOST_TAG = "pipeline.host"  # where the run's process ran: tells a killed run from a live one
PID_TAG = "pipeline.pid"
PRUNED_TAG = "pipeline.pruned_at_epoch"  # a search trial its pruner stopped: ended KILLED


class TrackingError(PipelineError):
    """The MLflow store cannot be used."""


def tracking_uri(configured: str | None, root: Path) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else SQLite `mlflow.db` at the root.

    The default is made absolute, so every process of the project writes the same store.
    """
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root / DEFAULT_STORE).resolve()}"


# What DVC writes for a run (the composed params, the lock of the stages' hashes): the run
# logs them, so they differ from the commit without making the code dirty.
RUN_FILES = ("params.yaml", "dvc.lock")


def lineage_tags(root: Path, data_path: Path, entry_point: str) -> dict[str, str]:
    """Tags that trace a run back to its code, data, experiment and the process that ran it.

    `git.dirty` is true when a file git tracks, or a new file it does not ignore (a config
    option not yet committed), differs from the commit; `params.yaml` and `dvc.lock` do not
    count, as the run's params record them.
    """
    tags = {"pipeline.entry_point": entry_point, HOST_TAG: socket.gethostname(),
            PID_TAG: str(os.getpid())}
    commit = _git(root, "rev-parse", "HEAD")
    if commit:
        tags["git.commit"] = commit
        changed = _git(root, "status", "--porcelain", "--",
                       *(f":(exclude,top){name}" for name in RUN_FILES))
        tags["git.dirty"] = str(bool(changed)).lower()
    md5 = data_md5(data_path)
    if md5:
        tags["data.md5"] = md5
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def config_params(cfg: Config) -> dict[str, Any]:
    """The resolved config flattened to dotted MLflow params (`optimizer.learning_rate`, ...)."""
    flat = flatten(to_dict(cfg))
    return {key: ("null" if value is None else value) for key, value in flat.items()}


def metric_key(name: str) -> str:
    """`name` as MLflow accepts a metric key: letters, digits and `_ - . : /` and spaces kept,
    anything else (a class folder's `(`, `&`, `'`, `+`, `,`) replaced by `_`."""
    return re.sub(r"[^\w\-. :/]", "_", name)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def file_store_path(uri: str) -> Path | None:
    """The folder of an MLflow file store (`file:///…/mlruns`, or a bare path), else None."""
    if uri in MLFLOW_SCHEME_NAMES:
        return None
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path)).resolve()
    return Path(uri).resolve() if parsed.scheme == "" else None


def check_file_store(uri: str) -> None:
    """Fail in one line on a file store, which MLflow 3 refuses with a long traceback, unless
    MLFLOW_ALLOW_FILE_STORE=true asks MLflow to use it all the same."""
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

    folder = file_store_path(uri)
    if folder is None or MLFLOW_ALLOW_FILE_STORE.get():
        return
    database = f"sqlite:///{folder.with_name(f'{folder.name}.db')}"
    raise ConfigError(
        f"the MLflow store {uri} is a file store, which MLflow 3 no longer reads: move it into "
        f"SQLite (mlflow migrate-filestore --source {folder} --target {database}) and set "
        f"mlflow.tracking_uri={database}, or set mlflow.tracking_uri=null for the project's "
        "SQLite store mlflow.db, or set MLFLOW_ALLOW_FILE_STORE=true to use the file store")


def missing_store(uri: str) -> Path | None:
    """The database file of a local SQLite store that does not exist yet (MLflow would create
    it, empty, on first use), else None."""
    database = sqlite_path(uri)
    return database if database is not None and not database.is_file() else None


def connect(uri: str) -> None:
    """Point MLflow at `uri`.

    A local SQLite store is created and migrated under a file lock (MLflow's first-use
    migration races when several processes open a new store at once) and opened with a busy
    timeout, so concurrent writers wait for each other instead of failing "database is locked".
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    check_file_store(uri)
    database = sqlite_path(uri)
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    if database is not None:
        if "?" not in uri:
            uri = f"{uri}?timeout={SQLITE_BUSY_TIMEOUT_S}"
        for name in ("mlflow.store.db.utils", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        with file_lock(database.with_name(f"{database.name}.lock")):
            MlflowClient(uri).search_experiments(max_results=1)
    mlflow.set_tracking_uri(uri)


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail at once, before any training, when an MLflow server does not answer.

    There is no silent fallback to the local store: runs would land where nobody looks.
    """
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as err:
        raise TrackingError(
            f"the MLflow server {uri} is not reachable ({type(err).__name__}); start it "
            "(mlflow server --host 127.0.0.1 --port PORT) or set mlflow.tracking_uri=null to "
            "log to the local store mlflow.db") from None


def _connect(cfg: Config, root: Path):
    import mlflow

    connect(tracking_uri(cfg.mlflow.tracking_uri, project_root(root)))
    return mlflow


def artifact_location(uri: str) -> str | None:
    """For a local SQLite store, `mlartifacts/` beside the database file; else None.

    Left to MLflow, a local store's artifacts land relative to whichever folder created the
    experiment (a DVC temp copy, a Hydra run folder). A server decides for itself.
    """
    database = sqlite_path(uri)
    if database is None:
        return None
    return (database.parent / DEFAULT_ARTIFACTS).resolve().as_uri()


def ensure_experiment(name: str) -> str:
    """The id of experiment `name` in the current store, creating it if needed."""
    import mlflow

    existing = mlflow.get_experiment_by_name(name)
    if existing and existing.lifecycle_stage == "deleted":
        raise TrackingError(
            f"the MLflow experiment {name!r} (id {existing.experiment_id}) is deleted; restore "
            f"it (mlflow experiments restore --experiment-id {existing.experiment_id}) or set "
            "mlflow.experiment_name to another name")
    if existing:
        return existing.experiment_id
    try:
        return mlflow.create_experiment(
            name, artifact_location=artifact_location(mlflow.get_tracking_uri()))
    except mlflow.exceptions.MlflowException:
        # another process created it in the meantime
        return mlflow.get_experiment_by_name(name).experiment_id


@contextmanager
def _ending(mlflow) -> Iterator[None]:
    """End the active run FINISHED, KILLED on Ctrl-C, KILLED and tagged `pipeline.pruned_at_epoch`
    when a search's pruner stopped it, FAILED on any other exception."""
    try:
        yield
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except TrialPruned as pruned:
        mlflow.set_tag(PRUNED_TAG, str(pruned.epoch))
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def sweep_tags(sweep_id: str, parent_run_id: str) -> dict[str, str]:
    return {SWEEP_ID_TAG: sweep_id, PARENT_RUN_TAG: parent_run_id}


def create_sweep_parent(experiment_id: str, sweep_id: str, tags: dict[str, str]) -> str:
    """Create the parent run of a sweep (status RUNNING); return its id."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient().create_run(
        experiment_id, run_name=f"sweep {sweep_id}",
        tags={**tags, SWEEP_ID_TAG: sweep_id, SWEEP_PARENT_TAG: "true"})
    return run.info.run_id


def find_sweep_parent(experiment_id: str, sweep_id: str) -> str | None:
    from mlflow.tracking import MlflowClient

    found = MlflowClient().search_runs(
        [experiment_id], max_results=1,
        filter_string=(f"tags.`{SWEEP_ID_TAG}` = '{sweep_id}' "
                       f"and tags.`{SWEEP_PARENT_TAG}` = 'true'"))
    return found[0].info.run_id if found else None


def reopen_sweep_parent(experiment_id: str, sweep_id: str) -> str | None:
    """The parent run of sweep `sweep_id`, set RUNNING again for more runs; None if none."""
    from mlflow.tracking import MlflowClient

    parent = find_sweep_parent(experiment_id, sweep_id)
    if parent is not None:
        MlflowClient().update_run(parent, status="RUNNING")
    return parent


def sweep_lock(root: Path | None = None) -> Path:
    """The lock under which the processes of this machine find or create a sweep's parent."""
    return lock_path("mlflow-sweep.lock", root)


def dvc_sweep_parent(cfg: Config, root: Path, experiment_id: str) -> tuple[str, str]:
    """(sweep id, parent run id) for a `dvc exp run`, creating the parent on first use.

    DVC experiments are grouped as `dvc exp show` groups them, by their baseline commit,
    unless `mlflow.sweep_id` names the sweep. Queue workers may start together, so the
    look-up and creation happen under a lock.
    """
    from mlflow.tracking import MlflowClient

    baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")[:8] or "workspace"
    sweep_id = cfg.mlflow.sweep_id or f"dvc-{baseline}"
    with file_lock(sweep_lock(root)):
        parent = find_sweep_parent(experiment_id, sweep_id)
        if parent is None:
            parent = create_sweep_parent(experiment_id, sweep_id,
                                         {"pipeline.entry_point": "dvc exp run"})
            # a container for the queue's runs: no process of its own to end it later
            MlflowClient().set_terminated(parent, "FINISHED")
    return sweep_id, parent


def process_gone(host: str | None, pid: str | None) -> bool:
    """True when the process `pid` on this host no longer runs (exited, killed, a zombie).
    A process on another host, or an unknown one, is never taken for gone."""
    if host != socket.gethostname() or not (pid or "").isdigit():
        return False
    return not is_running(int(pid))


def end_orphaned_runs(experiment_id: str, sweep_id: str) -> list[str]:
    """End KILLED the runs of a sweep that are still RUNNING though their process on this host
    is gone, and return their ids. A parallel launcher kills the other jobs of a sweep when one
    fails (joblib does), and a killed process cannot end its own run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    running = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_ID_TAG}` = '{sweep_id}' and attributes.status = 'RUNNING'")
    orphans = [run.info.run_id for run in running
               if process_gone(run.data.tags.get(HOST_TAG), run.data.tags.get(PID_TAG))]
    for run_id in orphans:
        client.set_terminated(run_id, "KILLED")
    return orphans


def sweep_of_this_run(cfg: Config, root: Path, experiment_id: str) -> tuple[str, str] | None:
    """(sweep id, parent run id) when this run belongs to a sweep, else None."""
    if os.environ.get(ENV_PARENT_RUN_ID):
        return os.environ[ENV_SWEEP_ID], os.environ[ENV_PARENT_RUN_ID]
    if os.environ.get("DVC_EXP_NAME"):
        return dvc_sweep_parent(cfg, root, experiment_id)
    return None


RUN_NAME_CHARS = 250  # MLflow's column; SQLite lets a longer name by, PostgreSQL refuses it


def short_name(name: str | None) -> str | None:
    """A run name within what every MLflow backend store keeps (a search trial's name is its
    overrides, which can run longer)."""
    if name is None or len(name) <= RUN_NAME_CHARS:
        return name
    return name[:RUN_NAME_CHARS - 3] + "..."


@contextmanager
def start_run(cfg: Config, root: Path, entry_point: str, data_path: Path,
              run_name: str | None = None) -> Iterator[Any]:
    """Start a run with the config as params and the lineage tags; yield the active run.

    A run that belongs to a sweep becomes a child of the sweep's parent run.
    """
    mlflow = _connect(cfg, root)
    experiment_id = ensure_experiment(cfg.mlflow.experiment_name)
    tags = lineage_tags(root, data_path, entry_point)
    sweep = sweep_of_this_run(cfg, root, experiment_id)
    if sweep:
        tags.update(sweep_tags(*sweep))
    with sigterm_interrupts():  # SIGTERM anywhere in the run ends it KILLED, not RUNNING
        run = mlflow.start_run(experiment_id=experiment_id, tags=tags,
                               run_name=short_name(run_name or os.environ.get("DVC_EXP_NAME")))
        with _ending(mlflow):
            mlflow.log_params(config_params(cfg))
            yield run


@contextmanager
def resume_run(cfg: Config, root: Path, run_id: str) -> Iterator[Any]:
    """Reopen a run another stage started (e.g. evaluate after train) and end it again."""
    mlflow = _connect(cfg, root)
    with sigterm_interrupts():
        run = mlflow.start_run(run_id=run_id)
        with _ending(mlflow):
            yield run


EVALUATES_TAG = "pipeline.evaluates"  # on an evaluation run of its own: the trained run


@contextmanager
def evaluation_run(cfg: Config, root: Path, trained_run_id: str, entry_point: str,
                   data_path: Path) -> Iterator[Any]:
    """The run `evaluate` logs to: the training run, reopened, when it was logged with this
    config; else (only evaluate's own params changed since, e.g. `invariance.*`, so DVC reran
    evaluate alone) a new run tagged `pipeline.evaluates` with the training run's id, so that
    every run's params describe its metrics."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg.mlflow.tracking_uri, project_root(root))  # the runs below connect
    logged = MlflowClient(uri).get_run(trained_run_id).data.params
    changed = sorted(key for key, value in config_params(cfg).items()
                     if logged.get(key) != str(value))
    if not changed:
        with resume_run(cfg, root, trained_run_id) as run:
            yield run
        return
    with start_run(cfg, root, entry_point, data_path,
                   run_name=f"evaluate {trained_run_id[:8]}") as run:
        import mlflow

        mlflow.set_tags({EVALUATES_TAG: trained_run_id,
                         "pipeline.evaluate_changed": " ".join(changed)})
        print(f"evaluate: {', '.join(changed)} differ from training run {trained_run_id}; "
              f"the results go to run {run.info.run_id}, tagged {EVALUATES_TAG}", flush=True)
        yield run


DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}
DIGEST_CHARS = 12  # of a split's SHA-256: what MLflow's Dataset column shows


def log_datasets(cfg: Config, data_path: Path, meta: dict, splits: tuple[str, ...]) -> None:
    """Record the prepared `splits` as the active run's inputs with MLflow's dataset tracking:
    the data source's name, the split's digest (of its images and labels, from `prepare`),
    the raw data's location as the source and the image shape as the schema; the context
    says which split. The MLflow UI's Dataset column then shows which data each run used."""
    import mlflow
    import numpy as np
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types.schema import Schema, TensorSpec

    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, *meta["input_shape"]), "image")])
    with warnings.catch_warnings():  # a local path: MLflow registers two equal source kinds
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(Path(data_path).resolve()))
    for split in splits:
        digest = meta.get("digests", {}).get(split)
        if digest is None:  # prepared before splits had digests
            continue
        dataset = MetaDataset(source, name=cfg.data.name, digest=digest[:DIGEST_CHARS],
                              schema=schema)
        mlflow.log_input(dataset, context=DATASET_CONTEXTS[split],
                         tags={"split": split, "examples": str(meta["sizes"][split])})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log numbers to the active run, at `step` when given (an epoch, a shift)."""
    import mlflow

    mlflow.log_metrics(metrics, step=step)


def log_files(paths: list[Path], folder: str | None = None) -> None:
    """Attach files to the active run, under `folder` of its artifacts when given."""
    import mlflow

    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=folder)


def log_folder(path: Path, folder: str) -> None:
    """Attach every file under `path` to the active run, as its artifacts' `folder`."""
    import mlflow

    mlflow.log_artifacts(str(path), artifact_path=folder)


BACKEND_PACKAGES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


@contextmanager
def _example_folder_created():
    """MLflow's Keras flavor writes `input_example.json` before it creates the model folder
    and fails (mlflow/mlflow#16183); create the folder first, as the upstream fix does."""
    from mlflow.keras import save as keras_save

    original = keras_save._save_example

    def save_example(mlflow_model, input_example, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, input_example, path, *args, **kwargs)

    keras_save._save_example = save_example
    try:
        yield
    finally:
        keras_save._save_example = original


def log_keras_model(model, x_example, labels: dict) -> None:
    """Log the Keras model to the active run with a signature, an input example, the class
    names as metadata, and pinned requirements (giving `pip_requirements` spares MLflow seconds
    of inferring them)."""
    import contextlib
    import io
    from importlib.metadata import version

    import keras
    import mlflow
    import numpy as np

    example = np.asarray(x_example).astype(np.float32)
    signature = mlflow.models.infer_signature(example, model.predict(example, verbose=0))
    package = BACKEND_PACKAGES[keras.backend.backend()]
    # MLflow checks the input example with a `predict` that draws Keras's progress bar; on JAX
    # the bar runs in Keras's callback thread, where the (thread-local) switch that
    # `backend.configure` turned off is on again.
    with _example_folder_created(), contextlib.redirect_stdout(io.StringIO()):
        mlflow.keras.log_model(
            model, name="model", signature=signature, input_example=example, metadata=labels,
            pip_requirements=[f"keras=={version('keras')}", f"{package}=={version(package)}"])


WARNING_TAG = "pipeline.warning"  # a run that looks broken: what happened and what to try


def set_tags(tags: dict[str, str]) -> None:
    """Tag the active run."""
    import mlflow

    mlflow.set_tags(tags)


def set_warning(line: str) -> None:
    """Tag the active run with the warning line a stage printed."""
    import mlflow

    mlflow.set_tag(WARNING_TAG, line)


def link_resumed_run(previous: str, current: str) -> None:
    """Tag both runs with each other; end the interrupted one KILLED if it is still RUNNING
    (its process was killed before it could end it)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if client.get_run(previous).info.status == "RUNNING":
        client.set_terminated(previous, "KILLED")
    client.set_tag(previous, "pipeline.resumed_by", current)
    client.set_tag(current, "pipeline.resumed_from", previous)


def dvc_entry_point() -> str:
    """How DVC started this stage: `dvc exp run` sets DVC_EXP_NAME, `dvc repro` does not."""
    return "dvc exp run" if os.environ.get("DVC_EXP_NAME") else "dvc repro"


def shown_uri(uri: str) -> str:
    """The URI as a person types it: without the SQLite busy timeout this module adds."""
    return uri.split("?", 1)[0] if sqlite_path(uri) else uri


def ui_command(uri: str) -> str:
    """How to open the MLflow UI on a store: a tracking server's address is the UI itself."""
    if uri.startswith(("http://", "https://")):
        return f"{uri} in a browser"
    return f"mlflow ui --backend-store-uri {shown_uri(uri)}"
