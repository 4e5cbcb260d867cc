"""Stage `evaluate`: test loss and accuracy, per-class precision/recall/F1, confusion matrix,
and the lecture's claims measured: translation invariance (accuracy on shifted test images,
against a baseline's when `invariance.baseline_run` names one) and the first conv layer's
filters and feature maps.

Writes `paths.metrics` (the headline figures, for `dvc metrics show`), `paths.per_class`
(precision, recall, F1 and support of each class), `paths.confusion` (a DVC confusion plot),
`paths.shift` (the shift curve, a DVC plot) and the PNG figures under `paths.figures`; adds all
of it to the training run in MLflow.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from pipeline import anatomy, backend, diagnostics, invariance, tracking
from pipeline.config import Config, flatten, load_params
from pipeline.diagnostics import class_probabilities, predict_labels
from pipeline.errors import run_cli
from pipeline.figures import (
    plot_confusion_matrix,
    plot_feature_maps,
    plot_filters,
    plot_learning_curves,
    plot_roc_pr,
    plot_shift_curves,
    save_figure,
)
from pipeline.files import read_json, write_json, write_text
from pipeline.metric_names import (
    ACCURACY,
    TEST_ACCURACY,
    TEST_ACCURACY_CI_HIGH,
    TEST_ACCURACY_CI_LOW,
    TEST_ACCURACY_TTA,
    TEST_EXAMPLES,
    TEST_LOSS,
    TEST_LOSS_TTA,
)
from pipeline.prepare import read_meta, read_split
from pipeline.project import data_location, project_root
from pipeline.stream import predict

CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "learning_curves.png"
ROC_PR_PNG = "roc_precision_recall.png"
SHIFT_PNG = "shift_invariance.png"
FILTERS_PNG = "first_layer_filters.png"
FEATURE_MAPS_PNG = "feature_maps.png"
SHIFT_BLOCK_BATCHES = 32  # test images shifted at a time, in batches
FEATURE_MAP_IMAGES = 4  # test images whose feature maps are drawn: one of each of the first classes


def curve_label(class_names: list[str]) -> str:
    if len(class_names) == 2:
        return f"positive class: {class_names[1]}"
    return "micro-average over the classes, one vs rest"


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


def roc_curve(positive: np.ndarray, scores: np.ndarray):
    """(false positive rate, true positive rate, thresholds), one point per distinct score."""
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order].astype(bool)
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # end of each tie group
    tps = np.cumsum(positive)[last]
    fps = last + 1 - tps
    tpr = np.r_[0.0, tps / max(positive.sum(), 1)]
    fpr = np.r_[0.0, fps / max((~positive).sum(), 1)]
    return fpr, tpr, np.r_[np.inf, scores[last]]


def precision_recall_curve(positive: np.ndarray, scores: np.ndarray):
    """(recall, precision, thresholds), starting at recall 0 with precision 1."""
    fpr, tpr, thresholds = roc_curve(positive, scores)
    n_pos, n_neg = max(positive.sum(), 1), max((~positive.astype(bool)).sum(), 1)
    tps, fps = tpr[1:] * n_pos, fpr[1:] * n_neg
    precision = np.r_[1.0, tps / np.maximum(tps + fps, 1)]
    return tpr, precision, thresholds


def area_under(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Σ (R_n - R_{n-1}) P_n: the area under the step-wise precision-recall curve."""
    return float(np.sum(np.diff(recall) * precision[1:]))


