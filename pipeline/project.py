"""The project on disk: its root folder, its git commit, its data version, a lock between
processes. No MLflow here: modules that only need to find the project import this."""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from pipeline.config import Config

PROJECT_MARKERS = ("dvc.yaml", "conf")


def project_root(start: Path | None = None) -> Path:
    """The project folder, also from DVC's temporary experiment copies and Hydra's run folders.

    DVC sets DVC_ROOT to the parent repository for queued and temporary experiments.
    """
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if all((folder / marker).exists() for marker in PROJECT_MARKERS):
            return folder
    return here


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def data_md5(data_path: Path) -> str | None:
    """The md5 DVC recorded for the data in `<data_path>.dvc`, if that file exists."""
    dvc_file = Path(f"{data_path}.dvc")
    if not dvc_file.is_file():
        return None
    with dvc_file.open() as f:
        outs = (yaml.safe_load(f) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def data_location(cfg: Config, root: Path) -> Path:
    """The data the run reads, whose `.dvc` file holds its version (relative to `root`)."""
    return Path(cfg.data.path) if Path(cfg.data.path).is_absolute() else root / cfg.data.path


def lock_path(name: str, root: Path | None = None) -> Path:
    """Where the processes of this machine keep the lock file `name` of a project: DVC's own
    scratch folder, which git ignores."""
    return project_root(root) / ".dvc" / "tmp" / name


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on this machine, held for the `with` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
