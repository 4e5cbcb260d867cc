"""Tier (c): `dvc repro` end to end in a copy of the project, on a subset of the real data.

Real DVC, a real MLflow SQLite store, no mocks. The stages run once for the module; the tests
then check the outputs, DVC's views of them, the MLflow run, and what a change reruns.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.params import write_params
from tests.conftest import QUICK, copy_project, mlflow_runs, run

STAGES = ("prepare", "build", "train", "evaluate")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")


def repro(project, *args, dvc="dvc", extra_env=None):
    result = run([dvc, "repro", *args], project, extra_env=extra_env)
    return set(re.findall(r"Running stage '(\w+)'", result.stdout)), result


def set_params(project, *overrides):
    write_params([*QUICK, *overrides], project / "params.yaml")


def without_venv(project):
    """The environment of `.venv/bin/dvc repro` typed in a new shell: the project has a
    `.venv` (this interpreter's, linked), and PATH does not hold it."""
    venv = Path(sys.prefix)
    (project / ".venv").symlink_to(venv, target_is_directory=True)
    with (project / ".git" / "info" / "exclude").open("a") as f:
        f.write("/.venv\n")  # .gitignore's `/.venv/` matches a folder, not a link
    path = [p for p in os.environ["PATH"].split(os.pathsep)
            if p and Path(p).resolve() != (venv / "bin").resolve()]
    return str(venv / "bin" / "dvc"), {"PATH": os.pathsep.join(path)}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, data_dir):
    """The first `dvc repro` runs as a newcomer starts it, `.venv/bin/dvc repro` in a shell
    where the venv is not active; later ones run with the venv on PATH."""
    project = copy_project(tmp_path_factory.mktemp("dvc") / "project", data_dir)
    set_params(project)
    dvc, environ = without_venv(project)
    ran, result = repro(project, dvc=dvc, extra_env=environ)
    return project, ran, result


def test_repro_runs_every_stage_and_writes_outputs(reproduced):
    project, ran, result = reproduced
    assert ran == set(STAGES)
    params = yaml.safe_load((project / "params.yaml").read_text())
    paths = params["paths"]
    for key in ("prepared", "build", "model", "history", "run", "metrics", "per_class",
                "confusion"):
        assert (project / paths[key]).exists(), key
    for png in ("confusion_matrix.png", "learning_curves.png"):
        assert (project / paths["figures"] / png).read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((project / paths["metrics"]).read_text())
    assert 0.1 < metrics["test_accuracy"] <= 1.0
    assert next(iter(metrics)) == "test_accuracy" and "per_class" not in metrics
    assert not set(CLASSES) & set(metrics)
    per_class = json.loads((project / paths["per_class"]).read_text())
    assert set(per_class) == set(CLASSES)
    assert all(set(s) == {"precision", "recall", "f1", "support"} for s in per_class.values())
    assert sum(s["support"] for s in per_class.values()) == metrics["test_examples"]
    history = (project / paths["history"]).read_text().splitlines()
    assert history[0].startswith("epoch,loss,accuracy,val_loss,val_accuracy")
    assert len(history) == 1 + 1  # header + one epoch
    assert "test accuracy" in result.stdout and "mlflow ui --backend-store-uri" in result.stdout
    assert "oneDNN" not in result.stderr and "cuda drivers" not in result.stderr


def test_one_finished_mlflow_run_with_params_metrics_tags_and_model(reproduced):
    project, _, _ = reproduced
    (run_,) = mlflow_runs(project)
    assert run_.info.status == "FINISHED"
    params = run_.data.params
    assert params["optimizer.name"] == "adam"
    assert params["optimizer.learning_rate"] == "0.001"
    assert params["data.limit"] == "300"
    assert params["model.name"] == "small_cnn"
    metrics = run_.data.metrics
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate",
                "test_loss", "test_accuracy"):
        assert key in metrics, key
    tags = run_.data.tags
    assert re.fullmatch(r"[0-9a-f]{40}", tags["git.commit"])
    assert tags["git.dirty"] == "false"  # params.yaml and dvc.lock changed, the code did not
    data_dvc = yaml.safe_load((project / "data.dvc").read_text())
    assert tags["data.md5"] == data_dvc["outs"][0]["md5"]
    assert tags["pipeline.entry_point"] == "dvc repro"
    recorded = json.loads((project / "outputs/train/mlflow_run.json").read_text())
    assert recorded["run_id"] == run_.info.run_id
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(run_.info.run_id)}
    assert {"report.md", "figures", "metrics.json"} <= artifacts
    (model,) = client.search_logged_models([run_.info.experiment_id])
    assert model.source_run_id == run_.info.run_id
    artifacts_dir = project / "mlartifacts"
    assert artifacts_dir.is_dir()  # artifacts at the project root, not in a stage's folder


