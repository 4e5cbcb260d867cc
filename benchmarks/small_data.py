"""Small datasets: BatchNorm with recomputed statistics against the moving averages and against
no BatchNorm, over seeds, on three small sets made from real Fashion-MNIST images.

    python benchmarks/small_data.py                 # seeds 1 2 3, all three sets
    python benchmarks/small_data.py --sets photos --seeds 1
    python benchmarks/small_data.py --sets photos --overrides model.dropout=0.1 \
        --variants "BatchNorm, recomputed statistics" "no BatchNorm" --out /tmp/try.md

The sets (written into a throwaway folder, seeded):
- `fmnist-300`: Fashion-MNIST with `data.limit=300` (270 training, 30 validation, 300 test
  images) and batches of 32, the default model and trainer otherwise.
- `photos`: a two-class "detector" as the README's small-data path runs it: 200 training photos
  (100 coats, 100 pullovers) and a separate test folder of 50 (two thirds coats), 64x64 RGB
  JPEGs, `experiment=small_images`.
- `digits-8px`: ten classes of 8x8 grayscale images, 1,400 training and 360 test, the default
  model (`data=image_folder`, no preset).
- `fmnist-full` (only when named in `--sets`; about 30 minutes a seed on 2 AVX2 cores): all of
  Fashion-MNIST with the default config, to show that the recomputed statistics cost the
  default nothing. Recomputing them after the last epoch changes no weight, so each seed
  trains once, with Keras's moving averages (`trainer.precise_bn=false`), and the recomputed
  row is that saved model after `recompute_batchnorm_statistics`, exactly as
  `trainer.precise_bn=true` runs it, scored on the same test split. (A BatchNorm-free row
  needs `--variants "no BatchNorm"`.)

Each set runs three ways: `trainer.precise_bn=true` (the default: BatchNorm statistics
recomputed over the training images after the last epoch), `trainer.precise_bn=false` (Keras's
moving averages, as before), and `model.batch_norm=false` (`--variants` picks some of them).
`--overrides` adds Hydra overrides to every run, after the set's own (e.g. to try a value
before it goes into a preset). Results (mean and range of the test accuracy and macro F1) are
appended to benchmarks/results.md (`--out` another file).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.idx import read_idx  # noqa: E402
from pipeline.metric_names import TEST_ACCURACY  # noqa: E402

VARIANTS = {
    "BatchNorm, recomputed statistics": ["model.batch_norm=true", "trainer.precise_bn=true"],
    "BatchNorm, moving averages": ["model.batch_norm=true", "trainer.precise_bn=false"],
    "no BatchNorm": ["model.batch_norm=false", "trainer.precise_bn=false"],
}
RECOMPUTED, MOVING = list(VARIANTS)[:2]
FULL_SET = "fmnist-full"
SMALL_SETS = ["fmnist-300", "photos", "digits-8px"]


def write_folder(dest: Path, images: np.ndarray, labels: np.ndarray, names: dict[int, str],
                 size: int, mode: str, ext: str) -> None:
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        folder = dest / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert(mode).resize((size, size), Image.BILINEAR).save(
            folder / f"{i:05d}.{ext}")


def pick(labels: np.ndarray, counts: dict[int, int], rng: np.random.Generator,
         exclude: np.ndarray | None = None) -> np.ndarray:
    chosen = []
    for label, count in counts.items():
        pool = np.setdiff1d(np.flatnonzero(labels == label), exclude if exclude is not None
                            else [])
        chosen.append(rng.choice(pool, count, replace=False))
    return np.concatenate(chosen)


def make_sets(data: Path, work: Path) -> dict[str, list[str]]:
    """The sets' folders under `work`; return each set's overrides."""
    images = read_idx(data / "train-images-idx3-ubyte")
    labels = read_idx(data / "train-labels-idx1-ubyte")
    rng = np.random.default_rng(0)
    photos = {4: "coat", 2: "pullover"}
    train = pick(labels, {4: 100, 2: 100}, rng)
    test = pick(labels, {4: 33, 2: 17}, rng, exclude=train)
    for name, idx in (("train", train), ("test", test)):
        write_folder(work / "photos" / name, images[idx], labels[idx], photos, 64, "RGB", "jpg")
    digits = {c: f"class{c}" for c in range(10)}
    train = pick(labels, {c: 140 for c in range(10)}, rng)
    test = pick(labels, {c: 36 for c in range(10)}, rng, exclude=train)
    for name, idx in (("train", train), ("test", test)):
        write_folder(work / "digits" / name, images[idx], labels[idx], digits, 8, "L", "png")
    return {
        FULL_SET: [f"data.path={data}", f"data.test_path={data}"],
        "fmnist-300": [f"data.path={data}", f"data.test_path={data}", "data.limit=300",
                       "trainer.batch_size=32"],
        "photos": ["experiment=small_images", f"data.path={work / 'photos/train'}",
                   f"data.test_path={work / 'photos/test'}", "data.positive_class=coat"],
        "digits-8px": ["data=image_folder", f"data.path={work / 'digits/train'}",
                       f"data.test_path={work / 'digits/test'}", "data.image_size=[8,8]",
                       "data.color_mode=grayscale"],
    }


def run_set(name: str, overrides: list[str], seeds: list[int], work: Path,
            variants: list[str], extra: list[str] = ()) -> list[dict]:
    uri = f"sqlite:///{work / 'mlflow.db'}"
    rows = []
    trained = [v for v in variants if not (name == FULL_SET and v == RECOMPUTED)]
    if name == FULL_SET and RECOMPUTED in variants and MOVING not in trained:
        trained.append(MOVING)  # the recomputed row is read from these models
    for variant in trained:
        switches = VARIANTS[variant]
        experiment = f"small-data-{name}-{'-'.join(s.split('=')[1] for s in switches)}"
        sweep = work / "runs" / experiment
        subprocess.run([sys.executable, "-m", "pipeline", "-m", *overrides, *extra, *switches,
                        f"seed={','.join(map(str, seeds))}", f"mlflow.tracking_uri={uri}",
                        f"mlflow.experiment_name={experiment}", "invariance.max_shift=1",
                        f"hydra.sweep.dir={sweep}"],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        runs = read_runs(uri, experiment)
        if variant in variants:
            rows += [{"set": name, "variant": variant, **r} for r in runs]
        if variant == MOVING and name == FULL_SET and RECOMPUTED in variants:
            rows += [{"set": name, "variant": RECOMPUTED, **r} for r in recomputed(sweep, runs)]
    return rows


def recomputed(sweep: Path, runs: list[dict]) -> list[dict]:
    """Each saved model of a `trainer.precise_bn=false` sweep scored on its test split after
    the statistics recompute that `trainer.precise_bn=true` runs after the last epoch.

    The same model is scored first as saved; that must equal the test accuracy its run
    logged, or the two rows would not compare the same weights."""
    import keras
    from omegaconf import OmegaConf

    from pipeline import backend
    from pipeline.config import validate
    from pipeline.evaluate import evaluate
    from pipeline.prepare import read_meta, read_split
    from pipeline.train import recompute_batchnorm_statistics

    logged = {r["seed"]: r["accuracy"] for r in runs}
    rows = []
    for config in sorted(sweep.glob("*/.hydra/config.yaml")):
        job = config.parent.parent
        cfg = validate(OmegaConf.to_container(OmegaConf.load(config), resolve=True))
        prepared = job / cfg.paths.prepared
        class_names = read_meta(prepared)["class_names"]
        backend.configure(cfg.seed, cfg.trainer.deterministic, cfg.trainer.precision)
        model = keras.models.load_model(job / cfg.paths.model)
        x_test, y_test = read_split(prepared, "test")
        batch = cfg.trainer.batch_size
        as_saved = evaluate(model, x_test, y_test, class_names, batch)[0][TEST_ACCURACY]
        if abs(as_saved - logged[cfg.seed]) * len(y_test) > 0.5:
            sys.exit(f"seed {cfg.seed}: the saved model scores {as_saved:.4f}, its run logged "
                     f"{logged[cfg.seed]:.4f}; the rows would not compare the same weights")
        recompute_batchnorm_statistics(model, read_split(prepared, "train")[0], batch,
                                       cfg.seed, cfg.trainer.epochs)
        metrics = evaluate(model, x_test, y_test, class_names, batch)[0]
        rows.append({"seed": cfg.seed, "accuracy": metrics[TEST_ACCURACY],
                     "f1": metrics["macro_f1"], "warned": None})  # no stage judged it
    return rows


def read_runs(uri: str, experiment: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [{"seed": int(r.data.params["seed"]), "accuracy": r.data.metrics[TEST_ACCURACY],
             "f1": r.data.metrics["macro_f1"],
             "warned": "pipeline.warning" in r.data.tags}
            for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
            if TEST_ACCURACY in r.data.metrics]


def cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def warned(group: list[dict]) -> str:
    judged = [r["warned"] for r in group if r["warned"] is not None]
    return f"{sum(judged)} of {len(judged)}" if judged else "-"


def report(rows: list[dict], seeds: list[int], variants: list[str],
           extra: list[str] = (), sets: list[str] = SMALL_SETS) -> list[str]:
    lines = [f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
             "small datasets and BatchNorm", "",
             f"`python benchmarks/small_data.py --seeds {' '.join(map(str, seeds))}"
             f"{' --sets ' + ' '.join(sets) if sets != SMALL_SETS else ''}"
             f"{' --overrides ' + ' '.join(extra) if extra else ''}`"
             f" ({len(variants)} of {len(VARIANTS)} variants)", "",
             "| set | model | test accuracy, mean (min–max) | macro F1, mean (min–max) "
             "| runs warned |", "|---|---|---:|---:|---:|"]
    for name in dict.fromkeys(r["set"] for r in rows):
        for variant in variants:
            group = [r for r in rows if r["set"] == name and r["variant"] == variant]
            lines.append(f"| {name} | {variant} | {cell([r['accuracy'] for r in group])} | "
                         f"{cell([r['f1'] for r in group])} | "
                         f"{warned(group)} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--sets", nargs="+", default=SMALL_SETS,
                        choices=[*SMALL_SETS, FULL_SET])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        metavar="VARIANT", help=f"any of: {'; '.join(VARIANTS)}")
    parser.add_argument("--overrides", nargs="+", default=[], metavar="OVERRIDE",
                        help="Hydra overrides added to every run, e.g. model.dropout=0.1")
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="small-data-") as tmp:
        sets = make_sets(args.data, Path(tmp))
        rows = [row for name in args.sets
                for row in run_set(name, sets[name], args.seeds, Path(tmp), args.variants,
                                   args.overrides)]
    lines = report(rows, args.seeds, args.variants, args.overrides, args.sets)
    with args.out.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[2:]))


if __name__ == "__main__":
    main()
