"""The MLflow UI as a user sees it: a finished optimizer sweep rendered by headless Chromium.

A real `mlflow server` serves a SQLite store built through MLflow's client API (no TensorFlow);
Debian's Chromium (`make browser`) loads the runs table and the run comparison view, dumps the
rendered DOM and keeps a screenshot of each page beside it in the test's tmp folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipeline.tracking import PARENT_RUN_TAG, SWEEP_ID_TAG, SWEEP_PARENT_TAG
from tests.conftest import compose
from tests.servers import free_port, stop, wait_until_ok

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# Without the networking flags Chromium reaches for Google's hosts at every start; the resolver
# rule makes every host but 127.0.0.1 unresolvable, so the page can contact nothing else.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                  "--virtual-time-budget=15000"]
RUNS_WINDOW = (1400, 1000)
# The comparison view scrolls its run columns sideways and its metrics grid renders only the
# cells near the viewport (at 1400x1000 one run's metric column was missing from the DOM):
# at this size all four runs, with their params and metrics, are on screen.
COMPARE_WINDOW = (1800, 1600)
BROWSER_TIMEOUT_S = 60
SERVER_START_TIMEOUT_S = 60

EXPERIMENT = compose().mlflow.experiment_name
SWEEP_ID = "sweep-ui-0001"
SHARE_KEY = "sweep-ui-view"  # MLflow's share-view tag is mlflow.sharedViewState.<key>
EPOCH_METRICS = ("loss", "val_loss", "accuracy", "val_accuracy")
PARAM_KEYS = ("optimizer.name", "optimizer.learning_rate")
# (learning rate, test accuracy), created in this order. Three decimals, so both pages print
# them as written (the comparison view rounds to three), and an order unlike creation order, so
# a table sorted by test_accuracy differs from the default newest-first one.
CHILDREN = {"gd": (0.1, 0.812), "momentum": (0.05, 0.875),
            "rmsprop": (0.001, 0.844), "adam": (0.002, 0.906)}
BY_ACCURACY = sorted(CHILDREN, key=lambda name: CHILDREN[name][1], reverse=True)


def run_name(optimizer: str) -> str:
    return f"optimizer={optimizer}"


@dataclass
class Sweep:
    """A finished sweep in a SQLite store: its experiment and its child runs' ids by optimizer."""

    store: Path
    experiment_id: str
    child_ids: dict[str, str]


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's Chromium; skipped where absent, except in CI, which must never skip."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing; `make browser` installs Debian's chromium"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return CHROMIUM


def log_child(client: MlflowClient, experiment_id: str, parent_id: str, optimizer: str,
              t0: int) -> str:
    """One FINISHED child run: its params, three epochs of curves and the test accuracy."""
    learning_rate, test_accuracy = CHILDREN[optimizer]
    run = client.create_run(experiment_id, run_name=run_name(optimizer),
                            tags={PARENT_RUN_TAG: parent_id, SWEEP_ID_TAG: SWEEP_ID})
    run_id = run.info.run_id
    curves = [Metric(key, value, t0 + step, step)
              for step in (1, 2, 3)
              for key, value in zip(EPOCH_METRICS, (1.0 / step, 1.1 / step,
                                                    0.6 + 0.1 * step, 0.55 + 0.1 * step))]
    client.log_batch(run_id,
                     metrics=[*curves, Metric("test_accuracy", test_accuracy, t0 + 4, 0)],
                     params=[Param("optimizer.name", optimizer),
                             Param("optimizer.learning_rate", str(learning_rate))])
    client.set_terminated(run_id, "FINISHED")
    return run_id


