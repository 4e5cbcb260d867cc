"""Throughput and time to 93% and 94% Fashion-MNIST test accuracy on one GPU (Keras 3 on JAX).

    make gpu-check                          # KERAS_BACKEND=jax python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --limit 2000 --epochs 1 --batch-size 256   # a CPU smoke run
    python benchmarks/gpu_check.py augment=light model.dropout=0.3            # Hydra overrides

Trains the model that `conf/` composes (the default `bn_cnn`, plus any Hydra overrides) with
the configured optimizer, on the prepare stage's training split, and scores the test split
after every epoch. It stops when every target accuracy is reached, after `--epochs` epochs,
or before an epoch that would end past `--budget-seconds` (counted from the start), and
prints a summary: device, backend, precision, batch, images/s, and the time to each target.

What makes it fast on a GPU:

- precision: `trainer.precision=mixed_bfloat16` where a GPU is found (`--precision`): bf16
  convolutions and matrix products on float32 variables, no loss scaling needed.
- XLA: a training step is one compiled JAX program, its buffers donated (updated in place),
  and the steps of an epoch are dispatched without waiting, so the device never idles on
  Python; the loss is read once an epoch. (Not `jax.lax.scan` over the steps: XLA on CPU runs
  convolutions inside a loop many times slower.) It is compiled before the first epoch; the
  compile time counts in the time to accuracy, not in images/s.
- data on the device: the uint8 train and test images go to the device once (50 MB for
  Fashion-MNIST; a set larger than half the device's memory is refused); each step gathers
  its batch there by index, and only the shuffled order (4 bytes an image) travels per epoch.
- batch: `--batch-size 1024` (the config's is 128, for the CPU); the learning rate is scaled
  by sqrt(batch / trainer.batch_size), the square-root rule for Adam-type optimizers, and the
  cosine schedule spans `--epochs`. Each epoch drops the remainder of the shuffled order.

Time to accuracy is wall time from the start of training (the compile included) to the end of
the evaluation after the first epoch at or above the target. images/s counts training steps
only (no compile, no evaluation). It needs JAX, Keras, Hydra and NumPy, no TensorFlow, MLflow
or DVC, so it runs on machines that have JAX and no TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_BACKEND", "jax")  # the loop below is JAX's; see `check_backend`

# isort: off
import pipeline  # noqa: E402, F401  (first: it sets up the Keras backend's environment)
# isort: on
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from pipeline import backend  # noqa: E402
from pipeline.build import model_from_config  # noqa: E402
from pipeline.config import PRECISIONS, Config  # noqa: E402
from pipeline.errors import ConfigError, run_cli  # noqa: E402
from pipeline.params import composed  # noqa: E402
from pipeline.prepare import prepare_configured  # noqa: E402
from pipeline.train import compile_model, make_optimizer, output_kind  # noqa: E402

GPU_PRECISION = "mixed_bfloat16"
EVAL_CHUNK = 1000  # test images per compiled forward pass


@dataclass
class Progress:
    """What the epochs so far measured."""

    epochs: int = 0
    images: int = 0
    train_seconds: float = 0.0  # compiled training steps only
    best: tuple[float, int] = (0.0, 0)  # (test accuracy, epoch)
    reached: dict[float, tuple[float, int, float]] = field(default_factory=dict)
    stop_reason: str = "all epochs done"


def check_backend() -> None:
    if keras.backend.backend() != "jax":
        raise ConfigError(f"KERAS_BACKEND={keras.backend.backend()}: the GPU check runs its "
                          "training loop in JAX; run it with KERAS_BACKEND=jax")


def describe_device() -> str:
    """The device the check runs on, e.g. 'GPU: NVIDIA H200 (1 of 8)' or 'CPU'."""
    devices = jax.devices()
    if devices[0].platform == "cpu":
        return "CPU"
    return f"{devices[0].platform.upper()}: {devices[0].device_kind} (1 of {len(devices)})"


def on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def to_device(x: np.ndarray, what: str) -> jax.Array:
    """`x` copied to the default device, refused when it would take over half its memory."""
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit and x.nbytes > limit // 2:
        raise ConfigError(f"the {what} ({x.nbytes / 1e9:.1f} GB) do not fit in half the "
                          f"device's memory ({limit / 1e9:.1f} GB); lower --limit")
    return jax.device_put(x)


def scaled_learning_rate(learning_rate: float, batch: int, reference_batch: int) -> float:
    """The square-root rule: a k times larger batch takes a sqrt(k) times larger step."""
    return learning_rate * math.sqrt(batch / reference_batch)


def make_train_step(model: keras.Model, optimizer: keras.optimizers.Optimizer, loss_fn):
    """One training step as one XLA program: (state, images, labels, order, step) -> (state,
    loss), with the batch gathered on the device from the epoch's order (steps, batch).

    `state` is (trainable, non-trainable, optimizer variables), Keras's stateless form; its
    buffers are donated, so each step updates them in place.
    """

    def train_step(state, x, y, order, step):
        trainable, non_trainable, optimizer_vars = state
        indices = order[step]

        def scaled_loss(trainable, non_trainable):
            images = x[indices].astype("float32")  # (batch, h, w, c) raw pixels, as in `fit`
            probs, non_trainable = model.stateless_call(trainable, non_trainable, images,
                                                        training=True)
            loss = jnp.mean(loss_fn(y[indices], probs))
            return optimizer.scale_loss(loss), (loss, non_trainable)

        (_, (loss, non_trainable)), grads = jax.value_and_grad(scaled_loss, has_aux=True)(
            trainable, non_trainable)
        trainable, optimizer_vars = optimizer.stateless_apply(optimizer_vars, grads, trainable)
        return (trainable, non_trainable, optimizer_vars), loss

    return jax.jit(train_step, donate_argnums=0)


def make_count_correct(model: keras.Model):
    """(state, images, labels) -> how many of the images the model classifies correctly."""

    def count_correct(state, x, y):
        trainable, non_trainable, _ = state
        probs, _ = model.stateless_call(trainable, non_trainable, x.astype("float32"),
                                        training=False)
        return jnp.sum(jnp.argmax(probs, axis=-1) == y)

    return jax.jit(count_correct)


def in_chunks(x: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(chunks, size, ...) arrays; the last chunk is padded with label -1, never correct."""
    n = math.ceil(len(y) / size) * size
    x = np.concatenate([x, np.zeros((n - len(x), *x.shape[1:]), x.dtype)])
    y = np.concatenate([y.astype(np.int32), np.full(n - len(y), -1, np.int32)])
    return x.reshape(-1, size, *x.shape[1:]), y.reshape(-1, size)


