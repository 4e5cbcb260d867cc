"""Exact resume: a training interrupted after any completed epoch and resumed ends with the
weights and the per-epoch history of the training that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from pipeline import backend, distribute
from pipeline import train as train_module
from pipeline.checkpoints import Checkpoint, claimed, random_states
from pipeline.data import fashion_mnist
from pipeline.models import build_model
from pipeline.params import composed
from pipeline.stream import EpochBatches, epoch_order
from pipeline.train import (
    batchnorm_layers,
    batchnorm_momentum,
    make_optimizer,
    recompute_batchnorm_statistics,
    train,
)
from tests.conftest import REPO, env, mlflow_runs, run
from tests.test_faults import start, wait_for_line

EPOCHS = 3
# Every layer that draws (dropout, augmentation) and BatchNorm, with a cosine schedule: what a
# resume has to carry over.
MODEL = dict(filters=(8, 16), batch_norm=True, dropout=0.25, dense_units=(32,),
             augment={"flip": "horizontal", "translate": 0.1, "erase": 0.5})


class Killed(Exception):
    """Stands in for kill -9 after an epoch's checkpoint: nothing after it runs."""


class KillAfter(keras.callbacks.Callback):
    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise Killed


@pytest.fixture(scope="module")
def subset(data_dir):
    data = fashion_mnist.load(data_dir, verify_md5=False)
    return data.x_train[:512], data.y_train[:512]


def fresh_model(seed: int = 7) -> keras.Model:
    """The built model as a new process sees it: generators seeded anew."""
    backend.configure(seed, deterministic=True)
    return build_model((28, 28, 1), 10, **MODEL)


def train_once(subset, checkpoint=None, kill_after=None):
    model = fresh_model()
    if kill_after:
        fit = model.fit
        model.fit = lambda *a, callbacks=(), **k: fit(
            *a, callbacks=[*callbacks, KillAfter(kill_after)], **k)
    x, y = subset
    rows = train(model, (x[:448], y[:448]), (x[448:], y[448:]), composed([]).optimizer,
                 epochs=EPOCHS, batch_size=64, seed=7, checkpoint=checkpoint, precise_bn=True)
    return model, rows


@pytest.fixture(scope="module")
def uninterrupted(subset):
    model, rows = train_once(subset)
    return distribute.weights_digest(model), rows


@pytest.mark.parametrize("kill_after", [1, 2])
def test_resume_after_any_epoch_ends_bit_identical(subset, uninterrupted, tmp_path, kill_after):
    checkpoint = Checkpoint(tmp_path / "checkpoint")
    with pytest.raises(Killed):
        train_once(subset, checkpoint, kill_after)
    assert len(checkpoint.completed_epochs()) == kill_after
    model, rows = train_once(subset, checkpoint)
    assert rows == uninterrupted[1]  # the same loss, accuracy, validation, lr: every digit
    assert distribute.weights_digest(model) == uninterrupted[0]


def test_checkpoint_holds_the_dropout_and_augmentation_random_states(subset, tmp_path):
    checkpoint = Checkpoint(tmp_path / "checkpoint")
    with pytest.raises(Killed):
        train_once(subset, checkpoint, kill_after=1)
    model = fresh_model()
    model.compile(optimizer=make_optimizer(composed([]).optimizer, 7, EPOCHS),
                  loss="sparse_categorical_crossentropy")
    before = [keras.ops.convert_to_numpy(v).copy() for v in random_states(model)]
    assert len(before) == 6  # three dropout layers, the flip, the translation, the erasing
    assert checkpoint.restore(model) == 1
    after = [keras.ops.convert_to_numpy(v) for v in random_states(model)]
    assert not any(np.array_equal(a, b) for a, b in zip(after, before))  # moved on by epoch 1


