"""Keras 3 on JAX on a machine without TensorFlow: the stages run, score and log as on
TensorFlow, and nothing imports TensorFlow."""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tests.conftest import QUICK, import_reports, mlflow_runs, run, without_packages

pytest.importorskip("jax")


@pytest.fixture
def no_tensorflow(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """(environment, report folder): KERAS_BACKEND=jax and TensorFlow unimportable."""
    folder = tmp_path / "no-tensorflow"
    return {**without_packages(folder, "tensorflow"), "KERAS_BACKEND": "jax"}, folder


def test_tensorflow_is_blocked_and_the_default_backend_falls_back_to_jax(tmp_path,
                                                                         no_tensorflow):
    extra, folder = no_tensorflow
    blocked = run(["python", "-c", "import tensorflow.keras"], tmp_path, check=False,
                  extra_env=extra)
    assert blocked.returncode == 1
    assert "ModuleNotFoundError: No module named 'tensorflow" in blocked.stderr
    chosen = run(["python", "-c", "import pipeline, keras; print(keras.backend.backend())"],
                 tmp_path, extra_env={**extra, "KERAS_BACKEND": None})
    assert chosen.stdout.strip() == "jax"
    assert [r["loaded"] for r in import_reports(folder)] == [[], []]


def test_no_backend_at_all_names_the_extras_to_install(tmp_path):
    extra = {**without_packages(tmp_path / "no-backend", "tensorflow", "jax"),
             "KERAS_BACKEND": None}
    result = run(["python", "-c", "import pipeline"], tmp_path, check=False, extra_env=extra)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "ImportError: no Keras backend is installed: install the package with one, pip install "
        "-e '.[tensorflow]' (or '.[gpu]', '.[jax]'), or set KERAS_BACKEND to the one you have")


@pytest.mark.unit
def test_the_backend_is_an_extra_so_a_jax_install_pulls_no_tensorflow():
    """What pip reads: the installed package's requirements, each with its extra."""
    by_extra: dict[str, list[str]] = {}
    for requirement in importlib.metadata.requires("pipeline"):
        name = re.match(r"[\w-]+", requirement)[0]
        extra = re.search(r'extra == "([\w-]+)"', requirement)
        by_extra.setdefault(extra[1] if extra else "", []).append(name)
    assert not {"tensorflow", "jax", "torch"} & set(by_extra[""]), by_extra[""]
    assert by_extra["tensorflow"] == ["tensorflow"] and by_extra["jax"] == ["jax"]


def logged_model_files(project: Path, run_id: str) -> tuple[list[str], dict]:
    """The requirements and the MLmodel file of the model that run `run_id` logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    (model,) = [m for m in client.search_logged_models(
        [client.get_run(run_id).info.experiment_id]) if m.source_run_id == run_id]
    folder = Path(urlparse(model.artifact_location).path)
    requirements = (folder / "requirements.txt").read_text().split()
    return requirements, yaml.safe_load((folder / "MLmodel").read_text())


@pytest.mark.slow  # the four stages on JAX (~25 s); CI runs it
def test_the_stages_run_on_jax_without_tensorflow(project, no_tensorflow):
    extra, folder = no_tensorflow
    result = run(["python", "-m", "pipeline", *QUICK], project, extra_env=extra)

    (run_,) = mlflow_runs(project)
    assert run_.info.status == "FINISHED"
    (metrics_file,) = (project / "runs").rglob("evaluate/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["test_accuracy"] > 0.2  # chance is 0.1 with ten classes
    assert run_.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])

    requirements, mlmodel = logged_model_files(project, run_.info.run_id)
    assert any(r.startswith("jax==") for r in requirements), requirements
    assert not any(r.startswith("tensorflow") for r in requirements), requirements
    assert mlmodel["flavors"]["keras"]["keras_backend"] == "jax"

    reports = import_reports(folder)
    assert reports and all(r["loaded"] == [] for r in reports)
    assert "jax" in {r["keras_backend"] for r in reports}
    output = result.stdout + result.stderr
    assert "━" not in output  # no Keras progress bar from MLflow's check of the input example
    assert "Unable to initialize backend" not in output  # JAX's INFO line about missing TPUs
