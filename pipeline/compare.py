"""Command `compare`: the finished runs of a sweep or an experiment side by side.

    python -m pipeline.compare --sweep <sweep id>          # the runs of one sweep
    python -m pipeline.compare --experiment NAME           # every run of an experiment
    python -m pipeline.compare --runs <run id> <run id>    # chosen runs
    python -m pipeline.compare                             # the experiment in params.yaml

Reads the runs from the MLflow store (the project's `mlflow.db` unless --tracking-uri says
otherwise) and writes `comparison.md`, a Markdown table of the params that differ between the
runs with their final metrics, and `comparison.png`, their learning curves, under
`reports/<sweep id or experiment>/`. When the runs share one parent run (a sweep's), both files
are also added to the parent's artifacts; the parent's status is left as it is.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import project, tracking
from pipeline.config import PARAMS_FILE, load_params
from pipeline.errors import PipelineError, run_cli
from pipeline.figures import save_figure
from pipeline.files import write_text
from pipeline.metric_names import (
    ACCURACY,
    LOSS,
    TEST_ACCURACY,
    TEST_LOSS,
    VAL_ACCURACY,
    VAL_LOSS,
)
from pipeline.params import composed
from pipeline.tracking import PARENT_RUN_TAG, SWEEP_ID_TAG, SWEEP_PARENT_TAG

IGNORED_PARAM_PREFIXES = ("paths.", "mlflow.")  # differ between runs without changing results
EPOCH_PARAM = "trainer.epochs"
TABLE_METRICS = (TEST_ACCURACY, TEST_LOSS, VAL_ACCURACY, VAL_LOSS)
PANELS = ((LOSS, "train cost J"), (VAL_LOSS, "validation cost J"),
          (ACCURACY, "train accuracy"), (VAL_ACCURACY, "validation accuracy"))
REPORTS_DIR = "reports"
REPORT_MD = "comparison.md"
REPORT_PNG = "comparison.png"
STATUSES = [RunStatus.to_string(status) for status in RunStatus.all_status()]
DEFAULT_STATUSES = (RunStatus.to_string(RunStatus.FINISHED),)
MISSING = "—"

History = dict[str, list[tuple[int, float]]]  # metric -> [(epoch, value), ...] by epoch


class CompareError(PipelineError):
    """No runs to compare: an unknown experiment, sweep or run id, or none finished."""


def select_runs(client: MlflowClient, experiment: str | None = None,
                sweep_id: str | None = None, run_ids: Sequence[str] | None = None,
                statuses: Sequence[str] = DEFAULT_STATUSES) -> list[Run]:
    """The runs to compare, oldest first; never a sweep's parent run.

    Either `run_ids`, or an `experiment` and/or a `sweep_id` (both given: the sweep's runs in
    that experiment). Only runs whose status is in `statuses` are kept.

    Raises:
        CompareError: an unknown experiment, sweep or run id, or no run left to compare.
    """
    if run_ids:
        if experiment or sweep_id:
            raise CompareError("give run ids, or an experiment and/or a sweep, not both; "
                               "drop --experiment/--sweep or --runs")
        runs = [_named_run(client, run_id, statuses) for run_id in run_ids]
    else:
        runs = _searched_runs(client, experiment, sweep_id, statuses)
    return sorted(runs, key=lambda run: (run.info.start_time or 0, run.info.run_id))


def _named_run(client: MlflowClient, run_id: str, statuses: Sequence[str]) -> Run:
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise CompareError(f"run {run_id!r} not found in {client.tracking_uri}; copy the run id "
                           "from the MLflow UI or `mlflow runs list`") from None
    if _is_sweep_parent(run):
        sweep = run.data.tags.get(SWEEP_ID_TAG)
        raise CompareError(f"run {run_id!r} is the parent of sweep {sweep!r}, which has no "
                           f"metrics; compare its runs with --sweep {sweep}")
    if run.info.status not in statuses:
        raise CompareError(f"run {run_id!r} is {run.info.status}, not {'/'.join(statuses)}; "
                           f"drop it, or pass --status {run.info.status} to include it")
    return run


def _searched_runs(client: MlflowClient, experiment: str | None, sweep_id: str | None,
                   statuses: Sequence[str]) -> list[Run]:
    experiment_ids = ([_experiment_id(client, experiment)] if experiment
                      else _all_experiment_ids(client))
    if sweep_id:
        if any(quote in sweep_id for quote in "'\"`"):
            raise CompareError(f"sweep id {sweep_id!r} contains a quote; sweep ids never do, "
                               "check the id")
        candidates = _search(client, experiment_ids, f"tags.`{SWEEP_ID_TAG}` = '{sweep_id}'")
        if not candidates:
            raise CompareError(f"sweep {sweep_id!r}: no runs with tag {SWEEP_ID_TAG}={sweep_id} "
                               f"in {_where(client, experiment)}; "
                               f"{_known_sweeps(client, experiment_ids)}")
    else:
        candidates = _search(client, experiment_ids)
    children = [run for run in candidates if not _is_sweep_parent(run)]
    runs = [run for run in children if run.info.status in statuses]
    if not runs:
        what = f"sweep {sweep_id!r}" if sweep_id else f"experiment {experiment!r}"
        raise CompareError(f"{what} has no {'/'.join(statuses)} runs to compare "
                           f"({_status_counts(children)}); wait for its runs to end, or pass "
                           "--status with the statuses to include")
    return runs


def _is_sweep_parent(run: Run) -> bool:
    return run.data.tags.get(SWEEP_PARENT_TAG) == "true"


def _experiment_id(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is None or found.lifecycle_stage != "active":
        names = sorted(exp.name for exp in _all_experiments(client))
        raise CompareError(f"experiment {name!r} not found in {client.tracking_uri}; choose one "
                           f"of {', '.join(names) or '(none: no runs logged yet)'}")
    return found.experiment_id


def _all_experiments(client: MlflowClient) -> list:
    experiments, token = [], None
    while True:
        page = client.search_experiments(page_token=token)
        experiments.extend(page)
        token = page.token
        if not token:
            return experiments


def _all_experiment_ids(client: MlflowClient) -> list[str]:
    return [exp.experiment_id for exp in _all_experiments(client)]


def _search(client: MlflowClient, experiment_ids: list[str], filter_string: str = "") -> list[Run]:
    """Every active run of the experiments that matches the filter, page by page."""
    runs: list[Run] = []
    token = None
    while experiment_ids:
        page = client.search_runs(experiment_ids, filter_string, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def _where(client: MlflowClient, experiment: str | None) -> str:
    return f"experiment {experiment!r}" if experiment else client.tracking_uri


def _known_sweeps(client: MlflowClient, experiment_ids: list[str]) -> str:
    parents = _search(client, experiment_ids, f"tags.`{SWEEP_PARENT_TAG}` = 'true'")
    ids = [run.data.tags[SWEEP_ID_TAG] for run in parents if SWEEP_ID_TAG in run.data.tags]
    if not ids:
        return "there are no sweeps there; start one, or compare with --experiment or --runs"
    return f"the sweeps there are {', '.join(ids)}"


def _status_counts(runs: list[Run]) -> str:
    if not runs:
        return "it has no runs"
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.info.status] = counts.get(run.info.status, 0) + 1
    return "its runs: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def differing_params(runs: Sequence[Run]) -> list[str]:
    """The param keys whose values differ between the runs (a key some runs lack counts),
    sorted; `paths.*` and `mlflow.*` are ignored."""
    keys = sorted({key for run in runs for key in run.data.params
                   if not key.startswith(IGNORED_PARAM_PREFIXES)})
    return [key for key in keys if len({run.data.params.get(key) for run in runs}) > 1]


def run_name(run: Run) -> str:
    """The run's name, or its first 8 id characters when it has none."""
    return run.info.run_name or run.info.run_id[:8]