def initial_state(model: keras.Model, optimizer: keras.optimizers.Optimizer):
    """Copies of the variables' values (the steps donate theirs), in Keras's stateless form."""
    optimizer.build(model.trainable_variables)
    return tuple([jnp.array(v.value) for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables, optimizer.variables))


def run_epoch(train_step, state, data, order: jax.Array):
    """All steps of one epoch, dispatched without waiting (the device runs behind); returns
    the new state and the mean loss, read once at the end."""
    losses = []
    for step in range(order.shape[0]):
        state, loss = train_step(state, *data, order, np.int32(step))
        losses.append(loss)
    return state, float(jnp.mean(jnp.stack(losses)))


def test_accuracy(count_correct, state, chunks, n: int) -> float:
    correct = [count_correct(state, x, y) for x, y in zip(*chunks)]
    return int(jnp.sum(jnp.stack(correct))) / n


def prepared_model(cfg: Config, prepared, args, steps: int):
    """The config's model compiled with its optimizer (learning rate scaled to the batch, the
    schedule over `args.epochs`); returns the model and the learning rate."""
    model = model_from_config(cfg.model, prepared.meta, cfg.augment)
    if output_kind(model) != "softmax":
        raise ConfigError("the GPU check scores a softmax over three or more classes; "
                          f"{cfg.data.name} has {prepared.meta['num_classes']}")
    lr = scaled_learning_rate(cfg.optimizer.learning_rate, args.batch_size,
                              cfg.trainer.batch_size)
    optimizer_cfg = dataclasses.replace(cfg.optimizer, learning_rate=lr)
    compile_model(model, make_optimizer(optimizer_cfg, steps, args.epochs), jit_compile=True)
    return model, lr


def train_to_targets(cfg: Config, prepared, args, started: float) -> tuple[Progress, dict]:
    """Train epoch by epoch, scoring the test split after each; return what was measured
    and the settings used."""
    x_train, y_train = prepared.splits["train"]
    x_test, y_test = prepared.splits["test"]
    steps = len(y_train) // args.batch_size
    if steps == 0:
        raise ConfigError(f"--batch-size {args.batch_size} is larger than the "
                          f"{len(y_train)} training images; lower it or raise --limit")
    model, lr = prepared_model(cfg, prepared, args, steps)
    optimizer = model.optimizer  # wrapped for loss scaling under mixed_float16, as `fit` does
    data = (to_device(x_train, "training images"), to_device(y_train.astype(np.int32), "labels"))
    chunks = tuple(to_device(a, "test images") for a in in_chunks(
        x_test, y_test, min(EVAL_CHUNK, len(y_test))))
    state = initial_state(model, optimizer)
    rng = np.random.default_rng(cfg.seed)

    def shuffled_order():  # (steps, batch) indices; the remainder of the permutation is dropped
        return jax.device_put(rng.permutation(len(y_train))[:steps * args.batch_size]
                              .reshape(steps, args.batch_size).astype(np.int32))

    trained_from = time.perf_counter()  # the compile counts in the time to accuracy
    train_step = make_train_step(model, optimizer, keras.losses.get(model.loss)).lower(
        state, *data, shuffled_order(), np.int32(0)).compile()
    count_correct = make_count_correct(model).lower(
        state, chunks[0][0], chunks[1][0]).compile()
    compile_seconds = time.perf_counter() - trained_from
    progress, targets = Progress(), sorted(args.targets)
    last_epoch_seconds = 0.0
    for epoch in range(1, args.epochs + 1):
        begun = time.perf_counter()
        if epoch > 1 and begun + last_epoch_seconds - started > args.budget_seconds:
            progress.stop_reason = f"the {args.budget_seconds:g} s budget"
            break
        order = shuffled_order()
        state, loss = run_epoch(train_step, state, data, order)
        progress.train_seconds += time.perf_counter() - begun
        if not math.isfinite(loss):
            raise ConfigError(f"the loss became {loss} in epoch {epoch}: training diverged; "
                              "lower --batch-size or optimizer.learning_rate")
        accuracy = test_accuracy(count_correct, state, chunks, len(y_test))
        now = time.perf_counter()
        last_epoch_seconds = now - begun
        progress.epochs, progress.images = epoch, progress.images + steps * args.batch_size
        progress.best = max(progress.best, (accuracy, epoch))
        for target in targets:
            if accuracy >= target and target not in progress.reached:
                progress.reached[target] = (now - trained_from, epoch, accuracy)
        print(f"epoch {epoch}/{args.epochs}  loss {loss:.4f}  test accuracy {accuracy:.4f}  "
              f"{last_epoch_seconds:.2f}s  (since the start of training "
              f"{now - trained_from:.1f}s)", flush=True)
        if len(progress.reached) == len(targets):
            progress.stop_reason = "every target reached"
            break
    settings = {"learning_rate": lr, "compile_seconds": compile_seconds, "model": model,
                "data_bytes": sum(a.nbytes for a in (*data, *chunks))}
    return progress, settings


