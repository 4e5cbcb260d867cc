"""Scale-out: the global batch and learning-rate rule, MirroredStrategy over two logical CPU
devices, and two multi_worker processes on the JAX backend with one MLflow run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import distribute
from pipeline.errors import ConfigError
from pipeline.params import params_yaml
from tests.conftest import QUICK, REPO, compose, env, mlflow_runs, run
from tests.servers import free_port

WORKER_TIMEOUT_S = 300


@pytest.mark.unit
def test_global_batch_and_the_linear_learning_rate_rule():
    replicas = distribute.Replicas("multi_worker", count=4, processes=2, process_id=1)
    assert distribute.global_batch(64, 4) == 256
    assert replicas.process_batch(64) == 128  # two replicas in each process
    scaled = distribute.scaled_optimizer(compose("optimizer=momentum").optimizer, 4)
    assert scaled.learning_rate == pytest.approx(0.04) and scaled.momentum == 0.9
    assert replicas.tags(64, 0.01) == {
        "distribute.replicas": "4", "distribute.processes": "2",
        "distribute.global_batch_size": "256", "distribute.learning_rate": "0.04"}
    assert replicas.describe_batch(64) == "global batch 256 = 64 x 4 replicas"
    assert replicas.describe_learning_rate(0.01) == "learning_rate 0.04 = 0.01 x 4 replicas"
    assert not replicas.is_chief


@pytest.mark.unit
def test_one_replica_leaves_everything_as_configured():
    cfg = compose()
    replicas = distribute.start("none")
    assert replicas.is_chief and replicas.count == 1
    assert distribute.scaled_optimizer(cfg.optimizer, 1) == cfg.optimizer
    assert replicas.process_batch(128) == 128
    arrays = (np.arange(10), np.arange(10))
    assert distribute.shard(arrays, 0, 1) is arrays
    assert replicas.describe_learning_rate(0.001) + replicas.describe_replicas() == \
        "learning_rate 0.001"


@pytest.mark.unit
def test_shards_are_disjoint_and_of_equal_size():
    x, y = np.arange(11), np.arange(11) * 10
    shards = [distribute.shard((x, y), i, 3) for i in range(3)]
    assert [len(s[0]) for s in shards] == [3, 3, 3]  # every process takes the same steps
    assert len(np.unique(np.concatenate([s[0] for s in shards]))) == 9
    assert all(np.array_equal(sy, sx * 10) for sx, sy in shards)


@pytest.mark.parametrize("environ,message", [
    ({}, "set KERAS_DISTRIBUTION_JOB_ADDRESSES, KERAS_DISTRIBUTION_NUM_PROCESSES"),
    ({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "h:1", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
      "KERAS_DISTRIBUTION_PROCESS_ID": "2"}, "must lie in 0..1"),
    ({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "h:1", "KERAS_DISTRIBUTION_NUM_PROCESSES": "two",
      "KERAS_DISTRIBUTION_PROCESS_ID": "0"}, "must be integers"),
])
@pytest.mark.unit
def test_a_badly_described_job_fails_in_one_line(environ, message):
    with pytest.raises(ConfigError, match=message):
        distribute.job_from_env(environ)


def test_each_mode_names_the_backend_it_needs(tmp_path):
    job = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "127.0.0.1:1",
           "KERAS_DISTRIBUTION_NUM_PROCESSES": "1", "KERAS_DISTRIBUTION_PROCESS_ID": "0"}
    with pytest.raises(ConfigError, match="multi_worker: needs KERAS_BACKEND=jax"):
        distribute.start("multi_worker", job)  # the tests run on TensorFlow
    (tmp_path / "params.yaml").write_text(params_yaml(compose("trainer.distribute=mirrored")))
    result = subprocess.run([sys.executable, "-m", "pipeline.train"], cwd=tmp_path,
                            env={**env(), "KERAS_BACKEND": "jax"}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: trainer.distribute=mirrored: needs KERAS_BACKEND=tensorflow, not jax")


@pytest.mark.unit
def test_python_m_pipeline_leaves_multi_worker_to_the_train_stage(tmp_path):
    from pipeline.__main__ import run_stages

    with pytest.raises(ConfigError, match=r"train stage in every process \(python -m pipeline"):
        run_stages(compose("trainer.distribute=multi_worker"), tmp_path, tmp_path)
    assert not list(tmp_path.iterdir())  # before any work


# Two logical CPU devices must be configured before TensorFlow starts: a fresh process.
# It trains twice through the train stage's own code, with op determinism on.
MIRRORED = """
import json, sys
from pathlib import Path
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from pipeline import build, distribute, prepare, train
from tests.conftest import compose
out, cfg = Path(sys.argv[1]), compose(*sys.argv[2:])
prepare.run(cfg, Path.cwd(), out)
build.run(cfg, out)
runs = []
for _ in range(2):
    run_id = train.run(cfg, Path.cwd(), out, "test")
    trained = keras.models.load_model(out / cfg.paths.model)
    runs.append([run_id, distribute.weights_digest(trained)])
