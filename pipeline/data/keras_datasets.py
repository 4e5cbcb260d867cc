"""Datasets Keras downloads by name (mnist, fashion_mnist, cifar10, cifar100)."""

from __future__ import annotations

import numpy as np

from pipeline.data.dataset import Dataset
from pipeline.data.fashion_mnist import CLASS_NAMES as FASHION_CLASSES
from pipeline.errors import DataError

CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion_mnist": list(FASHION_CLASSES),
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                "ship", "truck"],
    "cifar100": [str(i) for i in range(100)],
}


def load(dataset: str) -> Dataset:
    """Load `dataset` through `keras.datasets`, from Keras's cache or the network.

    Raises:
        DataError: when Keras cannot get it (e.g. no network).
    """
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, dataset).load_data()
    except Exception as err:  # noqa: BLE001 - any download failure becomes one clear line
        raise DataError(
            f"Keras could not load the dataset {dataset!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:120]}); this machine may not reach the download "
            "site: get the data elsewhere and use data=image_folder or data=hdf5") from None

    def images(x: np.ndarray) -> np.ndarray:
        return x[..., np.newaxis] if x.ndim == 3 else x

    return Dataset(images(x_train), y_train.reshape(-1).astype(np.int64), images(x_test),
                   y_test.reshape(-1).astype(np.int64), CLASS_NAMES[dataset])


def load_source(cfg, root, seed: int = 0) -> Dataset:
    """The `keras` data source (pipeline.config.KerasDatasetConfig)."""
    return load(cfg.dataset)
