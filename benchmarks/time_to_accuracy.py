"""Test accuracy and training time of an experiment preset, as the mean over seeds.

    python benchmarks/time_to_accuracy.py fast            # experiment=fast, seeds 42 43 44
    python benchmarks/time_to_accuracy.py best --seeds 42 43 44

Runs the whole pipeline (`python -m pipeline -m experiment=NAME seed=...`, a Hydra multirun,
one seed after the other) into a throwaway folder and MLflow store, then reads each run's test
accuracy and training time back from MLflow. Training time is the sum of the epochs' wall
times (`epoch_seconds`, which the train stage logs per epoch): the optimizer steps, the
validation pass and the checkpoint, not data loading or evaluation. The evaluate stage's shift
analysis is cut to one pixel (`invariance.max_shift=1`), which changes nothing that is timed.
Results are appended to benchmarks/results.md with the command.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.compare import format_duration  # noqa: E402
from pipeline.metric_names import EPOCH_SECONDS, TEST_ACCURACY  # noqa: E402


def run_sweep(experiment: str, seeds: list[int], workdir: Path, extra: list[str]) -> str:
    """Run the preset once per seed; return the MLflow tracking URI they logged to."""
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    subprocess.run([sys.executable, "-m", "pipeline", "-m", f"experiment={experiment}",
                    f"seed={','.join(map(str, seeds))}", f"mlflow.tracking_uri={uri}",
                    f"mlflow.experiment_name=time-to-accuracy-{experiment}",
                    "invariance.max_shift=1", f"hydra.sweep.dir={workdir / 'runs'}", *extra],
                   cwd=ROOT, check=True)
    return uri


def read_results(uri: str, experiment: str) -> list[dict[str, float]]:
    """One row per seed: seed, test accuracy, training seconds, epochs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(f"time-to-accuracy-{experiment}")
    rows = []
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'"):
        if TEST_ACCURACY not in run.data.metrics:
            continue  # the sweep's parent run
        seconds = client.get_metric_history(run.info.run_id, EPOCH_SECONDS)
        rows.append({"seed": int(run.data.params["seed"]),
                     "test_accuracy": run.data.metrics[TEST_ACCURACY],
                     "train_seconds": sum(m.value for m in seconds), "epochs": len(seconds)})
    return sorted(rows, key=lambda r: r["seed"])


def report(experiment: str, seeds: list[int], extra: list[str], rows: list[dict]) -> list[str]:
    acc = [r["test_accuracy"] for r in rows]
    secs = [r["train_seconds"] for r in rows]
    command = " ".join(["python benchmarks/time_to_accuracy.py", experiment, *extra,
                        "--seeds", *map(str, seeds)])
    lines = [f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
             f"experiment={experiment}, time to accuracy", "",
             f"`{command}`", "",
             "| seed | test accuracy | training time | epochs |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['seed']} | {r['test_accuracy']:.4f} | {format_duration(r['train_seconds'])}"
              f" | {r['epochs']} |" for r in rows]
    spread = f" ± {statistics.stdev(acc):.4f}" if len(acc) > 1 else ""
    lines += ["", f"experiment={experiment}: mean test accuracy {statistics.mean(acc):.4f}"
                  f"{spread} over {len(rows)} seeds, mean training time "
                  f"{format_duration(statistics.mean(secs))} "
                  f"(longest {format_duration(max(secs))})", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="a preset in conf/experiment, e.g. fast or best")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.md")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="time-to-accuracy-") as tmp:
        uri = run_sweep(args.experiment, args.seeds, Path(tmp), args.overrides)
        rows = read_results(uri, args.experiment)
    if len(rows) != len(args.seeds):
        sys.exit(f"error: {len(rows)} of {len(args.seeds)} runs finished; see the output above")
    lines = report(args.experiment, args.seeds, args.overrides, rows)
    with args.out.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[2:]))
    print(f"results appended to {args.out}")


if __name__ == "__main__":
    main()
