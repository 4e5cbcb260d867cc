"""Throughput of the pipeline's train stage against a bare `model.fit`, on the same machine.

    make bench            # python benchmarks/throughput.py [--rounds 3 --epochs 2 --images 12800]

Both ways train the same model (the default config's) from the same initial weights on the same
prepared Fashion-MNIST images for the same number of steps, alternating bare / pipeline so that
drifts in machine load hit both. The pipeline way is the train stage's own `train()` inside an
MLflow run with everything on, reading its batches from the prepared shards on disk as the
stage does (the seeded order of each epoch, per-epoch MLflow logging, the loss guard, the
resumable checkpoint, the progress line). The bare way is the fastest plain Keras found for
that model and data: `model.compile` (Keras's own XLA rule, as the train stage: XLA trained at
under a fifth of the speed on CPUs, docs/speed.md) and `model.fit` with `verbose=0`, fed three
ways each round: in-memory arrays (`shuffle=True`), a `tf.data` pipeline (cache, seeded
shuffle, batch, prefetch) and a `keras.utils.PyDataset` handing NumPy batches of the in-memory
arrays in a new random order each epoch. The fastest by median throughput is the baseline. The
last line is `pipeline/bare throughput ratio: X.XX`, the median over the rounds of the
baseline's time over the pipeline's.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# isort: off
import pipeline  # noqa: E402, F401  (first: it quiets TensorFlow's start-up log)
# isort: on
import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.training_options import tf_data  # noqa: E402
from pipeline import backend, tracking  # noqa: E402
from pipeline.build import model_from_config  # noqa: E402
from pipeline.checkpoints import Checkpoint  # noqa: E402
from pipeline.params import composed  # noqa: E402
from pipeline.prepare import prepare_configured, read_split  # noqa: E402
from pipeline.shards import ShardWriter  # noqa: E402
from pipeline.train import compile_model, make_optimizer, train  # noqa: E402

BARE_WAYS = ("bare arrays", "bare tf.data", "bare PyDataset")  # how `model.fit` gets the data


class ShuffledBatches(keras.utils.PyDataset):
    """Plain Keras input: NumPy batches of in-memory arrays, reshuffled after each epoch."""

    def __init__(self, x, y, batch_size: int, seed: int):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x))

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index: int):
        chosen = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.x[chosen], self.y[chosen]

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.x))


class FirstStep(keras.callbacks.Callback):
    """Seconds from `fit` being called to the end of the first training step."""

    def __init__(self, started: float):
        super().__init__()
        self.started, self.seconds = started, None

    def on_train_batch_end(self, batch, logs=None):
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.started


def bare_fit(model, cfg, data, epochs, way):
    x, y = data["train"]
    batch = cfg.trainer.batch_size
    compile_model(model, make_optimizer(cfg.optimizer, len(x) // batch, epochs))
    start = time.perf_counter()
    first = FirstStep(start)
    if way == "bare tf.data":  # the dataset shuffles; built inside the timing, as fit's own is
        model.fit(tf_data(x, y, batch, cfg.seed), validation_data=data["val"], epochs=epochs,
                  shuffle=False, verbose=0, callbacks=[first])
    elif way == "bare PyDataset":
        model.fit(ShuffledBatches(x, y, batch, cfg.seed), validation_data=data["val"],
                  epochs=epochs, shuffle=False, verbose=0, callbacks=[first])
    else:
        model.fit(x, y, validation_data=data["val"], epochs=epochs, batch_size=batch,
                  shuffle=True, verbose=0, callbacks=[first])
    return time.perf_counter() - start, first.seconds, 0.0


def through_pipeline(model, cfg, data, epochs, workdir):
    import mlflow

    logging_seconds = []

    def timed_log(metrics, step):
        t = time.perf_counter()
        mlflow.log_metrics(metrics, step=step)
        logging_seconds.append(time.perf_counter() - t)

    checkpoint = Checkpoint(Path(tempfile.mkdtemp(dir=workdir)))
    with tracking.start_run(cfg, ROOT, "benchmark", ROOT / cfg.data.path):
        start = time.perf_counter()
        first = FirstStep(start)
        model.fit = _with_callback(model.fit, first)
        train(model, data["train"], data["val"], cfg.optimizer, epochs, cfg.trainer.batch_size,
              log_metrics=timed_log, checkpoint=checkpoint)
        seconds = time.perf_counter() - start
    return seconds, first.seconds, statistics.mean(logging_seconds)


def _with_callback(fit, extra):
    def fit_with(*args, callbacks=(), **kwargs):
        return fit(*args, callbacks=[*callbacks, extra], **kwargs)
    return fit_with


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=12_800, help="training images per epoch")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.md")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    cfg = composed([f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
                    "mlflow.experiment_name=benchmark"])
    backend.configure(cfg.seed, cfg.trainer.deterministic, cfg.trainer.precision)
    prepared = prepare_configured(cfg, ROOT)
    data = {"train": tuple(a[:args.images] for a in prepared.splits["train"]),
            "val": tuple(a[:1000] for a in prepared.splits["val"])}
    on_disk = {}
    for split, (x, y) in data.items():  # the train stage's input: shards, read per batch
        writer = ShardWriter(workdir / "prepared" / split, x.shape[1:])
        writer.add(x)
        writer.close(y)
        on_disk[split] = read_split(workdir / "prepared", split)
    initial = model_from_config(cfg.model, prepared.meta, cfg.augment)
    weights = initial.get_weights()
    images = args.epochs * (len(data["train"][1]) // cfg.trainer.batch_size) \
        * cfg.trainer.batch_size

    results = {way: [] for way in (*BARE_WAYS, "pipeline")}
    for r in range(args.rounds):
        for way in results:
            model = keras.models.clone_model(initial)
            model.set_weights(weights)
            seconds, first_step, log_cost = (
                bare_fit(model, cfg, data, args.epochs, way) if way in BARE_WAYS
                else through_pipeline(model, cfg, on_disk, args.epochs, workdir))
            results[way].append((seconds, first_step, log_cost))
            print(f"round {r + 1} {way:12s} {images / seconds:7.0f} images/s  "
                  f"first step {first_step:.2f}s  total {seconds:.1f}s", flush=True)

    def median(way, i):
        return statistics.median(x[i] for x in results[way])

    rate = {way: images / median(way, 0) for way in results}
    baseline = max(BARE_WAYS, key=rate.get)
    # each round's pipeline run against the baseline's run of the same round: robust to drifts
    ratio = statistics.median(b[0] / p[0]
                              for b, p in zip(results[baseline], results["pipeline"]))
    lines = [
        f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{backend.cpu_description()}, Keras {keras.__version__} "
        f"({keras.backend.backend()}), {backend.describe_devices()}",
        "",
        f"`python benchmarks/throughput.py --rounds {args.rounds} --epochs {args.epochs} "
        f"--images {args.images}` (model {cfg.model.name}, batch {cfg.trainer.batch_size}, "
        f"{images} training images per run, medians of {args.rounds} alternating rounds; the "
        "ratio is the median of the rounds' ratios against the fastest bare way)",
        "",
        "| way | images/s | time to first step | MLflow logging per epoch |",
        "|---|---:|---:|---:|",
        *(f"| {way} `model.fit`{' (the baseline)' if way == baseline else ''} | "
          f"{rate[way]:.0f} | {median(way, 1):.2f} s | - |" for way in BARE_WAYS),
        f"| pipeline train stage | {rate['pipeline']:.0f} | {median('pipeline', 1):.2f} s | "
        f"{median('pipeline', 2) * 1000:.0f} ms |",
        "",
        f"pipeline/bare throughput ratio: {ratio:.2f}",
        "",
    ]
    with args.out.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[4:-3]))
    print(f"results appended to {args.out}")
    print(f"pipeline/bare throughput ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
