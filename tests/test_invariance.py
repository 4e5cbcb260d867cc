"""Translation invariance: shifted images by hand, the curve's arithmetic, shift 0 against the
plain test accuracy, and the evaluate stage with an MLP baseline read back from MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline import invariance, prepare, tracking
from pipeline.__main__ import run_stages
from pipeline.errors import ConfigError
from pipeline.evaluate import (
    FEATURE_MAPS_PNG,
    FILTERS_PNG,
    SHIFT_PNG,
    evaluate,
    predict_labels,
)
from pipeline.invariance import shift_curve, shift_images, summarize
from pipeline.models import build_model
from pipeline.prepare import read_split
from tests.conftest import QUICK, compose

PNG = b"\x89PNG\r\n\x1a\n"


def quick(*overrides: str) -> list[str]:
    """QUICK with `overrides` in place of its own values for the same keys."""
    keys = {o.split("=")[0] for o in overrides}
    return [*(o for o in QUICK if o.split("=")[0] not in keys), *overrides]


@pytest.mark.unit
def test_shift_images_by_hand():
    image = np.arange(1, 10, dtype=np.uint8).reshape(1, 3, 3, 1)  # rows 1 2 3 / 4 5 6 / 7 8 9
    assert shift_images(image, 0, 0)[0, ..., 0].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert shift_images(image, 1, 0)[0, ..., 0].tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 6]]
    assert shift_images(image, -1, 0)[0, ..., 0].tolist() == [[4, 5, 6], [7, 8, 9], [0, 0, 0]]
    assert shift_images(image, 0, 2)[0, ..., 0].tolist() == [[0, 0, 1], [0, 0, 4], [0, 0, 7]]
    assert shift_images(image, 0, -1)[0, ..., 0].tolist() == [[2, 3, 0], [5, 6, 0], [8, 9, 0]]
    assert not shift_images(image, 3, 0).any()
    assert image[0, 0, 0, 0] == 1  # the input is left as it was


def dot_images(rows_cols: list[tuple[int, int] | None]) -> np.ndarray:
    """3x3 images, each blank or with one bright pixel at (row, col)."""
    images = np.zeros((len(rows_cols), 3, 3, 1), np.uint8)
    for i, where in enumerate(rows_cols):
        if where:
            images[i, where[0], where[1], 0] = 255
    return images


@pytest.mark.unit
def test_a_position_free_classifier_keeps_its_answer_until_the_object_leaves():
    def anything_there(images):  # class 1 when any pixel is lit: blind to position
        return images.reshape(len(images), -1).max(axis=1).astype(bool).astype(int)

    images, labels = dot_images([None, (1, 1)]), np.array([0, 1])
    curve = shift_curve(anything_there, images, labels, max_shift=2)
    assert [row["shift"] for row in curve] == [0, 1, 2]
    assert [row["accuracy"] for row in curve] == [1.0, 1.0, 0.5]  # at 2 px the dot has left
    assert [row["agreement"] for row in curve] == [1.0, 1.0, 0.5]


@pytest.mark.unit
def test_a_position_bound_classifier_loses_half_at_one_pixel():
    def column_of_the_dot(images):  # the class is the dot's column: bound to position
        return images[..., 0].max(axis=1).argmax(axis=1)

    images, labels = dot_images([(1, 1)]), np.array([1])
    curve = shift_curve(column_of_the_dot, images, labels, max_shift=1)
    # down and up keep column 1; right and left move it to columns 2 and 0
    assert curve[1] == {"shift": 1, "accuracy": 0.5, "agreement": 0.5}
    assert summarize(curve) == {"accuracy_at_max_shift": 0.5, "agreement_at_max_shift": 0.5,
                                "mean_agreement": 0.5}


@pytest.mark.unit
def test_summary_averages_agreement_over_the_shifted_images_only():
    curve = [{"shift": 0, "accuracy": 0.9, "agreement": 1.0},
             {"shift": 1, "accuracy": 0.8, "agreement": 0.9},
             {"shift": 2, "accuracy": 0.6, "agreement": 0.7}]
    assert summarize(curve) == pytest.approx({"accuracy_at_max_shift": 0.6,
                                              "agreement_at_max_shift": 0.7,
                                              "mean_agreement": 0.8})


@pytest.mark.parametrize("classes", [10, 2])
def test_shift_zero_reproduces_the_test_accuracy_exactly(tmp_path, data_dir, classes):
    cfg = compose(*QUICK)
    prepare.run(cfg, data_dir.parent, tmp_path)
    (x, y), (x_test, y_test) = (read_split(tmp_path / cfg.paths.prepared, split)
                                for split in ("train", "test"))
    if classes == 2:  # a one-unit sigmoid detector: "T-shirt/top" or not
        y, y_test = (y == 0).astype(int), (y_test == 0).astype(int)
    keras.utils.set_random_seed(0)
    model = build_model(x.shape[1:], classes, filters=[4], dense_units=[8], batch_norm=False)
    loss = "binary_crossentropy" if classes == 2 else "sparse_categorical_crossentropy"
    model.compile(optimizer="adam", loss=loss)
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    names = [str(c) for c in range(classes)]
    metrics, *_ = evaluate(model, x_test, y_test, names, batch_size=64)
    curve = shift_curve(lambda images: predict_labels(model, images, 64), x_test, y_test, 1)
    assert curve[0]["accuracy"] == metrics["test_accuracy"]
    assert curve[0]["agreement"] == 1.0
    assert curve[1]["accuracy"] != metrics["test_accuracy"]  # shifting does change predictions


@pytest.fixture(scope="module")
def baseline_and_cnn(tmp_path_factory, data_dir):
    """An MLP baseline, then a small CNN compared with it, through the real stages and MLflow."""
    tmp = tmp_path_factory.mktemp("invariance")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    common = (f"mlflow.tracking_uri={store}", "invariance.max_shift=2")
    mlp_cfg = compose(*quick(*common, "model=mlp"))
    run_stages(mlp_cfg, data_dir.parent, tmp / "mlp")
    mlp_run = json.loads((tmp / "mlp" / mlp_cfg.paths.run).read_text())["run_id"]
    cnn_cfg = compose(*quick(*common, f"invariance.baseline_run={mlp_run}"))
    metrics = run_stages(cnn_cfg, data_dir.parent, tmp / "cnn")
    return tmp, store, mlp_cfg, mlp_run, cnn_cfg, metrics


def test_evaluate_writes_the_shift_curve_metrics_and_figures(baseline_and_cnn):
    tmp, _, mlp_cfg, _, cnn_cfg, metrics = baseline_and_cnn
    cnn, mlp = tmp / "cnn", tmp / "mlp"
    assert json.loads((cnn / cnn_cfg.paths.metrics).read_text()) == metrics
    shift = metrics["shift"]
    assert set(shift) == {"accuracy_at_max_shift", "agreement_at_max_shift", "mean_agreement",
                          "baseline"}
    mlp_metrics = json.loads((mlp / mlp_cfg.paths.metrics).read_text())
    assert "baseline" not in mlp_metrics["shift"]
    assert shift["baseline"] == mlp_metrics["shift"]  # its own numbers, read back from MLflow
    lines = (cnn / cnn_cfg.paths.shift).read_text().splitlines()
    assert lines[0] == "shift,accuracy,agreement"
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "1", "2"]
    assert float(lines[1].split(",")[1]) == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    figures = cnn / cnn_cfg.paths.figures
    for name in (SHIFT_PNG, FILTERS_PNG, FEATURE_MAPS_PNG):
        assert (figures / name).read_bytes()[:8] == PNG, name
    mlp_figures = mlp / mlp_cfg.paths.figures
    assert (mlp_figures / SHIFT_PNG).exists()
    assert not (mlp_figures / FILTERS_PNG).exists()  # no conv layer, no filters


def test_the_curves_and_figures_are_in_mlflow(baseline_and_cnn):
    from mlflow.tracking import MlflowClient

    tmp, store, _, mlp_run, cnn_cfg, metrics = baseline_and_cnn
    client = MlflowClient(store)
    cnn_run = json.loads((tmp / "cnn" / cnn_cfg.paths.run).read_text())["run_id"]
    history = client.get_metric_history(cnn_run, "shift.accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2]
    logged = client.get_run(cnn_run).data.metrics
    assert logged["shift.mean_agreement"] == metrics["shift"]["mean_agreement"]
    assert logged["shift.baseline.accuracy_at_max_shift"] == pytest.approx(
        client.get_run(mlp_run).data.metrics["shift.accuracy_at_max_shift"])
    figures = {Path(a.path).name for a in client.list_artifacts(cnn_run, "figures")}
    assert {SHIFT_PNG, FILTERS_PNG, FEATURE_MAPS_PNG} <= figures


def test_evaluate_alone_under_new_params_logs_a_run_of_its_own(baseline_and_cnn, data_dir):
    """As when `dvc repro` reruns evaluate alone after `invariance.*` changed: the training
    run keeps the params its metrics came from."""
    import shutil

    from mlflow.tracking import MlflowClient

    from pipeline import evaluate

    tmp, store, _, _, cnn_cfg, metrics = baseline_and_cnn
    again = tmp / "cnn-evaluated-again"
    shutil.copytree(tmp / "cnn", again)
    cfg = compose(*quick(f"mlflow.tracking_uri={store}", "invariance.max_shift=1"))
    evaluate.run(cfg, data_dir.parent, again, "dvc repro")
    client = MlflowClient(store)
    trained = json.loads((again / cnn_cfg.paths.run).read_text())["run_id"]
    (evaluation,) = client.search_runs(
        [client.get_run(trained).info.experiment_id],
        filter_string=f"tags.`{tracking.EVALUATES_TAG}` = '{trained}'")
    assert evaluation.info.status == "FINISHED"
    assert evaluation.data.params["invariance.max_shift"] == "1"
    assert evaluation.data.tags["pipeline.evaluate_changed"] == (
        "invariance.baseline_run invariance.max_shift")
    assert sorted(m.step for m in client.get_metric_history(
        evaluation.info.run_id, "shift.accuracy")) == [0, 1]
    assert client.get_run(trained).data.params["invariance.max_shift"] == "2"  # as it was
    assert sorted(m.step for m in client.get_metric_history(trained, "shift.accuracy")) == \
        [0, 1, 2]
    assert evaluation.data.metrics["test_accuracy"] == metrics["test_accuracy"]


def test_max_shift_0_leaves_the_shift_analysis_out(baseline_and_cnn, data_dir, capsys):
    import shutil

    from mlflow.tracking import MlflowClient

    from pipeline import evaluate

    tmp, store, _, _, cnn_cfg, metrics = baseline_and_cnn
    again = tmp / "cnn-without-shifts"
    shutil.copytree(tmp / "cnn", again)
    shutil.rmtree(again / cnn_cfg.paths.figures)  # as DVC removes a stage's outputs first
    cfg = compose(*quick(f"mlflow.tracking_uri={store}", "invariance.max_shift=0"))
    without = evaluate.run(cfg, data_dir.parent, again, "dvc repro")
    assert "shift" not in without
    assert without["test_accuracy"] == metrics["test_accuracy"]
    assert (again / cfg.paths.shift).read_text().splitlines() == ["shift,accuracy,agreement"]
    figures = again / cfg.paths.figures
    assert not (figures / SHIFT_PNG).exists() and (figures / FILTERS_PNG).exists()
    assert "shift analysis left out (invariance.max_shift=0)" in capsys.readouterr().out
    trained = json.loads((again / cnn_cfg.paths.run).read_text())["run_id"]
    client = MlflowClient(store)
    (evaluation,) = client.search_runs(
        [client.get_run(trained).info.experiment_id],
        filter_string=f"tags.`{tracking.EVALUATES_TAG}` = '{trained}' "
                      "and params.`invariance.max_shift` = '0'")
    assert not [k for k in evaluation.data.metrics if k.startswith("shift")]


@pytest.mark.parametrize("override,message", [
    ("data.limit=200", "tested on other data, so the curves do not compare: data.limit 300"),
    ("invariance.max_shift=3", "its shift curve reaches 2 pixels"),
])
def test_a_baseline_that_does_not_compare_fails_with_one_line(baseline_and_cnn, override,
                                                              message):
    _, store, mlp_cfg, mlp_run, _, _ = baseline_and_cnn
    tracking.connect(store)
    cfg = compose(*quick(f"mlflow.tracking_uri={store}", "invariance.max_shift=2", override))
    with pytest.raises(ConfigError, match=message):
        invariance.fetch_baseline(mlp_run, cfg)
    assert invariance.fetch_baseline(mlp_run, mlp_cfg)[0] == "mlp"
    with pytest.raises(ConfigError, match="no such MLflow run"):
        invariance.fetch_baseline("0" * 32, mlp_cfg)
