"""Stage `prepare`: decode and validate the raw data, subsample, split, record pixel statistics.

Writes the folders `train/`, `val/`, `test/` (uint8 images in `.npy` shards, integer labels:
`pipeline.shards`) and `meta.json` (class names, input shape, split sizes and digests, pixel
mean and std) under `paths.prepared`. Images from an image folder are decoded in
`data.workers` processes as they are written, so memory holds a few shards whatever the
number of images; the shards are the same whatever the number of workers.
The pixel scaling itself is part of the model (its first layer, made in `build`), so the saved
model takes raw pixels and every later use of it preprocesses exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import shards
from pipeline.config import Config, load_params
from pipeline.data import Dataset, load_dataset
from pipeline.data.image_folder import Decoder, ImageFiles, resized_note
from pipeline.data.split import stratified_order
from pipeline.errors import DataError, run_cli
from pipeline.files import atomic_dir, read_json, write_json
from pipeline.progress import Progress

SPLITS = ("train", "val", "test")
IMBALANCE_NOTE_AT = 1.5
META_FILE = "meta.json"


@dataclass
class Prepared:
    """The three splits as (images, labels) pairs, and what later stages need to know. The
    images are arrays, or image files not yet decoded (then `meta` lacks the pixel statistics
    until `write_prepared` has decoded them)."""

    splits: dict[str, tuple[np.ndarray | ImageFiles, np.ndarray]]
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
    }
    x_train = splits["train"][0]
    if isinstance(x_train, np.ndarray):
        meta.update(pixel_statistics(shards.summarize(x_train)))
    return Prepared(splits=splits, meta=meta)


def pixel_statistics(summary: shards.SplitSummary) -> dict:
    """The training images' statistics, for the model's input scaling.

    Raises:
        DataError: every training pixel has one value.
    """
    if summary.pixel_min == summary.pixel_max:
        raise DataError(f"every training pixel has the value {summary.pixel_min}: the images "
                        "carry nothing to learn; check the data source")
    return {"pixel_mean": summary.pixel_mean(), "pixel_std": summary.pixel_std()}


def check_splits(splits: dict[str, tuple], class_names: list[str],
                 limit: int | None, val_fraction: float) -> None:
    """Refuse splits that training or evaluation cannot use: an empty split, or a class
    missing from the training or test split (a model cannot learn it, nor be scored on it).
    Labels only: this runs before a single image is decoded.

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


def write_split(folder: Path, x: np.ndarray | ImageFiles, y: np.ndarray, decoder: Decoder,
                progress: Progress) -> tuple[shards.SplitSummary, int]:
    """Write one split as shards under `folder`: images in memory a shard at a time; image
    files decoded by the workers straight into their places in the shards. Reports the images
    decoded to `progress`; returns the split's summary and how many images were decoded at
    another size than the split's."""
    if isinstance(x, np.ndarray):
        writer = shards.ShardWriter(folder, x.shape[1:])
        for start in range(0, len(x), writer.length):
            writer.add(x[start:start + writer.length])
        return writer.close(y), 0
    layout = shards.ShardLayout(folder, x.shape[1:], len(x))
    layout.create()
    sums = shards.PixelSums(x.shape[1:])
    resized = 0
    for done, count, block in decoder.decode_into(x, layout):
        resized += count
        sums.add(block)
        progress.update(progress.done + done)
    labels = np.asarray(y, dtype=np.int64)
    shards.write_npy(folder / shards.LABELS_FILE, labels)
    return sums.summary(labels), resized


def write_prepared(prepared: Prepared, out_dir: Path, workers: int | None = None) -> None:
    """Write the splits as shards and meta.json (with the pixel statistics of the training
    shards and each split's digest); the folder appears whole or not at all.

    Raises:
        DataError: an image that cannot be read, a worker that died, a full disk, or training
            images that all have one value; the previous output is left as it was.
    """
    resized, total, size = 0, 0, None
    files = sum(len(x) for x, _ in prepared.splits.values() if isinstance(x, ImageFiles))
    progress = Progress("prepare: decoded", files)
    with atomic_dir(out_dir) as tmp, Decoder(workers) as decoder:
        digests = {}
        for name, (x, y) in prepared.splits.items():
            summary, resized_here = write_split(tmp / name, x, y, decoder, progress)
            resized += resized_here
            digests[name] = summary.digest
            if name == "train":
                prepared.meta.update(pixel_statistics(summary))
            if isinstance(x, ImageFiles):
                total, size = total + len(x), x.size
        prepared.meta["digests"] = digests
        write_json(tmp / META_FILE, prepared.meta)
    progress.close()
    note = resized_note(resized, total, size) if size else None
    if note:
        prepared.notes.insert(0, note)


def read_split(prepared_dir: Path, name: str) -> tuple[shards.ShardedImages, np.ndarray]:
    """The images (memory-mapped shards, read as they are indexed) and labels of a split."""
    return shards.read_split(Path(prepared_dir) / name)


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
    write_prepared(prepared, out_root / cfg.paths.prepared, cfg.data.workers)
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
    run(load_params(check_optimizer=False), root, root)


if __name__ == "__main__":
    run_cli(main)
