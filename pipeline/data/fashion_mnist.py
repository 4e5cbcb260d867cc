"""Fashion-MNIST as four decompressed IDX files: names, checksums, classes, loading.

The md5 sums are the published sums of the *decompressed* files, the same bytes whatever the
source; the compressed .gz files differ between sources (Debian recompressed them).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline.data.dataset import Dataset
from pipeline.data.idx import read_idx
from pipeline.errors import DataError

FILES = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLITS = {"train": (60_000, "train"), "test": (10_000, "t10k")}  # split -> (count, file prefix)
IMAGE_SHAPE = (28, 28)


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify(directory: Path) -> None:
    """Check that the four files exist and match the published md5 sums.

    Raises:
        DataError: naming the first missing or mismatching file and how to restore it.
    """
    for name, expected in FILES.items():
        path = Path(directory) / name
        if not path.is_file():
            raise DataError(f"{path} not found; put the data in place with `make data` "
                            "(or `dvc pull data.dvc`)")
        actual = md5_file(path)
        if actual != expected:
            raise DataError(f"{path} has md5 {actual}, expected {expected}: the file is "
                            "corrupt or not Fashion-MNIST; restore it with `make data`")


def load(directory: Path, verify_md5: bool = True) -> Dataset:
    """Load and validate the train and test splits from `directory`.

    Raises:
        DataError: missing or corrupt files, wrong counts or shapes, labels out of range.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"data folder {directory} not found; put the data in place with "
                        "`make data` (or `dvc pull data.dvc`)")
    if verify_md5:
        verify(directory)
    arrays = {}
    for split, (count, prefix) in SPLITS.items():
        images = _read(directory / f"{prefix}-images-idx3-ubyte")
        labels = _read(directory / f"{prefix}-labels-idx1-ubyte")
        if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
            raise DataError(f"{prefix}-images-idx3-ubyte holds images of shape "
                            f"{images.shape[1:]}, expected {IMAGE_SHAPE}")
        if len(images) != count or len(labels) != count:
            raise DataError(f"{directory}: {split} split has {len(images)} images and "
                            f"{len(labels)} labels, expected {count} of each; restore the "
                            "files with `make data`")
        if labels.ndim != 1 or labels.max(initial=0) >= len(CLASS_NAMES):
            raise DataError(f"{prefix}-labels-idx1-ubyte holds label {int(labels.max())}, "
                            f"outside 0..{len(CLASS_NAMES) - 1}")
        arrays[split] = (images[..., np.newaxis], labels)  # (n, 28, 28, 1)
    return Dataset(x_train=arrays["train"][0], y_train=arrays["train"][1],
                   x_test=arrays["test"][0], y_test=arrays["test"][1],
                   class_names=list(CLASS_NAMES))


def load_source(cfg, root: Path, seed: int = 0) -> Dataset:
    """The `fashion_mnist` data source (pipeline.config.FashionMnistConfig)."""
    return load(root / cfg.path, verify_md5=cfg.verify_md5)


def _read(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path} not found; put the data in place with `make data` "
                        "(or `dvc pull data.dvc`)")
    return read_idx(path)
