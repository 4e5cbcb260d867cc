"""Bad input to `pipeline.reproduce` and `pipeline.locks`: one line `error: ...`, no traceback.

Fast: no training. The failing `dvc repro` is a fake `dvc` on PATH that exits 1 (a fault
injection of the command's exit status); the rest call the functions directly.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import locks, reproduce
from pipeline.errors import run_cli
from pipeline.tracking import config_params
from tests.conftest import compose, env, run

FAKE_DVC = """#!/bin/sh
# `dvc checkout` succeeds; `dvc repro` fails as when another dvc process holds the lock
if [ "$1" = repro ]; then
    echo "ERROR: failed to reproduce: Unable to acquire lock. Most likely another DVC process \
is running or was terminated abruptly." >&2
    exit 1
fi
exit 0
"""


def one_error_line(capsys, call) -> str:
    """Run `call` as an entry point; the single `error: ...` line it exits 2 with."""
    with pytest.raises(SystemExit) as exited:
        run_cli(call)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ")
    return line


def logged(cfg) -> dict[str, str]:
    """The config's params as MLflow stores them: every value a string."""
    return {key: str(value) for key, value in config_params(cfg).items()}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def outside_git(tmp_path, monkeypatch) -> Path:
    """A folder that git does not see as part of any repository."""
    folder = tmp_path / "not-a-checkout"
    folder.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    return folder


# 1a: `dvc repro` fails


@pytest.mark.slow  # a real dvc repro that fails (~15 s); CI runs it
def test_a_failing_dvc_repro_is_one_line_with_the_command_and_its_exit_code(tmp_path):
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    project = tmp_path / "project"
    (project / "conf").mkdir(parents=True)  # the markers of a project root
    (project / "dvc.yaml").write_text("stages: {}\n")
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "c")
    commit = git(project, "rev-parse", "HEAD")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("e"),
                               tags={"git.commit": commit}).info.run_id
    params = [Param(key, value) for key, value in logged(compose()).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start:start + 100])
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "dvc").write_text(FAKE_DVC)
    (fake_bin / "dvc").chmod(0o755)
    environ = env()
    path = f"{fake_bin}{os.pathsep}{environ['PATH']}"

    result = run([sys.executable, "-m", "pipeline.reproduce", run_id,
                  "--tracking-uri", uri], project, check=False, extra_env={"PATH": path})

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Unable to acquire lock" in lines[0]  # DVC's own message stays above ours
    assert lines[-1].startswith("error: `dvc repro` failed with exit code 1")
    assert len([line for line in lines if line.startswith("error:")]) == 1


# 1b: `dvc` is not on PATH


@pytest.mark.unit
def test_dvc_missing_from_path_names_dvc_and_the_virtualenv(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    line = one_error_line(capsys, lambda: reproduce.restore_data(tmp_path, tmp_path / "data", {}))

    assert "`dvc` is not on PATH" in line
    assert "virtualenv" in line and ".venv/bin/activate" in line


# 1c: outside a git checkout


@pytest.mark.unit
def test_outside_a_git_checkout_says_to_run_inside_the_runs_commit(outside_git, capsys):
    commit = "0123456789abcdef0123456789abcdef01234567"

    line = one_error_line(capsys, lambda: reproduce.check_checkout(outside_git,
                                                                   {"git.commit": commit}))

    assert str(outside_git) in line and "not a git checkout" in line
    assert f"git checkout {commit}" in line


# 2: params back to a config keep strings strings


@pytest.mark.parametrize(("key", "value"), [
    ("positive_class", "yes"),
    ("positive_class", "off"),
    ("positive_class", "null"),  # None, logged as "null"
    ("path", "0755"),
    ("path", "1e3"),
    ("name", "fashion_mnist"),
])
@pytest.mark.unit
def test_string_data_fields_come_back_as_logged(key, value):
    cfg = compose()
    cfg.data = dataclasses.replace(cfg.data, **{key: None if value == "null" else value})

    assert reproduce.config_from_params(logged(cfg)) == cfg


@pytest.mark.parametrize("sweep_id", ["2024-01-01", "12:30", "1e3", "null"])
@pytest.mark.unit
def test_optional_string_fields_keep_their_text_and_null_means_none(sweep_id):
    cfg = compose()
    cfg.mlflow = dataclasses.replace(cfg.mlflow,
                                     sweep_id=None if sweep_id == "null" else sweep_id)

    assert reproduce.config_from_params(logged(cfg)) == cfg


@pytest.mark.unit
def test_numbers_bools_lists_and_other_sources_are_still_parsed():
    cfg = compose("data=image_folder", "data.path=0755", "data.color_mode=grayscale",
                  "optimizer=momentum", "optimizer.clipnorm=1.5", "trainer.jit_compile=true",
                  "data.limit=null")
    back = reproduce.config_from_params(logged(cfg))

    assert back == cfg
    assert back.data.path == "0755" and back.data.image_size == cfg.data.image_size
    assert back.data.limit is None and back.trainer.jit_compile is True
    assert back.optimizer.nesterov is cfg.optimizer.nesterov
    assert isinstance(back.optimizer.learning_rate, float)


# 3: an empty or unparsable rwlock


@pytest.mark.parametrize("text", ["", "  \n", '{"write": {"/x": {"pid": 1, "cm', "[]"])
@pytest.mark.unit
def test_an_empty_or_unparsable_rwlock_holds_no_locks_and_is_removed(tmp_path, text):
    path = tmp_path / locks.RWLOCK
    path.parent.mkdir(parents=True)
    path.write_text(text)

    (line,) = locks.check(tmp_path)

    assert not path.exists()
    assert str(locks.RWLOCK) in line and "held no locks" in line


def test_locks_cli_with_a_blank_rwlock_prints_one_line(tmp_path):
    path = tmp_path / locks.RWLOCK
    path.parent.mkdir(parents=True)
    path.write_text("\n")

    result = run([sys.executable, "-m", "pipeline.locks"], tmp_path, check=False)

    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("locks: removed") and not path.exists()
