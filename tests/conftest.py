"""Shared fixtures: the real Fashion-MNIST files, composed configs, throwaway project copies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.data import fashion_mnist
from pipeline.params import composed

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
# A small stratified subset: enough for every class, fast enough for one epoch in seconds.
QUICK = ["data.limit=300", "trainer.epochs=1", "model=small_cnn", "trainer.batch_size=64"]


DATA_FIXTURES = {"data_dir", "project"}  # what a `unit` test may not ask for


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the `unit` tier (make test-unit) free of data: a test marked unit that asks for
    the data or a project copy is an error at collection, not a slow inner loop."""
    for item in items:
        used = DATA_FIXTURES & set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("unit") and used:
            raise pytest.UsageError(f"{item.nodeid} is marked unit but uses {sorted(used)}; "
                                    "drop the mark or the fixture")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real Fashion-MNIST files, put in place by `make data`."""
    try:
        fashion_mnist.verify(DATA)
    except Exception as err:  # noqa: BLE001 - turned into a clear test failure
        pytest.fail(f"the real Fashion-MNIST files are needed; run `make data` first ({err})")
    return DATA


def compose(*overrides: str) -> Config:
    """The typed config for `conf/` plus Hydra overrides."""
    return composed(overrides)


def env() -> dict[str, str]:
    """The environment for subprocesses: this interpreter's tools first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("DVC_", "MLFLOW_", "PIPELINE_"))}
    environ["PATH"] = bin_dir + os.pathsep + environ.get("PATH", "")
    return environ


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 600,
        extra_env: dict[str, str | None] | None = None):
    """Run `cmd` in `cwd` with `env()`, plus `extra_env` (None unsets a variable)."""
    environ = env()
    for key, value in (extra_env or {}).items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    result = subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


BLOCKER = """\
# Makes the packages in BLOCKED unimportable, as on a machine without them, and writes on exit
# which of them were loaded and which Keras backend ran.
import atexit, json, os, sys

BLOCKED = {blocked!r}


class Blocker:
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{fullname!r}}", name=fullname)
        return None


def report():
    keras = sys.modules.get("keras")
    loaded = sorted(n for n in sys.modules if n.partition(".")[0] in BLOCKED)
    with open(os.path.join({folder!r}, f"imports-{{os.getpid()}}.json"), "w") as f:
        json.dump({{"loaded": loaded,
                   "keras_backend": keras.backend.backend() if keras else None}}, f)


sys.meta_path.insert(0, Blocker())
atexit.register(report)
"""


def without_packages(folder: Path, *names: str) -> dict[str, str]:
    """The environment additions under which Python processes cannot import the packages
    `names` (a `sitecustomize.py` in `folder`); each process writes `folder/imports-<pid>.json`
    on exit: the blocked modules it had loaded and the Keras backend it used."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted(names),
                                                            folder=str(folder)))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder),
                                                        os.environ.get("PYTHONPATH")]))}


def import_reports(folder: Path) -> list[dict]:
    """What each process run `without_packages(folder, ...)` wrote on exit."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob("imports-*.json"))]


def copy_project(dest: Path, data_dir: Path) -> Path:
    """A git repository holding this project's files and a copy of the real data."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    shutil.copytree(data_dir, dest / "data")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


@pytest.fixture
def project(tmp_path: Path, data_dir: Path) -> Path:
    """A fresh copy of the project, with data, as a git repository in tmp."""
    return copy_project(tmp_path / "project", data_dir)


def mlflow_runs(project_dir: Path, experiment: str = "fashion-mnist-cnn"):
    """All runs of `experiment` in the project's default SQLite store."""
    from mlflow.tracking import MlflowClient

    store = project_dir / "mlflow.db"
    if not store.exists():
        return []
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def write_image_folder(dest: Path, data_dir: Path, classes: dict[str, int], per_class: int,
                       size: tuple[int, int] = (32, 32), mode: str = "RGB",
                       formats: tuple[str, ...] = ("png", "jpeg", "bmp", "gif")) -> Path:
    """Real Fashion-MNIST images of the chosen classes as an image folder, one subfolder per
    class, in several file formats (a stand-in for a user's own photos)."""
    from PIL import Image

    from pipeline.data.idx import read_idx

    images = read_idx(data_dir / "t10k-images-idx3-ubyte")
    labels = read_idx(data_dir / "t10k-labels-idx1-ubyte")
    for name, label in classes.items():
        folder = dest / name
        folder.mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(labels == label)[:per_class]):
            image = Image.fromarray(images[index]).convert(mode).resize(size[::-1])
            ext = formats[i % len(formats)]
            image.save(folder / f"{i:04d}.{ext}")
    return dest
