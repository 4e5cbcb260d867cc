"""`python -m pipeline.compare` on a real MLflow SQLite store holding a small sweep."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipeline.compare import (
    CompareError,
    comparison_table,
    default_experiment,
    default_out_dir,
    differing_params,
    fetch_history,
    format_duration,
    log_to_parent,
    open_client,
    plot_comparison,
    run_labels,
    select_runs,
    write_report,
)
from pipeline.params import write_params
from tests.conftest import REPO, run

EXPERIMENT = "fashion-mnist-cnn"
SWEEP = "sweep-0001"
T0 = 1_700_000_000_000  # ms
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMON = {"seed": "42", "model.name": "small_cnn", "trainer.epochs": "3", "data.limit": "300"}


@dataclass
class FakeRun:
    """What one run of the store holds; `start` and `seconds` are its start and wall time."""

    name: str
    start: int
    seconds: int
    params: dict[str, str]
    curves: dict[str, list[float]]
    test: dict[str, float]
    status: str = "FINISHED"


def curves(loss, val_loss, accuracy, val_accuracy):
    return {"loss": loss, "val_loss": val_loss, "accuracy": accuracy,
            "val_accuracy": val_accuracy, "learning_rate": [0.01, 0.005, 0.001]}


# Created in this order; by start time they are sgd, baseline, momentum, adam, adamw.
CHILDREN = [
    FakeRun("adam", 400, 3725, {"optimizer.name": "adam", "optimizer.learning_rate": "0.001"},
            curves([0.60, 0.40, 0.30], [0.55, 0.45, 0.42], [0.78, 0.86, 0.89],
                   [0.80, 0.85, 0.84]),
            {"test_accuracy": 0.8412, "test_loss": 0.4321}),
    FakeRun("momentum", 200, 47, {"optimizer.name": "momentum",
                                  "optimizer.learning_rate": "0.01", "optimizer.momentum": "0.9"},
            curves([0.90, 0.60, 0.50], [0.80, 0.62, 0.58], [0.68, 0.78, 0.82],
                   [0.71, 0.79, 0.77]),
            {"test_accuracy": 0.7654, "test_loss": 0.5876}),
    FakeRun("sgd", 0, 125, {"optimizer.name": "gd", "optimizer.learning_rate": "0.01"},
            curves([1.20, 0.90, 0.80], [1.10, 0.95, 0.90], [0.55, 0.66, 0.70],
                   [0.61, 0.70, 0.69]),
            {"test_accuracy": 0.6811, "test_loss": 0.8123}),
    FakeRun("adamw", 600, 30, {"optimizer.name": "adamw", "optimizer.learning_rate": "0.001"},
            curves([0.7, 0.5, 0.4], [0.6, 0.5, 0.5], [0.7, 0.8, 0.85], [0.7, 0.8, 0.8]),
            {}, status="FAILED"),
]
BASELINE = FakeRun("baseline", 50, 10, {"optimizer.name": "adam",
                                        "optimizer.learning_rate": "0.001"},
                   curves([0.5, 0.4, 0.3], [0.5, 0.4, 0.4], [0.8, 0.85, 0.9], [0.8, 0.85, 0.86]),
                   {"test_accuracy": 0.8555, "test_loss": 0.4})


@dataclass
class Store:
    client: MlflowClient
    uri: str
    ids: dict[str, str]  # run name -> run id
    parent_id: str


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A migrated, empty SQLite store to copy: creating the schema takes seconds."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def add_run(client: MlflowClient, experiment_id: str, fake: FakeRun, tags: dict[str, str]) -> str:
    run_id = client.create_run(experiment_id, start_time=T0 + fake.start * 1000, tags=tags,
                               run_name=fake.name).info.run_id
    params = {**COMMON, **fake.params, "paths.model": f"runs/{fake.name}/model.keras",
              "mlflow.tracking_uri": f"sqlite:///{fake.name}.db"}  # differ, but are ignored
    metrics = [Metric(key, value, T0 + epoch, epoch)
               for key, values in fake.curves.items() for epoch, value in enumerate(values, 1)]
    metrics += [Metric(key, value, T0 + 10, 0) for key, value in fake.test.items()]
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    if fake.status != "RUNNING":
        client.set_terminated(run_id, fake.status, end_time=T0 + (fake.start + fake.seconds) * 1000)
    return run_id


@pytest.fixture
def store(tmp_path: Path, empty_store: Path) -> Store:
    """A sweep (parent, 3 finished runs, 1 failed), an unrelated run in the same experiment,
    one in another experiment, and an experiment with only a running run."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    artifacts = (tmp_path / "mlartifacts").as_uri()
    exp = client.create_experiment(EXPERIMENT, artifact_location=artifacts)
    parent_id = client.create_run(exp, start_time=T0 - 1000, run_name="sweep",
                                  tags={"sweep.id": SWEEP, "sweep.parent": "true"}).info.run_id
    client.log_batch(parent_id, params=[Param(k, v) for k, v in COMMON.items()])
    client.set_terminated(parent_id, "FINISHED", end_time=T0 + 2_000_000)
    ids = {fake.name: add_run(client, exp, fake, {"sweep.id": SWEEP,
                                                  "mlflow.parentRunId": parent_id})
           for fake in CHILDREN}
    ids["baseline"] = add_run(client, exp, BASELINE, {})
    other = client.create_experiment("other", artifact_location=artifacts)
    ids["elsewhere"] = add_run(client, other, BASELINE, {})
    empty = client.create_experiment("empty", artifact_location=artifacts)
    ids["running"] = add_run(client, empty, FakeRun("running", 0, 0, {}, {}, {}, "RUNNING"), {})
    return Store(client, uri, ids, parent_id)