print(json.dumps(runs))
"""


@pytest.mark.slow  # two replicas through the whole stage (~20 s); CI runs it
def test_mirrored_trains_two_replicas_through_the_train_stage(tmp_path, data_dir):
    overrides = [*QUICK, "trainer.distribute=mirrored",
                 f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    result = run([sys.executable, "-c", MIRRORED, str(tmp_path), *overrides], REPO)
    first = next(line for line in result.stdout.splitlines() if line.startswith("train: "))
    assert first.endswith("on CPU, 2 replicas (mirrored)"), first
    assert "global batch 128 = 64 x 2 replicas" in first
    assert "learning_rate 0.002 = 0.001 x 2 replicas" in first
    (run_a, digest_a), (run_b, digest_b) = json.loads(result.stdout.splitlines()[-1])
    assert digest_a == digest_b  # op determinism holds under the strategy
    runs = {r.info.run_id: r for r in mlflow_runs(tmp_path)}
    for run_id in (run_a, run_b):
        assert runs[run_id].info.status == "FINISHED"
        assert runs[run_id].data.tags["distribute.replicas"] == "2"
        assert runs[run_id].data.tags["distribute.global_batch_size"] == "128"


def start_worker(project: Path, port: int, process_id: int) -> subprocess.Popen:
    worker_env = {**env(), "KERAS_BACKEND": "jax",
                  "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port}",
                  "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
                  "KERAS_DISTRIBUTION_PROCESS_ID": str(process_id)}
    return subprocess.Popen([sys.executable, "-m", "pipeline.train"], cwd=project,
                            env=worker_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def digest_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if "weights digest" in line)


@pytest.mark.slow  # three processes (two workers and pytest) on 2 cores: about 40 s
def test_two_workers_train_as_one_and_process_0_logs(tmp_path, data_dir):
    pytest.importorskip("jax")
    import keras

    from pipeline import build, prepare

    cfg = compose(*QUICK, "trainer.distribute=multi_worker", f"data.path={data_dir}",
                  f"data.test_path={data_dir}",
                  f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "params.yaml").write_text(params_yaml(cfg))
    prepare.run(cfg, tmp_path, tmp_path)
    build.run(cfg, tmp_path)
    port = free_port()
    workers = [start_worker(tmp_path, port, i) for i in (0, 1)]
    try:
        outputs = [w.communicate(timeout=WORKER_TIMEOUT_S) for w in workers]
    finally:
        for w in workers:
            w.kill()
    for w, (stdout, stderr) in zip(workers, outputs):
        assert w.returncode == 0, f"{stdout}\n{stderr}"
    firsts = [next(line for line in out.splitlines() if line.startswith("train: "))
              for out, _ in outputs]
    assert firsts[0].endswith("2 replicas (multi_worker, process 0 of 2)"), firsts[0]
    assert "global batch 128 = 64 x 2 replicas" in firsts[1]
    digests = [digest_line(out).rsplit(" ", 1)[1] for out, _ in outputs]
    assert digests[0] == digests[1]
    saved = keras.models.load_model(tmp_path / cfg.paths.model, compile=False)
    assert distribute.weights_digest(saved) == digests[0]
    (mlrun,) = mlflow_runs(tmp_path)
    assert mlrun.info.status == "FINISHED" and "val_accuracy" in mlrun.data.metrics
    assert mlrun.data.tags["distribute.processes"] == "2"
    assert not list((tmp_path / ".checkpoints").glob("*"))
