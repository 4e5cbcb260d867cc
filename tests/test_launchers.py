"""Hydra's joblib launcher: a sweep's jobs in parallel processes, under one MLflow parent run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from pipeline import tracking
from pipeline.errors import TrainingError
from tests.conftest import QUICK, env, mlflow_runs, run

JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


def split_sweep(project):
    runs = mlflow_runs(project)
    parents = [r for r in runs if r.data.tags.get(tracking.SWEEP_PARENT_TAG) == "true"]
    return parents, [r for r in runs if r not in parents]


@pytest.mark.slow  # about 50 s on 2 cores: each worker process loads TensorFlow anew
def test_joblib_sweep_runs_jobs_in_parallel_processes(project):
    run(["python", "-m", "pipeline", "-m", *JOBLIB, *QUICK, "optimizer=gd,adam"], project)
    parents, children = split_sweep(project)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags[tracking.PARENT_RUN_TAG] for c in children} == {parent.info.run_id}
    assert {c.data.tags[tracking.SWEEP_ID_TAG] for c in children} == {
        parent.data.tags[tracking.SWEEP_ID_TAG]}
    # two worker processes, both training at the same time
    assert len({c.data.tags[tracking.PID_TAG] for c in children}) == 2
    first, second = sorted(children, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time
    (multirun,) = (project / "runs").rglob("multirun.yaml")
    launcher = yaml.safe_load(multirun.read_text())["hydra"]["launcher"]
    assert launcher["_target_"].endswith("JoblibLauncher") and launcher["n_jobs"] == 2
    assert {"comparison.md", "comparison.png"} <= {p.name for p in multirun.parent.iterdir()}
    assert len(list(multirun.parent.glob("*/outputs/evaluate/metrics.json"))) == 2


@pytest.mark.slow
def test_a_failed_joblib_job_fails_the_sweep_and_leaves_no_run_running(project):
    """One job diverges: the sweep exits with its error and exit code, and joblib kills the
    other job, whose run, if it had begun, must not stay RUNNING."""
    result = run(["python", "-m", "pipeline", "-m", *JOBLIB, *QUICK, "trainer.epochs=3",
                  "optimizer=gd", "optimizer.learning_rate=1e12,0.01"], project, check=False)
    assert result.returncode == TrainingError.exit_code
    assert "error: the loss became nan" in result.stderr
    parents, children = split_sweep(project)
    assert [p.info.status for p in parents] == ["FAILED"]
    status = {float(c.data.params["optimizer.learning_rate"]): c.info.status for c in children}
    assert status.pop(1e12) == "FAILED"
    assert set(status.values()) <= {"KILLED", "FINISHED"}  # none when killed before its run began


@pytest.mark.slow
def test_a_killed_joblib_worker_leaves_no_run_running(project, tmp_path):
    """A worker dies mid-training (as by the OOM killer); joblib kills the other one. Neither
    process can end its run: the sweep ends both KILLED, from their host and pid tags."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        sweep = subprocess.Popen(
            ["python", "-m", "pipeline", "-m", *JOBLIB, "data.limit=3000", "trainer.epochs=5",
             "model=small_cnn", "optimizer=gd,adam"],
            cwd=project, env=env(), stdout=stdout, stderr=stderr, text=True)
    deadline = time.monotonic() + 300
    while sweep.poll() is None and time.monotonic() < deadline:
        # the store is read only once the sweep has created it (and its parent run)
        children = split_sweep(project)[1] if "MLflow parent run" in out.read_text() else []
        if len(children) == 2 and all(c.info.status == "RUNNING" for c in children):
            break
        time.sleep(0.5)
    else:
        sweep.kill()
        raise AssertionError(f"two jobs never ran together:\n{err.read_text()[-3000:]}")
    os.kill(int(children[0].data.tags[tracking.PID_TAG]), signal.SIGKILL)
    assert sweep.wait(timeout=300) != 0
    parents, children = split_sweep(project)
    assert [p.info.status for p in parents] == ["FAILED"]
    assert [c.info.status for c in children] == ["KILLED", "KILLED"]


def test_orphaned_sweep_runs_end_killed_and_live_ones_are_left_alone(tmp_path):
    from mlflow.tracking import MlflowClient

    tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = tracking.ensure_experiment("orphans")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          env=env(), capture_output=True, text=True, check=True).stdout.strip()
    here = socket.gethostname()
    processes = {"dead": (here, dead), "alive": (here, "1"), "elsewhere": ("other-host", dead),
                 "other-sweep": (here, dead)}
    client = MlflowClient()
    ids = {}
    for name, (host, pid) in processes.items():
        sweep = "s2" if name == "other-sweep" else "s1"
        ids[name] = client.create_run(experiment_id, tags={
            tracking.SWEEP_ID_TAG: sweep, tracking.HOST_TAG: host,
            tracking.PID_TAG: pid}).info.run_id
    assert tracking.end_orphaned_runs(experiment_id, "s1") == [ids["dead"]]
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING",
                      "other-sweep": "RUNNING"}
