"""A reproducible training pipeline for convolutional image classifiers.

Stages (one module each, same names as in dvc.yaml): prepare -> build -> train -> evaluate.
"""

import importlib.util
import os

from pipeline import quiet_import


def default_backend() -> str:
    """TensorFlow where it is installed, else JAX (GPU machines often have JAX and no
    TensorFlow); KERAS_BACKEND, when set, wins."""
    for name in ("tensorflow", "jax"):
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except ImportError:  # a package that cannot even be located counts as absent
            continue
    raise ImportError("no Keras backend is installed: install the package with one, "
                      "pip install -e '.[tensorflow]' (or '.[gpu]', '.[jax]'), or set "
                      "KERAS_BACKEND to the one you have")


# Before TensorFlow is first imported: keep its start-up log quiet unless asked for. The
# backend is looked up before the quiet finder is installed, which acts on the first lookup.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "KERAS_BACKEND" not in os.environ:
    os.environ["KERAS_BACKEND"] = default_backend()
quiet_import.install("tensorflow")

__version__ = "0.1.0"
