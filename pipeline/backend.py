"""Everything that talks to TensorFlow directly lives here; the rest of the code is Keras 3.

Each function also works on another Keras backend (JAX, PyTorch), where it skips what only
TensorFlow offers.
"""

from __future__ import annotations

import logging

import keras


def is_tensorflow() -> bool:
    return keras.backend.backend() == "tensorflow"


def configure(seed: int, deterministic: bool, precision: str = "float32") -> None:
    """Seed every generator, switch on op determinism, set the dtype policy.

    With op determinism on, the same params on the same data give bit-identical results on CPU.
    """
    keras.utils.set_random_seed(seed)
    if is_tensorflow():
        import tensorflow as tf

        if deterministic:
            tf.config.experimental.enable_op_determinism()
        tf.get_logger().setLevel("ERROR")
    keras.mixed_precision.set_global_policy(precision)
    # No progress bars from library calls (MLflow predicts on the input example); Keras then
    # reports through absl's logger, which stays at warnings.
    keras.config.disable_interactive_logging()
    logging.getLogger("absl").setLevel(logging.WARNING)


def describe_devices() -> str:
    """A short description of what training runs on, e.g. 'CPU' or '1 GPU'."""
    if is_tensorflow():
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return f"{len(gpus)} GPU" if gpus else "CPU"
    if keras.backend.backend() == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        return f"{len(gpus)} GPU" if gpus else "CPU"
    return keras.backend.backend()
