"""Images sorted into one subfolder per class: `<path>/cat/*.jpg`, `<path>/non-cat/*.png`."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import ImageFolderConfig
from pipeline.data.dataset import Dataset
from pipeline.data.split import split_off
from pipeline.errors import DataError
from pipeline.shards import BlockSums, ShardLayout, write_images

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PIL_MODES = {"rgb": "RGB", "grayscale": "L"}
DECODE_CHUNK = 16  # images a worker decodes per task
IN_FLIGHT_PER_WORKER = 4  # tasks queued or done but not yet written, per worker


def class_folders(path: Path) -> list[Path]:
    """The class subfolders of `path`, sorted by name.

    Raises:
        DataError: `path` missing, fewer than two classes, or a class folder without images.
    """
    if not path.is_dir():
        raise DataError(f"image folder {path} not found; set data.path to a folder with one "
                        "subfolder of images per class")
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        found = ", ".join(p.name for p in folders) or "none"
        raise DataError(f"{path} has {len(folders)} class folder(s) ({found}); a classifier "
                        "needs at least two, e.g. cat/ and non-cat/")
    for folder in folders:
        if not image_files(folder):
            raise DataError(f"class folder {folder} holds no images ({', '.join(EXTENSIONS)}); "
                            "add images or remove the folder")
    return folders


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, subfolders included, sorted; hidden files and folders
    (`.DS_Store`, macOS's `._photo.jpg`, `.ipynb_checkpoints/`) are not images of the class."""
    return [p for p in folder_files(folder) if p.suffix.lower() in EXTENSIONS]


def folder_files(folder: Path) -> list[Path]:
    """Every file under `folder` whose path below it has no hidden part, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_image(path: Path, size: tuple[int, int], mode: str) -> tuple[np.ndarray, bool]:
    """One image as uint8 (height, width, channels), converted and resized; and whether it was
    resized.

    Raises:
        DataError: the file is not a readable image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            # upright as the camera meant it (phone photos carry the rotation in EXIF)
            image = converted(ImageOps.exif_transpose(image), PIL_MODES[mode])
            resized = image.size != (size[1], size[0])
            if resized:
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError) as err:
        raise DataError(f"{path} is not a readable image ({type(err).__name__}); "
                        "remove or replace it") from None
    return (array[..., np.newaxis] if array.ndim == 2 else array), resized


def converted(image, mode: str):
    """`image` in the PIL mode `mode` ("RGB" or "L"), as a viewer shows it: 16-bit pixels
    scaled to 0..255 (Pillow's own conversion clips them to white), and
    transparent pixels on white (Pillow's conversion drops the alpha and leaves them black)."""
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit PNG and TIFF pixels
        pixels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        image = Image.fromarray(np.rint(pixels * (255 / 65535)).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P"
                                               and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert(mode)


@dataclass(frozen=True)
class ImageFiles:
    """Image files not yet decoded, with their target size and colour mode: what an image
    folder's split is until `prepare` decodes it (in worker processes, `decoded`)."""

    paths: tuple[Path, ...]
    size: tuple[int, int]  # (height, width)
    mode: str  # "rgb" | "grayscale"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), *self.size, 3 if self.mode == "rgb" else 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index) -> ImageFiles:
        chosen = np.asarray(index).reshape(-1) if not isinstance(index, slice) else index
        paths = np.asarray(self.paths, dtype=object)[chosen]
        return ImageFiles(tuple(paths), self.size, self.mode)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = np.concatenate([chunk for chunk, *_ in Decoder(1).decoded(self)]
                                or [np.empty((0, *self.shape[1:]), np.uint8)])
        return images if dtype is None else images.astype(dtype)


def decode_chunk(paths: tuple[Path, ...], size: tuple[int, int], mode: str
                 ) -> tuple[np.ndarray, int, BlockSums]:
    """The images of `paths` as one uint8 array, how many were resized, and their sums and
    digests (computed here, in the worker, not in the process writing the shards)."""
    images = np.empty((len(paths), *size, 3 if mode == "rgb" else 1), dtype=np.uint8)
    resized = 0
    for i, path in enumerate(paths):
        images[i], was_resized = read_image(path, size, mode)
        resized += was_resized
    return images, resized, BlockSums.of(images)


def decode_into(paths: tuple[Path, ...], size: tuple[int, int], mode: str,
                places: list[tuple[str, int, int]]) -> tuple[int, BlockSums]:
    """Decode `paths` and write the images straight to their places in the shards
    (`ShardLayout.places`); return how many were resized and their sums."""
    images, resized, sums = decode_chunk(paths, size, mode)
    write_images(images, places)
    return resized, sums


def _ignore_interrupt() -> None:
    """Workers leave Ctrl-C to the main process, which stops them all."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_count(workers: int | None) -> int:
    """`data.workers`, or every core this process may use."""
    return workers or len(os.sched_getaffinity(0))


class Decoder:
    """Worker processes that decode image files, started once for all the splits of a
    prepare (`with Decoder(workers) as decoder: ... decoder.decoded(files)`)."""

    def __init__(self, workers: int | None = None):
        self.workers = worker_count(workers)
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers at once (after an error or Ctrl-C, the others stop too)."""
        if self._executor is None:
            return
        for process in list((getattr(self._executor, "_processes", None) or {}).values()):
            process.terminate()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._executor = None

    def decoded(self, files: ImageFiles,
                chunk: int = DECODE_CHUNK) -> Iterator[tuple[np.ndarray, int, BlockSums]]:
        """(images, number resized, their sums) of `files`, `chunk` at a time, in order.

        Raises:
            DataError: a file is not a readable image (named), or a worker died.
        """
        parts = [files.paths[i:i + chunk] for i in range(0, len(files), chunk)]
        yield from self._map(decode_chunk, [(part, files.size, files.mode) for part in parts])

    def decode_into(self, files: ImageFiles, layout: ShardLayout,
                    chunk: int = DECODE_CHUNK) -> Iterator[tuple[int, int, BlockSums]]:
        """Decode `files` into the shards of `layout` (created), the workers writing each
        image to its place; yield (images done, number resized, their sums) a chunk at a
        time, in order. The shards do not depend on the number of workers.

        Raises:
            DataError: a file is not a readable image (named), or a worker died.
        """
        starts = range(0, len(files), chunk)
        tasks = [(files.paths[i:i + chunk], files.size, files.mode,
                  layout.places(i, min(chunk, len(files) - i))) for i in starts]
        for (paths, *_), (resized, sums) in zip(tasks, self._map(decode_into, tasks)):
            yield len(paths), resized, sums

    def _map(self, function, tasks: list[tuple]) -> Iterator:
        """`function(*task)` for each task, in order, in the workers, with at most a few tasks
        per worker in flight (memory stays bounded whatever the number of tasks); the first
        argument of a task is its files, named when a worker dies on them."""
        if self.workers == 1 or len(tasks) <= 1:
            for task in tasks:
                yield function(*task)
            return
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_ignore_interrupt)
        pending: deque = deque()
        try:
            for task in tasks:
                pending.append((task[0], self._executor.submit(function, *task)))
                if len(pending) >= IN_FLIGHT_PER_WORKER * self.workers:
                    yield pending.popleft()[1].result()
            while pending:
                yield pending.popleft()[1].result()
        except BrokenProcessPool:
            where = pending[0][0][0] if pending else tasks[-1][0][-1]
            raise DataError(f"an image-decoding worker died (killed, or out of memory) near "
                            f"{where}; run prepare again, with fewer data.workers if memory is "
                            "short") from None
        except BaseException:
            self.close()
            raise