@pytest.mark.unit
def test_a_second_claim_trains_apart_and_folders_of_dead_processes_go(tmp_path):
    folder = tmp_path / "checkpoints" / "abc"
    gone = subprocess.Popen(["true"])
    gone.wait()
    for name in (f"abc-{gone.pid}", f"abc-{os.getppid()}", "abc-old", "abcd-1"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    with claimed(folder) as first:
        assert first.folder == folder
        with claimed(folder) as second:  # one config trained twice at once
            assert second.folder == folder.with_name(f"abc-{os.getpid()}")
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == sorted(["abc", f"abc-{os.getppid()}", "abc-old", "abcd-1"])  # a live parent
    with claimed(folder) as again:  # released: the folder is free again
        assert again.folder == folder


@pytest.mark.unit
def test_each_epoch_order_is_a_function_of_seed_and_epoch():
    first = epoch_order(100, seed=3, epoch=0)
    assert sorted(first) == list(range(100))
    assert np.array_equal(first, epoch_order(100, seed=3, epoch=0))
    assert not np.array_equal(first, epoch_order(100, seed=3, epoch=1))
    assert not np.array_equal(first, epoch_order(100, seed=4, epoch=0))
    x, y = np.arange(10)[:, None], np.arange(10)
    stream = EpochBatches(x, y, batch_size=4, seed=3)
    resumed = EpochBatches(x, y, batch_size=4, seed=3, first_epoch=1)
    assert stream.steps == 3 and len(stream[2][1]) == 2  # the remainder, as Keras batches
    assert all(np.array_equal(stream[3 + i][1], resumed[i][1]) for i in range(3))
    assert sorted(np.concatenate([stream[i][1] for i in range(3)])) == list(range(10))


def test_precise_batchnorm_statistics_are_those_of_the_training_data(subset):
    backend.configure(0, deterministic=True)
    model = build_model((28, 28, 1), 10, filters=(8,), batch_norm=True, dropout=0.5,
                        augment={"flip": "horizontal"})
    x = subset[0][:256]
    assert recompute_batchnorm_statistics(model, x, batch_size=64, seed=0, epoch=0) == 2
    bn = model.get_layer("block1_bn1")
    # the conv's outputs at inference, where dropout and augmentation do nothing
    features = keras.Model(model.input, model.get_layer("block1_conv1").output)
    outputs = keras.ops.convert_to_numpy(features.predict(x, verbose=0)).astype(np.float64)
    outputs = outputs.reshape(-1, outputs.shape[-1])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), outputs.mean(axis=0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_variance),
                               outputs.var(axis=0), rtol=1e-4)
    dense = model.get_layer("dense1_bn")  # set after block1_bn1, from its new statistics
    inputs = keras.Model(model.input, dense.input).predict(x, verbose=0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(dense.moving_mean),
                               inputs.mean(axis=0), rtol=1e-4, atol=1e-5)


@pytest.mark.unit
def test_batchnorm_momentum_forgets_the_start_within_an_epoch():
    assert batchnorm_momentum(422, 0.99) == 0.99  # the full default keeps Keras's
    assert batchnorm_momentum(36, 0.99) == pytest.approx(1 - 4 / 36)
    assert batchnorm_momentum(36, 0.5) == 0.5
    assert batchnorm_momentum(3, 0.99) == 0.0  # the last batch's statistics
    assert batchnorm_momentum(36, 0.99) ** 36 < np.exp(-4)


def test_batchnorm_momentum_changes_the_statistics_not_the_weights(subset, monkeypatch):
    x, y = subset
    trained = {}
    for rule in ("per epoch", "keras"):
        if rule == "keras":
            monkeypatch.setattr(train_module, "batchnorm_momentum", lambda steps, m: m)
        model = fresh_model()
        train(model, (x[:448], y[:448]), (x[448:], y[448:]), composed([]).optimizer,
              epochs=1, batch_size=64, seed=7)
        trained[rule] = model
    per_epoch, keras_rule = trained["per epoch"], trained["keras"]
    assert {bn.momentum for bn in batchnorm_layers(per_epoch)} == {batchnorm_momentum(7, 0.99)}
    assert {bn.momentum for bn in batchnorm_layers(keras_rule)} == {0.99}
    for a, b in zip(per_epoch.trainable_weights, keras_rule.trainable_weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))
    bn, other = batchnorm_layers(per_epoch)[0], batchnorm_layers(keras_rule)[0]
    assert not np.allclose(keras.ops.convert_to_numpy(bn.moving_mean),
                           keras.ops.convert_to_numpy(other.moving_mean))


@pytest.mark.unit
def test_benchmark_reports_name_the_cpu_and_the_flags_its_speed_follows(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma avx512f "
                       "avx512bw avx512_bf16\n")
    assert backend.cpu_description(str(cpuinfo)) == "AMD EPYC (avx2 fma avx512f avx512_bf16)"
    cpuinfo.write_text("model name\t: Old CPU\nflags\t\t: fpu sse2\n")
    assert backend.cpu_description(str(cpuinfo)) == "Old CPU (no AVX2)"


@pytest.mark.unit
def test_precision_auto_picks_bfloat16_only_where_it_pays():
    assert backend.resolve_precision("auto", flags={"avx2", "fma"}, gpu=False) == "float32"
    assert backend.resolve_precision("auto", flags={"avx512_bf16"}, gpu=False) == \
        "mixed_bfloat16"
    assert backend.resolve_precision("auto", flags={"amx_bf16"}, gpu=False) == "mixed_bfloat16"
    assert backend.resolve_precision("auto", flags=set(), gpu=True) == "mixed_bfloat16"
    assert backend.resolve_precision("float32", flags={"amx_bf16"}, gpu=True) == "float32"
    for preset in ("fast", "best"):
        assert composed([f"experiment={preset}"]).trainer.precision == "auto"


# --- through the real command, with real signals --------------------------------------------

ARGS = ["data.limit=1500", "trainer.epochs=3", "model=small_cnn", "trainer.batch_size=32",
        "model.dropout=0.25", "augment=light"]


def kill_and_rerun(project, args, line, how=signal.SIGKILL):
    """Start `python -m pipeline args`, send `how` once it prints `line`, then run the same
    command to its end; return that run's result."""
    proc = start(project, *args)
    wait_for_line(proc, line)
    os.killpg(proc.pid, how)
    proc.communicate(timeout=300)
    return run(["python", "-m", "pipeline", *args], project)


