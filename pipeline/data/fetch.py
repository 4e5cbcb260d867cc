"""Put the default data (Fashion-MNIST) in place under `data/`, from the first source that has it.

Sources, in order: the files already in `data/`; a configured DVC remote (`dvc pull`); Debian's
package `dataset-fashion-mnist`; Keras's download. Whatever the source, the decompressed files
are checked against the published md5 sums, so `dvc status data.dvc` is clean afterwards.

    python -m pipeline.data.fetch [--dest data] [--no-download]
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from pipeline.data import fashion_mnist
from pipeline.errors import DataError, run_cli

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"


def decompress_into(gz_dir: Path, dest: Path) -> None:
    """Decompress `<name>.gz` for each Fashion-MNIST file from `gz_dir` into `dest`.

    Each file is written under a temporary name and renamed only after it matches its md5,
    so `dest` never holds a partial or wrong file.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name, expected in fashion_mnist.FILES.items():
        source = gz_dir / f"{name}.gz"
        if not source.is_file():
            raise DataError(f"{source} not found")
        tmp = dest / f".{name}.tmp"
        try:
            with gzip.open(source, "rb") as src, tmp.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            actual = fashion_mnist.md5_file(tmp)
            if actual != expected:
                raise DataError(f"{source} decompresses to md5 {actual}, expected {expected}")
            os.replace(tmp, dest / name)
        finally:
            tmp.unlink(missing_ok=True)


def from_workspace(dest: Path) -> bool:
    try:
        fashion_mnist.verify(dest)
    except DataError:
        return False
    return True


def from_dvc_remote(dest: Path) -> bool:
    """`dvc pull` the data when the project has a DVC remote configured."""
    remotes = subprocess.run(["dvc", "remote", "list"], capture_output=True, text=True)
    if remotes.returncode != 0 or not remotes.stdout.strip():
        return False
    pulled = subprocess.run(["dvc", "pull", "--quiet", f"{dest}.dvc"])
    return pulled.returncode == 0 and from_workspace(dest)


def from_debian(dest: Path, gz_dir: Path = DEBIAN_DIR) -> bool:
    if not all((gz_dir / f"{name}.gz").is_file() for name in fashion_mnist.FILES):
        return False
    decompress_into(gz_dir, dest)
    return True


def from_keras_download(dest: Path, origin: str | None = None,
                        cache_dir: Path | None = None) -> bool:
    """Download the gz files the way `keras.datasets.fashion_mnist` does, then decompress.

    `origin` (or $FASHION_MNIST_ORIGIN) is the base URL; a `file://` URL works offline.
    """
    import keras

    origin = origin or os.environ.get("FASHION_MNIST_ORIGIN", KERAS_ORIGIN)
    paths = [Path(keras.utils.get_file(f"{name}.gz", origin=f"{origin}{name}.gz",
                                       cache_dir=cache_dir,
                                       cache_subdir="datasets/fashion-mnist"))
             for name in fashion_mnist.FILES]
    cache = paths[0].parent
    decompress_into(cache, dest)
    return True


SOURCES: list[tuple[str, Callable[[Path], bool]]] = [
    ("already in place", from_workspace),
    ("DVC remote", from_dvc_remote),
    (f"Debian package dataset-fashion-mnist ({DEBIAN_DIR})", from_debian),
    ("Keras download", from_keras_download),
]


def fetch(dest: Path, download: bool = True) -> str:
    """Put the four files in `dest` from the first source that works; return its name.

    Raises:
        DataError: when no source could provide the data.
    """
    tried = []
    for label, source in SOURCES:
        if source is from_keras_download and not download:
            continue
        try:
            if source(dest):
                return label
        except (DataError, OSError) as err:
            tried.append(f"{label}: {err}")
            continue
        tried.append(f"{label}: not available")
    raise DataError(f"could not put Fashion-MNIST in {dest} ({'; '.join(tried)}); install "
                    "Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
                    "or copy the four IDX files there")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path("data"))
    parser.add_argument("--no-download", action="store_true",
                        help="use local sources only (workspace, DVC remote, Debian package)")
    args = parser.parse_args()
    source = fetch(args.dest, download=not args.no_download)
    print(f"data: Fashion-MNIST in {args.dest}/ ({source}), md5 sums verified")


if __name__ == "__main__":
    run_cli(main)