def list_folder(path: Path, class_names: list[str]) -> tuple[list[Path], np.ndarray, list[Path]]:
    """The image files under the class subfolders of `path` with their labels, and the other
    files, which are not images."""
    files, labels, others = [], [], []
    for label, name in enumerate(class_names):
        folder = path / name
        if not folder.is_dir():
            raise DataError(f"{path} has no folder {name!r}, a class of the training folder")
        for file in folder_files(folder):
            if file.suffix.lower() not in EXTENSIONS:
                others.append(file)
                continue
            files.append(file)
            labels.append(label)
    return files, np.asarray(labels, dtype=np.int64), others


def skipped_note(others: list[Path]) -> str | None:
    """A line on the files of the class folders that were left out for not being images."""
    if not others:
        return None
    kinds = ", ".join(sorted({p.suffix.lower() or p.name for p in others}))
    return (f"skipped {len(others)} file(s) that are not images ({kinds}); the image formats "
            f"are {' '.join(EXTENSIONS)}")


def load(cfg: ImageFolderConfig, root: Path, seed: int) -> Dataset:
    """The training folder and the test folder, or a seeded stratified test split, as image
    files that `prepare` decodes."""
    path, test_path = root / cfg.path, root / cfg.test_path
    class_names = [p.name for p in class_folders(path)]
    size = (cfg.image_size[0], cfg.image_size[1])
    paths, y, others = list_folder(path, class_names)
    x = ImageFiles(tuple(paths), size, cfg.color_mode)
    if test_path.resolve() == path.resolve():
        train_idx, test_idx = split_off(y, cfg.test_fraction, np.random.default_rng(seed))
        x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    else:
        extra = sorted({p.name for p in class_folders(test_path)} - set(class_names))
        if extra:
            raise DataError(f"test folder {test_path} has classes {extra} that the training "
                            f"folder {path} lacks")
        x_train, y_train = x, y
        test_paths, y_test, test_others = list_folder(test_path, class_names)
        x_test = ImageFiles(tuple(test_paths), size, cfg.color_mode)
        others = others + test_others
    notes = list(filter(None, [skipped_note(others)]))
    return Dataset(x_train, y_train, x_test, y_test, class_names, notes=notes)


def resized_note(resized: int, total: int, size: tuple[int, int]) -> str | None:
    """A line on the images decoded at another size than `data.image_size`."""
    if not resized:
        return None
    return f"resized {resized} of {total} images to {size[0]}x{size[1]}"