def names(runs) -> list[str]:
    return [r.info.run_name for r in runs]


def table_rows(table: str) -> dict[str, dict[str, str]]:
    """Run name -> {column: cell} of a Markdown table."""
    lines = [[cell.strip() for cell in line.strip().strip("|").split("|")]
             for line in table.strip().splitlines()]
    header, rule, *body = lines
    assert set(rule) == {"---"} and all(len(row) == len(header) for row in body)
    return {row[0]: dict(zip(header, row)) for row in body}


def test_select_by_sweep_gives_the_finished_children_by_start_time(store):
    runs = select_runs(store.client, sweep_id=SWEEP)
    assert names(runs) == ["sgd", "momentum", "adam"]


def test_select_by_sweep_can_include_other_statuses_but_never_the_parent(store):
    runs = select_runs(store.client, sweep_id=SWEEP, statuses=("FINISHED", "FAILED"))
    assert names(runs) == ["sgd", "momentum", "adam", "adamw"]


def test_select_by_experiment_leaves_out_the_parent_and_other_experiments(store):
    runs = select_runs(store.client, experiment=EXPERIMENT)
    assert names(runs) == ["sgd", "baseline", "momentum", "adam"]
    assert [r.info.run_id for r in select_runs(store.client, experiment="other")] == [
        store.ids["elsewhere"]]


def test_select_by_run_ids_orders_by_start_time(store):
    runs = select_runs(store.client, run_ids=[store.ids["adam"], store.ids["baseline"],
                                              store.ids["sgd"]])
    assert names(runs) == ["sgd", "baseline", "adam"]


@pytest.mark.parametrize("selection, message", [
    (lambda s: {"experiment": "nope"},
     r"^experiment 'nope' not found in sqlite:.*; choose one of .*fashion-mnist-cnn"),
    (lambda s: {"sweep_id": "nope"}, rf"^sweep 'nope': no runs .*the sweeps there are {SWEEP}$"),
    (lambda s: {"run_ids": [s.ids["sgd"], "0" * 32]}, r"^run '0{32}' not found"),
    (lambda s: {"run_ids": [s.parent_id]}, rf"is the parent of sweep '{SWEEP}'.*--sweep {SWEEP}"),
    (lambda s: {"run_ids": [s.ids["adamw"]]}, r"is FAILED, not FINISHED.*--status FAILED"),
    (lambda s: {"experiment": "empty"}, r"^experiment 'empty' has no FINISHED runs .*1 RUNNING"),
    (lambda s: {"experiment": EXPERIMENT, "run_ids": [s.ids["sgd"]]}, r"not both"),
])
def test_bad_selections_fail_with_one_line(store, selection, message):
    with pytest.raises(CompareError, match=message) as err:
        select_runs(store.client, **selection(store))
    assert "\n" not in str(err.value)


def test_differing_params_ignore_paths_and_mlflow_keys(store):
    runs = select_runs(store.client, sweep_id=SWEEP)
    assert differing_params(runs) == ["optimizer.learning_rate", "optimizer.momentum",
                                      "optimizer.name"]
    sgd, momentum, _ = runs
    assert differing_params([sgd, momentum]) == ["optimizer.momentum", "optimizer.name"]
    assert differing_params([sgd]) == []