def test_logged_model_loads_and_predicts(reproduced):
    import mlflow
    import numpy as np

    project, _, _ = reproduced
    (run_,) = mlflow_runs(project)
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    (logged,) = mlflow.search_logged_models(experiment_ids=[run_.info.experiment_id],
                                            output_format="list")
    model = mlflow.pyfunc.load_model(logged.model_uri)
    assert model.metadata.get_input_schema() is not None
    example = model.input_example
    assert example is not None and example.shape[1:] == (28, 28, 1)
    assert np.asarray(model.predict(example.astype("float32"))).shape == (len(example), 10)


def test_dvc_metrics_plots_and_params_views(reproduced):
    project, _, _ = reproduced
    shown = run(["dvc", "metrics", "show"], project).stdout
    assert "test_accuracy" in shown and "shift.accuracy_at_max_shift" in shown
    assert not any(name in shown for name in CLASSES)  # per class in a file of its own
    assert max(len(line) for line in shown.splitlines()) < 300
    paths = yaml.safe_load((project / "params.yaml").read_text())["paths"]
    per_class = run(["dvc", "metrics", "show", paths["per_class"]], project).stdout
    assert "Trouser.f1" in per_class and "Ankle boot.support" in per_class
    plots = run(["dvc", "plots", "show", "-o", "plots_html"], project)
    html = (project / "plots_html" / "index.html").read_text()
    assert "learning curves" in html and "confusion matrix" in html, plots.stdout
    assert "translation invariance" in html and "ROC" in html
    diff = run(["dvc", "params", "diff", "--all"], project).stdout
    assert "optimizer.learning_rate" in diff


def test_repro_with_nothing_changed_runs_nothing(reproduced):
    project, _, _ = reproduced
    ran, result = repro(project)
    assert ran == set()
    assert len(mlflow_runs(project)) == 1


def test_optimizer_change_reruns_train_and_evaluate_only(reproduced):
    project, _, _ = reproduced
    set_params(project, "optimizer.learning_rate=0.002")
    ran, _ = repro(project)
    assert ran == {"train", "evaluate"}
    runs = mlflow_runs(project)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.params["optimizer.learning_rate"] for r in runs} == {"0.001", "0.002"}


@pytest.mark.slow
def test_model_change_reruns_build_train_and_evaluate(reproduced):
    project, _, _ = reproduced
    set_params(project, "optimizer.learning_rate=0.002", "model.dense_units=[32]")
    ran, _ = repro(project)
    assert ran == {"build", "train", "evaluate"}


def test_dvc_exp_run_composes_hydra_overrides(reproduced):
    project, _, _ = reproduced
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    result = run(["dvc", "exp", "run", "-S", "optimizer=rmsprop",
                  "-S", "optimizer.learning_rate=0.01", "-S", "data.limit=300",
                  "-S", "trainer.epochs=1", "-S", "model=small_cnn"], project)
    name = re.search(r"Ran experiment\(s\): (\S+)", result.stdout).group(1)
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["optimizer"]["name"] == "rmsprop" and "rho" in params["optimizer"]
    latest = max(mlflow_runs(project), key=lambda r: r.info.start_time)
    assert latest.info.status == "FINISHED"
    assert latest.data.params["optimizer.name"] == "rmsprop"
    assert latest.data.params["optimizer.learning_rate"] == "0.01"
    assert latest.data.tags["dvc.exp_name"] == name
    assert latest.data.tags["pipeline.entry_point"] == "dvc exp run"
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], project).stdout
    assert name in shown and "test_accuracy" in shown


@pytest.mark.slow
def test_a_few_thousand_photos_stream_through_dvc_repro(tmp_path, data_dir):
    """Generated photos of varied sizes (JPEGs around 400x300, the hue leaning to the class)
    through every stage: prepared as shards by two workers, trained and evaluated from them,
    each split recorded in MLflow with the digest meta.json gives it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from data_scale import photo_folder

    folder = photo_folder(tmp_path / "photos", 2400, seed=0, classes=4, cores=2)
    project = copy_project(tmp_path / "project", data_dir)
    write_params(["data=image_folder", f"data.path={folder}", "data.image_size=[64,64]",
                  "data.workers=2", "model=small_cnn", "trainer.epochs=1",
                  "trainer.batch_size=64"], project / "params.yaml")
    ran, result = repro(project)
    assert ran == set(STAGES)
    assert re.search(r"prepare: .*train \d+, val \d+, test 480", result.stdout)
    prepared = project / "outputs" / "prepared"
    meta = json.loads((prepared / "meta.json").read_text())
    assert sum(meta["sizes"].values()) == 2400 and meta["input_shape"] == [64, 64, 3]
    assert len(list((prepared / "train").glob("images-*.npy"))) >= 1
    metrics = json.loads((project / "outputs" / "evaluate" / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.5  # four classes: chance is 0.25
    (run_,) = mlflow_runs(project)
    digests = {i.dataset.digest for i in run_.inputs.dataset_inputs}
    assert digests == {meta["digests"][split][:12] for split in ("train", "val", "test")}
