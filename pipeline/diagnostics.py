"""What a small dataset can and cannot tell: the confidence interval of an accuracy measured on
n examples, and a one-line warning when a run looks broken though its training went well (the
predictions of the validation or test split collapse into one class, or the validation loss
climbs while the training loss falls).

Pure functions on label arrays and history rows; the train and evaluate stages print and log
what they return.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.metric_names import (
    LOSS,
    TEST_ACCURACY_CI_HIGH,
    TEST_ACCURACY_CI_LOW,
    TEST_EXAMPLES,
    VAL_ACCURACY_CI_HIGH,
    VAL_ACCURACY_CI_LOW,
    VAL_EXAMPLES,
    VAL_LOSS,
)

Z_95 = 1.96  # the standard normal quantile of a two-sided 95% interval

# Collapse: at least this share of the split's predictions fall in one class (models left at
# 0.14-0.37 test accuracy on ten balanced classes by the moving BatchNorm averages of a few
# hundred steps put most, not all, of their predictions in one: a 90% rule caught 1 of 6 in
# benchmarks/small_data.py) ...
COLLAPSE_SHARE = 0.5
# ... which is predicted this much more often than it occurs (0.97 predicted vs 0.67 true is a
# collapse; 0.9 predicted vs 0.67 true, a weak minority recall, is not) ...
COLLAPSE_EXCESS = 0.3
# ... while training accuracy got at least this fraction of the way from the majority rate to 1
# (0.325 with 10 balanced classes, 0.75 with two classes at 2:1): the model did learn.
LEARNED_FRACTION = 0.25

# Divergence: since its lowest point, at least this many epochs before the last, validation
# loss rose by this fraction while training loss fell by this fraction.
DIVERGENCE_EPOCHS = 2
DIVERGENCE_RISE = 0.25
DIVERGENCE_FALL = 0.25

COLLAPSE_CAUSES = ("BatchNorm statistics estimated from few training steps",
                   "overfitting on a few hundred images", "class imbalance")
COLLAPSE_FIXES = ("model.batch_norm=false", "augment=light", "more data", "model=pretrained",
                  "trainer.class_weight=balanced")
DIVERGENCE_CAUSES = ("overfitting on a few hundred images",)
DIVERGENCE_FIXES = ("augment=light", "more data", "model=pretrained", "fewer trainer.epochs")

# The metric names of each split's interval: (low, high, number of examples).
INTERVAL_METRICS = {
    "validation": (VAL_ACCURACY_CI_LOW, VAL_ACCURACY_CI_HIGH, VAL_EXAMPLES),
    "test": (TEST_ACCURACY_CI_LOW, TEST_ACCURACY_CI_HIGH, TEST_EXAMPLES),
}


def accuracy_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval (95% for the default z) of an accuracy of `correct` out of
    `n`. Unlike the normal approximation it stays inside [0, 1] and is not empty at 0/n or n/n.
    """
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"an accuracy needs 0 <= correct <= n and n > 0; got {correct}/{n}")
    p, z2 = correct / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def interval_text(low: float, high: float, n: int) -> str:
    """`(95% CI 0.69–0.90, n=50)`: what follows an accuracy in a summary line."""
    return f"(95% CI {low:.2f}–{high:.2f}, n={n})"


def accuracy_line(split: str, correct: int, n: int) -> str:
    """`validation accuracy 0.4500 (95% CI 0.31–0.60, n=40)`."""
    return f"{split} accuracy {correct / n:.4f} {interval_text(*accuracy_interval(correct, n), n)}"


def interval_metrics(split: str, correct: int, n: int) -> dict[str, float | int]:
    """The interval and the number of examples under the split's metric names."""
    low_name, high_name, n_name = INTERVAL_METRICS[split]
    low, high = accuracy_interval(correct, n)
    return {low_name: low, high_name: high, n_name: n}


def collapse_fact(predicted: np.ndarray, actual: np.ndarray, train_accuracy: float,
                  split: str, class_names: list[str] | None) -> str | None:
    """What collapsed, in words, when the split's predictions fall almost all in one class that
    the true labels hold far less often, though training accuracy shows the model learned."""
    if len(predicted) == 0:
        return None
    classes, counts = np.unique(predicted, return_counts=True)
    top = int(classes[counts.argmax()])
    share = counts.max() / len(predicted)
    true_share = float(np.mean(actual == top))
    majority = np.unique(actual, return_counts=True)[1].max() / len(actual)
    learned = train_accuracy >= majority + LEARNED_FRACTION * (1 - majority)
    if share < COLLAPSE_SHARE or share - true_share < COLLAPSE_EXCESS or not learned:
        return None
    name = class_names[top] if class_names else str(top)
    return (f"{share:.0%} of the {len(predicted)} {split} predictions are class {name!r}, "
            f"which is {true_share:.0%} of the true labels, though training accuracy reached "
            f"{train_accuracy:.2f} (majority class {majority:.2f})")


def divergence_fact(history: list[dict]) -> str | None:
    """What diverged, in words, when validation loss rose a wide margin from its lowest point
    (at least DIVERGENCE_EPOCHS epochs before the last) while training loss fell a wide margin."""
    rows = [row for row in history if VAL_LOSS in row and LOSS in row]
    if not rows:
        return None
    best = min(range(len(rows)), key=lambda i: rows[i][VAL_LOSS])
    epochs = len(rows) - 1 - best
    start, end = rows[best], rows[-1]
    if epochs < DIVERGENCE_EPOCHS or not (start[VAL_LOSS] > 0 and start[LOSS] > 0):
        return None
    rise = end[VAL_LOSS] / start[VAL_LOSS] - 1
    fall = 1 - end[LOSS] / start[LOSS]
    if not (rise >= DIVERGENCE_RISE and fall >= DIVERGENCE_FALL):
        return None
    return (f"validation loss rose {rise:.0%} ({start[VAL_LOSS]:.3f} to {end[VAL_LOSS]:.3f}) "
            f"over the last {epochs} epochs while training loss fell {fall:.0%} "
            f"({start[LOSS]:.3f} to {end[LOSS]:.3f})")


def unique(items) -> list[str]:
    return list(dict.fromkeys(items))


def collapse_warning(*, predicted: np.ndarray, actual: np.ndarray, train_accuracy: float,
                     split: str, class_names: list[str] | None = None,
                     history: list[dict] | None = None) -> str | None:
    """One line starting `warning: ` when the run looks broken, else None.

    It fires when (a) at least COLLAPSE_SHARE (50%) of the split's predictions fall in one
    class, predicted at least COLLAPSE_EXCESS (0.3) more often than the true labels hold it,
    while the training accuracy got at least LEARNED_FRACTION (a quarter) of the way from the
    majority rate of `actual` to 1; or (b) given the per-epoch `history` rows (`loss`,
    `val_loss`), validation loss rose at least DIVERGENCE_RISE (25%) from its lowest point, at
    least DIVERGENCE_EPOCHS (2) epochs before the last, while training loss fell at least
    DIVERGENCE_FALL (25%) over the same epochs. A healthy run with 10 roughly balanced classes,
    or two classes at 2:1, predicts no class 90% of the time.

    Args: the predicted and true class indices of the split (`validation` or `test`), the
    training accuracy of the last epoch, the class names for the message.
    """
    collapsed = collapse_fact(np.asarray(predicted), np.asarray(actual), train_accuracy, split,
                              class_names)
    diverged = divergence_fact(history or [])
    if not (collapsed or diverged):
        return None
    causes = (COLLAPSE_CAUSES if collapsed else ()) + (DIVERGENCE_CAUSES if diverged else ())
    fixes = (COLLAPSE_FIXES if collapsed else ()) + (DIVERGENCE_FIXES if diverged else ())
    facts = "; ".join(fact for fact in (collapsed, diverged) if fact)
    return (f"warning: {facts}. Likely causes: {', '.join(unique(causes))}. "
            f"Try: {', '.join(unique(fixes))}")


def validation_report(y_true: np.ndarray, y_pred: np.ndarray, train_accuracy: float,
                      rows: list[dict], class_names: list[str] | None = None,
                      ) -> tuple[str, str | None, dict[str, float | int]]:
    """For the end of training: (the validation accuracy with its 95% interval and size, the
    warning line or None, the interval metrics `val_accuracy_ci_low`, `val_accuracy_ci_high`,
    `val_examples` to log). `rows` are the per-epoch history rows."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    correct, n = int(np.sum(y_true == y_pred)), len(y_true)
    warning = collapse_warning(predicted=y_pred, actual=y_true, train_accuracy=train_accuracy,
                               split="validation", class_names=class_names, history=rows)
    return (accuracy_line("validation", correct, n), warning,
            interval_metrics("validation", correct, n))


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """(n, classes) probabilities; one sigmoid unit p becomes the columns (1 - p, p)."""
    if outputs.shape[1] == 1:
        return np.concatenate([1.0 - outputs, outputs], axis=1)
    return outputs


def predict_labels(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The predicted class of each image, as `evaluate` scores it."""
    from pipeline.stream import predict

    return class_probabilities(predict(model, x, batch_size)).argmax(axis=1)
