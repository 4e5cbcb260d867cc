"""Fault injection with real processes and real signals: nothing lost, nothing left lying."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import QUICK, compose, env, mlflow_runs, run
from tests.servers import free_port

# long enough to be interrupted after the first epoch, short enough for CI
LONGER = ["data.limit=3000", "trainer.epochs=3", "model=small_cnn", "trainer.batch_size=32"]


def start(project, *args):
    return subprocess.Popen(["python", "-m", "pipeline", *args], cwd=project, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_line(proc, text, limit=600):
    """Read the process's output until a line contains `text` (bounded by process exit)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"{text!r} never printed; output:\n{''.join(seen)}\n"
                         f"{proc.stderr.read()}")


def checkpoints(project):
    return [p for p in (project / ".checkpoints").glob("*") if p.is_dir()]


@pytest.mark.slow
def test_kill_9_during_training_resumes_from_the_last_epoch(project):
    proc = start(project, *LONGER)
    wait_for_line(proc, "epoch 1/3")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    (killed,) = mlflow_runs(project)
    assert killed.info.status == "RUNNING"  # nobody could end it
    assert len(checkpoints(project)) == 1

    result = run(["python", "-m", "pipeline", *LONGER], project)
    assert f"resuming after epoch 1 from the checkpoint of interrupted run {killed.info.run_id}" \
        in result.stdout
    assert "epoch 1/3" not in result.stdout and "epoch 3/3" in result.stdout
    runs = {r.info.run_id: r for r in mlflow_runs(project)}
    assert runs[killed.info.run_id].info.status == "KILLED"
    (resumed,) = [r for r in runs.values() if r.info.run_id != killed.info.run_id]
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["pipeline.resumed_from"] == killed.info.run_id
    assert runs[killed.info.run_id].data.tags["pipeline.resumed_by"] == resumed.info.run_id
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "val_loss")]
    assert sorted(steps) == [1, 2, 3]
    (history,) = (project / "runs").rglob("history.csv")
    assert len(history.read_text().splitlines()) == 1 + 3
    assert checkpoints(project) == []  # removed once training finished


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_keeps_the_checkpoint(project):
    proc = start(project, *LONGER)
    wait_for_line(proc, "epoch 1/3")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM)" in stderr and "run the same command again" in stderr
    (stopped,) = mlflow_runs(project)
    assert stopped.info.status == "KILLED"
    assert len(checkpoints(project)) == 1
    assert not list((project / "runs").rglob("model.keras"))


@pytest.mark.slow  # a NaN training under dvc repro (~30 s); CI runs it
def test_nan_loss_fails_with_epoch_and_step_and_dvc_caches_nothing(project):
    run(["python", "-m", "pipeline.params", *QUICK, "optimizer=gd",
         "optimizer.learning_rate=1e4", "optimizer.schedule=constant"], project)
    result = run(["dvc", "repro"], project, check=False)
    assert result.returncode != 0
    line = [x for x in result.stderr.splitlines() if x.startswith("error: ")][0]
    assert "the loss became" in line and "in epoch 1, step" in line
    assert "lower optimizer.learning_rate" in line
    (failed,) = mlflow_runs(project)
    assert failed.info.status == "FAILED"
    assert not (project / "outputs/train/model.keras").exists()
    status = run(["dvc", "status", "train"], project).stdout
    assert "changed" in status or "modified" in status or "deleted" in status, status


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_rwlock(project, pid):
    lock = {"write": {str(project / "outputs/train/model.keras"): {"pid": pid, "cmd": "dvc repro"}},
            "read": {str(project / "params.yaml"): [{"pid": pid, "cmd": "dvc repro"}]}}
    path = project / ".dvc" / "tmp" / "rwlock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(lock))
    return path


def test_stale_dvc_lock_is_cleared_and_a_live_one_left_alone(project):
    path = write_rwlock(project, dead_pid())
    result = run(["python", "-m", "pipeline.locks"], project)
    assert "removed the stale DVC lock" in result.stderr
    assert json.loads(path.read_text()) == {"read": {}, "write": {}}
    run(["dvc", "status"], project)

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = write_rwlock(project, sleeper.pid)
        before = path.read_text()
        result = run(["python", "-m", "pipeline.locks"], project, check=False)
        assert result.returncode == 2
        assert f"DVC is busy in this project (pid {sleeper.pid}" in result.stderr
        assert path.read_text() == before
    finally:
        sleeper.kill()


