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
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import CONF_DIR, PARAMS_FILE, Config, group_options, to_dict, validate
from pipeline.errors import ConfigError, run_cli
from pipeline.files import write_text


def compose_config(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Compose `conf/config.yaml` with Hydra overrides into a plain, resolved dictionary."""
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
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
        group, option = missing.groups()
        return (f"{group}={option!r}: unknown {group}; choose one of "
                f"{', '.join(group_options(group))}")
    unknown = re.search(r"Could not override '([^']+)'", message)
    if unknown:
        return (f"unknown config key {unknown.group(1)!r}; check its spelling against "
                "params.yaml, which lists every key")
    return message.splitlines()[0]


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
    write_params(overrides)
    print(f"wrote {PARAMS_FILE} ({' '.join(overrides) or 'defaults'}); run `dvc repro`")


if __name__ == "__main__":
    run_cli(main)
