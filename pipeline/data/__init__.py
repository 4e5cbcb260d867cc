"""Data sources. Each returns a :class:`Dataset` of raw uint8 images and integer labels."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.config import (
    DataConfig,
    FashionMnistConfig,
    Hdf5Config,
    ImageFolderConfig,
    KerasDatasetConfig,
)
from pipeline.data import fashion_mnist, hdf5, image_folder, keras_datasets
from pipeline.data.dataset import Dataset
from pipeline.errors import DataError

__all__ = ["Dataset", "load_dataset", "with_positive_class"]


def load_dataset(cfg: DataConfig, root: Path, seed: int = 0) -> Dataset:
    """Load the dataset `cfg` describes; relative paths are taken from `root`."""
    root = Path(root)
    if isinstance(cfg, FashionMnistConfig):
        data = fashion_mnist.load(root / cfg.path, verify_md5=cfg.verify_md5)
    elif isinstance(cfg, ImageFolderConfig):
        data = image_folder.load(cfg, root, seed)
    elif isinstance(cfg, Hdf5Config):
        data = hdf5.load(cfg, root)
    elif isinstance(cfg, KerasDatasetConfig):
        data = keras_datasets.load(cfg.dataset)
    else:
        raise AssertionError(f"data source {cfg.name!r} passed validation but has no loader")
    return with_positive_class(data, cfg.positive_class)


def with_positive_class(data: Dataset, positive: str | None) -> Dataset:
    """Reorder two classes so that `positive` is class 1, the one a sigmoid output scores."""
    if positive is None:
        return data
    if len(data.class_names) != 2:
        raise DataError(f"data.positive_class={positive!r} needs two classes; the data has "
                        f"{len(data.class_names)}")
    if positive not in data.class_names:
        raise DataError(f"data.positive_class={positive!r} is not a class; choose one of "
                        f"{', '.join(data.class_names)}")
    if data.class_names[1] == positive:
        return data
    swap = np.array([1, 0])
    return replace(data, y_train=swap[data.y_train], y_test=swap[data.y_test],
                   class_names=[data.class_names[1], data.class_names[0]])