def test_run_labels_name_the_differing_values(store):
    runs = select_runs(store.client, sweep_id=SWEEP)
    assert run_labels(runs, differing_params(runs)) == [
        "optimizer.learning_rate=0.01, optimizer.name=gd",
        "optimizer.learning_rate=0.01, optimizer.name=momentum",
        "optimizer.learning_rate=0.001, optimizer.name=adam",
    ]  # optimizer.momentum, which gd and adam lack, is not needed to tell the runs apart
    assert run_labels(runs, ["optimizer.learning_rate", "optimizer.momentum"]) == [
        "optimizer.learning_rate=0.01",  # the rate alone does not tell sgd from momentum,
        "optimizer.learning_rate=0.01, optimizer.momentum=0.9",  # so momentum stays
        "optimizer.learning_rate=0.001",
    ]
    assert run_labels(runs, ["optimizer.learning_rate"]) == [
        "sgd: optimizer.learning_rate=0.01", "momentum: optimizer.learning_rate=0.01",
        "optimizer.learning_rate=0.001"]  # run names where labels would repeat
    assert run_labels(runs, []) == ["sgd", "momentum", "adam"]


def test_comparison_table_has_the_final_metrics_and_wall_times(store):
    runs = select_runs(store.client, sweep_id=SWEEP)
    histories = {r.info.run_id: fetch_history(store.client, r.info.run_id) for r in runs}
    rows = table_rows(comparison_table(runs, histories))
    assert list(rows) == ["sgd", "momentum", "adam"]
    assert list(rows["sgd"]) == ["run", "run id", "optimizer.learning_rate",
                                 "optimizer.momentum", "optimizer.name", "test_accuracy",
                                 "test_loss", "val_accuracy", "val_loss", "epochs", "wall time"]
    assert rows["sgd"] == {
        "run": "sgd", "run id": store.ids["sgd"][:8], "optimizer.learning_rate": "0.01",
        "optimizer.momentum": "—", "optimizer.name": "gd", "test_accuracy": "0.6811",
        "test_loss": "0.8123", "val_accuracy": "0.6900", "val_loss": "0.9000", "epochs": "3",
        "wall time": "2 min 05 s"}
    assert (rows["momentum"]["optimizer.momentum"], rows["momentum"]["val_accuracy"],
            rows["momentum"]["wall time"]) == ("0.9", "0.7700", "47.0 s")
    assert (rows["adam"]["test_accuracy"], rows["adam"]["val_loss"],
            rows["adam"]["wall time"]) == ("0.8412", "0.4200", "1 h 02 min")
    assert table_rows(comparison_table(runs))["adam"]["epochs"] == "3"  # from trainer.epochs


def test_fetch_history_keeps_the_latest_value_of_a_repeated_epoch(store):
    run_id = store.ids["momentum"]
    store.client.log_metric(run_id, "loss", 0.55, timestamp=T0 + 100, step=2)  # epoch 2 again
    history = fetch_history(store.client, run_id)
    assert history["loss"] == [(1, 0.90), (2, 0.55), (3, 0.50)]
    assert history["val_accuracy"] == [(1, 0.71), (2, 0.79), (3, 0.77)]
    assert set(history) == {"loss", "val_loss", "accuracy", "val_accuracy"}


def test_plot_comparison_draws_one_line_per_run_in_each_panel():
    a = {"loss": [(1, 1.0), (2, 0.5)], "val_loss": [(1, 1.1), (2, 0.7)],
         "accuracy": [(1, 0.6), (2, 0.8)], "val_accuracy": [(1, 0.5), (2, 0.7)]}
    b = {key: [(epoch, value / 2) for epoch, value in series] for key, series in a.items()}
    fig = plot_comparison({"optimizer.name=gd": a, "optimizer.name=adam": b})
    panels = fig.axes
    assert [ax.get_title() for ax in panels] == ["train cost J", "validation cost J",
                                                 "train accuracy", "validation accuracy"]
    for ax, metric in zip(panels, ("loss", "val_loss", "accuracy", "val_accuracy")):
        assert [list(line.get_ydata()) for line in ax.get_lines()] == [
            [v for _, v in a[metric]], [v for _, v in b[metric]]]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["optimizer.name=gd",
                                                                  "optimizer.name=adam"]


