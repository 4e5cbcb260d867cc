"""Stage `prepare`: decode and validate the raw data, subsample, split, record pixel statistics.

Writes `train.npz`, `val.npz`, `test.npz` (uint8 images, integer labels) and `meta.json`
(class names, input shape, split sizes, pixel mean and std) under `paths.prepared`.
The pixel scaling itself is part of the model (its first layer, made in `build`), so the saved
model takes raw pixels and every later use of it preprocesses exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Config, load_params
from pipeline.data import Dataset, load_dataset
from pipeline.errors import run_cli
from pipeline.files import read_arrays, read_json, write_arrays, write_json

SPLITS = ("train", "val", "test")
META_FILE = "meta.json"


@dataclass
class Prepared:
    """The three splits as (images, labels) pairs, and what later stages need to know."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    meta: dict


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


def prepare(data: Dataset, limit: int | None, val_fraction: float, seed: int) -> Prepared:
    """Subsample each split to at most `limit` examples and hold out a stratified val split."""
    rng = np.random.default_rng(seed)
    pool = stratified_order(data.y_train, rng)[:limit]
    n_val = max(1, round(len(pool) * val_fraction))
    val_idx, train_idx = np.sort(pool[:n_val]), np.sort(pool[n_val:])
    test_idx = np.sort(stratified_order(data.y_test, rng)[:limit])
    splits = {
        "train": (data.x_train[train_idx], data.y_train[train_idx]),
        "val": (data.x_train[val_idx], data.y_train[val_idx]),
        "test": (data.x_test[test_idx], data.y_test[test_idx]),
    }
    x_train = splits["train"][0].astype(np.float64) / 255.0
    num_classes = len(data.class_names)
    meta = {
        "class_names": list(data.class_names),
        "num_classes": num_classes,
        "input_shape": list(data.x_train.shape[1:]),
        "sizes": {name: int(len(y)) for name, (_, y) in splits.items()},
        "train_class_counts": np.bincount(splits["train"][1], minlength=num_classes).tolist(),
        # statistics of the training images, for the model's input scaling
        "pixel_mean": float(x_train.mean()),
        "pixel_std": float(x_train.std()),
    }
    return Prepared(splits=splits, meta=meta)


def write_prepared(prepared: Prepared, out_dir: Path) -> None:
    for name, (x, y) in prepared.splits.items():
        write_arrays(out_dir / f"{name}.npz", x=x, y=y.astype(np.int64))
    write_json(out_dir / META_FILE, prepared.meta)


def read_split(prepared_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    arrays = read_arrays(Path(prepared_dir) / f"{name}.npz")
    return arrays["x"], arrays["y"]


def read_meta(prepared_dir: Path) -> dict:
    return read_json(Path(prepared_dir) / META_FILE)


def run(cfg: Config, root: Path, out_root: Path) -> Prepared:
    """Load `cfg.data` (relative paths from `root`), prepare it, write it under `out_root`."""
    data = load_dataset(cfg.data, root)
    prepared = prepare(data, cfg.data.limit, cfg.data.val_fraction, cfg.seed)
    write_prepared(prepared, out_root / cfg.paths.prepared)
    sizes = ", ".join(f"{k} {v}" for k, v in prepared.meta["sizes"].items())
    print(f"prepare: {cfg.data.name}: {sizes} -> {cfg.paths.prepared}/", flush=True)
    return prepared


def main() -> None:
    root = Path.cwd()
    run(load_params(), root, root)


if __name__ == "__main__":
    run_cli(main)