def share_view(client: MlflowClient, experiment_id: str) -> None:
    """Store a shared runs-table view, as the UI's Share button does, under SHARE_KEY.

    A first visit to MLflow 3.17's runs table nests child runs under their collapsed parent and
    shows no metric or param columns (only Source, Models, Dataset). A shared view link carries
    the filter, sort and columns, so the page opens on the sweep's runs with their results.
    """
    view = {"searchFilter": f"tags.`{SWEEP_ID_TAG}` = '{SWEEP_ID}'",
            "orderByKey": "metrics.`test_accuracy`", "orderByAsc": False,
            "selectedColumns": ["metrics.`test_accuracy`",
                                *(f"params.`{key}`" for key in PARAM_KEYS)]}
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{SHARE_KEY}",
                              json.dumps(view))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """A SQLite store holding one finished four-optimizer sweep, written by MlflowClient."""
    root = tmp_path_factory.mktemp("mlflow")
    store = root / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment_id = client.create_experiment(EXPERIMENT,
                                             artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(experiment_id, run_name=f"sweep {SWEEP_ID}",
                               tags={SWEEP_ID_TAG: SWEEP_ID, SWEEP_PARENT_TAG: "true"})
    parent_id = parent.info.run_id
    t0 = parent.info.start_time
    child_ids = {name: log_child(client, experiment_id, parent_id, name, t0) for name in CHILDREN}
    client.set_terminated(parent_id, "FINISHED")
    share_view(client, experiment_id)
    return Sweep(store, experiment_id, child_ids)


def server_env() -> dict[str, str]:
    """This interpreter's tools first on PATH; no telemetry, no background job runners."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + environ.get("PATH", "")
    environ.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
                   MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    return environ


@pytest.fixture(scope="module")
def server(sweep: Sweep, chromium: Path) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port serving the sweep; yields its base URL."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = sweep.store.parent / "server.log"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server",
           "--backend-store-uri", f"sqlite:///{sweep.store}",
           "--default-artifact-root", (sweep.store.parent / "artifacts").as_uri(),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=sweep.store.parent, env=server_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ok(f"{base_url}/health", proc, log, SERVER_START_TIMEOUT_S)
        yield base_url
    finally:
        stop(proc)


class _Text(HTMLParser):
    """The text nodes of a document, stripped, outside <script>, <style> and <noscript>."""

    HIDDEN = {"script", "style", "noscript"}

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self._hidden += 1

    def handle_endtag(self, tag):
        if tag in self.HIDDEN and self._hidden:
            self._hidden -= 1

    def handle_data(self, data):
        if not self._hidden and data.strip():
            self.texts.append(data.strip())


def render(chromium: Path, url: str, screenshot: Path, window: tuple[int, int]) -> list[str]:
    """The text nodes of `url` as rendered by headless Chromium, in document order.

    Also writes a PNG of the `window`-sized page to `screenshot`. A fresh profile per call.
    """
    profile = screenshot.with_suffix(".profile")
    profile.mkdir()
    result = subprocess.run([str(chromium), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             "--window-size={},{}".format(*window),
                             f"--screenshot={screenshot}", "--dump-dom", url],
                            capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    errors = "\n".join(line for line in result.stderr.splitlines() if "dbus" not in line)
    assert result.returncode == 0, f"chromium exited {result.returncode}:\n{errors}"
    assert screenshot.stat().st_size > 0, f"chromium wrote no screenshot:\n{errors}"
    parser = _Text()
    parser.feed(result.stdout)
    return parser.texts


def positions(texts: list[str], wanted: list[str]) -> list[int]:
    """Where each of `wanted` first appears among the text nodes; fails naming the missing."""
    missing = [item for item in wanted if item not in texts]
    assert not missing, f"not on the page: {missing}; the page shows {texts}"
    return [texts.index(item) for item in wanted]


def test_runs_table_lists_the_sweep_sorted_by_test_accuracy(chromium, server, sweep, tmp_path):
    url = f"{server}/#/experiments/{sweep.experiment_id}/runs?viewStateShareKey={SHARE_KEY}"
    texts = render(chromium, url, tmp_path / "runs.png", RUNS_WINDOW)

    assert EXPERIMENT in texts
    names = positions(texts, [run_name(name) for name in BY_ACCURACY])
    assert names == sorted(names), f"rows not in test_accuracy order {BY_ACCURACY}: {texts}"
    header, *values = positions(texts, ["test_accuracy",
                                        *(str(CHILDREN[name][1]) for name in BY_ACCURACY)])
    assert header < values[0] and values == sorted(values), (
        f"test_accuracy column not in the rows' order: {texts}")
    positions(texts, [*PARAM_KEYS, *BY_ACCURACY])  # param columns: names and optimizer values


def test_compare_view_shows_the_four_runs_params_and_metrics(chromium, server, sweep, tmp_path):
    ids = [sweep.child_ids[name] for name in BY_ACCURACY]
    url = (f"{server}/#/compare-runs?runs={quote(json.dumps(ids))}"
           f"&experiments={quote(json.dumps([sweep.experiment_id]))}")
    texts = render(chromium, url, tmp_path / "compare.png", COMPARE_WINDOW)

    assert f"Comparing {len(ids)} Runs from 1 Experiment" in texts, texts
    names = positions(texts, [run_name(name) for name in BY_ACCURACY])
    assert names == sorted(names), f"run columns not in the order asked for: {texts}"
    assert f"sweep {SWEEP_ID}" not in texts, "the parent run is not one of those compared"
    positions(texts, [*PARAM_KEYS, *EPOCH_METRICS, "test_accuracy"])
    for column, values in (("learning rates", [CHILDREN[name][0] for name in BY_ACCURACY]),
                           ("test accuracies", [CHILDREN[name][1] for name in BY_ACCURACY])):
        cells = positions(texts, [str(value) for value in values])
        assert cells == sorted(cells), f"{column} not in the runs' column order: {texts}"
