"""Prepared splits on disk: uint8 images in fixed-size `.npy` shards, read by memory map.

A split is a folder: `images-00000.npy`, `images-00001.npy`, ... of `shard_length` images
each (the last holds the rest) and `labels.npy`. `.npy` is NumPy's own format: any Keras
backend (TensorFlow, JAX, PyTorch) reads it with NumPy alone, and at a fixed offset after its
header, so a batch reads just its own images (`os.preadv` into the batch's array). Neither the
split nor a memory map of it is held: the process's memory stays a few batches whatever the
size of the split (the operating system's page cache keeps what fits, outside the process).

The writer takes images in order and keeps at most one shard in memory; it accumulates the
pixel sums shard by shard in exact integers, so the statistics equal the in-memory
computation's, and a SHA-256 of the bytes written, the split's digest.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError

SHARD_BYTES = 64 * 2**20  # images per shard: as many as fit in 64 MiB
IMAGES_PATTERN = "images-{:05d}.npy"
LABELS_FILE = "labels.npy"
SUM_BLOCK = 2**22  # pixel values summed at a time
SUM_IMAGES = 4096  # images summed at a time in memory


def shard_length(image_shape: tuple[int, ...]) -> int:
    """Images per shard for images of `image_shape` (height, width, channels)."""
    return max(1, SHARD_BYTES // math.prod(image_shape))


@dataclass
class SplitSummary:
    """What the writer learned on the way: exact pixel sums, extremes, the digest."""

    count: int
    values_per_image: int
    pixel_sum: int  # of the uint8 values
    pixel_square_sum: int
    pixel_min: int
    pixel_max: int
    digest: str

    @property
    def values(self) -> int:
        return self.count * self.values_per_image

    def pixel_mean(self) -> float:
        """Mean of the pixels scaled to 0..1, as `(x / 255).mean()` over the whole split."""
        return self.pixel_sum / self.values / 255.0

    def pixel_std(self) -> float:
        """Standard deviation of the pixels scaled to 0..1 (population, as NumPy's `std`)."""
        n = self.values
        variance = (self.pixel_square_sum * n - self.pixel_sum ** 2) / (n * n)  # exact ints
        return math.sqrt(variance) / 255.0


@dataclass
class BlockSums:
    """Exact integer pixel sums and extremes of a block of images, and each image's SHA-256:
    what a decoding worker computes beside the images, so that the process writing the shards
    only adds them up. Sums of blocks add up to the sums of the whole, in any blocking."""

    count: int
    total: int
    squares: int
    low: int
    high: int
    digests: bytes  # the images' SHA-256 digests, one after the other

    @classmethod
    def of(cls, images: np.ndarray) -> BlockSums:
        total = squares = 0
        low, high = 255, 0
        flat = images.reshape(-1)
        for start in range(0, flat.size, SUM_BLOCK):  # bounded temporaries
            block = flat[start:start + SUM_BLOCK]
            total += int(block.sum(dtype=np.uint64))
            squares += int(np.square(block, dtype=np.uint32).sum(dtype=np.uint64))
            low, high = min(low, int(block.min())), max(high, int(block.max()))
        digests = b"".join(hashlib.sha256(np.ascontiguousarray(image).data).digest()
                           for image in images)
        return cls(len(images), total, squares, low, high, digests)


class PixelSums:
    """The running sums of a split's blocks, and the split's digest: the SHA-256 of its images'
    digests in order, then of its labels."""

    def __init__(self, image_shape: tuple[int, ...]):
        self.image_shape = tuple(image_shape)
        self.count = self.total = self.squares = 0
        self.low, self.high = 255, 0
        self.hash = hashlib.sha256()

    def add(self, sums: BlockSums) -> None:
        self.count += sums.count
        self.total += sums.total
        self.squares += sums.squares
        if sums.count:
            self.low, self.high = min(self.low, sums.low), max(self.high, sums.high)
        self.hash.update(sums.digests)

    def summary(self, labels: np.ndarray) -> SplitSummary:
        self.hash.update(np.asarray(labels, dtype=np.int64).tobytes())
        return SplitSummary(self.count, math.prod(self.image_shape), self.total, self.squares,
                            self.low, self.high, self.hash.hexdigest())


class ShardWriter:
    """Write a split's images in order into shards of `length` images under `folder`, keeping
    one shard in memory."""

    def __init__(self, folder: Path, image_shape: tuple[int, ...], length: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.image_shape = tuple(image_shape)
        self.length = length or shard_length(self.image_shape)
        self._buffer = np.empty((self.length, *self.image_shape), dtype=np.uint8)
        self._filled = self._shards = 0
        self._sums = PixelSums(self.image_shape)

    def add(self, images: np.ndarray, sums: BlockSums | None = None) -> None:
        """Append uint8 images of shape (k, *image_shape), with their sums when the caller
        has them (computed here otherwise)."""
        if images.shape[1:] != self.image_shape or images.dtype != np.uint8:
            raise ValueError(f"ShardWriter: images {images.dtype}{images.shape[1:]}, expected "
                             f"uint8{self.image_shape}")
        self._sums.add(sums if sums is not None else BlockSums.of(images))
        start = 0
        while start < len(images):
            take = min(self.length - self._filled, len(images) - start)
            self._buffer[self._filled:self._filled + take] = images[start:start + take]
            self._filled += take
            start += take
            if self._filled == self.length:
                self._flush()

    def _flush(self) -> None:
        if not self._filled:
            return
        shard = self._buffer[:self._filled]
        write_npy(self.folder / IMAGES_PATTERN.format(self._shards), shard)
        self._shards += 1
        self._filled = 0

    def close(self, labels: np.ndarray) -> SplitSummary:
        """Write the last shard and the labels; return the split's summary."""
        self._flush()
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != self._sums.count:
            raise ValueError(f"ShardWriter: {self._sums.count} images, {len(labels)} labels")
        write_npy(self.folder / LABELS_FILE, labels)
        return self._sums.summary(labels)


def write_npy(path: Path, array: np.ndarray) -> None:
    """`np.save`, but through `write`, which names the cause of a failure (`np.save` writes
    with `tofile`, whose error on a full disk has no errno)."""
    array = np.ascontiguousarray(array)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
        f.write(memoryview(array).cast("B"))


@functools.lru_cache(maxsize=64)
def npy_header(shape: tuple[int, ...]) -> bytes:
    """The `.npy` header of a uint8 array of `shape`, as `np.save` writes it."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": np.dtype(np.uint8).str,
                                               "fortran_order": False, "shape": tuple(shape)})
    return out.getvalue()


class ShardLayout:
    """The shards of a split of `count` images, created empty at their full size, so that the
    processes decoding the images write each one straight to its place (`write_images`):
    nothing passes through the process that made the layout, and the files are the same bytes
    as `ShardWriter`'s whatever the order in which the places are filled."""

    def __init__(self, folder: Path, image_shape: tuple[int, ...], count: int,
                 length: int | None = None):
        self.folder = Path(folder)
        self.image_shape = tuple(image_shape)
        self.count = count
        self.length = length or shard_length(self.image_shape)
        self.image_bytes = math.prod(self.image_shape)

    def create(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for shard, start in enumerate(range(0, self.count, self.length)):
            images = min(self.length, self.count - start)
            header = npy_header((images, *self.image_shape))
            with open(self.path(shard), "wb") as f:
                f.write(header)
                f.truncate(len(header) + images * self.image_bytes)

    def path(self, shard: int) -> Path:
        return self.folder / IMAGES_PATTERN.format(shard)

    def places(self, start: int, count: int) -> list[tuple[str, int, int]]:
        """(file, byte offset, images) runs where images start..start+count go."""
        runs = []
        while count > 0:
            shard, index = divmod(start, self.length)
            images = min(self.length, self.count - shard * self.length)
            header = len(npy_header((images, *self.image_shape)))  # cached: 2 shapes a split
            take = min(count, images - index)
            runs.append((str(self.path(shard)), header + index * self.image_bytes, take))
            start, count = start + take, count - take
        return runs


def write_images(images: np.ndarray, places: list[tuple[str, int, int]]) -> None:
    """Write `images` to the runs of `ShardLayout.places`, in order."""
    images = np.ascontiguousarray(images)
    first = 0
    for path, offset, count in places:
        fd = os.open(path, os.O_WRONLY)
        try:
            data = memoryview(images[first:first + count]).cast("B")
            while data:
                try:
                    written = os.pwrite(fd, data, offset)
                except OSError as err:  # name the file, as open() would
                    raise OSError(err.errno, err.strerror, path) from None
                data, offset = data[written:], offset + written
        finally:
            os.close(fd)
        first += count


def summarize(images: np.ndarray) -> SplitSummary:
    """The pixel sums and extremes `ShardWriter` finds, of images in memory."""
    sums = PixelSums(images.shape[1:])
    for start in range(0, len(images), SUM_IMAGES):
        sums.add(BlockSums.of(images[start:start + SUM_IMAGES]))
    return sums.summary(np.zeros(0, np.int64))


class ShardedImages:
    """The images of a split as one read-only array-like: `len`, `shape`, `dtype`, and indexing
    by an int, a slice or an array of indices (any order), each read from the memory-mapped
    shards."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob(IMAGES_PATTERN.replace("{:05d}", "*")))
        if not files:
            raise DataError(f"{self.folder} holds no image shards; run the prepare stage "
                            "(dvc repro prepare)")
        self._files, lengths, shapes = [], [], set()
        for file in files:
            with file.open("rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                self._files.append((file, f.tell()))  # the path and where the pixels start
            if dtype != np.uint8:
                raise DataError(f"{file} holds {dtype} images, not uint8; run prepare again")
            lengths.append(shape[0])
            shapes.add(tuple(shape[1:]))
        if len(shapes) != 1:
            raise DataError(f"the shards in {self.folder} hold images of shapes {sorted(shapes)}"
                            "; run prepare again")
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._index: np.ndarray | None = None  # a subset's positions in the split
        self.shape = (int(self._starts[-1]), *shapes.pop())
        self._image_bytes = math.prod(self.shape[1:])
        self.dtype = np.dtype(np.uint8)
        self.ndim = len(self.shape)

    def subset(self, indices: np.ndarray) -> ShardedImages:
        """A view of the images at `indices`, read from the same shards when indexed."""
        view = copy.copy(self)
        indices = np.asarray(indices, dtype=np.int64)
        view._index = indices if self._index is None else self._index[indices]
        view.shape = (len(indices), *self.shape[1:])
        return view

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self.take(np.array([index]))[0]
        if isinstance(index, slice):
            return self.take(np.arange(*index.indices(len(self))))
        return self.take(np.asarray(index))

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The images at `indices`, in that order, as one in-memory array."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        indices = np.where(indices < 0, indices + len(self), indices)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        if self._index is not None:
            indices = self._index[indices]
        out = np.empty((len(indices), *self.shape[1:]), dtype=np.uint8)
        rows = out.reshape(len(indices), -1)
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        for shard in np.unique(shard_of):
            here = np.flatnonzero(shard_of == shard)
            local = indices[here] - self._starts[shard]
            order = np.argsort(local, kind="stable")  # read each shard front to back
            path, offset = self._files[shard]
            fd = os.open(path, os.O_RDONLY)
            try:
                for row, image in zip(here[order], local[order]):
                    got = os.preadv(fd, [rows[row]], offset + int(image) * self._image_bytes)
                    if got != self._image_bytes:
                        raise DataError(f"{path} is shorter than its header says; run prepare "
                                        "again")
            finally:
                os.close(fd)
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self.take(np.arange(len(self)))
        return whole if dtype is None else whole.astype(dtype)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """The images in order, `batch_size` at a time."""
        for start in range(0, len(self), batch_size):
            yield self[start:start + batch_size]


def select(images: np.ndarray | ShardedImages, indices: np.ndarray):
    """`images[indices]`: in memory for an array, a view for shards."""
    return images.subset(indices) if isinstance(images, ShardedImages) else images[indices]


def read_split(folder: Path) -> tuple[ShardedImages, np.ndarray]:
    """(images, labels) of the split written under `folder`."""
    return ShardedImages(folder), np.load(Path(folder) / LABELS_FILE)