def run_labels(runs: Sequence[Run], keys: Sequence[str]) -> list[str]:
    """One legend label per run from its values of `keys`: `optimizer.name=adam, ...`.

    Keys some run lacks (an optimizer's own hyper-parameters) are left out when the keys every
    run has already tell the runs apart; the run name is put first where the label would be
    empty or the same as another run's.
    """
    shared = [key for key in keys if all(key in run.data.params for run in runs)]
    if shared and len({tuple(run.data.params[k] for k in shared) for run in runs}) == len(runs):
        keys = shared
    labels = [", ".join(f"{key}={run.data.params[key]}" for key in keys if key in run.data.params)
              for run in runs]
    return [label if label and labels.count(label) == 1
            else ": ".join(filter(None, (run_name(run), label)))
            for run, label in zip(runs, labels)]


def fetch_history(client: MlflowClient, run_id: str) -> History:
    """The per-epoch values (MLflow step = epoch) of the metrics the figure shows.

    A step logged twice (a resumed run) keeps its latest value.
    """
    history: History = {}
    for metric, _ in PANELS:
        points = sorted(client.get_metric_history(run_id, metric),
                        key=lambda m: (m.step, m.timestamp))
        by_epoch = {m.step: m.value for m in points}
        if by_epoch:
            history[metric] = sorted(by_epoch.items())
    return history


