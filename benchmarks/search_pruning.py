"""What pruning saves a hyperparameter search: the same seeded Optuna study with a pruner
(the median one by default) and without one, on the same machine in the same run.

    make bench-search      # python benchmarks/search_pruning.py
    python benchmarks/search_pruning.py --trials 4 --limit 1000 --epochs 2   # a quick look
    python benchmarks/search_pruning.py --pruner hyperband
    python benchmarks/search_pruning.py --pruner successive_halving
    python benchmarks/search_pruning.py hparams_search.startup_trials=3   # overrides for both

Each study is `python -m pipeline -m hparams_search=optuna` with `--trials` trials (16),
`data.limit` (10,000 images), `trainer.epochs` (up to 6: a trial stops earlier when pruned)
and the same seed, so both studies draw their first values alike; only `hparams_search.pruner`
differs (`--pruner`, then `none`, alternating which runs first over `--rounds`). Each runs in a
folder of its own outside the project: its own study storage, MLflow store and sweep folder,
so nothing reaches the project's `optuna.db`, `mlflow.db` or champion. Timed: the wall time of
the search process, start-up included. Read back from the study: the best validation
accuracy. Results are appended to benchmarks/results.md; the last line is exactly

    search: pruning took X.XX of the time, best val_accuracy A.AAAA vs B.BBBB

X.XX the median over the rounds of (time with pruning / time without), A the best validation
accuracy with pruning and B without (their medians over the rounds).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PRUNERS = ("median", "hyperband", "successive_halving")  # each measured against "none"


def study(pruner: str, args: argparse.Namespace, folder: Path) -> dict:
    """One search with `pruner` in `folder`; its wall time, best value and trial states."""
    import optuna

    folder.mkdir(parents=True)
    storage = f"sqlite:///{folder / 'optuna.db'}"
    command = [sys.executable, "-m", "pipeline", "-m", "hparams_search=optuna",
               f"hparams_search.study_name=bench-{pruner}", f"hparams_search.storage={storage}",
               f"hparams_search.n_trials={args.trials}", f"hparams_search.pruner={pruner}",
               f"data.limit={args.limit}", f"trainer.epochs={args.epochs}", f"seed={args.seed}",
               f"mlflow.tracking_uri=sqlite:///{folder / 'mlflow.db'}",
               f"hydra.sweep.dir={folder / 'sweep'}", *args.overrides]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PIPELINE_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    started = time.monotonic()
    with (folder / "search.log").open("w") as log:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"search_pruning: the {pruner} search exited {done.returncode}; see "
                 f"{folder / 'search.log'}")
    result = optuna.load_study(study_name=f"bench-{pruner}", storage=storage)
    states = [t.state.name for t in result.trials]
    epochs = sum(t.last_step or 0 for t in result.trials)
    print(f"  {pruner:6s} {seconds:7.1f} s, best val_accuracy {result.best_value:.4f}, "
          f"{states.count('PRUNED')} of {len(states)} pruned, {epochs} epochs trained",
          flush=True)
    return {"seconds": seconds, "best": result.best_value, "pruned": states.count("PRUNED"),
            "trials": len(states), "epochs": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--limit", type=int, default=10_000, help="data.limit of each trial")
    parser.add_argument("--epochs", type=int, default=6, help="trainer.epochs of each trial")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--pruner", choices=PRUNERS, default="median",
                        help="the pruner measured against none (hparams_search.pruner)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.md")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for both searches")
    args = parser.parse_args()
    from pipeline.backend import cpu_description

    pruners = (args.pruner, "none")
    runs: dict[str, list[dict]] = {p: [] for p in pruners}
    with tempfile.TemporaryDirectory(prefix="search-bench-") as tmp:
        for round_ in range(args.rounds):
            order = pruners if round_ % 2 == 0 else pruners[::-1]
            print(f"round {round_ + 1} of {args.rounds}", flush=True)
            for pruner in order:
                runs[pruner].append(study(pruner, args, Path(tmp) / f"{round_}-{pruner}"))
    ratio = statistics.median(p["seconds"] / n["seconds"]
                              for p, n in zip(runs[args.pruner], runs["none"]))
    best = {p: statistics.median(r["best"] for r in runs[p]) for p in pruners}
    lines = [
        f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, search "
        f"pruning, {cpu_description()}, {os.cpu_count()} cores",
        "",
        f"`python benchmarks/search_pruning.py --trials {args.trials} --limit {args.limit} "
        f"--epochs {args.epochs} --seed {args.seed} --rounds {args.rounds} "
        f"--pruner {args.pruner}{''.join(' ' + o for o in args.overrides)}` (the same seeded "
        f"study with the {args.pruner} pruner and with none; wall time of each search process)",
        "",
        "| pruner | wall time (s) | best val_accuracy | trials pruned | epochs trained |",
        "|---|---:|---:|---:|---:|",
    ]
    for pruner in pruners:
        for r in runs[pruner]:
            lines.append(f"| {pruner} | {r['seconds']:.0f} | {r['best']:.4f} | "
                         f"{r['pruned']} of {r['trials']} | {r['epochs']} |")
    summary = (f"search: pruning took {ratio:.2f} of the time, best val_accuracy "
               f"{best[args.pruner]:.4f} vs {best['none']:.4f}")
    lines += ["", summary, ""]
    with args.out.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"results appended to {args.out}")
    print(summary)


if __name__ == "__main__":
    main()
