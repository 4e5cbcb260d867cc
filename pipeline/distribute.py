"""Data parallelism: one model replica per device, the global batch and the learning-rate rule.

`trainer.distribute` chooses the engine:

- `none`: one replica where Keras puts it (the GPU when there is one, else the CPU).
- `mirrored`: tf.distribute's MirroredStrategy over the GPUs of one machine (TensorFlow backend;
  the strategy itself comes from `pipeline.backend`).
- `multi_worker`: Keras's own `keras.distribution` over processes on several machines (JAX
  backend): every process joins through `keras.distribution.initialize` (jax.distributed),
  holds a replica per local device and feeds its own shard of the data; gradients are summed
  across processes (NCCL between GPUs, gloo between CPUs). tf.distribute's
  MultiWorkerMirroredStrategy is not used: Keras 3's `fit` fails under it
  (keras-team/keras#20585).

`trainer.batch_size` is the batch of one replica, so one step takes `batch_size × replicas`
images (the global batch), and the learning rate follows the linear scaling rule (Goyal et al.,
2017): the pipeline trains with `optimizer.learning_rate × replicas`. With one replica both are
the configured values. Only process 0, the chief, logs to MLflow and writes the stage outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from pipeline import backend, shards
from pipeline.config import OptimizerConfig
from pipeline.errors import ConfigError

# What keras.distribution.initialize reads when it is given no arguments.
ENV_JOB_ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
ENV_NUM_PROCESSES = "KERAS_DISTRIBUTION_NUM_PROCESSES"
ENV_PROCESS_ID = "KERAS_DISTRIBUTION_PROCESS_ID"
README_SECTION = "see docs/gpu.md, 'Several GPUs or machines'"


def global_batch(batch_size: int, replicas: int) -> int:
    """`trainer.batch_size` is per replica: one step takes batch_size × replicas images."""
    return batch_size * replicas


def scaled_learning_rate(learning_rate: float, replicas: int) -> float:
    """The linear scaling rule: a global batch k times larger takes a k times larger step."""
    return learning_rate * replicas


def scaled_optimizer(cfg: OptimizerConfig, replicas: int) -> OptimizerConfig:
    """The optimizer config with its learning rate scaled for `replicas`."""
    return dataclasses.replace(cfg, learning_rate=scaled_learning_rate(cfg.learning_rate,
                                                                       replicas))


@dataclass(frozen=True)
class Replicas:
    """How one training step is spread: `count` model replicas over `processes` processes.

    `distribution` is what model loading, compiling and `fit` run under: a tf.distribute
    strategy (mirrored), a keras.distribution.Distribution (multi_worker) or None.
    """

    mode: str = "none"
    count: int = 1
    processes: int = 1
    process_id: int = 0
    distribution: Any = None

    @property
    def is_chief(self) -> bool:
        """Process 0: the one that logs to MLflow and writes the stage outputs."""
        return self.process_id == 0

    def scope(self):
        """The context to load, compile and fit the model in."""
        return self.distribution.scope() if self.distribution is not None else nullcontext()

    def process_batch(self, batch_size: int) -> int:
        """The batch this process hands to `fit`: its replicas' share of the global batch."""
        return global_batch(batch_size, self.count) // self.processes

    def tags(self, batch_size: int, learning_rate: float) -> dict[str, str]:
        """The effective values as MLflow tags (the params are the config alone)."""
        return {"distribute.replicas": str(self.count),
                "distribute.processes": str(self.processes),
                "distribute.global_batch_size": str(global_batch(batch_size, self.count)),
                "distribute.learning_rate": str(scaled_learning_rate(learning_rate, self.count))}

    def describe_learning_rate(self, learning_rate: float) -> str:
        if self.count == 1:
            return f"learning_rate {learning_rate}"
        return (f"learning_rate {scaled_learning_rate(learning_rate, self.count):g} = "
                f"{learning_rate} x {self.count} replicas")

    def describe_batch(self, batch_size: int) -> str:
        if self.count == 1:
            return f"batch {batch_size}"
        return (f"global batch {global_batch(batch_size, self.count)} = {batch_size} x "
                f"{self.count} replicas")

    def describe_replicas(self) -> str:
        """Empty for one replica, else e.g. `, 2 replicas (multi_worker, process 0 of 2)`."""
        if self.count == 1:
            return ""
        if self.processes == 1:
            return f", {self.count} replicas ({self.mode})"
        return (f", {self.count} replicas ({self.mode}, process {self.process_id} of "
                f"{self.processes})")