def curve_scores(y: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is positive, score) pairs: the positive class (index 1) for two classes, else
    one-vs-rest over every class (micro average)."""
    if probabilities.shape[1] == 2:
        return y == 1, probabilities[:, 1]
    one_hot = np.eye(probabilities.shape[1], dtype=bool)[y]
    return one_hot.ravel(), probabilities.ravel()


def cross_entropy(y: np.ndarray, probabilities: np.ndarray) -> float:
    """The mean cross-entropy of the class probabilities; for a sigmoid output (two columns,
    `class_probabilities`) equal to its binary cross-entropy, -log p or -log(1 - p)."""
    loss = keras.losses.SparseCategoricalCrossentropy()(y, probabilities)
    return float(keras.ops.convert_to_numpy(loss))


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, class_names: list[str],
             batch_size: int) -> tuple[dict, dict, np.ndarray, np.ndarray, dict]:
    """Return (metrics, per-class scores, confusion matrix, predicted labels, curves) of
    `model` on (x, y).

    The metrics are the headline figures, test accuracy first: loss, the accuracy's 95%
    interval and the number of examples, macro averages, ROC AUC, average precision. With two
    classes, precision, recall and F1 are the positive class's (index 1) and the ROC and
    precision-recall curves score it; with more, the curves are micro-averaged one-vs-rest.
    """
    probabilities = class_probabilities(predict(model, x, batch_size))
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(y, predicted, len(class_names))
    scores = per_class_scores(matrix, class_names)
    positive, score = curve_scores(y, probabilities)
    fpr, tpr, roc_thresholds = roc_curve(positive, score)
    recall, precision, pr_thresholds = precision_recall_curve(positive, score)
    metrics = {
        TEST_ACCURACY: float(np.mean(predicted == y)),
        TEST_LOSS: cross_entropy(y, probabilities),
        **diagnostics.interval_metrics("test", int(np.sum(predicted == y)), len(y)),
        "macro_precision": float(np.mean([s["precision"] for s in scores.values()])),
        "macro_recall": float(np.mean([s["recall"] for s in scores.values()])),
        "macro_f1": float(np.mean([s["f1"] for s in scores.values()])),
        "roc_auc": area_under(fpr, tpr),
        "average_precision": average_precision(recall, precision),
    }
    if len(class_names) == 2:
        metrics.update({k: scores[class_names[1]][k] for k in ("precision", "recall", "f1")})
    curves = {"roc": {"fpr": fpr, "tpr": tpr, "threshold": roc_thresholds},
              "precision_recall": {"recall": recall, "precision": precision,
                                   "threshold": pr_thresholds}}
    return metrics, scores, matrix, predicted, curves


def flip_averaged(model: keras.Model) -> keras.Model:
    """`model` under flip test-time augmentation: the mean of its outputs (class
    probabilities) for each image and for the image mirrored left to right."""
    inputs = keras.Input(model.input_shape[1:], dtype=model.inputs[0].dtype)
    mirrored = keras.layers.Lambda(lambda x: keras.ops.flip(x, axis=2), name="mirror")(inputs)
    mean = keras.layers.Average(name="tta_mean")([model(inputs), model(mirrored)])
    return keras.Model(inputs, mean, name=f"{model.name}_flip_tta")


def tta_metrics(model: keras.Model, x, y: np.ndarray, tta: str, batch_size: int) -> dict:
    """Accuracy and loss under test-time augmentation `tta` (`evaluate.tta`); none: {}."""
    if tta == "none":
        return {}
    probabilities = class_probabilities(predict(flip_averaged(model), x, batch_size))
    return {TEST_ACCURACY_TTA: float(np.mean(probabilities.argmax(axis=1) == y)),
            TEST_LOSS_TTA: cross_entropy(y, probabilities)}


def curve_csv(curve: dict[str, np.ndarray], max_points: int = 1000) -> str:
    """The curve as CSV for DVC's plots, thinned evenly to at most `max_points` rows."""
    n = len(next(iter(curve.values())))
    keep = np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(curve)
    for i in keep:
        writer.writerow(f"{curve[k][i]:.6g}" for k in curve)
    return out.getvalue()


