"""The in-memory form every data source produces."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Dataset:
    """Images as uint8 arrays of shape (n, height, width, channels), labels as int class ids."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    notes: list[str] = field(default_factory=list)  # things worth reporting, e.g. resizing