def weights_digest(model: keras.Model) -> str:
    """A short digest of the model's weights: equal in every process when the replicas agree."""
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()[:16]


def shard(arrays: tuple[np.ndarray, ...], process_id: int, processes: int
          ) -> tuple[np.ndarray, ...]:
    """This process's share of the examples: every `processes`-th one from `process_id` on,
    cut to the same length in every process (each must take the same number of steps; fewer
    than `processes` examples are left out)."""
    if processes == 1:
        return arrays
    size = len(arrays[0]) // processes
    mine = np.arange(process_id, len(arrays[0]), processes)[:size]
    return tuple(shards.select(a, mine) for a in arrays)


@dataclass(frozen=True)
class Job:
    """The processes of a multi_worker training, as every one of them is told at start."""

    job_addresses: str  # host:port of process 0 (the coordinator), or all, comma-separated
    num_processes: int
    process_id: int


def job_from_env(environ: Mapping[str, str] = os.environ) -> Job:
    """The multi_worker job from the KERAS_DISTRIBUTION_* variables each process starts with.

    Raises:
        ConfigError: a variable is missing or out of range.
    """
    missing = [name for name in (ENV_JOB_ADDRESSES, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
               if not environ.get(name)]
    if missing:
        raise ConfigError(f"trainer.distribute=multi_worker: set {', '.join(missing)} in every "
                          f"process, e.g. {ENV_JOB_ADDRESSES}=host0:12345 {ENV_NUM_PROCESSES}=2 "
                          f"{ENV_PROCESS_ID}=0 ({README_SECTION})")
    try:
        num_processes, process_id = int(environ[ENV_NUM_PROCESSES]), int(environ[ENV_PROCESS_ID])
    except ValueError:
        raise ConfigError(f"{ENV_NUM_PROCESSES}={environ[ENV_NUM_PROCESSES]!r}, "
                          f"{ENV_PROCESS_ID}={environ[ENV_PROCESS_ID]!r}: both must be "
                          f"integers, e.g. 2 and 0") from None
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"{ENV_PROCESS_ID}={process_id}: must lie in 0..{num_processes - 1} "
                          f"for {ENV_NUM_PROCESSES}={num_processes}")
    return Job(environ[ENV_JOB_ADDRESSES], num_processes, process_id)


def initialize(job: Job) -> None:
    """Join this process to the job (blocks until all have joined); once per process.

    Between CPUs the processes sum gradients over gloo (TCP); between GPUs JAX uses NCCL.
    """
    import jax

    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(job.job_addresses, job.num_processes, job.process_id)


def start(mode: str, environ: Mapping[str, str] = os.environ) -> Replicas:
    """Set up `trainer.distribute=mode`: after `backend.configure` (which seeds every process
    alike) and before the first computation on the backend.

    Raises:
        ConfigError: the mode does not fit the Keras backend, or the job is not described.
    """
    if mode == "none":
        return Replicas()
    if mode == "mirrored":
        strategy = backend.mirrored_strategy()
        return Replicas(mode, strategy.num_replicas_in_sync, distribution=strategy)
    if keras.backend.backend() != "jax":
        raise ConfigError(f"trainer.distribute=multi_worker: needs KERAS_BACKEND=jax, not "
                          f"{keras.backend.backend()} (tf.distribute's multi-worker strategy "
                          f"does not work with Keras 3's fit; {README_SECTION})")
    initialize(job_from_env(environ))
    import jax

    data_parallel = keras.distribution.DataParallel(devices=jax.devices(),
                                                    auto_shard_dataset=False)
    return Replicas(mode, len(jax.devices()), jax.process_count(), jax.process_index(),
                    data_parallel)
