"""Searches of several processes sharing one study: `hparams_search.n_jobs` on one machine, and
the same command started again beside it (what each machine of a team runs), against a shared
SQLite file and against a real PostgreSQL server that is also an `mlflow server`'s store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import env
from tests.servers import free_port, stop, wait_until_ok
from tests.test_search import search_command, sweep_runs, sweep_tree

pytestmark = pytest.mark.slow

N_TRIALS = 4
ONE_EPOCH = "trainer.epochs=1"


def start(command: list[str], cwd: Path, extra_env: dict[str, str] | None = None,
          log: Path | None = None) -> subprocess.Popen:
    out = log.open("w") if log else subprocess.PIPE
    return subprocess.Popen(command, cwd=cwd, env={**env(), **(extra_env or {})},
                            stdout=out, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen], logs: list[Path]) -> list[str]:
    outputs = []
    for proc, log in zip(procs, logs):
        proc.wait(timeout=900)
        outputs.append(log.read_text())
        assert proc.returncode == 0, outputs[-1][-3000:]
    return outputs


def check_shared_study(study, parent, children, outputs: list[str]) -> None:
    """Every trial ran once, in one of several processes, under the one parent run."""
    from optuna.trial import TrialState

    assert len(study.trials) == N_TRIALS, [t.state for t in study.trials]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert len({t.user_attrs["pipeline.pid"] for t in study.trials}) >= 2
    assert sorted(children) == list(range(N_TRIALS))
    assert all(len(runs) == 1 for runs in children.values())
    assert {runs[0].info.run_id for runs in children.values()} == {
        t.user_attrs["mlflow.run_id"] for t in study.trials}
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best.run_id"] == study.best_trial.user_attrs["mlflow.run_id"]
    assert sum("best trial" in out for out in outputs) >= 1


def test_n_jobs_and_a_second_search_share_one_sqlite_study(project):
    """`n_jobs=2` (two processes) and a second command beside them on the same optuna.db: four
    trials in all, each run once, one parent run in MLflow."""
    import optuna

    logs = [project / "first.log", project / "second.log"]
    procs = [start(search_command("shared", N_TRIALS, ONE_EPOCH, "hparams_search.n_jobs=2"),
                   project, log=logs[0]),
             start(search_command("shared", N_TRIALS, ONE_EPOCH, "hparams_search.sampler_seed=7"),
                   project, log=logs[1])]
    outputs = finish(procs, logs)
    assert "1 more process(es) share the study" in outputs[0]
    study = optuna.load_study(study_name="shared",
                              storage=f"sqlite:///{project / 'optuna.db'}")
    parent, children = sweep_runs(project, "shared")
    check_shared_study(study, parent, children, outputs)
    assert len({t.user_attrs["pipeline.pid"] for t in study.trials}) >= 2


POSTGRES_BIN = Path("/usr/lib/postgresql")


def postgres_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(POSTGRES_BIN.glob(f"*/bin/{name}"))
    return str(versions[-1]) if versions else None


@pytest.fixture
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 (Debian's package) with databases `optuna` and
    `mlflow`; yields its URL without a database. As root, the server runs as `postgres`."""
    initdb, pg_ctl = postgres_tool("initdb"), postgres_tool("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server here (Debian: apt-get install postgresql)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="pipeline-postgres-"))
    if as_user:
        shutil.chown(home, "postgres")
    port = free_port()
    data = home / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "pipeline"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(home / "log"), "-w", "-o",
                    f"-c listen_addresses=127.0.0.1 -p {port} -k {home}", "start"],
                   check=True, capture_output=True)
    try:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="pipeline", dbname="postgres",
                             autocommit=True) as connection:
            connection.execute("CREATE DATABASE optuna")
            connection.execute("CREATE DATABASE mlflow")
        yield f"postgresql://pipeline@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def test_two_searches_share_a_postgresql_study_and_mlflow_server(project, postgres):
    """A team's setup: the study in PostgreSQL, the runs in an `mlflow server` whose backend
    store is the same PostgreSQL; two search commands (two machines' worth) against both."""
    import optuna
    from mlflow.tracking import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server_log = project / "server.log"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server",
         "--backend-store-uri", f"{postgres}/mlflow",
         "--artifacts-destination", (project / "server-artifacts").as_uri(),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=project, env={**env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=server_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ok(f"{uri}/health", server, server_log, 180)
        shared = [f"hparams_search.storage={postgres}/optuna", f"mlflow.tracking_uri={uri}",
                  ONE_EPOCH]
        logs = [project / "first.log", project / "second.log"]
        procs = [start(search_command("team", N_TRIALS, *shared), project, log=logs[0]),
                 start(search_command("team", N_TRIALS, *shared,
                                      "hparams_search.sampler_seed=7"), project, log=logs[1])]
        outputs = finish(procs, logs)
        study = optuna.load_study(study_name="team", storage=f"{postgres}/optuna")
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("fashion-mnist-cnn")
        parent, children = sweep_tree(client.search_runs([experiment.experiment_id]), "team")
        check_shared_study(study, parent, children, outputs)
        assert not (project / "optuna.db").exists() and not (project / "mlflow.db").exists()
    finally:
        stop(server)