def final_state(project):
    """(weights digest of the saved model, history.csv) of the newest run folder."""
    (model_file,) = sorted((project / "runs").rglob("outputs/train/model.keras"),
                           key=os.path.getmtime)[-1:]
    history = model_file.parent / "history.csv"
    return (distribute.weights_digest(keras.models.load_model(model_file)),
            history.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_killed_and_resumed_run_ends_as_the_uninterrupted_one(project, how):
    run(["python", "-m", "pipeline", *ARGS], project)
    expected = final_state(project)
    subprocess.run(["rm", "-rf", str(project / "runs")], check=True)
    result = kill_and_rerun(project, ARGS, "epoch 2/3", how)
    assert "resuming after epoch 2" in result.stdout
    assert final_state(project) == expected
    states = sorted(r.info.status for r in mlflow_runs(project))
    assert states == ["FINISHED", "FINISHED", "KILLED"]
    resumed = next(r for r in mlflow_runs(project) if "pipeline.resumed_from" in r.data.tags)
    assert resumed.data.tags["pipeline.resumed_exact"] == "true"


@pytest.mark.slow
def test_a_resume_without_op_determinism_says_it_is_not_exact(project):
    args = [*ARGS[:1], "trainer.epochs=2", *ARGS[2:], "trainer.deterministic=false"]
    result = kill_and_rerun(project, args, "epoch 1/2")
    assert "train: this resume is not exact" in result.stdout
    resumed = next(r for r in mlflow_runs(project) if "pipeline.resumed_from" in r.data.tags)
    assert resumed.data.tags["pipeline.resumed_exact"] == "false"


SWEEP = ["-m", "data.limit=1000", "trainer.epochs=2", "model=small_cnn", "trainer.batch_size=32",
         "optimizer=adam", "seed=5"]


@pytest.mark.slow
def test_a_sweep_job_killed_and_resumed_ends_as_the_uninterrupted_one(project):
    run(["python", "-m", "pipeline", *SWEEP], project)
    expected = final_state(project)
    subprocess.run(["rm", "-rf", str(project / "runs")], check=True)
    result = kill_and_rerun(project, SWEEP, "epoch 1/2")
    assert "resuming after epoch 1" in result.stdout
    assert final_state(project) == expected


MIRRORED = """
import json, sys
from pathlib import Path
import keras
from pipeline import build, distribute, prepare, train
from tests.conftest import compose
out, cfg = Path(sys.argv[1]), compose(*sys.argv[3:])
if sys.argv[2] == "prepare":
    prepare.run(cfg, Path.cwd(), out)
    build.run(cfg, out)
else:
    train.run(cfg, Path.cwd(), out, "test")
    print("digest", distribute.weights_digest(keras.models.load_model(out / cfg.paths.model)))
"""


@pytest.mark.slow
def test_a_mirrored_training_killed_and_resumed_ends_as_the_uninterrupted_one(tmp_path,
                                                                              data_dir):
    overrides = ["data.limit=600", "trainer.epochs=2", "model=small_cnn",
                 "trainer.batch_size=32", "trainer.distribute=mirrored", f"data.path={data_dir}",
                 f"data.test_path={data_dir}",
                 f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    script = [sys.executable, "-c", MIRRORED, str(tmp_path)]
    run([*script, "prepare", *overrides], REPO)

    def digest(stdout):
        return next(line for line in stdout.splitlines() if line.startswith("digest"))

    expected = digest(run([*script, "train", *overrides], REPO).stdout)
    proc = subprocess.Popen([*script, "train", *overrides], cwd=REPO, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    wait_for_line(proc, "epoch 1/2")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=300)
    result = run([*script, "train", *overrides], REPO)
    assert "resuming after epoch 1" in result.stdout
    assert digest(result.stdout) == expected


JAX_RESUME = """
import sys
import pytest
from tests import test_resume as t
from pipeline import distribute
from pipeline.checkpoints import Checkpoint
from pipeline.data import fashion_mnist
data = fashion_mnist.load(sys.argv[2], verify_md5=False)
subset = data.x_train[:512], data.y_train[:512]
model, rows = t.train_once(subset)
checkpoint = Checkpoint(sys.argv[1])
with pytest.raises(t.Killed):
    t.train_once(subset, checkpoint, kill_after=2)
resumed, resumed_rows = t.train_once(subset, checkpoint)
print(distribute.weights_digest(model) == distribute.weights_digest(resumed), rows == resumed_rows)
"""


@pytest.mark.slow
def test_resume_is_exact_on_jax_too(tmp_path, data_dir):
    pytest.importorskip("jax")
    result = run([sys.executable, "-c", JAX_RESUME, str(tmp_path / "checkpoint"), str(data_dir)],
                 REPO, extra_env={"KERAS_BACKEND": "jax"})
    assert result.stdout.strip().splitlines()[-1] == "True True"