def epochs_run(history: History) -> int | None:
    """The last epoch with a logged value, or None when nothing was logged."""
    return max((epoch for series in history.values() for epoch, _ in series), default=None)


def comparison_table(runs: Sequence[Run],
                     histories: Mapping[str, History] | None = None) -> str:
    """A Markdown table, one row per run: name, short id, the params that differ, the final
    test and validation metrics, the epochs and the run's wall time (start to end).

    Args:
        runs: the runs, in the row order.
        histories: run id -> per-epoch history; the epochs column counts the logged epochs
            when given, else shows the `trainer.epochs` param.
    """
    keys = differing_params(runs)
    header = ["run", "run id", *keys, *TABLE_METRICS, "epochs", "wall time"]
    rows = [header, ["---"] * len(header)]
    for run in runs:
        if histories is not None:
            epochs = epochs_run(histories.get(run.info.run_id, {}))
        else:
            epochs = run.data.params.get(EPOCH_PARAM)
        rows.append([run_name(run), run.info.run_id[:8],
                     *(run.data.params.get(key, MISSING) for key in keys),
                     *(_number(run.data.metrics.get(metric)) for metric in TABLE_METRICS),
                     MISSING if epochs is None else str(epochs), _wall_time(run)])
    return "\n".join("| " + " | ".join(_cell(value) for value in row) + " |" for row in rows) + "\n"


def _number(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4f}"


def _cell(value: str) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _wall_time(run: Run) -> str:
    if not run.info.start_time or not run.info.end_time:
        return MISSING
    return format_duration((run.info.end_time - run.info.start_time) / 1000)


def count_runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def format_duration(seconds: float) -> str:
    """`12.3 s`, `4 min 05 s` or `1 h 02 min`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def plot_comparison(histories: Mapping[str, History], title: str | None = None) -> Figure:
    """Train and validation cost J and accuracy per epoch, one line per run, in 2x2 panels.

    Args:
        histories: legend label -> that run's per-epoch history, in the legend's order.
    """
    # a bare Figure, not pyplot: no backend and no global list of open figures
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True, sharey="row").ravel()  # rows: cost J, accuracy
    handles = {}  # label -> one of its lines, for the shared legend
    for i, (label, history) in enumerate(histories.items()):
        style = {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i // 10 % 4]}
        for ax, (metric, _) in zip(axes, PANELS):
            if history.get(metric):
                epochs, values = zip(*history[metric])
                handles[label] = ax.plot(epochs, values, marker="o", markersize=3, label=label,
                                         **style)[0]
    for ax, (_, name) in zip(axes, PANELS):
        ax.set_title(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("epoch")
    long_labels = max(map(len, handles), default=0) > 40
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncols=1 if long_labels else min(3, max(len(handles), 1)))
    fig.suptitle(title or f"Learning curves of {count_runs(len(histories))}")
    return fig


def report_markdown(title: str, table: str, figure_name: str) -> str:
    """The report: a heading, the table, and the figure below it."""
    return (f"# {title}\n\n{table}\nParams that every run shares are left out; MLflow holds "
            f"each run's whole config.\n\n![learning curves]({figure_name})\n")


def fetch_histories(client: MlflowClient, runs: Sequence[Run]) -> dict[str, History]:
    """Run id -> its per-epoch history, for each run."""
    return {run.info.run_id: fetch_history(client, run.info.run_id) for run in runs}


def write_report(client: MlflowClient, runs: Sequence[Run], out_dir: Path,
                 title: str | None = None,
                 histories: Mapping[str, History] | None = None) -> tuple[Path, Path]:
    """Write `comparison.md` and `comparison.png` for the runs into `out_dir`.

    Args:
        histories: the runs' histories if already fetched (see `fetch_histories`).

    Returns:
        The paths of the Markdown report and of the figure.
    """
    title = title or f"Comparison of {count_runs(len(runs))}"
    if histories is None:
        histories = fetch_histories(client, runs)
    labels = run_labels(runs, differing_params(runs))
    md_path, png_path = Path(out_dir) / REPORT_MD, Path(out_dir) / REPORT_PNG
    save_figure(plot_comparison({label: histories[run.info.run_id]
                                 for label, run in zip(labels, runs)}, title), png_path)
    write_text(md_path, report_markdown(title, comparison_table(runs, histories), REPORT_PNG))
    return md_path, png_path


def shared_parent(runs: Sequence[Run]) -> str | None:
    """The id of the parent run all the runs share, or None."""
    parents = {run.data.tags.get(PARENT_RUN_TAG) for run in runs}
    return parents.pop() if len(parents) == 1 and None not in parents else None


def log_to_parent(client: MlflowClient, runs: Sequence[Run],
                  paths: Sequence[Path]) -> str | None:
    """Add the files to the artifacts of the runs' shared parent (a sweep's), if they have one.

    Uses the client, not `mlflow.start_run`, so the parent's status and end time stay as they
    are. Returns the parent's run id, or None when the runs share no parent.
    """
    parent_id = shared_parent(runs)
    if parent_id:
        for path in paths:
            client.log_artifact(parent_id, str(path))
    return parent_id


def open_client(uri: str) -> MlflowClient:
    """A client of the store at `uri`; a SQLite store must exist (MLflow would create it)."""
    tracking.check_file_store(uri)
    database = tracking.missing_store(uri)
    if database:
        raise CompareError(f"no MLflow store at {database}; train a run first (dvc repro) "
                           "or pass --tracking-uri")
    return MlflowClient(tracking_uri=uri)


def default_experiment(root: Path) -> str:
    """The experiment `params.yaml` logs to, or the config's default without that file."""
    params = root / PARAMS_FILE
    if not params.is_file():
        return composed().mlflow.experiment_name
    return load_params(params).mlflow.experiment_name


