"""Images and labels in HDF5 files, e.g. `train_set_x`, `train_set_y`, `list_classes`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import Hdf5Config
from pipeline.data.dataset import Dataset
from pipeline.errors import DataError


def _dataset(handle, path: Path, key: str, config_key: str) -> np.ndarray:
    if key not in handle:
        names = ", ".join(sorted(handle.keys())) or "none"
        raise DataError(f"{path} has no dataset {key!r} (it has: {names}); set {config_key}")
    return np.asarray(handle[key])


def _images(array: np.ndarray, path: Path, key: str) -> np.ndarray:
    """uint8 (n, height, width, channels) from (n, h, w) or (n, h, w, c), uint8 or 0..1 floats."""
    if array.ndim == 3:
        array = array[..., np.newaxis]
    if array.ndim != 4:
        raise DataError(f"{path}:{key} has shape {array.shape}; expected (n, height, width) "
                        "or (n, height, width, channels)")
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array * _pixel_scale(array, path, key)), 0, 255).astype(np.uint8)
    return array


def _pixel_scale(array: np.ndarray, path: Path, key: str) -> float:
    """The factor to 0..255: floats in 0..1 or 0..255, integers in 0..255 or 16-bit."""
    low, high = float(array.min(initial=0)), float(array.max(initial=0))
    if low < 0:
        raise DataError(f"{path}:{key} holds negative values (from {low:g} to {high:g}); "
                        "store raw pixels, not standardised ones: the model scales them")
    if np.issubdtype(array.dtype, np.floating) and high <= 1.0:
        return 255.0
    if high <= 255:
        return 1.0
    if np.issubdtype(array.dtype, np.integer) and high <= 65535:
        return 255 / 65535
    raise DataError(f"{path}:{key} holds values from {low:g} to {high:g}; expected uint8 "
                    "pixels, floats in 0..1 or 0..255, or 16-bit integers")


def read_split(path: Path, x_key: str, y_key: str, keys: tuple[str, str]):
    import h5py

    if not path.is_file():
        raise DataError(f"HDF5 file {path} not found; set data.path / data.test_path")
    try:
        with h5py.File(path, "r") as handle:
            x = _images(_dataset(handle, path, x_key, keys[0]), path, x_key)
            y = _dataset(handle, path, y_key, keys[1]).reshape(-1).astype(np.int64)
            names = handle.attrs.get("classes")
    except OSError as err:
        raise DataError(f"{path} is not a readable HDF5 file ({err})") from None
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels in {x_key!r}/{y_key!r}; "
                        "they must be equal")
    return x, y, names


def class_names_from(path: Path, key: str | None, num_labels: int) -> list[str]:
    import h5py

    if key is None:
        return [str(i) for i in range(num_labels)]
    with h5py.File(path, "r") as handle:
        raw = _dataset(handle, path, key, "data.classes_key")
    return [c.decode() if isinstance(c, bytes) else str(c) for c in raw.reshape(-1)]


def load(cfg: Hdf5Config, root: Path, seed: int = 0) -> Dataset:  # the files fix the split
    path, test_path = root / cfg.path, root / cfg.test_path
    x_train, y_train, _ = read_split(path, cfg.x_key, cfg.y_key, ("data.x_key", "data.y_key"))
    x_test, y_test, _ = read_split(test_path, cfg.test_x_key, cfg.test_y_key,
                                   ("data.test_x_key", "data.test_y_key"))
    labels_max = int(max(y_train.max(initial=0), y_test.max(initial=0)))
    class_names = class_names_from(path, cfg.classes_key, labels_max + 1)
    for name, y in (("train", y_train), ("test", y_test)):
        if y.min(initial=0) < 0 or y.max(initial=0) >= len(class_names):
            raise DataError(f"{name} labels range over {int(y.min())}..{int(y.max())} but there "
                            f"are {len(class_names)} classes {class_names}; fix the labels or "
                            "data.classes_key")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"train images are {x_train.shape[1:]} but test images "
                        f"{x_test.shape[1:]}; they must have the same shape")
    return Dataset(x_train, y_train, x_test, y_test, class_names)
