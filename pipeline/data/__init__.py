"""Data sources. Each returns a :class:`Dataset` of raw uint8 images and integer labels."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.dataset import Dataset
from pipeline.errors import ConfigError, DataError

__all__ = ["Dataset", "load_dataset", "source_loader", "with_positive_class"]


def load_dataset(cfg: DataConfig, root: Path, seed: int = 0) -> Dataset:
    """Load the dataset `cfg` describes; relative paths are taken from `root`."""
    data = source_loader(type(cfg))(cfg, Path(root), seed)
    return with_positive_class(data, cfg.positive_class)


def source_loader(schema: type[DataConfig]) -> Callable[[DataConfig, Path, int], Dataset]:
    """The loader that `@data_source` registered with `schema` (pipeline/config.py).

    Raises:
        ConfigError: `schema` has no registration of its own (a subclass does not inherit
            its parent's loader).
    """
    spec = vars(schema).get("loader")
    if spec is None:
        raise ConfigError(f"data source {schema.__name__} has no loader; register it with "
                          "@data_source(name, loader='module:function') in pipeline/config.py")
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


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
