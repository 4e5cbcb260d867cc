"""`python -m pipeline`: Hydra overrides and multiruns, determinism, and bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

from pipeline.__main__ import run_stages
from pipeline.errors import ConfigError
from pipeline.params import check_command_line, write_params
from tests.conftest import QUICK, compose, mlflow_runs, run


def pipeline_cmd(*overrides, multirun=False):
    return ["python", "-m", "pipeline", *(["-m"] if multirun else []), *QUICK, *overrides]


def run_folders(project):
    return [p for p in (project / "runs").rglob("outputs") if p.is_dir()]


def test_override_run_logs_its_params_and_metrics(project):
    result = run(pipeline_cmd("optimizer=momentum", "optimizer.learning_rate=0.02",
                              "evaluate.tta=flip", "trainer.label_smoothing=0.1"), project)
    (run_,) = mlflow_runs(project)
    assert run_.info.status == "FINISHED"
    assert run_.data.params["optimizer.name"] == "momentum"
    assert run_.data.params["optimizer.momentum"] == "0.9"
    assert run_.data.params["optimizer.learning_rate"] == "0.02"
    assert run_.data.tags["pipeline.entry_point"] == "python -m pipeline"
    assert {"val_accuracy", "test_accuracy", "learning_rate"} <= set(run_.data.metrics)
    (outputs,) = run_folders(project)
    metrics = json.loads((outputs / "evaluate" / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(run_.data.metrics["test_accuracy"])
    # flip test-time augmentation, scored beside the plain accuracy, in both places
    assert metrics["test_accuracy_tta"] == pytest.approx(run_.data.metrics["test_accuracy_tta"])
    assert run_.data.params["evaluate.tta"] == "flip"
    assert run_.data.params["trainer.label_smoothing"] == "0.1"  # trained on one-hot targets
    assert f"with flip test-time augmentation {metrics['test_accuracy_tta']:.4f}" in result.stdout
    assert not (project / "outputs").exists()  # DVC's outputs are left alone
    assert "epoch 1/1" in result.stdout and "test accuracy" in result.stdout
    meta = json.loads((outputs / "prepared" / "meta.json").read_text())
    inputs = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset
              for i in run_.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "test"}  # MLflow's context tag
    for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        assert inputs[context].name == "fashion_mnist"
        assert inputs[context].digest == meta["digests"][split][:12]
        assert json.loads(inputs[context].source)["uri"].endswith("data")


@pytest.mark.slow
def test_multirun_logs_one_run_per_optimizer(project):
    run(pipeline_cmd("optimizer=gd,rmsprop", multirun=True), project)
    runs = [r for r in mlflow_runs(project) if "sweep.parent" not in r.data.tags]
    assert sorted(r.data.params["optimizer.name"] for r in runs) == ["gd", "rmsprop"]
    assert all(r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics for r in runs)
    assert len(run_folders(project)) == 2


def test_same_params_give_bit_identical_results(tmp_path, data_dir):
    from pathlib import Path

    import keras

    cfg = compose(*QUICK, f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    root = Path(data_dir).parent
    first = run_stages(cfg, root, tmp_path / "a")
    second = run_stages(cfg, root, tmp_path / "b")
    assert first == second
    weights = [keras.models.load_model(tmp_path / d / cfg.paths.model).get_weights()
               for d in ("a", "b")]
    for w1, w2 in zip(*weights):
        np.testing.assert_array_equal(w1, w2)
    history = [(tmp_path / d / cfg.paths.history).read_text() for d in ("a", "b")]
    assert history[0] == history[1]


def assert_failed_cleanly(result, project, message):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert not run_folders(project), "a failed run left outputs behind"
    assert all(r.info.status != "RUNNING" for r in mlflow_runs(project))
    assert not [r for r in mlflow_runs(project) if r.info.status == "FINISHED"]


@pytest.mark.parametrize("override,message", [
    ("optimizer.learning_rate=-0.1", "optimizer.learning_rate=-0.1: must be positive"),
    # the same path as the learning rate; test_config checks the value itself
    pytest.param("trainer.batch_size=0", "trainer.batch_size=0: must be a positive integer",
                 marks=pytest.mark.slow),
    ("data.path=no/such/folder", "no/such/folder not found"),
])
def test_bad_values_fail_before_training(project, override, message):
    result = run(pipeline_cmd(override), project, check=False)
    assert_failed_cleanly(result, project, message)


@pytest.mark.parametrize("override,message", [
    ("optimizer=adma", "unknown optimizer"),
    pytest.param("model=resnet", "unknown model", marks=pytest.mark.slow),  # as the optimizer
])
def test_unknown_names_fail_at_composition(project, override, message):
    result = run(pipeline_cmd(override), project, check=False)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()  # one line, not Hydra's usage block
    assert line.startswith("error: ") and message in line
    assert not (project / "runs").exists()


@pytest.mark.parametrize("argv,message", [
    (["trainer.epoch=3"], "unknown config key 'trainer.epoch'; check its spelling"),
    (["-m", "optimizer=adam,adma"], "optimizer='adma': unknown optimizer; choose one of adam, "
     "adamw, gd, momentum, rmsprop"),
    (["-m", "hydra/launcher=joblib", "model=small_cnn,resnet", "trainer.epochs=1,2"],
     "model='resnet': unknown model"),
    (["experiment=compare_optimizers", "+trainer.epoch=1"], "trainer.epoch"),
    (["-m", "optimizer=adam,rmsprop", "optimizer.class_name=Nadma"],
     "optimizer.class_name='Nadma': not an optimizer class of keras.optimizers; choose one of"),
    (["+optimizer.betta_1=0.9"], "optimizer.betta_1=0.9: not an argument of "
     "keras.optimizers.Adam; its arguments are beta_1, "),
])
@pytest.mark.unit
def test_command_lines_are_checked_as_hydra_would_compose_them(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_command_line(argv)


@pytest.mark.parametrize("argv", [
    ["-m", "optimizer=gd,adam", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    ["experiment=compare_optimizers", "trainer.epochs=1"],
    ["--cfg", "job", "trainer.epochs=range(1,3)", "+hydra.job.env_set.X=1"],
    ["--help"],
])
@pytest.mark.unit
def test_good_command_lines_pass_the_check(argv):
    check_command_line(argv)


@pytest.mark.parametrize("overrides,message", [
    (["experiment=compare_optimizers"], "experiment=compare_optimizers is a sweep over "
     "optimizer=gd,momentum,rmsprop,adam; params.yaml holds one config: run the sweep with "
     "`python -m pipeline experiment=compare_optimizers`"),
    (["optimizer=gd,adam"], "optimizer=gd,adam is a sweep; params.yaml holds one config: run "
     "the sweep with `python -m pipeline -m optimizer=gd,adam`, or queue its runs with "
     "`dvc exp run --queue -S 'optimizer=gd,adam'`"),
])
@pytest.mark.unit
def test_params_yaml_refuses_a_sweep(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        write_params(overrides, tmp_path / "params.yaml")
    assert not (tmp_path / "params.yaml").exists()


@pytest.mark.unit
def test_params_main_writes_the_projects_params_yaml_from_a_subfolder(tmp_path, monkeypatch,
                                                                      capsys):
    from pipeline import params

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # a project: dvc.yaml and conf/
    (tmp_path / "conf").mkdir()
    monkeypatch.chdir(tmp_path / "conf")
    monkeypatch.setattr("sys.argv", ["pipeline.params", "optimizer=rmsprop"])
    params.main()
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["optimizer"]["name"] == "rmsprop"
    assert not (tmp_path / "conf" / "params.yaml").exists()
    assert f"wrote {tmp_path / 'params.yaml'}" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["pipeline.params", "--help"])
    params.main()
    assert capsys.readouterr().out.startswith("Write `params.yaml`")


def test_xla_under_op_determinism_is_refused_before_any_work(tmp_path, data_dir):
    from pathlib import Path

    # Keras would train without XLA, with only a warning
    cfg = compose(*QUICK, "trainer.jit_compile=true",
                  f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ConfigError, match=r"^trainer\.jit_compile=true: TensorFlow does not "
                       r"compile with XLA under op determinism .*trainer\.deterministic=false"):
        run_stages(cfg, Path(data_dir).parent, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def corrupt(path, how):
    raw = path.read_bytes()
    path.unlink()  # the copy may share blocks with the original: write a new file
    path.write_bytes(how(raw))


@pytest.mark.parametrize("how,extra,message", [
    # the IDX checks themselves are unit-tested in test_data.py; end to end, one is enough
    pytest.param(lambda b: b[:-1000], "data.verify_md5=false", "truncated or corrupt",
                 marks=pytest.mark.slow),
    pytest.param(lambda b: b"\x07" + b[1:], "data.verify_md5=false", "bad magic number",
                 marks=pytest.mark.slow),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "data.verify_md5=true", "has md5"),
])
def test_corrupt_data_fails_before_training(project, how, extra, message):
    corrupt(project / "data" / "t10k-images-idx3-ubyte", how)
    result = run(pipeline_cmd(extra), project, check=False)
    assert_failed_cleanly(result, project, message)


def test_corrupt_data_fails_dvc_repro_without_outputs(project):
    corrupt(project / "data" / "train-labels-idx1-ubyte", lambda b: b[:-10])
    run(["python", "-m", "pipeline.params", *QUICK], project)
    result = run(["dvc", "repro"], project, check=False)
    assert result.returncode != 0
    assert "error: " in result.stderr and "train-labels-idx1-ubyte" in result.stderr
    assert not (project / "outputs").exists() or not any((project / "outputs").rglob("*.npy"))
    assert mlflow_runs(project) == []
