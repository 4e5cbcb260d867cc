"""Data sources. Each returns a :class:`Dataset` of raw uint8 images and integer labels."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data import fashion_mnist
from pipeline.data.dataset import Dataset

__all__ = ["Dataset", "load_dataset"]


def load_dataset(cfg: DataConfig, root: Path) -> Dataset:
    """Load the dataset `cfg` names; a relative `cfg.path` is taken from `root`."""
    path = Path(cfg.path) if Path(cfg.path).is_absolute() else Path(root) / cfg.path
    if cfg.name == "fashion_mnist":
        return fashion_mnist.load(path, verify_md5=cfg.verify_md5)
    raise AssertionError(f"data.name {cfg.name!r} passed validation but has no loader")
