"""Hydra sweeper `pipeline_optuna`: an Optuna study as a Hydra multirun.

    python -m pipeline -m hparams_search=optuna hparams_search.n_trials=30

Hydra imports every module of the `hydra_plugins` namespace package at start and registers
the sweepers it finds. This module registers the sweeper's config (group `hydra/sweeper`,
option `pipeline_optuna`) and hands the study to `pipeline.search`; it imports nothing heavy,
as every `python -m pipeline` imports it.
"""

# No `from __future__ import annotations`: Hydra runs this module before it is in sys.modules,
# where `dataclass` cannot resolve string annotations.

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.pipeline_search.optuna_sweeper.OptunaSweeper"
    # the `hparams_search` node of the config (study, storage, trials, pruner), which
    # `conf/hparams_search/optuna.yaml` interpolates here; checked by pipeline.search
    search: Any = MISSING
    # the search space in Hydra's sweep syntax: choice(...), interval(...), tag(log, ...)
    params: dict[str, str] | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="pipeline_optuna",
                             node=OptunaSweeperConf, provider="pipeline")


class OptunaSweeper(Sweeper):
    """Runs the trials of an Optuna study through Hydra's launcher, one after the other."""

    def __init__(self, search: Any, params: dict[str, str] | None = None) -> None:
        self.search = search
        self.params = dict(params or {})
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from pipeline import search

        assert self.config is not None and self.launcher is not None
        settings = OmegaConf.to_container(self.search, resolve=True) \
            if isinstance(self.search, DictConfig) else self.search
        return search.sweep(settings, self.params, arguments, self.config,
                            compose=self._compose, launch=self._launch)

    def _compose(self, overrides: list[str]) -> DictConfig:
        """The job config Hydra would compose for `overrides` (the check before a launch)."""
        assert self.hydra_context is not None and self.config is not None
        return self.hydra_context.config_loader.load_sweep_config(
            master_config=self.config, sweep_overrides=list(overrides))

    def _launch(self, overrides: list[str], job_number: int):
        assert self.launcher is not None
        (result,) = self.launcher.launch([list(overrides)], initial_job_idx=job_number)
        return result