def test_an_orphaned_stage_is_named_with_the_command_to_stop_it(project):
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m",
                               "pipeline.train"], cwd=project)
    try:
        result = run(["python", "-m", "pipeline.locks"], project, check=False)
        assert result.returncode == 2
        assert f"kill {orphan.pid}" in result.stderr.strip().splitlines()[-1]
    finally:
        orphan.kill()


def test_unreachable_mlflow_server_fails_before_any_work(project):
    uri = f"http://127.0.0.1:{free_port()}"
    result = run(["python", "-m", "pipeline", *QUICK, f"mlflow.tracking_uri={uri}"], project,
                 check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert f"the MLflow server {uri} is not reachable" in last
    assert "prepare:" not in result.stdout
    assert not list((project / "runs").rglob("outputs"))


def test_an_mlflow_file_store_fails_in_one_line_before_any_work(project, tmp_path):
    """A `file:` store (as many MLflow users have); a bare path is checked in test_tracking."""
    folder = tmp_path / "mlruns"
    uri = folder.as_uri()
    result = run(["python", "-m", "pipeline", *QUICK, f"mlflow.tracking_uri={uri}"], project,
                 check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]]
    assert "MLflow 3 no longer reads" in errors[0] and "mlflow migrate-filestore" in errors[0]
    assert "mlflow.tracking_uri=null" in errors[0] and "Traceback" not in result.stderr
    assert "prepare:" not in result.stdout
    assert not list((project / "runs").rglob("outputs"))
    assert not folder.exists() and mlflow_runs(project) == []  # no run, RUNNING or other


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_gives_one_line_and_no_partial_outputs(project, small_disk):
    run(["python", "-m", "pipeline.params", "data.limit=2000",
         f"paths.prepared={small_disk / 'prepared'}"], project)
    result = run(["python", "-m", "pipeline.prepare"], project, check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write") and "No space left on device" in last
    assert list(small_disk.iterdir()) == []


def test_read_only_output_folder_gives_one_line(project):
    outputs = project / "outputs"
    outputs.mkdir()
    if subprocess.run(["chattr", "+i", str(outputs)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system")
    try:
        run(["python", "-m", "pipeline.params", *QUICK], project)
        result = run(["python", "-m", "pipeline.prepare"], project, check=False)
        assert result.returncode == 2
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: cannot write") and "not permitted" in last
        assert list(Path(outputs).iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(outputs)], check=True)



def test_an_epoch_cut_short_by_sigterm_is_neither_checkpointed_nor_logged(tmp_path):
    import keras
    import numpy as np

    from pipeline.checkpoints import Checkpoint, TrainingInterrupted
    from pipeline.train import train

    class SigtermAt(keras.callbacks.Callback):
        """Sends this process SIGTERM as step `step` of epoch `epoch` (from 0) begins."""

        def __init__(self, epoch, step):
            super().__init__()
            self.at, self.epoch = (epoch, step), -1

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            if (self.epoch, batch) == self.at:
                os.kill(os.getpid(), signal.SIGTERM)

    def model_with(*extra_callbacks):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
        fit = model.fit
        model.fit = lambda *a, callbacks=(), **k: fit(*a, callbacks=[*callbacks, *extra_callbacks],
                                                      **k)
        return model

    rng = np.random.default_rng(0)
    data = (rng.normal(size=(256, 4)).astype("float32"), rng.integers(0, 3, 256))
    checkpoint = Checkpoint(tmp_path / "checkpoint")
    logged = []

    def fit(model):
        return train(model, data, data, compose().optimizer, epochs=3, batch_size=32,
                     log_metrics=lambda metrics, step: logged.append(step), checkpoint=checkpoint)

    with pytest.raises(TrainingInterrupted):
        fit(model_with(SigtermAt(epoch=1, step=2)))
    assert logged == [1]
    assert [row["epoch"] for row in checkpoint.completed_epochs()] == [1]

    logged.clear()
    rows = fit(model_with())
    assert logged == [2, 3]  # the resume repeats epoch 2 from its start
    assert [row["epoch"] for row in rows] == [1, 2, 3]
