"""Everything that talks to TensorFlow directly lives here; the rest of the code is Keras 3.

Each function also works on another Keras backend (JAX, PyTorch), where it skips what only
TensorFlow offers or does the backend's own equivalent; none of them needs TensorFlow
installed unless the backend is TensorFlow.
"""

from __future__ import annotations

import logging
import os

import keras

XLA_DETERMINISM_FLAG = "--xla_gpu_deterministic_ops=true"


def is_tensorflow() -> bool:
    return keras.backend.backend() == "tensorflow"


def configure(seed: int, deterministic: bool, precision: str = "float32") -> None:
    """Seed every generator, switch on op determinism, set the dtype policy.

    With op determinism on, the same params on the same data give bit-identical results on CPU.
    """
    # JAX logs at INFO which accelerator plugins it did not find ("Unable to initialize
    # backend 'tpu'") when its first computation starts a backend.
    logging.getLogger("jax").setLevel(logging.WARNING)
    if deterministic and keras.backend.backend() == "jax":
        use_deterministic_xla_kernels()
    keras.utils.set_random_seed(seed)
    if is_tensorflow():
        import tensorflow as tf

        if deterministic:
            tf.config.experimental.enable_op_determinism()
        tf.get_logger().setLevel("ERROR")
    keras.mixed_precision.set_global_policy(resolve_precision(precision))
    # No progress bars from library calls (MLflow predicts on the input example); Keras then
    # reports through absl's logger, which stays at warnings.
    keras.config.disable_interactive_logging()
    logging.getLogger("absl").setLevel(logging.WARNING)


# CPU features that do bfloat16 matrix work in hardware (Linux /proc/cpuinfo names): AVX-512
# BF16 (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later) and AMX. Without
# them TensorFlow emulates bfloat16, and mixed_bfloat16 trained the default model at 0.11-0.15
# of float32's images/s on an AVX2-only AMD EPYC (docs/speed.md).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_field(name: str, cpuinfo: str) -> str | None:
    """The first `name` line's value in Linux's /proc/cpuinfo; None where there is none."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux lists them; empty where there is no such file."""
    return set((_cpuinfo_field("flags", cpuinfo) or "").split())


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name, for benchmark reports."""
    import platform

    return _cpuinfo_field("model name", cpuinfo) or platform.processor() or platform.machine()


SPEED_CPU_FLAGS = ("avx2", "fma", "avx512f", *BF16_CPU_FLAGS)  # what CPU training speed follows


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model and the flags its training speed follows (`SPEED_CPU_FLAGS`), for
    benchmark reports: `AMD EPYC (avx2 fma avx512f avx512_bf16)`."""
    flags = cpu_flags(cpuinfo)
    present = [f for f in SPEED_CPU_FLAGS if f in flags]
    return f"{cpu_model(cpuinfo)} ({' '.join(present) or 'no AVX2'})"


def resolve_precision(precision: str, flags: set[str] | None = None,
                      gpu: bool | None = None) -> str:
    """`trainer.precision` as Keras's dtype policy: `auto` is mixed_bfloat16 on a GPU or on a
    CPU with bfloat16 units (`BF16_CPU_FLAGS`), float32 elsewhere; other values stay."""
    if precision != "auto":
        return precision
    if gpu is None:
        gpu = describe_devices() != "CPU"
    if gpu:
        return "mixed_bfloat16"
    flags = cpu_flags() if flags is None else flags
    return "mixed_bfloat16" if flags & set(BF16_CPU_FLAGS) else "float32"


def check_jit_compile(jit_compile: bool | str, deterministic: bool) -> None:
    """Refuse `trainer.jit_compile=true` where Keras would drop it with only a warning: on
    TensorFlow, Keras compiles no model with XLA while op determinism is on, so `auto` means no
    XLA there too, on GPUs as well.

    Raises:
        ConfigError: XLA asked for on TensorFlow with `trainer.deterministic=true`.
    """
    if jit_compile is True and deterministic and is_tensorflow():
        from pipeline.errors import ConfigError

        raise ConfigError("trainer.jit_compile=true: TensorFlow does not compile with XLA under "
                          "op determinism (trainer.deterministic=true); add "
                          "trainer.deterministic=false to train with XLA")


def use_deterministic_xla_kernels() -> None:
    """JAX's counterpart of TensorFlow's op determinism: XLA's deterministic GPU kernels (XLA
    on CPU is deterministic already). XLA reads XLA_FLAGS once, when JAX starts its backend at
    the first computation, so this comes before any."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_DETERMINISM_FLAG}".strip()


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


def mirrored_strategy():
    """tf.distribute's MirroredStrategy: one model replica per GPU of this machine, or per
    logical CPU device where TensorFlow was given several (tests) and there is no GPU.

    Raises:
        ConfigError: the Keras backend is not TensorFlow.
    """
    if not is_tensorflow():
        from pipeline.errors import ConfigError

        raise ConfigError(f"trainer.distribute=mirrored: needs KERAS_BACKEND=tensorflow, not "
                          f"{keras.backend.backend()}; on JAX use trainer.distribute=multi_worker "
                          "(one process per machine, all its GPUs)")
    import tensorflow as tf

    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])