def test_write_report_writes_the_markdown_and_the_png(store, tmp_path):
    runs = select_runs(store.client, sweep_id=SWEEP)
    out = tmp_path / "report"
    md, png = write_report(store.client, runs, out)
    assert (md, png) == (out / "comparison.md", out / "comparison.png")
    assert sorted(p.name for p in out.iterdir()) == ["comparison.md", "comparison.png"]
    assert png.read_bytes()[:8] == PNG_MAGIC
    text = md.read_text()
    assert text.startswith("# Comparison of 3 runs\n")
    assert "![learning curves](comparison.png)" in text
    assert table_rows(text.split("\n\n")[1])["adam"]["test_accuracy"] == "0.8412"


def test_log_to_parent_adds_the_report_and_leaves_the_parent_as_it_was(store, tmp_path):
    before = store.client.get_run(store.parent_id).info
    assert store.client.list_artifacts(store.parent_id) == []
    runs = select_runs(store.client, sweep_id=SWEEP)
    paths = write_report(store.client, runs, tmp_path / "report")
    assert log_to_parent(store.client, runs, paths) == store.parent_id
    assert sorted(a.path for a in store.client.list_artifacts(store.parent_id)) == [
        "comparison.md", "comparison.png"]
    after = store.client.get_run(store.parent_id).info
    assert (after.status, after.end_time) == (before.status, before.end_time) == (
        "FINISHED", T0 + 2_000_000)


def test_runs_without_a_shared_parent_log_nowhere(store, tmp_path):
    runs = select_runs(store.client, run_ids=[store.ids["sgd"], store.ids["baseline"]])
    paths = write_report(store.client, runs, tmp_path / "report")
    assert log_to_parent(store.client, runs, paths) is None
    for name in ("sgd", "baseline"):
        assert store.client.list_artifacts(store.ids[name]) == []
    assert store.client.list_artifacts(store.parent_id) == []


def test_default_out_dir_is_named_after_the_sweep_or_the_experiment(store, tmp_path):
    def out(*run_names):
        runs = select_runs(store.client, run_ids=[store.ids[n] for n in run_names])
        return default_out_dir(tmp_path, store.client, runs)

    assert out("sgd", "adam") == tmp_path / "reports" / SWEEP
    assert out("sgd", "baseline") == tmp_path / "reports" / EXPERIMENT
    assert out("baseline", "elsewhere") == tmp_path / "reports" / "runs"


def test_default_experiment_comes_from_params_yaml(tmp_path):
    assert default_experiment(tmp_path) == "fashion-mnist-cnn"  # no params.yaml
    write_params(["mlflow.experiment_name=my-experiment"], tmp_path / "params.yaml")
    assert default_experiment(tmp_path) == "my-experiment"


def test_a_missing_sqlite_store_is_an_error_not_a_new_store(tmp_path):
    with pytest.raises(CompareError, match="no MLflow store at .*missing.db"):
        open_client(f"sqlite:///{tmp_path / 'missing.db'}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seconds, text", [(12.34, "12.3 s"), (125, "2 min 05 s"),
                                           (3725, "1 h 02 min")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def compare(store: Store, *args: str):
    return run([sys.executable, "-m", "pipeline.compare", "--tracking-uri", store.uri, *args],
               cwd=REPO, check=False, timeout=120)


def test_cli_prints_the_table_and_writes_the_report(store, tmp_path):
    out = tmp_path / "out"
    result = compare(store, "--sweep", SWEEP, "--out", str(out))
    assert result.returncode == 0, result.stderr
    table = "\n".join(line for line in result.stdout.splitlines() if line.startswith("|"))
    rows = table_rows(table)
    assert list(rows) == ["sgd", "momentum", "adam"]
    assert rows["momentum"]["test_accuracy"] == "0.7654"
    assert f"report  {out / 'comparison.md'}" in result.stdout
    assert f"added to parent run {store.parent_id}" in result.stdout
    assert (out / "comparison.png").read_bytes()[:8] == PNG_MAGIC
    assert table_rows((out / "comparison.md").read_text().split("\n\n")[1]) == rows


def test_cli_unknown_sweep_is_one_error_line_and_writes_nothing(store, tmp_path):
    out = tmp_path / "out"
    result = compare(store, "--sweep", "nope", "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: sweep 'nope': no runs with tag sweep.id=nope")
    assert result.stdout == ""
    assert not out.exists()
    assert store.client.list_artifacts(store.parent_id) == []
