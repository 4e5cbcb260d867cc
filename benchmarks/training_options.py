"""Throughput of training options against each other, interleaved on the same machine.

    python benchmarks/training_options.py [--compare input precision] [--rounds 16]
    python benchmarks/training_options.py --compare jit trainer.deterministic=false

For each comparison two copies of the default model start from the same weights, one trained
way A and one way B, each compiled and warmed up once (so tracing and XLA compiles are not
timed). Then they take turns, one epoch of `--images` training images each, A B, B A, A B, ...
The machine's speed drifts by tens of percent from minute to minute, so only a ratio of two
measurements taken seconds apart means anything: each round's B/A throughput ratio is one
sample, and the result is the median over the rounds with the middle half of them (quartiles)
as its spread. An epoch is timed from the end of its first step to the end of its last, which
leaves out what `fit` does once per call (building the data iterator, callbacks) and keeps
what it does every step (shuffled batches, the input pipeline, the optimizer step).

- input: in-memory arrays given to `model.fit` (A, what the train stage does) against a
  `tf.data` pipeline with caching, seeded shuffling, batching and prefetching (B).
- precision: float32 (A) against mixed_bfloat16 (B); CPUs with AVX-512 BF16 or AMX run bf16
  matrix work natively.
- jit: Keras's `jit_compile="auto"` (A; on TensorFlow that is no XLA on a CPU) against XLA (B).
  TensorFlow compiles nothing with XLA under op determinism, so this one runs with
  `trainer.deterministic=false`, both ways.

Hydra overrides of `conf/` go last, e.g. `trainer.batch_size=256`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# isort: off
import pipeline  # noqa: E402, F401  (first: it quiets TensorFlow's start-up log)
# isort: on
import keras  # noqa: E402

from pipeline import backend  # noqa: E402
from pipeline.build import model_from_config  # noqa: E402
from pipeline.errors import run_cli  # noqa: E402
from pipeline.params import composed  # noqa: E402
from pipeline.prepare import prepare_configured  # noqa: E402
from pipeline.train import compile_model, make_optimizer  # noqa: E402

COMPARISONS = {
    "input": ({"input": "memory"}, {"input": "tf_data"}),
    "precision": ({"precision": "float32"}, {"precision": "mixed_bfloat16"}),
    "jit": ({"jit_compile": "auto"}, {"jit_compile": True}),
}
DEFAULT_WAY = {"input": "memory", "precision": "float32", "jit_compile": "auto"}


class StepClock(keras.callbacks.Callback):
    """Seconds from the end of an epoch's first step to the end of its last, and their steps."""

    def __init__(self):
        super().__init__()
        self.first = self.last = 0.0
        self.steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.last = time.perf_counter()
        if self.steps == 0:
            self.first = self.last
        self.steps += 1

    def rate(self, batch_size: int) -> float:
        """Images per second over the timed steps."""
        return (self.steps - 1) * batch_size / (self.last - self.first)


def tf_data(x, y, batch_size: int, seed: int):
    import tensorflow as tf

    return (tf.data.Dataset.from_tensor_slices((x, y)).cache()
            .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def make_trainer(cfg, prepared, weights, x, y, way: dict):
    """A model for `way`, compiled and warmed up; returns `epoch()`, which trains one epoch
    and returns its images/s."""
    keras.mixed_precision.set_global_policy(way["precision"])
    model = model_from_config(cfg.model, prepared.meta, cfg.augment)
    model.set_weights(weights)
    batch = cfg.trainer.batch_size
    compile_model(model, make_optimizer(cfg.optimizer, len(x) // batch, 1000), way["jit_compile"])
    clock = StepClock()
    if way["input"] == "tf_data":
        data = tf_data(x, y, batch, cfg.seed)

        def fit():
            model.fit(data, epochs=1, shuffle=False, verbose=0, callbacks=[clock])  # it shuffles
    else:
        def fit():
            model.fit(x, y, batch_size=batch, epochs=1, shuffle=True, verbose=0,
                      callbacks=[clock])

    def epoch() -> float:
        fit()
        return clock.rate(batch)

    epoch()  # traces the step function (and compiles it under XLA); fills tf.data's cache
    return epoch


def compare(cfg, prepared, x, y, name: str, rounds: int) -> dict:
    """Interleaved epochs of way A and way B; their images/s and per-round B/A ratios."""
    a_way, b_way = ({**DEFAULT_WAY, **w} for w in COMPARISONS[name])
    keras.utils.set_random_seed(cfg.seed)
    weights = model_from_config(cfg.model, prepared.meta, cfg.augment).get_weights()
    epochs = {"A": make_trainer(cfg, prepared, weights, x, y, a_way),
              "B": make_trainer(cfg, prepared, weights, x, y, b_way)}
    keras.mixed_precision.set_global_policy(cfg.trainer.precision)
    rates: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(rounds):
        for label in ("AB" if r % 2 == 0 else "BA"):
            rates[label].append(epochs[label]())
        print(f"{name} round {r + 1}: A {rates['A'][-1]:.0f}  B {rates['B'][-1]:.0f} images/s  "
              f"B/A {rates['B'][-1] / rates['A'][-1]:.2f}", flush=True)
    ratios = [b / a for a, b in zip(rates["A"], rates["B"])]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"a_way": a_way, "b_way": b_way, "rates": rates, "ratio": statistics.median(ratios),
            "quartiles": (quartiles[0], quartiles[2])}


def describe_way(way: dict, name: str) -> str:
    """The settings that tell the way apart, e.g. `precision=mixed_bfloat16`."""
    return ", ".join(f"{k}={v}" for k, v in way.items() if k in COMPARISONS[name][0])


def table_row(name: str, result: dict) -> str:
    low, high = result["quartiles"]
    return (f"| {name}: {describe_way(result['a_way'], name)} (A) vs "
            f"{describe_way(result['b_way'], name)} (B) | "
            f"{statistics.median(result['rates']['A']):.0f} | "
            f"{statistics.median(result['rates']['B']):.0f} | {result['ratio']:.2f} | "
            f"{low:.2f} to {high:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", nargs="+", choices=COMPARISONS, default=list(COMPARISONS))
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--images", type=int, default=6_400, help="training images per epoch")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.md")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/")
    args = parser.parse_args()

    cfg = composed(args.overrides)
    if "jit" in args.compare:
        backend.check_jit_compile(True, cfg.trainer.deterministic)
    backend.configure(cfg.seed, cfg.trainer.deterministic, cfg.trainer.precision)
    prepared = prepare_configured(cfg, ROOT)
    x, y = (a[:args.images] for a in prepared.splits["train"])
    lines = [
        f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, training "
        f"options, Keras {keras.__version__} ({keras.backend.backend()}), "
        f"{backend.describe_devices()}",
        "",
        f"`python benchmarks/training_options.py --compare {' '.join(args.compare)} "
        f"--rounds {args.rounds} --images {args.images}{''.join(' ' + o for o in args.overrides)}`"
        f" (model {cfg.model.name}, batch "
        f"{cfg.trainer.batch_size}; A and B take turns, one epoch each; B/A is the median of "
        "the rounds' throughput ratios, the spread their quartiles)",
        "",
        "| comparison | A images/s | B images/s | B/A | middle half of the rounds |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in args.compare:
        lines.append(table_row(name, compare(cfg, prepared, x, y, name, args.rounds)))
        print(lines[-1], flush=True)
    lines.append("")
    with args.out.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"results appended to {args.out}")


if __name__ == "__main__":
    run_cli(main)
