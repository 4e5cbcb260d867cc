"""Seeded, stratified sampling: every prefix of the order keeps the class proportions."""

from __future__ import annotations

import numpy as np


def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded permutation of indices whose every prefix keeps the class proportions.

    Each example gets its relative rank within its (shuffled) class; sorting by that rank
    interleaves the classes, so `order[:n]` is a stratified sample of size n.
    """
    perm = rng.permutation(len(labels))
    rank = np.empty(len(labels))
    for cls in np.unique(labels):
        members = perm[labels[perm] == cls]
        rank[members] = (np.arange(len(members)) + 0.5) / len(members)
    return perm[np.argsort(rank[perm], kind="stable")]


def split_off(labels: np.ndarray, fraction: float,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) sorted index arrays; `fraction` of each class is held out."""
    order = stratified_order(labels, rng)
    n_held = max(1, round(len(order) * fraction))
    return np.sort(order[n_held:]), np.sort(order[:n_held])
