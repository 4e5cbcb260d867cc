"""Images sorted into one subfolder per class: `<path>/cat/*.jpg`, `<path>/non-cat/*.png`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import ImageFolderConfig
from pipeline.data.dataset import Dataset
from pipeline.data.split import split_off
from pipeline.errors import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PIL_MODES = {"rgb": "RGB", "grayscale": "L"}


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


def read_folder(path: Path, class_names: list[str], size: tuple[int, int],
                mode: str) -> tuple[np.ndarray, np.ndarray, int, list[Path]]:
    """All images under the class subfolders of `path`: (images, labels, number resized,
    the other files, which are not images)."""
    images, labels, resized, others = [], [], 0, []
    for label, name in enumerate(class_names):
        folder = path / name
        if not folder.is_dir():
            raise DataError(f"{path} has no folder {name!r}, a class of the training folder")
        for file in folder_files(folder):
            if file.suffix.lower() not in EXTENSIONS:
                others.append(file)
                continue
            array, was_resized = read_image(file, size, mode)
            images.append(array)
            labels.append(label)
            resized += was_resized
    return np.stack(images), np.asarray(labels, dtype=np.int64), resized, others


def skipped_note(others: list[Path]) -> str | None:
    """A line on the files of the class folders that were left out for not being images."""
    if not others:
        return None
    kinds = ", ".join(sorted({p.suffix.lower() or p.name for p in others}))
    return (f"skipped {len(others)} file(s) that are not images ({kinds}); the image formats "
            f"are {' '.join(EXTENSIONS)}")


def load(cfg: ImageFolderConfig, root: Path, seed: int) -> Dataset:
    """Load the training folder and the test folder, or a seeded stratified test split."""
    path, test_path = root / cfg.path, root / cfg.test_path
    class_names = [p.name for p in class_folders(path)]
    size, notes = (cfg.image_size[0], cfg.image_size[1]), []
    x, y, resized, others = read_folder(path, class_names, size, cfg.color_mode)
    if test_path.resolve() == path.resolve():
        train_idx, test_idx = split_off(y, cfg.test_fraction, np.random.default_rng(seed))
        x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    else:
        extra = sorted({p.name for p in class_folders(test_path)} - set(class_names))
        if extra:
            raise DataError(f"test folder {test_path} has classes {extra} that the training "
                            f"folder {path} lacks")
        x_train, y_train = x, y
        x_test, y_test, test_resized, test_others = read_folder(test_path, class_names, size,
                                                                cfg.color_mode)
        resized, others = resized + test_resized, others + test_others
    if resized:
        notes.append(f"resized {resized} of {len(x_train) + len(x_test)} images to "
                     f"{size[0]}x{size[1]}")
    notes.extend(filter(None, [skipped_note(others)]))
    return Dataset(x_train, y_train, x_test, y_test, class_names, notes=notes)
