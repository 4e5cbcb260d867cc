"""Evaluation arithmetic against hand-computed values, and the figures."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate import confusion_csv, confusion_matrix, per_class_scores
from pipeline.figures import plot_confusion_matrix, plot_learning_curves, save_figure
from pipeline.train import history_csv

pytestmark = pytest.mark.unit  # make test-unit: no data, no DVC, no training


def test_confusion_matrix_and_scores_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    matrix = confusion_matrix(y_true, y_pred, 3)
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    scores = per_class_scores(matrix, ["a", "b", "c"])
    assert scores["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8,
                                         "support": 3})
    assert scores["b"]["precision"] == pytest.approx(0.5)
    assert scores["b"]["recall"] == pytest.approx(0.5)
    assert scores["c"]["precision"] == pytest.approx(0.5)
    assert scores["c"]["f1"] == pytest.approx(2 / 3)


def test_scores_are_zero_for_a_class_never_predicted():
    scores = per_class_scores(confusion_matrix(np.array([0, 1]), np.array([0, 0]), 2), ["a", "b"])
    assert scores["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_confusion_csv_uses_class_names():
    text = confusion_csv(np.array([0, 1]), np.array([1, 1]), ["cat", "dog"])
    assert text.splitlines() == ["actual,predicted", "cat,dog", "dog,dog"]


def test_figures_are_written_as_png(tmp_path):
    matrix = np.array([[5, 1], [2, 7]])
    save_figure(plot_confusion_matrix(matrix, ["a", "b"]), tmp_path / "cm.png")
    history = [{"epoch": 1, "loss": 0.9, "accuracy": 0.6, "val_loss": 1.0, "val_accuracy": 0.5},
               {"epoch": 2, "loss": 0.5, "accuracy": 0.8, "val_loss": 0.7, "val_accuracy": 0.7}]
    save_figure(plot_learning_curves(history), tmp_path / "curves.png")
    for name in ("cm.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_history_csv_has_one_row_per_epoch():
    rows = [{"epoch": 1, "loss": 0.5, "accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.7,
             "learning_rate": 0.001}]
    assert history_csv(rows).splitlines() == [
        "epoch,loss,accuracy,val_loss,val_accuracy,learning_rate",
        "1,0.5,0.8,0.6,0.7,0.001"]


def test_headline_metrics_hold_no_per_class_figures():
    """`dvc metrics show` reads the headline dict, test accuracy first; each class's figures
    come apart, one entry per class."""
    import keras

    from pipeline.evaluate import evaluate

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    x = np.random.default_rng(0).normal(size=(12, 4)).astype("float32")
    y = np.arange(12) % 3
    metrics, per_class, matrix, predicted, _ = evaluate(model, x, y, ["a", "b", "c"], 4)
    assert next(iter(metrics)) == "test_accuracy"
    assert {"test_loss", "test_accuracy_ci_low", "test_accuracy_ci_high", "test_examples",
            "macro_precision", "macro_recall", "macro_f1", "roc_auc",
            "average_precision"} <= set(metrics)
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # nothing nested
    assert per_class == per_class_scores(matrix, ["a", "b", "c"])
    assert [s["support"] for s in per_class.values()] == [4, 4, 4]
    assert metrics["test_accuracy"] == np.mean(predicted == y)


def test_flip_tta_averages_each_image_with_its_mirror_image():
    import keras

    from pipeline.evaluate import flip_averaged, tta_metrics

    # two classes read off the leftmost and the rightmost pixel of a 1x4 image
    model = keras.Sequential([keras.Input((1, 4, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(2, activation="softmax")])
    model.set_weights([np.array([[4.0, -4.0], [0, 0], [0, 0], [-4.0, 4.0]]), np.zeros(2)])
    x = np.array([[1, 0, 0, 0], [0, 0, 0, 1], [1, 0, 1, 0]], "float32").reshape(3, 1, 4, 1)
    plain = model.predict(x, verbose=0)
    mirrored = model.predict(x[:, :, ::-1], verbose=0)
    assert not np.allclose(plain, mirrored)
    averaged = flip_averaged(model).predict(x, verbose=0)
    np.testing.assert_allclose(averaged, (plain + mirrored) / 2, atol=1e-6)
    y = np.array([0, 0, 1])
    scores = tta_metrics(model, x, y, "flip", batch_size=2)
    assert scores["test_accuracy_tta"] == np.mean(averaged.argmax(axis=1) == y)
    assert scores["test_loss_tta"] == pytest.approx(
        -np.mean(np.log(averaged[np.arange(3), y])), rel=1e-5)
    assert tta_metrics(model, x, y, "none", batch_size=2) == {}


def test_every_metric_keras_reports_is_kept_logged_and_written():
    """A metric added to `compile` (here AUC) reaches the history, MLflow and the CSV."""
    import keras

    from pipeline.train import EpochLog

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="sgd", loss="binary_crossentropy",
                  metrics=["accuracy", keras.metrics.AUC(name="auc")])
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    logged = []
    log = EpochLog(1, log_metrics=lambda metrics, step: logged.append(metrics))
    model.fit(x, y, validation_data=(x, y), epochs=1, verbose=0, callbacks=[log])
    assert {"auc", "val_auc"} <= set(log.rows[0]) and {"auc", "val_auc"} <= set(logged[0])
    header = history_csv(log.rows).splitlines()[0].split(",")
    assert header[:6] == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy",
                          "learning_rate"] and {"auc", "val_auc"} <= set(header[6:])