def confusion_csv(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> str:
    """One row per test image, `actual,predicted`: the input of DVC's confusion template."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["actual", "predicted"])
    writer.writerows((class_names[a], class_names[p]) for a, p in zip(y_true, y_pred))
    return out.getvalue()


def shift_summary(curve: list[dict], baseline: list[dict] | None) -> dict:
    """The `shift` section of the metrics: this model's summary, and the baseline's."""
    summary = invariance.summarize(curve)
    if baseline:
        summary["baseline"] = invariance.summarize(baseline)
    return summary


def draw_first_layer(model: keras.Model, x: np.ndarray, y: np.ndarray, class_names: list[str],
                     figures: Path) -> None:
    """What the filters learned: the first conv layer's filters, and their feature maps for
    one test image of each of the first classes. Nothing for a model without conv layers."""
    conv = anatomy.first_conv_layer(model)
    if conv is None:
        return
    picks = np.unique(y, return_index=True)[1][:FEATURE_MAP_IMAGES]
    save_figure(plot_filters(anatomy.first_layer_filters(conv), conv.name), figures / FILTERS_PNG)
    maps = anatomy.feature_maps(model, conv, x[picks])
    save_figure(plot_feature_maps(x[picks], maps, [class_names[y[i]] for i in picks], conv.name),
                figures / FEATURE_MAPS_PNG)


def read_history(path: Path) -> list[dict[str, float]]:
    with Path(path).open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@dataclass
class Results:
    """What evaluating a model on the test split found, and what it was compared with."""
    metrics: dict  # the headline figures, the shift summary under "shift"
    per_class: dict[str, dict[str, float]]
    matrix: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray  # the test labels
    class_names: list[str]
    curves: dict[str, dict[str, np.ndarray]]  # ROC and precision-recall
    shift: list[dict]  # the shift curve, a row per shift
    baseline: tuple[str, list[dict]] | None  # the baseline model's name and shift curve


def assess(model: keras.Model, x_test, y_test: np.ndarray, class_names: list[str], cfg: Config,
           baseline: tuple[str, list[dict]] | None) -> Results:
    """Score the model on the test split and on its shifted copies (none with
    `invariance.max_shift=0`: no shift curve and no `shift` summary then)."""
    metrics, per_class, matrix, predicted, curves = evaluate(
        model, x_test, y_test, class_names, cfg.trainer.batch_size)
    metrics.update(tta_metrics(model, x_test, y_test, cfg.evaluate.tta, cfg.trainer.batch_size))
    shift = []
    if cfg.invariance.max_shift:
        shift = invariance.shift_curve(
            lambda images: predict_labels(model, images, cfg.trainer.batch_size),
            x_test, y_test, cfg.invariance.max_shift, reference=predicted,
            block=cfg.trainer.batch_size * SHIFT_BLOCK_BATCHES)
        metrics["shift"] = shift_summary(shift, baseline[1] if baseline else None)
    return Results(metrics, per_class, matrix, predicted, y_test, class_names, curves, shift,
                   baseline)


def write_results(results: Results, model: keras.Model, x_test,
                  history: list[dict[str, float]], cfg: Config, out_root: Path) -> None:
    """The stage's files: metrics, per-class figures, the DVC plots' CSVs and the PNGs."""
    class_names, baseline = results.class_names, results.baseline
    write_json(out_root / cfg.paths.metrics, results.metrics)
    write_json(out_root / cfg.paths.per_class, results.per_class)
    write_text(out_root / cfg.paths.confusion,
               confusion_csv(results.actual, results.predicted, class_names))
    for name, path in (("roc", cfg.paths.roc), ("precision_recall", cfg.paths.precision_recall)):
        write_text(out_root / path, curve_csv(results.curves[name]))
    write_text(out_root / cfg.paths.shift, curve_csv(invariance.curve_columns(results.shift)))
    figures = out_root / cfg.paths.figures
    save_figure(plot_confusion_matrix(results.matrix, class_names), figures / CONFUSION_PNG)
    save_figure(plot_learning_curves(history), figures / CURVES_PNG)
    save_figure(plot_roc_pr(results.curves, results.metrics, curve_label(class_names)),
                figures / ROC_PR_PNG)
    if results.shift:
        shift_curves = {model.name: results.shift}
        if baseline:
            shift_curves[f"{baseline[0]} (baseline)"] = baseline[1]
        save_figure(plot_shift_curves(shift_curves), figures / SHIFT_PNG)
    draw_first_layer(model, x_test, results.actual, class_names, figures)


def logged_metrics(results: Results) -> dict[str, float]:
    """The numbers the run gets once: the headline figures, the shift summary flattened
    (`shift.mean_agreement`, ...) and each class's F1 under a key MLflow accepts."""
    numbers = {k: v for k, v in results.metrics.items() if isinstance(v, (int, float))}
    if "shift" in results.metrics:
        numbers.update(flatten({"shift": results.metrics["shift"]}))
    numbers.update({tracking.metric_key(f"test_f1.{name}"): scores["f1"]
                    for name, scores in results.per_class.items()})
    return numbers


def log_results(results: Results, cfg: Config, out_root: Path) -> None:
    """Add the results to the run: the numbers, the shift curve with step = shift (where a
    baseline comparison reads it), the figures and the metrics files."""
    tracking.log_metrics(logged_metrics(results))
    for row in results.shift:
        tracking.log_metrics({name: row[key] for key, name in invariance.CURVE_METRICS.items()},
                             step=row["shift"])
    tracking.log_folder(out_root / cfg.paths.figures, "figures")
    tracking.log_files([out_root / cfg.paths.metrics, out_root / cfg.paths.per_class])


def run(cfg: Config, root: Path, out_root: Path, entry_point: str) -> dict:
    """Evaluate the trained model on the test split; add the results to its MLflow run (or,
    when only evaluate's params changed since training, to a run of their own)."""
    backend.configure(cfg.seed, cfg.trainer.deterministic, cfg.trainer.precision)
    prepared = out_root / cfg.paths.prepared
    meta = read_meta(prepared)
    class_names = meta["class_names"]
    x_test, y_test = read_split(prepared, "test")
    run_id = read_json(out_root / cfg.paths.run)["run_id"]
    model = keras.models.load_model(out_root / cfg.paths.model)
    history = read_history(out_root / cfg.paths.history)
    data_path = data_location(cfg, root)
    with tracking.evaluation_run(cfg, root, run_id, entry_point, data_path) as active:
        run_id = active.info.run_id
        tracking.log_datasets(cfg, data_path, meta, ("test",))
        baseline_run = cfg.invariance.baseline_run
        baseline = invariance.fetch_baseline(baseline_run, cfg) if baseline_run else None
        results = assess(model, x_test, y_test, class_names, cfg, baseline)
        warning = diagnostics.collapse_warning(
            predicted=results.predicted, actual=y_test, split="test", class_names=class_names,
            train_accuracy=history[-1][ACCURACY] if history else float("nan"), history=history)
        write_results(results, model, x_test, history, cfg, out_root)
        log_results(results, cfg, out_root)
        if warning:
            tracking.set_warning(warning)
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri, project_root(root))
    print_summary(cfg, out_root, results.metrics, run_id, uri)
    if warning:
        print(warning, flush=True)
    return results.metrics


