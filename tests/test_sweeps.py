"""Sweeps: parent and child runs, many processes on one new store, the DVC queue, lineage."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from pipeline.params import write_params
from tests.conftest import QUICK, env, mlflow_runs, run

LOGGER = """
import sys, time, pathlib, mlflow
from pipeline import tracking
from pipeline.params import composed
go = pathlib.Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
cfg = composed([f"mlflow.tracking_uri={sys.argv[1]}", "mlflow.experiment_name=race"])
with tracking.start_run(cfg, pathlib.Path.cwd(), "race", pathlib.Path("data")):
    for step in range(1, 101):
        mlflow.log_metrics({"loss": 1.0 / step, "accuracy": step / 100}, step=step)
"""


@pytest.mark.slow  # eight processes racing on a new store (~70 s); CI runs it
def test_eight_processes_on_a_brand_new_store(tmp_path):
    """MLflow's first-use migration races without the lock; all eight must be recorded."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", LOGGER, uri, str(go)], cwd=tmp_path,
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(8)]
    time.sleep(0.5)  # let the interpreters reach the start line; the file releases them all
    go.touch()
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0] * 8, [r[1][-2000:] for r in results if r[2]]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert len(runs) == 8
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert len(client.get_metric_history(r.info.run_id, "loss")) == 100


def test_hydra_multirun_is_one_parent_with_children_and_a_report(project):
    result = run(["python", "-m", "pipeline", "-m", *QUICK, "optimizer=gd,adam"], project)
    runs = mlflow_runs(project)
    parents = [r for r in runs if r.data.tags.get("sweep.parent") == "true"]
    children = [r for r in runs if r not in parents]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    sweep_id = parent.data.tags["sweep.id"]
    assert parent.info.status == "FINISHED"
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["sweep.id"] == sweep_id
        assert child.info.status == "FINISHED"
    assert sorted(c.data.params["optimizer.name"] for c in children) == ["adam", "gd"]
    assert sorted(c.info.run_name for c in children)[0].startswith("data.limit=300")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.png"} <= logged
    (report,) = (project / "runs").rglob("comparison.md")
    assert "optimizer.name" in report.read_text()
    assert sweep_id in result.stdout


@pytest.mark.slow
def test_sigterm_during_a_sweep_ends_the_parent_and_the_job_killed(project):
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "-m", *QUICK, "optimizer=gd,adam"],
                            cwd=project, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:
        if line.startswith("epoch 1/1"):  # the first job logs its model, outside `fit`
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    runs = mlflow_runs(project)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.parent") == "true"]
    (child,) = [r for r in runs if r is not parent]  # the second job never started
    assert parent.info.status == "KILLED" and child.info.status == "KILLED"


@pytest.mark.slow
def test_a_named_sweep_keeps_one_parent_across_multiruns(project):
    for optimizer in ("gd", "adam"):
        result = run(["python", "-m", "pipeline", "-m", *QUICK, "mlflow.sweep_id=lr",
                      f"optimizer={optimizer}"], project)
    runs = mlflow_runs(project)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.parent") == "true"]
    children = [r for r in runs if r is not parent]
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.params["optimizer.name"] for c in children) == ["adam", "gd"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert "sweep lr: 2 runs compared" in result.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert {"comparison.md", "comparison.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.slow
def test_compare_optimizers_preset_is_a_fair_sweep(project):
    run(["python", "-m", "pipeline", "experiment=compare_optimizers", *QUICK], project)
    children = [r for r in mlflow_runs(project) if "sweep.parent" not in r.data.tags]
    assert sorted(c.data.params["optimizer.name"] for c in children) == [
        "adam", "gd", "momentum", "rmsprop"]
    for key in ("model.name", "seed", "trainer.epochs", "trainer.batch_size", "data.limit",
                "optimizer.schedule"):
        assert len({c.data.params[key] for c in children}) == 1, key
    rates = {c.data.params["optimizer.name"]: float(c.data.params["optimizer.learning_rate"])
             for c in children}
    assert rates["gd"] > rates["adam"]  # each optimizer keeps its own sensible rate


@pytest.mark.slow
def test_dvc_queue_with_two_workers(project):
    write_params(QUICK, project / "params.yaml")
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "quick params"], project)
    run(["dvc", "exp", "run", "--queue", "-S", "optimizer=gd,momentum,rmsprop,adam",
         *[f"-S{o}" for o in QUICK if not o.startswith("model=")], "-S", "model=small_cnn"],
        project)
    run(["dvc", "queue", "start", "-j", "2"], project)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], project).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(2)
    assert status.count("Success") == 4, status
    runs = mlflow_runs(project)
    parents = [r for r in runs if r.data.tags.get("sweep.parent") == "true"]
    children = [r for r in runs if r not in parents]
    assert len(parents) == 1 and len(children) == 4
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.params["optimizer.name"] for c in children) == [
        "adam", "gd", "momentum", "rmsprop"]
    names = {c.data.tags["dvc.exp_name"] for c in children}
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], project).stdout
    assert all(name in shown for name in names)


@pytest.mark.slow
def test_a_run_reproduces_from_its_lineage(project):
    """From an MLflow run back to the exact model: its commit, data version and params."""
    run(["dvc", "commit", "--force", "--quiet", "data.dvc"], project)  # as `make data` does
    run(["python", "-m", "pipeline", *QUICK, "optimizer=momentum"], project)
    (first,) = mlflow_runs(project)
    commit = first.data.tags["git.commit"]
    assert first.data.tags["git.dirty"] == "false"
    # the project moves on: other params, another commit
    write_params([*QUICK, "optimizer=rmsprop"], project / "params.yaml")
    run(["git", "commit", "-qam", "try rmsprop"], project)

    wrong = run(["python", "-m", "pipeline.reproduce", first.info.run_id], project, check=False)
    assert wrong.returncode == 2
    assert f"run `git checkout {commit}` first" in wrong.stderr.strip().splitlines()[-1]

    run(["git", "checkout", "-q", commit], project)
    result = run(["python", "-m", "pipeline.reproduce", first.info.run_id], project)
    assert "identical metrics" in result.stdout
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["optimizer"]["name"] == "momentum"
    metrics = json.loads((project / params["paths"]["metrics"]).read_text())
    assert metrics["test_accuracy"] == first.data.metrics["test_accuracy"]
    assert metrics["test_loss"] == first.data.metrics["test_loss"]
    latest = max(mlflow_runs(project), key=lambda r: r.info.start_time)
    assert latest.info.run_id != first.info.run_id
    assert latest.data.tags["git.commit"] == commit
    assert latest.data.tags["data.md5"] == first.data.tags["data.md5"]
