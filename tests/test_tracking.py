"""MLflow runs and their lineage: the dirty flag, deleted experiments, runs that always end."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.tracking import TrackingError
from tests.conftest import env


def git(folder: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder,
                   check=True, capture_output=True)


def dirty(folder: Path) -> str:
    return tracking.lineage_tags(folder, folder / "data", "test")["git.dirty"]


@pytest.mark.unit
def test_git_dirty_is_about_the_code_not_the_params_a_run_logs(tmp_path):
    for name, text in (("params.yaml", "seed: 1\n"), ("dvc.lock", "schema: '2.0'\n"),
                       ("conf/model/a.yaml", "filters: [8]\n"), (".gitignore", "/outputs/\n")):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "project")
    (tmp_path / "params.yaml").write_text("seed: 2\n")  # `python -m pipeline.params`, DVC
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "model.keras").write_text("ignored output")
    assert dirty(tmp_path) == "false"
    (tmp_path / "conf" / "model" / "b.yaml").write_text("filters: [16]\n")  # not committed yet
    assert dirty(tmp_path) == "true"
    (tmp_path / "conf" / "model" / "b.yaml").unlink()
    (tmp_path / "conf" / "model" / "a.yaml").write_text("filters: [4]\n")
    assert dirty(tmp_path) == "true"
    assert tracking.lineage_tags(tmp_path / "conf", tmp_path / "data", "test")[
        "git.dirty"] == "true"  # from a subfolder, the whole checkout counts


def test_a_deleted_experiment_is_named_with_the_command_that_restores_it(tmp_path):
    import mlflow

    tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = tracking.ensure_experiment("gone")
    mlflow.delete_experiment(experiment_id)
    with pytest.raises(TrackingError, match=(
            rf"^the MLflow experiment 'gone' \(id {experiment_id}\) is deleted; restore it "
            rf"\(mlflow experiments restore --experiment-id {experiment_id}\) or set "
            r"mlflow.experiment_name")):
        tracking.ensure_experiment("gone")


SIGTERM_IN_RUN = """
import os, pathlib, signal, sys
from pipeline import tracking
from pipeline.errors import run_cli
from pipeline.params import composed

def main():
    cfg = composed([f"mlflow.tracking_uri={sys.argv[1]}"])
    with tracking.start_run(cfg, pathlib.Path.cwd(), "test", pathlib.Path("data")) as run:
        pathlib.Path(sys.argv[2]).write_text(run.info.run_id)
        os.kill(os.getpid(), signal.SIGTERM)  # as when a model is being logged after training
        signal.pause()

run_cli(main)
"""


@pytest.mark.slow  # a whole run signalled while the model is logged (~15 s); CI runs it
def test_sigterm_outside_training_ends_the_run_killed(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = subprocess.run([sys.executable, "-c", SIGTERM_IN_RUN, uri, str(tmp_path / "id")],
                            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "interrupted (SIGTERM)" in result.stderr
    run_id = (tmp_path / "id").read_text()
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"



@pytest.mark.parametrize("uri", ["file:///{tmp}/mlruns", "{tmp}/mlruns"])
@pytest.mark.unit
def test_a_file_store_is_one_line_that_names_the_migration(tmp_path, monkeypatch, uri):
    from pipeline.errors import ConfigError

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = uri.format(tmp=tmp_path)
    database = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with pytest.raises(ConfigError, match=(
            rf"^the MLflow store {uri} is a file store, which MLflow 3 no longer reads: move it "
            rf"into SQLite \(mlflow migrate-filestore --source {tmp_path / 'mlruns'} --target "
            rf"{database}\) and set mlflow.tracking_uri={database}, or set "
            r"mlflow.tracking_uri=null for the project's SQLite store mlflow.db, or set "
            r"MLFLOW_ALLOW_FILE_STORE=true to use the file store$")):
        tracking.connect(uri)
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.unit
def test_mlflow_allow_file_store_lets_mlflow_use_it(tmp_path, monkeypatch):
    import mlflow

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri())  # restored after
    previous = mlflow.get_tracking_uri()
    try:
        tracking.connect(store.as_uri())
        experiment_id = tracking.ensure_experiment("files")
        assert (store / experiment_id / "meta.yaml").is_file()
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.mark.parametrize("uri", ["databricks", "sqlite:///x.db", "http://127.0.0.1:5000"])
@pytest.mark.unit
def test_other_stores_are_not_file_stores(uri):
    assert tracking.file_store_path(uri) is None


@pytest.mark.unit
def test_a_long_run_name_is_cut_to_what_every_store_keeps():
    """A search trial's run name is its overrides; PostgreSQL refuses names over 250 characters
    where SQLite keeps them."""
    assert tracking.short_name("a" * 300) == "a" * 247 + "..."
    assert tracking.short_name("a" * 250) == "a" * 250
    assert tracking.short_name(None) is None


@pytest.mark.unit
def test_the_ui_of_a_tracking_server_is_its_address():
    assert tracking.ui_command("http://127.0.0.1:5000") == "http://127.0.0.1:5000 in a browser"
    assert tracking.ui_command("sqlite:////p/mlflow.db?timeout=120") == (
        "mlflow ui --backend-store-uri sqlite:////p/mlflow.db")
