"""Write `params.yaml`, the config DVC's stages read, from `conf/` plus Hydra overrides.

    python -m pipeline.params                                  # the default composition
    python -m pipeline.params optimizer=rmsprop optimizer.learning_rate=0.01
    python -m pipeline.params experiment=quick && dvc repro

(`dvc exp run -S ...` composes `conf/` itself; this is for plain `dvc repro`.)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import (
    CONF_DIR,
    PARAMS_FILE,
    SEARCH_KEY,
    Config,
    group_options,
    to_dict,
    validate,
)
from pipeline.errors import ConfigError, run_cli
from pipeline.files import write_text
from pipeline.project import project_root

SWEEP_HINT = "params.yaml holds one config: run the sweep with `python -m pipeline {0}`"


def compose_config(overrides: Sequence[str] = (), sweep: bool = False) -> dict[str, Any]:
    """Compose `conf/config.yaml` with Hydra overrides into a plain, resolved dictionary.

    Raises:
        ConfigError: an unknown option or key, or, unless `sweep`, a composition that is a
            sweep (a preset that runs as a multirun, such as `experiment=compare_optimizers`).
    """
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        axes = cfg.hydra.sweeper.get("params")
        if not sweep and (cfg.hydra.mode == RunMode.MULTIRUN or axes):
            raise ConfigError(f"{' '.join(overrides)} is a sweep over "
                              f"{', '.join(f'{k}={v}' for k, v in (axes or {}).items())}; "
                              + SWEEP_HINT.format(" ".join(overrides)))
        with open_dict(cfg):
            del cfg["hydra"]
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(explain_override_error(str(err))) from None


def composed(overrides: Sequence[str] = ()) -> Config:
    """The typed config of `conf/` plus Hydra overrides (what `params.yaml` would hold)."""
    return validate(compose_config(overrides))


def explain_override_error(message: str) -> str:
    """Hydra's composition error as one line that names the bad value and the fix."""
    missing = re.search(r"Could not find '(\w+)/([^']*)'", message)
    if missing:
        return unknown_option(*missing.groups())
    sweep = re.search(r"Ambiguous value for argument '([^']+)'", message)
    if sweep:
        return (f"{sweep.group(1)} is a sweep; " + SWEEP_HINT.format(f"-m {sweep.group(1)}")
                + f", or queue its runs with `dvc exp run --queue -S '{sweep.group(1)}'`")
    unknown = re.search(r"Could not override '([^']+)'", message)
    if unknown:
        return (f"unknown config key {unknown.group(1)!r}; check its spelling against "
                "params.yaml, which lists every key")
    return message.splitlines()[0]


def unknown_option(group: str, option: str) -> str:
    return (f"{group}={option!r}: unknown {group}; choose one of "
            f"{', '.join(group_options(group))}")


def check_command_line(argv: Sequence[str]) -> None:
    """The overrides of a `python -m pipeline` command line checked as Hydra would compose
    them, so that a misspelt option or key stops with one line rather than Hydra's usage
    block: every option a sweep names, the composition (validated) of each sweep's first
    value, and a hyperparameter search's settings.

    Raises:
        ConfigError: naming the bad option or key and the fix.
    """
    from hydra._internal.utils import get_args_parser  # the parser `hydra.main` uses
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, _ = get_args_parser().parse_known_args(list(argv))
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException as err:
        raise ConfigError(explain_override_error(str(err))) from None
    first = []
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra"):  # Hydra's own settings: launcher, sweeper, run folders
            continue
        if not override.is_sweep_override():
            first.append(override.input_line)
            continue
        try:
            values = list(override.sweep_string_iterator())
        except HydraException:  # an interval, for an optimising sweeper: Hydra checks it
            continue
        if (CONF_DIR / key).is_dir():  # a config group: its options are its files
            for value in values:
                if value not in group_options(key):
                    raise ConfigError(unknown_option(key, value))
        first.append(f"{override.get_key_element()}={values[0]}")
    raw = compose_config(first, sweep=True)
    validate(raw)
    if SEARCH_KEY in raw:  # hparams_search=optuna: checked before any MLflow run exists
        from pipeline.search import preflight

        preflight(args.overrides, first)


def params_yaml(cfg: Config) -> str:
    header = ("# Composed from conf/ by `python -m pipeline.params` (or `dvc exp run -S ...`).\n"
              "# DVC's stages read only this file; edit conf/ and recompose rather than by hand.\n")
    return header + yaml.safe_dump(to_dict(cfg), sort_keys=False)


def write_params(overrides: Sequence[str] = (), path: Path | str = PARAMS_FILE) -> Config:
    """Compose, validate and write `params.yaml`; return the typed config."""
    cfg = composed(overrides)
    write_text(path, params_yaml(cfg))
    return cfg


def main() -> None:
    overrides = sys.argv[1:]
    if {"-h", "--help"} & set(overrides):
        print(__doc__.strip())
        return
    path = project_root() / PARAMS_FILE  # where DVC's stages read it, from any subfolder
    write_params(overrides, path)
    print(f"wrote {path} ({' '.join(overrides) or 'defaults'}); run `dvc repro`")


if __name__ == "__main__":
    run_cli(main)
