"""Figures as PNG: the confusion matrix and the learning curves (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.files import atomic_path  # noqa: E402


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
    for ax, metric, label in ((axes[0], "loss", "cost J (cross-entropy)"),
                              (axes[1], "accuracy", "accuracy")):
        ax.plot(epochs, [row[metric] for row in history], "o-", label="train")
        if all(f"val_{metric}" in row for row in history):
            ax.plot(epochs, [row[f"val_{metric}"] for row in history], "o-", label="validation")
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
