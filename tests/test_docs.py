"""The commands the README and docs/ show stay true: each `python -m pipeline` command composes
and validates as the entry point checks it before any work, each `python -m pipeline.X` module
exists, each `make` target and each `dvc exp run -S` key exists, and each relative link leads
to a file. Commands that need a cluster or a server this machine lacks are listed in NEEDS."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.config import flatten

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# what a command needs that a test machine lacks, by a word of the command
NEEDS = {"submitit_slurm": "a SLURM cluster", "postgresql://": "a PostgreSQL server",
         "mlflow-host": "an MLflow server", "<": "a value of the reader's own"}


def commands() -> list[tuple[str, str]]:
    """(page, command) for every command line in the pages' code blocks, continuation lines
    joined, comments and environment assignments dropped."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", page.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = line.split("  #")[0].split(" # ")[0].strip()
                line = re.sub(r"^(\w+=\S+ )+", "", line)  # KERAS_BACKEND=jax python ...
                if line and not line.startswith("#"):
                    found.append((page.relative_to(REPO).as_posix(), line))
    return found


def shown(prefix: str) -> list[tuple[str, list[str]]]:
    """(page, arguments after `prefix`) of every command that starts with it and needs nothing
    this machine lacks."""
    return [(page, shlex.split(line)[len(prefix.split()):]) for page, line in commands()
            if line.split()[:len(prefix.split())] == prefix.split()
            and not any(word in line for word in NEEDS)]


@pytest.mark.unit
def test_the_pages_show_the_commands_this_test_reads():
    assert len(shown("python -m pipeline")) >= 20
    assert len(shown("dvc exp run")) >= 3 and len(shown("make")) >= 2


# not `unit`: a Hydra composition per command, some 15 s in all; make test runs it
@pytest.mark.parametrize("page,argv", shown("python -m pipeline"),
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_each_pipeline_command_composes_and_validates(page, argv, tmp_path, monkeypatch):
    from pipeline.params import check_command_line

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # a search's study storage goes there
    check_command_line(argv)


@pytest.mark.unit
def test_each_pipeline_module_the_pages_run_exists():
    modules = {line.split()[2] for _, line in commands()
               if line.startswith("python -m pipeline.")}
    assert modules, "no python -m pipeline.X command found"
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    assert not missing


@pytest.mark.unit
def test_each_make_target_the_pages_name_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    named = {argv[0] for _, argv in shown("make") if argv}
    assert named and named <= targets, named - targets


@pytest.mark.unit
def test_each_dvc_exp_run_key_is_a_param():
    params = flatten(yaml.safe_load((REPO / "params.yaml").read_text()))
    groups = {p.name for p in (REPO / "conf").iterdir() if p.is_dir()}
    for page, argv in shown("dvc exp run"):
        keys = [argv[i + 1].split("=")[0] for i, a in enumerate(argv) if a == "-S"]
        for key in keys:
            assert key in params or key in groups, f"{page}: dvc exp run -S {key}=..."


@pytest.mark.unit
def test_each_relative_link_leads_to_a_file():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken
