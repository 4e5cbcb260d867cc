"""Stage `evaluate`: test loss and accuracy, per-class precision/recall/F1, confusion matrix.

Writes `paths.metrics` (for `dvc metrics show`), `paths.confusion` (a DVC confusion plot) and
the PNG figures under `paths.figures`; adds all of it to the training run in MLflow.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import keras
import numpy as np

from pipeline import backend, tracking
from pipeline.config import Config, load_params
from pipeline.errors import run_cli
from pipeline.figures import plot_confusion_matrix, plot_learning_curves, save_figure
from pipeline.files import read_json, write_json, write_text
from pipeline.prepare import read_meta, read_split

CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "learning_curves.png"


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[i, j]: examples of true class i predicted as class j."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    return counts


def per_class_scores(matrix: np.ndarray, class_names: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall and F1 per class from a confusion matrix (0 where undefined)."""
    tp = np.diag(matrix).astype(np.float64)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {name: {"precision": float(p), "recall": float(r), "f1": float(f),
                   "support": int(n)}
            for name, p, r, f, n in zip(class_names, precision, recall, f1, actual)}


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, class_names: list[str],
             batch_size: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """Return (metrics, confusion matrix, predicted labels) of `model` on (x, y)."""
    probabilities = model.predict(x, batch_size=batch_size, verbose=0)
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(y, predicted, len(class_names))
    loss = keras.losses.SparseCategoricalCrossentropy()(y, probabilities)
    scores = per_class_scores(matrix, class_names)
    metrics = {
        "test_loss": float(keras.ops.convert_to_numpy(loss)),
        "test_accuracy": float(np.mean(predicted == y)),
        "macro_precision": float(np.mean([s["precision"] for s in scores.values()])),
        "macro_recall": float(np.mean([s["recall"] for s in scores.values()])),
        "macro_f1": float(np.mean([s["f1"] for s in scores.values()])),
        "per_class": scores,
    }
    return metrics, matrix, predicted


def confusion_csv(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> str:
    """One row per test image, `actual,predicted`: the input of DVC's confusion template."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["actual", "predicted"])
    writer.writerows((class_names[a], class_names[p]) for a, p in zip(y_true, y_pred))
    return out.getvalue()


def read_history(path: Path) -> list[dict[str, float]]:
    with Path(path).open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def run(cfg: Config, root: Path, out_root: Path) -> dict:
    """Evaluate the trained model on the test split; add the results to its MLflow run."""
    backend.configure(cfg.seed, cfg.trainer.deterministic, cfg.trainer.precision)
    prepared = out_root / cfg.paths.prepared
    meta = read_meta(prepared)
    x_test, y_test = read_split(prepared, "test")
    run_id = read_json(out_root / cfg.paths.run)["run_id"]
    model = keras.models.load_model(out_root / cfg.paths.model)
    with tracking.resume_run(cfg, root, run_id):
        import mlflow

        metrics, matrix, predicted = evaluate(model, x_test, y_test, meta["class_names"],
                                              cfg.trainer.batch_size)
        write_json(out_root / cfg.paths.metrics, metrics)
        write_text(out_root / cfg.paths.confusion,
                   confusion_csv(y_test, predicted, meta["class_names"]))
        figures = out_root / cfg.paths.figures
        save_figure(plot_confusion_matrix(matrix, meta["class_names"]), figures / CONFUSION_PNG)
        save_figure(plot_learning_curves(read_history(out_root / cfg.paths.history)),
                    figures / CURVES_PNG)
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
        mlflow.log_metrics({f"test_f1.{name}": s["f1"]
                            for name, s in metrics["per_class"].items()})
        mlflow.log_artifacts(str(figures), artifact_path="figures")
        mlflow.log_artifact(str(out_root / cfg.paths.metrics))
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri, tracking.project_root(root))
    print_summary(cfg, out_root, metrics, run_id, uri)
    return metrics


def print_summary(cfg: Config, out_root: Path, metrics: dict, run_id: str, uri: str) -> None:
    def show(path: str) -> str:
        full = out_root / path
        return str(full.relative_to(Path.cwd())) if full.is_relative_to(Path.cwd()) else str(full)

    print(f"\ntest accuracy {metrics['test_accuracy']:.4f}  (test loss {metrics['test_loss']:.4f}, "
          f"macro F1 {metrics['macro_f1']:.4f})\n"
          f"  model    {show(cfg.paths.model)}\n"
          f"  metrics  {show(cfg.paths.metrics)}\n"
          f"  plots    {show(cfg.paths.figures)}/, {show(cfg.paths.history)}, "
          f"{show(cfg.paths.confusion)}\n"
          f"  MLflow   run {run_id} in {uri}\n"
          f"           open the UI: {tracking.ui_command(uri)}", flush=True)


def main() -> None:
    root = Path.cwd()
    run(load_params(), root, root)


if __name__ == "__main__":
    run_cli(main)
