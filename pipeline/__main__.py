"""`python -m pipeline [overrides]`: the four stages in-process on Hydra's composed config.

    python -m pipeline optimizer=adam trainer.epochs=3
    python -m pipeline -m optimizer=gd,momentum,rmsprop,adam      # a Hydra multirun

Each run writes into its own folder under `runs/` (never over DVC's outputs) and logs one
MLflow run to the project's store.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline import backend, build, evaluate, invariance, prepare, project, tracking, train
from pipeline.config import Config, validate
from pipeline.errors import (
    ConfigError,
    PipelineError,
    as_pipeline_error,
    exit_interrupted,
    fail,
    run_cli,
)
from pipeline.metric_names import TEST_ACCURACY
from pipeline.params import check_command_line

ENTRY_POINT = "python -m pipeline"


def run_stages(cfg: Config, root: Path, out_root: Path, run_name: str | None = None) -> dict:
    """prepare -> build -> train -> evaluate, with inputs from `root`, outputs under `out_root`."""
    if cfg.trainer.distribute == "multi_worker":  # prepare, build, evaluate once, not N times
        raise ConfigError("trainer.distribute=multi_worker: run prepare and build once, then the "
                          "train stage in every process (python -m pipeline.train); see "
                          "docs/gpu.md, 'Several GPUs or machines'")
    backend.check_jit_compile(cfg.trainer.jit_compile, cfg.trainer.deterministic)
    prepare.run(cfg, root, out_root)
    build.run(cfg, out_root)
    train.run(cfg, root, out_root, ENTRY_POINT, run_name)
    return evaluate.run(cfg, root, out_root, ENTRY_POINT)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> float:
    """Run the stages; return the test accuracy (the objective for Hydra sweepers)."""
    hydra_cfg = HydraConfig.get()
    out_root = Path(hydra_cfg.runtime.output_dir)
    try:
        cfg = validate(OmegaConf.to_container(raw, resolve=True))
        root = project.project_root()
        tracking.connect(tracking.tracking_uri(cfg.mlflow.tracking_uri, root))
        tracking.ensure_experiment(cfg.mlflow.experiment_name)  # a deleted one fails now
        if cfg.invariance.baseline_run:  # a bad baseline fails now, not after training
            invariance.fetch_baseline(cfg.invariance.baseline_run, cfg)
        metrics = run_stages(cfg, root, out_root, run_name=hydra_cfg.job.override_dirname or None)
    except (PipelineError, OSError) as err:
        known = as_pipeline_error(err)
        if known is None:
            raise
        shutil.rmtree(out_root, ignore_errors=True)  # a failed run leaves no partial outputs
        fail(known)
    except KeyboardInterrupt as err:
        shutil.rmtree(out_root, ignore_errors=True)
        exit_interrupted(err)
    return metrics[TEST_ACCURACY]


if __name__ == "__main__":
    run_cli(lambda: check_command_line(sys.argv[1:]))  # one line, before Hydra's usage block
    main()
