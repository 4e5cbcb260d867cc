"""Test accuracy of the experiment presets and their training time in epochs of the default.

    make bench-accuracy     # python benchmarks/time_to_accuracy.py: fast and best, seeds 42 43 44
    python benchmarks/time_to_accuracy.py fast --seeds 42   # one preset, one seed
    python benchmarks/time_to_accuracy.py fast data.limit=3000   # Hydra overrides for every run
    python benchmarks/time_to_accuracy.py fast fast:augment.erase=0.5   # a trick, paired

Minutes mean nothing from one machine to the next (one epoch of the default took 35 s on one
2-core machine and 102-186 s on another), so training time is counted in **default-epoch
equivalents**: a preset's training wall time divided by the wall time of one epoch of the
default config (`bn_cnn`, batch 128, float32), both measured here, on this machine, in this
run. For each seed in turn the script runs the whole pipeline (`python -m pipeline`) once with
the default config for one epoch, then once per preset, into a throwaway folder and MLflow
store, and reads back from MLflow:

- the default's epoch: `epoch_seconds` of its one epoch (the optimizer steps, the validation
  pass and the checkpoint, its first-step start-up included);
- each preset's training time: `train_seconds`, the wall time of all its epochs and of the
  BatchNorm statistics recomputed after them; its `test_accuracy`, and `test_accuracy_tta`
  where the preset sets `evaluate.tta`.

A preset's equivalents in a round are its training time over that round's default epoch
(the two minutes apart, so that drifts in the machine's speed cancel), averaged over the seeds.
The evaluate stage's shift analysis is cut to one pixel (`invariance.max_shift=1`), which
changes nothing that is timed. Results are appended to benchmarks/results.md; the last line is

    time to accuracy: fast A.AAAA in E.E default epochs; best B.BBBB in F.F default epochs

(one part per preset measured, A and B the mean test accuracies over the seeds). A preset
followed by `:key=value` overrides (`fast:augment.erase=0.5:trainer.epochs=5`) is a variant of
it, run in the same rounds as the preset itself: a trick measured against its absence, paired
seed by seed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.compare import format_duration  # noqa: E402
from pipeline.metric_names import (  # noqa: E402
    EPOCH_SECONDS,
    TEST_ACCURACY,
    TEST_ACCURACY_TTA,
    TRAIN_SECONDS,
)

DEFAULT = "default"  # the reference: the default config, one epoch


def entry_config(name: str) -> list[str]:
    """The overrides of an entry: the default's one epoch, a preset, or a preset's variant
    (`fast:augment.erase=0.5:trainer.epochs=5`)."""
    if name == DEFAULT:
        return ["trainer.epochs=1"]
    preset, *overrides = name.split(":")
    return [f"experiment={preset}", *overrides]


def experiment_name(name: str) -> str:
    """The entry's MLflow experiment: letters, digits and - only."""
    return "time-to-accuracy-" + "".join(c if c.isalnum() else "-" for c in name)


def run_once(name: str, seed: int, workdir: Path, extra: list[str]) -> None:
    """One run of the pipeline: entry `name` with `seed`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PIPELINE_"))}
    print(f"seed {seed}: {name}", flush=True)
    subprocess.run([sys.executable, "-m", "pipeline", *entry_config(name), f"seed={seed}",
                    f"mlflow.tracking_uri={tracking_uri(workdir)}",
                    f"mlflow.experiment_name={experiment_name(name)}", "invariance.max_shift=1",
                    f"hydra.run.dir={workdir / 'runs' / experiment_name(name)}-{seed}",
                    *extra], cwd=ROOT, env=env, check=True)


def tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


def read_results(uri: str, name: str) -> dict[int, dict[str, float]]:
    """Seed -> the run's test accuracy (and its TTA accuracy), training seconds and epochs;
    for the default, its one epoch's seconds as the training seconds."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name(name))
    results = {}
    for run in client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'"):
        metrics = run.data.metrics
        epochs = client.get_metric_history(run.info.run_id, EPOCH_SECONDS)
        results[int(run.data.params["seed"])] = {
            "test_accuracy": metrics[TEST_ACCURACY], "tta": metrics.get(TEST_ACCURACY_TTA),
            "seconds": epochs[0].value if name == DEFAULT else metrics[TRAIN_SECONDS],
            "epochs": len(epochs)}
    return results