def default_out_dir(root: Path, client: MlflowClient, runs: Sequence[Run]) -> Path:
    """`reports/<sweep id>/` when the runs share a sweep, else `reports/<experiment>/`."""
    sweeps = {run.data.tags.get(SWEEP_ID_TAG) for run in runs}
    experiments = {run.info.experiment_id for run in runs}
    if len(sweeps) == 1 and None not in sweeps:
        name = sweeps.pop()
    elif len(experiments) == 1:
        name = client.get_experiment(experiments.pop()).name
    else:
        name = "runs"
    return root / REPORTS_DIR / re.sub(r"[^\w.-]+", "_", name)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.compare",
        description="Compare finished MLflow runs: a Markdown table and their learning curves.")
    parser.add_argument("--experiment", metavar="NAME", help="compare the runs of this experiment "
                        "(default without --sweep/--runs: mlflow.experiment_name in params.yaml)")
    parser.add_argument("--sweep", metavar="ID", help="compare the runs of this sweep")
    parser.add_argument("--runs", nargs="+", metavar="ID", help="compare these runs")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="the MLflow store (default: mlflow.db at the project root)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="where to write the report (default: reports/<sweep or experiment>/)")
    parser.add_argument("--status", nargs="+", default=list(DEFAULT_STATUSES),
                        choices=STATUSES, metavar="STATUS",
                        help=f"the run statuses to include, of {', '.join(STATUSES)} "
                        "(default: FINISHED)")
    return parser.parse_args(argv)


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    root = project.project_root()
    configured = args.tracking_uri
    if configured is None and (root / PARAMS_FILE).is_file():
        configured = load_params(root / PARAMS_FILE).mlflow.tracking_uri
    client = open_client(tracking.tracking_uri(configured, root))
    experiment = args.experiment
    if not (experiment or args.sweep or args.runs):
        experiment = default_experiment(root)
    runs = select_runs(client, experiment, args.sweep, args.runs, args.status)
    source = (f"sweep {args.sweep}" if args.sweep else
              f"experiment {experiment}" if experiment else "chosen runs")
    histories = fetch_histories(client, runs)
    md_path, png_path = write_report(client, runs, args.out or default_out_dir(root, client, runs),
                                     f"Comparison of {count_runs(len(runs))}: {source}", histories)
    print(comparison_table(runs, histories))
    print(f"  report  {_shown(md_path)}\n  figure  {_shown(png_path)}")
    parent_id = log_to_parent(client, runs, (md_path, png_path))
    if parent_id:
        print(f"  MLflow  added to parent run {parent_id}")


if __name__ == "__main__":
    run_cli(main)
