"""The accuracy's confidence interval against hand-computed values, the warning on collapsed
and healthy predictions and on diverging losses, and the warning of a collapsed model through
the real stages and MLflow."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.diagnostics import (
    accuracy_interval,
    accuracy_line,
    collapse_warning,
    validation_report,
)
from tests.conftest import QUICK, compose

CLASSES = ["cat", "dog", "bird", "fish", "frog", "horse", "ship", "truck", "plane", "deer"]


@pytest.mark.parametrize("correct,n,expected", [
    (45, 100, (0.3561, 0.5475)),
    (18, 40, (0.3070, 0.6017)),
    (0, 10, (0.0, 0.2775)),   # 0/n: [0, z²/(n + z²)]
    (10, 10, (0.7225, 1.0)),  # n/n: [n/(n + z²), 1]
    (1, 1, (0.2065, 1.0)),
])
@pytest.mark.unit
def test_wilson_interval_by_hand(correct, n, expected):
    assert accuracy_interval(correct, n) == pytest.approx(expected, abs=1e-4)


@pytest.mark.unit
def test_interval_edges_are_exact_and_narrow_with_n():
    assert accuracy_interval(0, 50)[0] == 0.0
    assert accuracy_interval(50, 50)[1] == 1.0
    small, large = accuracy_interval(45, 100), accuracy_interval(4500, 10000)
    assert large[1] - large[0] < (small[1] - small[0]) / 5


@pytest.mark.parametrize("correct,n", [(0, 0), (5, 4), (-1, 4)])
@pytest.mark.unit
def test_interval_refuses_impossible_counts(correct, n):
    with pytest.raises(ValueError, match=f"{correct}/{n}"):
        accuracy_interval(correct, n)


@pytest.mark.unit
def test_accuracy_line():
    assert accuracy_line("validation", 18, 40) == (
        "validation accuracy 0.4500 (95% CI 0.31–0.60, n=40)")


def balanced(n_per_class: int, classes: int) -> np.ndarray:
    return np.repeat(np.arange(classes), n_per_class)


def noisy(actual: np.ndarray, accuracy: float, classes: int, seed: int = 0) -> np.ndarray:
    """`actual` with a share 1 - accuracy of labels replaced by random classes."""
    rng = np.random.default_rng(seed)
    wrong = rng.random(len(actual)) > accuracy
    return np.where(wrong, rng.integers(0, classes, len(actual)), actual)


@pytest.mark.unit
def test_collapsed_test_predictions_give_one_warning_line():
    actual = balanced(5, 10)
    predicted = np.r_[np.zeros(49, int), 1]
    line = collapse_warning(predicted=predicted, actual=actual, train_accuracy=0.95,
                            split="test", class_names=CLASSES)
    assert line.startswith("warning: 98% of the 50 test predictions are class 'cat', which is "
                           "10% of the true labels, though training accuracy reached 0.95 "
                           "(majority class 0.10)")
    assert "\n" not in line
    for cause in ("BatchNorm", "overfitting", "class imbalance", "model.batch_norm=false",
                  "augment=light", "more data", "model=pretrained",
                  "trainer.class_weight=balanced"):
        assert cause in line


@pytest.mark.parametrize("classes,actual", [
    (10, balanced(30, 10)),                             # 10 balanced classes
    (10, np.r_[balanced(30, 10), np.zeros(30, int)]),   # roughly balanced: one class twice
    (2, np.r_[np.zeros(200, int), np.ones(100, int)]),  # two classes at 2:1
])
@pytest.mark.parametrize("accuracy", [0.5, 0.85, 0.99])
@pytest.mark.unit
def test_healthy_predictions_give_no_warning(classes, actual, accuracy):
    predicted = noisy(actual, accuracy, classes)
    assert collapse_warning(predicted=predicted, actual=actual, train_accuracy=0.99,
                            split="test") is None


@pytest.mark.unit
def test_a_two_class_model_that_favours_the_majority_class_is_no_collapse():
    actual = np.r_[np.zeros(200, int), np.ones(100, int)]
    predicted = np.r_[np.zeros(200, int), np.zeros(70, int), np.ones(30, int)]  # 90% class 0
    assert collapse_warning(predicted=predicted, actual=actual, train_accuracy=0.95,
                            split="validation") is None
    all_majority = np.zeros(300, int)
    assert collapse_warning(predicted=all_majority, actual=actual, train_accuracy=0.95,
                            split="validation") is not None


@pytest.mark.unit
def test_a_model_that_learned_nothing_is_not_a_collapse():
    """One class everywhere with training accuracy near chance: underfitting, not this."""
    assert collapse_warning(predicted=np.zeros(50, int), actual=balanced(5, 10),
                            train_accuracy=0.2, split="test") is None


def history(losses, val_losses):
    return [{"epoch": i + 1, "loss": a, "val_loss": b}
            for i, (a, b) in enumerate(zip(losses, val_losses))]


@pytest.mark.unit
def test_diverging_losses_give_a_warning():
    rows = history([1.0, 0.6, 0.4, 0.3, 0.2], [1.0, 0.8, 0.9, 1.1, 1.2])
    line = collapse_warning(predicted=balanced(5, 10), actual=balanced(5, 10),
                            train_accuracy=0.9, split="validation", history=rows)
    assert line == (
        "warning: validation loss rose 50% (0.800 to 1.200) over the last 3 epochs while "
        "training loss fell 67% (0.600 to 0.200). Likely causes: overfitting on a few hundred "
        "images. Try: augment=light, more data, model=pretrained, fewer trainer.epochs")


@pytest.mark.parametrize("losses,val_losses", [
    ([1.0, 0.6, 0.4, 0.3, 0.2], [1.0, 0.7, 0.6, 0.5, 0.45]),  # both fall
    ([0.30, 0.25, 0.22, 0.20, 0.19], [0.30, 0.27, 0.26, 0.28, 0.30]),  # a mild rise: +15%
    ([1.0, 0.6, 0.4, 0.3, 0.2], [1.0, 0.8, 0.7, 0.6, 0.9]),  # a spike in the last epoch only
    ([1.0, 0.5], [1.0, 2.0]),  # too few epochs to tell
    ([0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.5, 2.0]),  # training loss did not fall
])
@pytest.mark.unit
def test_no_divergence_warning(losses, val_losses):
    assert collapse_warning(predicted=balanced(5, 10), actual=balanced(5, 10),
                            train_accuracy=0.9, split="validation",
                            history=history(losses, val_losses)) is None


@pytest.mark.unit
def test_validation_report():
    actual = balanced(4, 10)
    predicted = actual.copy()
    predicted[:22] = (predicted[:22] + 1) % 10  # 18 of 40 right
    line, warning, metrics = validation_report(actual, predicted, 0.9, [])
    assert line == "validation accuracy 0.4500 (95% CI 0.31–0.60, n=40)"
    assert warning is None
    assert metrics == pytest.approx({"val_accuracy_ci_low": 0.3070,
                                     "val_accuracy_ci_high": 0.6017, "val_examples": 40},
                                    abs=1e-4)
    _, warning, _ = validation_report(actual, np.full(40, 3), 0.9, [], class_names=CLASSES)
    assert warning.startswith("warning: 100% of the 40 validation predictions are class 'fish'")


def favour_one_class(path, label: int) -> None:
    """Overwrite the model at `path` with itself, its last bias pushing every image to
    `label`: a model that collapsed, as BatchNorm statistics after few steps can make one."""
    import keras

    model = keras.models.load_model(path)
    logits = [layer for layer in model.layers if layer.weights][-1]  # (features, classes)
    kernel, bias = logits.get_weights()
    bias[:] = 0.0
    bias[label] = 100.0
    logits.set_weights([kernel, bias])
    model.save(path)


def test_a_collapsed_model_is_flagged_in_the_output_and_in_mlflow(tmp_path, data_dir, capsys,
                                                                   monkeypatch):
    """A healthy small run gets no warning; the same run's model made to predict one class
    gets the line last in its output and the `pipeline.warning` tag on its MLflow run."""
    from mlflow.tracking import MlflowClient

    from pipeline import evaluate
    from pipeline.__main__ import ENTRY_POINT, run_stages
    from pipeline.tracking import WARNING_TAG

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # MLflow sets it; undone after the test
    # three epochs: training accuracy well above chance, as in a run that learned
    cfg = compose(*QUICK, "trainer.epochs=3", "invariance.max_shift=1",
                  f"mlflow.tracking_uri={store}")
    out = tmp_path / "run"
    metrics = run_stages(cfg, data_dir.parent, out)
    healthy = capsys.readouterr().out
    run_id = json.loads((out / cfg.paths.run).read_text())["run_id"]
    assert "warning:" not in healthy
    assert WARNING_TAG not in MlflowClient(store).get_run(run_id).data.tags
    assert f"(95% CI {metrics['test_accuracy_ci_low']:.2f}–" in healthy
    assert metrics["test_examples"] == 300
    saved = json.loads((out / cfg.paths.metrics).read_text())
    assert saved["test_accuracy_ci_low"] < saved["test_accuracy"] < saved["test_accuracy_ci_high"]
    logged = MlflowClient(store).get_run(run_id).data.metrics
    assert logged["test_examples"] == 300
    assert logged["test_accuracy_ci_high"] == pytest.approx(saved["test_accuracy_ci_high"])

    favour_one_class(out / cfg.paths.model, label=3)
    evaluate.run(cfg, data_dir.parent, out, ENTRY_POINT)
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert last.startswith("warning: 100% of the 300 test predictions are class 'Dress', which "
                           "is 10% of the true labels, though training accuracy reached 0.")
    assert MlflowClient(store).get_run(run_id).data.tags[WARNING_TAG] == last


def test_most_predictions_in_one_of_ten_classes_is_a_collapse():
    actual = np.repeat(np.arange(10), 30)
    predicted = np.r_[np.full(180, 3), np.arange(120) % 10]  # 64% class 3, 10% of the labels
    line = collapse_warning(predicted=predicted, actual=actual, train_accuracy=0.9,
                            split="test")
    assert line is not None and line.startswith("warning: 64% of the 300 test predictions")
