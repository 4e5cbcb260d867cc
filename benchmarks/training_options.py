"""Throughput of training options against each other, alternating on the same machine.

    python benchmarks/training_options.py [--compare input precision jit] [--rounds 4]

Each comparison trains the default model from the same initial weights on the same prepared
Fashion-MNIST arrays, one way then the other, round after round, so that drifts in machine load
hit both; the ratio is the median of the rounds' ratios (B/A throughput, above 1: B is faster).

- input: in-memory arrays given to `model.fit` (A, what the train stage does) against a
  `tf.data` pipeline with caching, seeded shuffling, batching and prefetching (B).
- precision: float32 (A) against mixed_bfloat16 (B); CPUs with AVX-512 BF16 / AMX run bf16
  matrix work natively.
- jit: Keras's `jit_compile="auto"` (A; on TensorFlow that is no XLA on a CPU) against XLA (B).
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
from pipeline.config import validate  # noqa: E402
from pipeline.data import load_dataset  # noqa: E402
from pipeline.params import compose_config  # noqa: E402
from pipeline.prepare import prepare  # noqa: E402
from pipeline.train import compile_model, make_optimizer  # noqa: E402

COMPARISONS = {
    "input": ({"input": "memory"}, {"input": "tf_data"}),
    "precision": ({"precision": "float32"}, {"precision": "mixed_bfloat16"}),
    "jit": ({"jit_compile": "auto"}, {"jit_compile": True}),
}
DEFAULT_WAY = {"input": "memory", "precision": "float32", "jit_compile": "auto"}


def tf_data(x, y, batch_size: int, seed: int):
    import tensorflow as tf

    return (tf.data.Dataset.from_tensor_slices((x, y)).cache()
            .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def seconds_per_epoch(cfg, prepared, x, y, way: dict, epochs: int) -> float:
    """Seconds per epoch after a warm-up epoch (which traces the step function)."""
    keras.mixed_precision.set_global_policy(way["precision"])
    keras.utils.set_random_seed(cfg.seed)
    model = model_from_config(cfg.model, prepared.meta, cfg.augment)
    batch = cfg.trainer.batch_size
    compile_model(model, make_optimizer(cfg.optimizer, len(x) // batch, epochs + 1),
                  way["jit_compile"])
    if way["input"] == "tf_data":
        data = tf_data(x, y, batch, cfg.seed)

        def fit(n):
            model.fit(data, epochs=n, verbose=0)
    else:
        def fit(n):
            model.fit(x, y, batch_size=batch, epochs=n, shuffle=True, verbose=0)
    fit(1)
    start = time.perf_counter()
    fit(epochs)
    return (time.perf_counter() - start) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", nargs="+", choices=COMPARISONS, default=list(COMPARISONS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per run")
    parser.add_argument("--images", type=int, default=12_800, help="training images per epoch")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.md")
    args = parser.parse_args()

    cfg = validate(compose_config([]))
    backend.configure(cfg.seed, cfg.trainer.deterministic, cfg.trainer.precision)
    prepared = prepare(load_dataset(cfg.data, ROOT), None, cfg.data.val_fraction, cfg.seed)
    x, y = (a[:args.images] for a in prepared.splits["train"])
    lines = [
        f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, training "
        f"options, Keras {keras.__version__} ({keras.backend.backend()}), "
        f"{backend.describe_devices()}",
        "",
        f"`python benchmarks/training_options.py --compare {' '.join(args.compare)} "
        f"--rounds {args.rounds} --epochs {args.epochs} --images {args.images}` (model "
        f"{cfg.model.name}, batch {cfg.trainer.batch_size}; B/A is the median of the rounds' "
        "throughput ratios)",
        "",
        "| comparison | A images/s | B images/s | B/A |",
        "|---|---:|---:|---:|",
    ]
    for name in args.compare:
        a_way, b_way = ({**DEFAULT_WAY, **w} for w in COMPARISONS[name])
        rates = {"A": [], "B": []}
        for r in range(args.rounds):
            for label, way in (("A", a_way), ("B", b_way)):
                rate = len(x) / seconds_per_epoch(cfg, prepared, x, y, way, args.epochs)
                rates[label].append(rate)
                print(f"{name} round {r + 1} {label} {way}: {rate:.0f} images/s", flush=True)
        ratio = statistics.median(b / a for a, b in zip(rates["A"], rates["B"]))
        a_desc, b_desc = (", ".join(f"{k}={v}" for k, v in w.items() if DEFAULT_WAY[k] != v
                                    or k in COMPARISONS[name][0]) for w in (a_way, b_way))
        lines.append(f"| {name}: {a_desc} (A) vs {b_desc} (B) | "
                     f"{statistics.median(rates['A']):.0f} | "
                     f"{statistics.median(rates['B']):.0f} | {ratio:.2f} |")
        print(lines[-1], flush=True)
    lines.append("")
    with args.out.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"results appended to {args.out}")


if __name__ == "__main__":
    main()
