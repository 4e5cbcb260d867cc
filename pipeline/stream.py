"""The training data as a stream of batches whose order is a function of (seed, epoch, step).

Keras's own shuffle (`fit(x, y, shuffle=True)`) draws each epoch's order from a random state
that lives in the process: a run resumed in a new process replays the first epoch's order, and
with it (for the same dropout masks) trains a different model. Here the order of epoch `e` is
`permutation(seed, e)`, so any epoch's batches are known without having run the ones before.

The dataset is endless (Keras is given `steps_per_epoch`), so that Keras builds one iterator
for the whole `fit` and batch `i` of the stream is step `i % steps` of epoch
`first_epoch + i // steps`: nothing depends on when Keras calls the epoch hooks, which can come
after the next epoch's first batches were prefetched.
"""

from __future__ import annotations

import math

import keras
import numpy as np


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the `n` training examples in (0-based) `epoch`."""
    return np.random.default_rng((seed, epoch)).permutation(n)


def one_hot(y: np.ndarray, classes: int | None) -> np.ndarray:
    """Labels as one-hot float32 rows of `classes` columns; as they are where `classes` is
    None."""
    return y if classes is None else np.eye(classes, dtype=np.float32)[y]


def sample_weights(y: np.ndarray, class_weight: dict[int, float] | None) -> np.ndarray | None:
    """Per-example weights from per-class weights (Keras's `class_weight`), or None."""
    if not class_weight:
        return None
    table = np.zeros(int(y.max()) + 1, dtype=np.float32)
    for label, weight in class_weight.items():
        table[label] = weight
    return table[y]


class EpochBatches(keras.utils.PyDataset):
    """Batches of (x, y[, sample weight]) in the seeded order of each epoch, from `first_epoch`;
    y one-hot over `classes` columns where given (a loss with label smoothing).

    The last batch of an epoch holds the remainder, as Keras's own batching does.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
                 first_epoch: int = 0, class_weight: dict[int, float] | None = None,
                 classes: int | None = None):
        super().__init__()
        self.classes = classes
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"EpochBatches: {len(x)} images and {len(y)} labels")
        self.x, self.y = x, y
        self.weights = sample_weights(y, class_weight)
        self.batch_size, self.seed, self.first_epoch = batch_size, seed, first_epoch
        self.steps = math.ceil(len(x) / batch_size)
        self._orders: dict[int, np.ndarray] = {}

    @property
    def num_batches(self) -> None:
        return None  # endless: see the module's docstring

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.x), self.seed, epoch)}
        return self._orders[epoch]

    def indices(self, index: int) -> np.ndarray:
        """Example indices of batch `index` of the stream, sorted (reads in file order)."""
        epoch, step = self.first_epoch + index // self.steps, index % self.steps
        chosen = self.order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]
        return np.sort(chosen)

    def __getitem__(self, index: int):
        chosen = self.indices(index)
        batch = (self.x[chosen], one_hot(self.y[chosen], self.classes))
        if self.weights is not None:
            batch += (self.weights[chosen],)
        return batch


class OrderedBatches(keras.utils.PyDataset):
    """The images (and labels, one-hot over `classes` columns where given) of a split in order,
    `batch_size` at a time: validation and prediction over arrays or shards (`pipeline.shards`)
    alike, reading one batch at a time."""

    def __init__(self, x, y: np.ndarray | None, batch_size: int, classes: int | None = None):
        super().__init__()
        self.x, self.y, self.batch_size, self.classes = x, y, batch_size, classes

    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, index: int):
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        if self.y is None:
            return self.x[part]
        return self.x[part], one_hot(self.y[part], self.classes)


def predict(model: keras.Model, x, batch_size: int) -> np.ndarray:
    """`model.predict` over arrays or shards, a batch read at a time."""
    if isinstance(x, np.ndarray):
        return model.predict(x, batch_size=batch_size, verbose=0)
    return model.predict(OrderedBatches(x, None, batch_size), verbose=0)
