"""The form every data source produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.data.image_folder import ImageFiles


@dataclass
class Dataset:
    """Images as uint8 arrays of shape (n, height, width, channels), or as image files that
    `prepare` decodes (an image folder); labels as int class ids."""

    x_train: np.ndarray | ImageFiles
    y_train: np.ndarray
    x_test: np.ndarray | ImageFiles
    y_test: np.ndarray
    class_names: list[str]
    notes: list[str] = field(default_factory=list)  # things worth reporting, e.g. skipped files
