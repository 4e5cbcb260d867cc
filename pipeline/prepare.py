"""Stage `prepare`: decode and validate the raw data, subsample, split, record pixel statistics.

Writes `train.npz`, `val.npz`, `test.npz` (uint8 images, integer labels) and `meta.json`
(class names, input shape, split sizes, pixel mean and std) under `paths.prepared`.
The pixel scaling itself is part of the model (its first layer, made in `build`), so the saved
model takes raw pixels and every later use of it preprocesses exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import Config, load_params
from pipeline.data import Dataset, load_dataset
from pipeline.data.split import stratified_order
from pipeline.errors import DataError, run_cli
from pipeline.files import atomic_dir, read_arrays, read_json, write_arrays, write_json

SPLITS = ("train", "val", "test")
IMBALANCE_NOTE_AT = 1.5
META_FILE = "meta.json"


@dataclass
class Prepared:
    """The three splits as (images, labels) pairs, and what later stages need to know."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    meta: dict
    notes: list[str] = field(default_factory=list)  # what the data source had to say


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
    check_splits(splits, data.class_names, limit, val_fraction)
    x_train = splits["train"][0].astype(np.float64) / 255.0
    num_classes = len(data.class_names)
    counts = np.bincount(splits["train"][1], minlength=num_classes)
    meta = {
        "class_names": list(data.class_names),
        "num_classes": num_classes,
        "input_shape": list(data.x_train.shape[1:]),
        "sizes": {name: int(len(y)) for name, (_, y) in splits.items()},
        "train_class_counts": counts.tolist(),
        # largest over smallest class: 1.0 is balanced
        "imbalance_ratio": float(counts.max() / max(counts.min(), 1)),
        # statistics of the training images, for the model's input scaling
        "pixel_mean": float(x_train.mean()),
        "pixel_std": float(x_train.std()),
    }
    return Prepared(splits=splits, meta=meta)


def check_splits(splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str],
                 limit: int | None, val_fraction: float) -> None:
    """Refuse splits that training or evaluation cannot use: an empty split, a class missing
    from the training or test split (a model cannot learn it, nor be scored on it), or
    training images that all have one value.

    Raises:
        DataError: naming the split, the counts and the settings to change.
    """
    sizes = ", ".join(f"{name} {len(y)}" for name, (_, y) in splits.items())
    settings = f"data.limit={limit}, data.val_fraction={val_fraction}"
    for name in SPLITS:
        if len(splits[name][1]) == 0:
            raise DataError(f"the {name} split is empty ({sizes}; {settings}); add images, "
                            "raise data.limit or change data.val_fraction")
    for name in ("train", "test"):
        counts = np.bincount(splits[name][1], minlength=len(class_names))
        missing = [c for c, n in zip(class_names, counts) if n == 0]
        if missing:
            raise DataError(f"the {name} split has no images of class(es) "
                            f"{', '.join(map(repr, missing))} ({sizes}; {settings}); add "
                            "images of each class, raise data.limit (or data.test_fraction), "
                            "or fix the labels")
    x_train = splits["train"][0]
    if x_train.min() == x_train.max():
        raise DataError(f"every training pixel has the value {x_train.flat[0]}: the images "
                        "carry nothing to learn; check the data source")


def write_prepared(prepared: Prepared, out_dir: Path) -> None:
    """Write the splits and meta.json; the folder appears whole or not at all."""
    with atomic_dir(out_dir) as tmp:
        for name, (x, y) in prepared.splits.items():
            write_arrays(tmp / f"{name}.npz", x=x, y=y.astype(np.int64))
        write_json(tmp / META_FILE, prepared.meta)


def read_split(prepared_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    arrays = read_arrays(Path(prepared_dir) / f"{name}.npz")
    return arrays["x"], arrays["y"]


def read_meta(prepared_dir: Path) -> dict:
    return read_json(Path(prepared_dir) / META_FILE)


def prepare_configured(cfg: Config, root: Path) -> Prepared:
    """`prepare` the data source `cfg.data` describes (relative paths from `root`) as the
    config says: its limit, validation fraction and seed."""
    data = load_dataset(cfg.data, root, cfg.seed)
    prepared = prepare(data, cfg.data.limit, cfg.data.val_fraction, cfg.seed)
    prepared.notes.extend(data.notes)
    return prepared


def run(cfg: Config, root: Path, out_root: Path) -> Prepared:
    """Load `cfg.data` (relative paths from `root`), prepare it, write it under `out_root`."""
    prepared = prepare_configured(cfg, root)
    write_prepared(prepared, out_root / cfg.paths.prepared)
    sizes = ", ".join(f"{k} {v}" for k, v in prepared.meta["sizes"].items())
    print(f"prepare: {cfg.data.name}: {sizes} -> {cfg.paths.prepared}/", flush=True)
    for note in [*prepared.notes, imbalance_note(prepared.meta)]:
        if note:
            print(f"prepare: {note}", flush=True)
    return prepared


def imbalance_note(meta: dict) -> str | None:
    """A line on class imbalance when the largest class is 1.5x the smallest or more."""
    if meta["imbalance_ratio"] < IMBALANCE_NOTE_AT:
        return None
    counts = ", ".join(f"{name} {n}" for name, n in
                       zip(meta["class_names"], meta["train_class_counts"]))
    return (f"class imbalance {meta['imbalance_ratio']:.1f}x in the training split ({counts}); "
            "consider trainer.class_weight=balanced")


def main() -> None:
    root = Path.cwd()
    run(load_params(), root, root)


if __name__ == "__main__":
    run_cli(main)