def summarize(presets: list[str], seeds: list[int],
              results: dict[str, dict[int, dict]]) -> dict[str, dict[str, float]]:
    """Per preset: mean test accuracy, its lowest seed, mean default-epoch equivalents."""
    reference = results[DEFAULT]
    return {name: {"accuracy": statistics.mean(results[name][s]["test_accuracy"] for s in seeds),
                   "lowest": min(results[name][s]["test_accuracy"] for s in seeds),
                   "equivalents": statistics.mean(results[name][s]["seconds"]
                                                  / reference[s]["seconds"] for s in seeds)}
            for name in presets}


def last_line(summary: dict[str, dict[str, float]]) -> str:
    return "time to accuracy: " + "; ".join(
        f"{name} {s['accuracy']:.4f} in {s['equivalents']:.1f} default epochs"
        for name, s in summary.items())


def report(presets: list[str], seeds: list[int], extra: list[str],
           results: dict[str, dict[int, dict]]) -> list[str]:
    from pipeline.backend import cpu_description

    command = " ".join(["python benchmarks/time_to_accuracy.py", *presets, *extra,
                        "--seeds", *map(str, seeds)])
    lines = [f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, time to "
             f"accuracy, {cpu_description()}, {os.cpu_count()} cores", "",
             f"`{command}`", "",
             "| seed | run | test accuracy | with TTA | training time | epochs | default epochs |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for seed in seeds:
        reference = results[DEFAULT][seed]["seconds"]
        for name in (DEFAULT, *presets):
            r = results[name][seed]
            label = ("default, 1 epoch (the unit)" if name == DEFAULT
                     else " ".join(entry_config(name)))
            tta = f"{r['tta']:.4f}" if r["tta"] is not None else "-"
            lines.append(f"| {seed} | {label} | {r['test_accuracy']:.4f} | {tta} | "
                         f"{format_duration(r['seconds'])} | {r['epochs']} | "
                         f"{r['seconds'] / reference:.2f} |")
    summary = summarize(presets, seeds, results)
    lines.append("")
    for name, s in summary.items():
        spread = statistics.stdev(results[name][x]["test_accuracy"] for x in seeds) \
            if len(seeds) > 1 else 0.0
        lines.append(f"- {' '.join(entry_config(name))}: mean test accuracy {s['accuracy']:.4f} ± "
                     f"{spread:.4f} over {len(seeds)} seeds (lowest {s['lowest']:.4f}), "
                     f"{s['equivalents']:.2f} default epochs of training")
    return [*lines, "", last_line(summary), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("items", nargs="*", metavar="PRESET_OR_OVERRIDE",
                        help="presets in conf/experiment (default: fast best), variants "
                             "(preset:key=value:...) and Hydra "
                             "overrides (key=value) for every run, the default's too")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.md")
    args = parser.parse_args()
    presets = [i for i in args.items if "=" not in i.split(":")[0]] or ["fast", "best"]
    extra = [i for i in args.items if "=" in i.split(":")[0]]
    known = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    missing = [p.split(":")[0] for p in presets if p.split(":")[0] not in known]
    if missing:
        sys.exit(f"error: no preset conf/experiment/{missing[0]}.yaml; name one of "
                 f"{', '.join(known)}")

    with tempfile.TemporaryDirectory(prefix="time-to-accuracy-") as tmp:
        for seed in args.seeds:  # a round: the unit, then each preset, minutes apart
            for name in (DEFAULT, *presets):
                run_once(name, seed, Path(tmp), extra)
        results = {name: read_results(tracking_uri(Path(tmp)), name)
                   for name in (DEFAULT, *presets)}
    lines = report(presets, args.seeds, extra, results)
    with args.out.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    print(f"results appended to {args.out}")
    print(lines[-2])


if __name__ == "__main__":
    main()
