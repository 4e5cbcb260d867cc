"""Reproduce an MLflow run from its lineage: its git commit, its data version and its params.

    git checkout <commit>                       # the run's tag git.commit
    python -m pipeline.reproduce <run id>       # data version + params.yaml + dvc repro

The command checks that the checkout is at the run's commit, puts the data version of the run
in place (`dvc checkout data.dvc`, verified against the run's tag data.md5), writes
`params.yaml` from the run's params, runs `dvc repro` (`--force` retrains even when DVC has the
outputs cached) and compares the test metrics with the run's. Runs made by `dvc exp run` can
also be restored with `dvc exp apply <dvc.exp_name>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline import project, tracking
from pipeline.config import PARAMS_FILE, SECTIONS, Config, section_schema, validate
from pipeline.errors import PipelineError, run_cli
from pipeline.files import write_text
from pipeline.metric_names import TEST_ACCURACY, TEST_LOSS
from pipeline.params import params_yaml

COMPARED = (TEST_ACCURACY, TEST_LOSS)


class ReproduceError(PipelineError):
    """The checkout or the data does not match the run."""


def field_types(params: dict[str, str]) -> dict[str, Any]:
    """The schema's type of every dotted key (`data.path`: str), for the data source, the
    model and the optimizer that the params name (`data.name`, `optimizer.class_name`, ...)."""
    types: dict[str, Any] = {}
    sections: dict[str, dict[str, str]] = {}
    for key, text in params.items():
        group, _, leaf = key.partition(".")
        if group in SECTIONS and leaf and "." not in leaf:
            sections.setdefault(group, {})[leaf] = text

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            key, hint = f"{prefix}{field.name}", hints[field.name]
            if key in sections:
                hint = section_schema(key, sections)
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{key}.")
            else:
                types[key] = hint

    walk(Config, "")
    return types


def is_string(hint: Any) -> bool:
    """True for `str` and `str | None`."""
    return hint is str or set(typing.get_args(hint)) == {str, type(None)}


def param_value(text: str, hint: Any) -> Any:
    """A logged param back as its value: a string field keeps the logged text ("yes", "0755",
    "2024-01-01"), except "null" (how None is logged) where the field is optional; numbers,
    bools and lists are parsed as YAML."""
    if is_string(hint):
        return None if text == "null" and hint is not str else text
    return yaml.safe_load(text)


def config_from_params(params: dict[str, str]) -> Config:
    """The typed config back from MLflow's string params (`optimizer.learning_rate`: "0.001")."""
    types = field_types(params)
    nested: dict[str, Any] = {}
    for key, text in params.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = param_value(text, types.get(key))  # unknown keys: validate names them
    return validate(nested)


NOT_ON_PATH = {
    "dvc": "activate the project's virtualenv (`source .venv/bin/activate`) or put dvc on PATH",
    "git": "install git or put it on PATH",
}


def run_command(root: Path, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd)` in `root`; a command missing from PATH is a ReproduceError."""
    try:
        return subprocess.run(cmd, cwd=root, **kwargs)
    except FileNotFoundError:
        raise ReproduceError(f"`{cmd[0]}` is not on PATH; "
                             f"{NOT_ON_PATH.get(cmd[0], f'put {cmd[0]} on PATH')}, "
                             "then rerun") from None


def check_checkout(root: Path, tags: dict[str, str]) -> None:
    commit = tags.get("git.commit")
    if not commit:
        raise ReproduceError("the run has no git.commit tag; it was not made in a git checkout")
    result = run_command(root, ["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or ["no commit"])[0]
        raise ReproduceError(f"{root} is not a git checkout ({said}); run this inside the git "
                             f"checkout of the run's commit: in a clone of the project, "
                             f"`git checkout {commit}`, then rerun there")
    head = result.stdout.strip()
    if head != commit:
        raise ReproduceError(f"the checkout is at {head[:8]} but the run was trained at "
                             f"{commit[:8]}; run `git checkout {commit}` first")


def restore_data(root: Path, data_path: Path, tags: dict[str, str]) -> None:
    expected = tags.get("data.md5")
    recorded = project.data_md5(data_path)
    if expected and recorded != expected:
        raise ReproduceError(f"{data_path}.dvc records data {recorded} but the run used "
                             f"{expected}; check out the run's commit first")
    dvc_file = f"{data_path.relative_to(root)}.dvc"
    if run_command(root, ["dvc", "checkout", "--quiet", dvc_file]).returncode != 0:
        raise ReproduceError(f"`dvc checkout {dvc_file}` failed: the run's data version is not "
                             f"in the DVC cache; get it with `dvc pull {dvc_file}` or `make data`")


def repro(root: Path, run_id: str, force: bool = False) -> None:
    """Run `dvc repro`; its failure (DVC has printed why) is one line with its exit code."""
    cmd = ["dvc", "repro", *(["--force"] if force else [])]
    code = run_command(root, cmd).returncode
    if code != 0:
        raise ReproduceError(f"`{' '.join(cmd)}` failed with exit code {code} (DVC's message is "
                             "above); fix what it reports (another dvc process holding the lock: "
                             "wait for it, or run `python -m pipeline.locks`), then rerun "
                             f"`python -m pipeline.reproduce {run_id}`")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id")
    parser.add_argument("--tracking-uri", help="default: the project's store")
    parser.add_argument("--force", action="store_true", help="retrain even if DVC has it cached")
    args = parser.parse_args(argv)

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    root = project.project_root()
    uri = args.tracking_uri or tracking.tracking_uri(None, root)
    if tracking.missing_store(uri):
        raise ReproduceError(f"no MLflow store at {tracking.missing_store(uri)}; pass "
                             "--tracking-uri")
    tracking.connect(uri)
    try:
        run = MlflowClient().get_run(args.run_id)
    except MlflowException:
        raise ReproduceError(f"run {args.run_id!r} not found in {uri}; pass --tracking-uri "
                             "if it lives elsewhere") from None
    tags = run.data.tags
    cfg = config_from_params(run.data.params)
    check_checkout(root, tags)
    restore_data(root, root / cfg.data.path, tags)
    write_text(root / PARAMS_FILE, params_yaml(cfg))
    print(f"reproduce: run {args.run_id} at {tags['git.commit'][:8]}, data "
          f"{tags.get('data.md5', '?')}, params.yaml written; dvc repro", flush=True)
    repro(root, args.run_id, force=args.force)
    metrics = json.loads((root / cfg.paths.metrics).read_text())
    same = all(metrics[k] == run.data.metrics.get(k) for k in COMPARED)
    for key in COMPARED:
        print(f"  {key}: run {run.data.metrics.get(key)}  reproduced {metrics[key]}")
    print("identical metrics" if same else "the metrics differ from the run's", flush=True)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
