"""Figures as PNG (matplotlib, no display): the confusion matrix, the learning curves, ROC and
precision-recall, the shift curves, and a conv layer's filters and feature maps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.files import atomic_path  # noqa: E402
from pipeline.metric_names import ACCURACY, LOSS, VAL_ACCURACY, VAL_LOSS  # noqa: E402


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str]) -> plt.Figure:
    """Row-normalised confusion matrix with the counts written in each cell."""
    n = len(class_names)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n, 0.8 + 0.65 * n), layout="constrained")
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, label="share of the actual class")
    ax.set_title(f"Confusion matrix ({int(matrix.sum())} test images)")
    return fig


def plot_learning_curves(history: list[dict[str, float]]) -> plt.Figure:
    """Train and validation cost J and accuracy per epoch, side by side."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for ax, metric, val_metric, label in ((axes[0], LOSS, VAL_LOSS, "cost J (cross-entropy)"),
                                          (axes[1], ACCURACY, VAL_ACCURACY, "accuracy")):
        ax.plot(epochs, [row[metric] for row in history], "o-", label="train")
        if all(val_metric in row for row in history):
            ax.plot(epochs, [row[val_metric] for row in history], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Learning curves")
    return fig


def plot_roc_pr(curves: dict, metrics: dict, label: str) -> plt.Figure:
    """The ROC curve and the precision-recall curve side by side, with their areas."""
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(10, 4.5), layout="constrained")
    roc.plot(curves["roc"]["fpr"], curves["roc"]["tpr"],
             label=f"ROC AUC {metrics['roc_auc']:.3f}")
    roc.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    roc.set_xlabel("false positive rate")
    roc.set_ylabel("true positive rate (recall)")
    pr.plot(curves["precision_recall"]["recall"], curves["precision_recall"]["precision"],
            label=f"average precision {metrics['average_precision']:.3f}")
    pr.set_xlabel("recall")
    pr.set_ylabel("precision")
    for ax in (roc, pr):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if ax is roc else "lower left")
    fig.suptitle(f"ROC and precision-recall ({label})")
    return fig


def save_figure(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def plot_shift_curves(curves: dict[str, list[dict[str, float]]]) -> plt.Figure:
    """Test accuracy and agreement with the unshifted prediction against the shift in pixels,
    one line per model (`curves`: label -> rows of shift, accuracy, agreement)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for label, curve in curves.items():
        shifts = [row["shift"] for row in curve]
        for ax, key in zip(axes, ("accuracy", "agreement")):
            ax.plot(shifts, [row[key] for row in curve], "o-", label=label)
    for ax, label in zip(axes, ("test accuracy", "agreement with the unshifted prediction")):
        ax.set_xlabel("shift (pixels, averaged over up, down, left, right)")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.02)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
    fig.suptitle("Translation invariance: the test images shifted")
    return fig


def _image(ax: plt.Axes, pixels: np.ndarray, **kwargs) -> None:
    """Draw (H, W, 1) or (H, W, 3) pixels without axes."""
    ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_filters(kernel: np.ndarray, layer: str) -> plt.Figure:
    """Each filter of a conv layer's kernel (rows, cols, channels, filters): RGB for three
    input channels (scaled per filter), else the mean over the channels in grey, mid-grey 0."""
    count = kernel.shape[-1]
    cols = min(count, 8)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows + 0.5),
                             layout="constrained", squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= count:
            ax.axis("off")
            continue
        weights = kernel[..., i]
        if weights.shape[-1] == 3:
            low, high = weights.min(), weights.max()
            _image(ax, (weights - low) / max(high - low, 1e-12))
        else:
            mean = weights.mean(axis=-1, keepdims=True)
            limit = max(float(np.abs(mean).max()), 1e-12)
            _image(ax, mean, cmap="gray", vmin=-limit, vmax=limit)
        ax.set_title(str(i), fontsize=8)
    fig.suptitle(f"Filters of {layer} ({kernel.shape[0]}×{kernel.shape[1]}×{kernel.shape[2]})")
    return fig


def plot_feature_maps(images: np.ndarray, maps: np.ndarray, labels: list[str], layer: str,
                      max_maps: int = 8) -> plt.Figure:
    """Per image (a row): the image, then its first `max_maps` feature maps from `layer`."""
    count = min(maps.shape[-1], max_maps)
    fig, axes = plt.subplots(len(images), count + 1, figsize=(1.3 * (count + 1),
                                                              1.3 * len(images) + 0.5),
                             layout="constrained", squeeze=False)
    for image, image_maps, label, row in zip(images, maps, labels, axes):
        _image(row[0], image, cmap="gray")
        row[0].set_ylabel(label, fontsize=8)
        for j in range(count):
            _image(row[j + 1], image_maps[..., j:j + 1], cmap="magma")
    for j in range(count):
        axes[0, j + 1].set_title(f"filter {j}", fontsize=8)
    fig.suptitle(f"Feature maps of {layer} for test images")
    return fig