def shift_line(shift: dict | None, max_shift: int) -> str:
    """Accuracy at the largest shift and the mean agreement, and the baseline's."""
    if shift is None:
        return "shift analysis left out (invariance.max_shift=0)"
    line = (f"shifted {max_shift} px: accuracy {shift['accuracy_at_max_shift']:.4f}, "
            f"mean agreement {shift['mean_agreement']:.4f}")
    if "baseline" in shift:
        base = shift["baseline"]
        line += (f"  (baseline: accuracy {base['accuracy_at_max_shift']:.4f}, "
                 f"mean agreement {base['mean_agreement']:.4f})")
    return line


def tta_text(tta: str, metrics: dict) -> str:
    """The test-time augmentation's accuracy, to follow the plain one; '' without it."""
    if TEST_ACCURACY_TTA not in metrics:
        return ""
    return f"; with {tta} test-time augmentation {metrics[TEST_ACCURACY_TTA]:.4f}"


def print_summary(cfg: Config, out_root: Path, metrics: dict, run_id: str, uri: str) -> None:
    def show(path: str) -> str:
        full = out_root / path
        return str(full.relative_to(Path.cwd())) if full.is_relative_to(Path.cwd()) else str(full)

    interval = diagnostics.interval_text(metrics[TEST_ACCURACY_CI_LOW],
                                         metrics[TEST_ACCURACY_CI_HIGH], metrics[TEST_EXAMPLES])
    print(f"\ntest accuracy {metrics[TEST_ACCURACY]:.4f} {interval}, "
          f"test loss {metrics[TEST_LOSS]:.4f}, macro F1 {metrics['macro_f1']:.4f}"
          f"{tta_text(cfg.evaluate.tta, metrics)}\n"
          f"  {shift_line(metrics.get('shift'), cfg.invariance.max_shift)}\n"
          f"  model    {show(cfg.paths.model)}\n"
          f"  metrics  {show(cfg.paths.metrics)}, per class {show(cfg.paths.per_class)}\n"
          f"  plots    {show(cfg.paths.figures)}/, {show(cfg.paths.history)}, "
          f"{show(cfg.paths.confusion)}, {show(cfg.paths.shift)}\n"
          f"  MLflow   run {run_id} in {tracking.shown_uri(uri)}\n"
          f"           open the UI: {tracking.ui_command(uri)}", flush=True)


def main() -> None:
    root = Path.cwd()
    run(load_params(), root, root, tracking.dvc_entry_point())


if __name__ == "__main__":
    run_cli(main)