def summary(cfg: Config, args, precision: str, progress: Progress, settings: dict,
            sizes: dict) -> list[str]:
    """The final report, one `name  value` line each."""
    lr, reference = settings["learning_rate"], cfg.trainer.batch_size
    rate = progress.images / progress.train_seconds if progress.train_seconds else 0.0
    lines = [
        f"gpu check: {cfg.model.name} ({settings['model'].count_params():,} parameters), "
        f"{cfg.data.name}, {sizes['train']} training and {sizes['test']} test images",
        f"  device         {describe_device()}",
        f"  backend        Keras {keras.__version__} on JAX {jax.__version__}, XLA",
        f"  precision      {precision}",
        f"  batch          {args.batch_size} (learning rate {lr:.3g} = "
        f"{cfg.optimizer.learning_rate:g} x sqrt({args.batch_size}/{reference}), "
        f"{cfg.optimizer.name}, {cfg.optimizer.schedule} over {args.epochs} epoch"
        f"{'s' if args.epochs > 1 else ''})",
        f"  data           on the device ({settings['data_bytes'] / 1e6:.1f} MB)",
        f"  epochs         {progress.epochs} of {args.epochs} (stopped: {progress.stop_reason})",
        f"  compile        {settings['compile_seconds']:.1f} s",
        f"  images/s       {rate:.0f}",
        f"  best accuracy  {progress.best[0]:.4f} (epoch {progress.best[1]})",
    ]
    for target in sorted(args.targets):
        label = f"time to {target * 100:g}%".ljust(14)
        if target in progress.reached:
            seconds, epoch, accuracy = progress.reached[target]
            lines.append(f"  {label} {seconds:.1f} s (epoch {epoch}, test accuracy "
                         f"{accuracy:.4f})")
        else:
            lines.append(f"  {label} not reached")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. "
                        "augment=light (trainer.batch_size is the reference batch of the "
                        "learning rate)")
    parser.add_argument("--epochs", type=int, default=40,
                        help="most epochs; the learning-rate schedule spans them (default 40)")
    parser.add_argument("--batch-size", type=int, default=1024, help="default 1024")
    parser.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                        help=f"auto: {GPU_PRECISION} on a GPU, else trainer.precision")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most this many images per split (data.limit); default all")
    parser.add_argument("--budget-seconds", type=float, default=240.0,
                        help="no epoch starts that would end later (default 240)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.93, 0.94],
                        help="test accuracies to time (default 0.93 0.94)")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    return args


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = parse_args(argv)
    check_backend()
    limit = [f"data.limit={args.limit}"] if args.limit else []
    cfg = composed([*limit, *args.overrides])
    precision = (args.precision if args.precision != "auto"
                 else GPU_PRECISION if on_gpu() else cfg.trainer.precision)
    # seeded, and without XLA's deterministic GPU kernels: this measures speed
    backend.configure(cfg.seed, deterministic=False, precision=precision)
    prepared = prepare_configured(cfg, ROOT)
    sizes = prepared.meta["sizes"]
    print(f"gpu check: {describe_device()}, {precision}, batch {args.batch_size}, "
          f"{sizes['train']} training images, budget {args.budget_seconds:g} s", flush=True)
    progress, settings = train_to_targets(cfg, prepared, args, started)
    print("\n".join(summary(cfg, args, precision, progress, settings, sizes)), flush=True)


if __name__ == "__main__":
    run_cli(main)
