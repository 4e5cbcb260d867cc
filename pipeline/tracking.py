"""MLflow: where runs go, what identifies them, and runs that always end in a final state.

Every run carries the whole resolved config as dotted params and the lineage as tags: the git
commit and dirty flag, the md5 of the data from its `.dvc` file, the DVC experiment name when
DVC runs it, and the entry point.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from pipeline.config import Config, flatten, to_dict

DEFAULT_STORE = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
PROJECT_MARKERS = ("dvc.yaml", "conf")


def project_root(start: Optional[Path] = None) -> Path:
    """The project folder, also from DVC's temporary experiment copies and Hydra's run folders.

    DVC sets DVC_ROOT to the parent repository for queued and temporary experiments.
    """
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if all((folder / marker).exists() for marker in PROJECT_MARKERS):
            return folder
    return here


def tracking_uri(configured: Optional[str], root: Path) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else SQLite `mlflow.db` at the root.

    The default is made absolute, so every process of the project writes the same store.
    """
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root / DEFAULT_STORE).resolve()}"


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def data_md5(data_path: Path) -> Optional[str]:
    """The md5 DVC recorded for the data in `<data_path>.dvc`, if that file exists."""
    dvc_file = Path(f"{data_path}.dvc")
    if not dvc_file.is_file():
        return None
    with dvc_file.open() as f:
        outs = (yaml.safe_load(f) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def lineage_tags(root: Path, data_path: Path, entry_point: str) -> dict[str, str]:
    """Tags that trace a run back to its code, data and experiment."""
    tags = {"pipeline.entry_point": entry_point}
    commit = _git(root, "rev-parse", "HEAD")
    if commit:
        tags["git.commit"] = commit
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
        tags["git.dirty"] = str(bool(dirty)).lower()
    md5 = data_md5(data_path)
    if md5:
        tags["data.md5"] = md5
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def config_params(cfg: Config) -> dict[str, Any]:
    """The resolved config flattened to dotted MLflow params (`optimizer.learning_rate`, ...)."""
    return {key: ("null" if value is None else value) for key, value in flatten(to_dict(cfg)).items()}


def _connect(cfg: Config, root: Path):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg.mlflow.tracking_uri, project_root(root)))
    return mlflow


def artifact_location(uri: str) -> Optional[str]:
    """For a local SQLite store, `mlartifacts/` beside the database file; else None.

    Left to MLflow, a local store's artifacts land relative to whichever folder created the
    experiment (a DVC temp copy, a Hydra run folder). A server decides for itself.
    """
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.parent / DEFAULT_ARTIFACTS).resolve().as_uri()


def ensure_experiment(name: str) -> str:
    """The id of experiment `name` in the current store, creating it if needed."""
    import mlflow

    existing = mlflow.get_experiment_by_name(name)
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
    """End the active run FINISHED, KILLED on Ctrl-C, FAILED on any other exception."""
    try:
        yield
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


@contextmanager
def start_run(cfg: Config, root: Path, entry_point: str, data_path: Path) -> Iterator[Any]:
    """Start a run with the config as params and the lineage tags; yield the active run."""
    mlflow = _connect(cfg, root)
    mlflow.set_experiment(experiment_id=ensure_experiment(cfg.mlflow.experiment_name))
    run = mlflow.start_run(tags=lineage_tags(root, data_path, entry_point))
    with _ending(mlflow):
        mlflow.log_params(config_params(cfg))
        yield run


@contextmanager
def resume_run(cfg: Config, root: Path, run_id: str) -> Iterator[Any]:
    """Reopen a run another stage started (e.g. evaluate after train) and end it again."""
    mlflow = _connect(cfg, root)
    run = mlflow.start_run(run_id=run_id)
    with _ending(mlflow):
        yield run


def dvc_entry_point() -> str:
    """How DVC started this stage: `dvc exp run` sets DVC_EXP_NAME, `dvc repro` does not."""
    return "dvc exp run" if os.environ.get("DVC_EXP_NAME") else "dvc repro"


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on a store."""
    return f"mlflow ui --backend-store-uri {uri}"
