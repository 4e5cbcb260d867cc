"""Stage `build`: the untrained Keras model from config, and its parameter report.

Writes `model.keras` (seeded initial weights), `report.json` and `report.md` under `paths.build`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras

from pipeline import backend
from pipeline.config import AugmentConfig, Config, ModelConfig, check_model_fits, load_params
from pipeline.errors import ConfigError, run_cli
from pipeline.files import atomic_dir, write_json, write_text
from pipeline.models import build_model, parameter_report, report_markdown
from pipeline.prepare import read_meta

MODEL_FILE = "model.keras"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def model_from_config(cfg: ModelConfig, meta: dict,
                      augment: AugmentConfig | None = None) -> keras.Model:
    """The one place where config becomes model arguments."""
    check_model_fits(cfg, meta["input_shape"])  # one line, not Keras's negative-size error
    try:
        return _build(cfg, meta, augment)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _build(cfg: ModelConfig, meta: dict, augment: AugmentConfig | None) -> keras.Model:
    return build_model(
        meta["input_shape"], meta["num_classes"],
        pixel_mean=meta["pixel_mean"], pixel_std=meta["pixel_std"],
        pad_input=cfg.pad_input, filters=cfg.filters, kernel_size=cfg.kernel_size,
        convs_per_block=cfg.convs_per_block, padding=cfg.padding, pooling=cfg.pooling,
        batch_norm=cfg.batch_norm, activation=cfg.activation, dense_units=cfg.dense_units,
        dropout=cfg.dropout, head=cfg.head,
        augment=dataclasses.asdict(augment) if augment else None, name=cfg.name)


def run(cfg: Config, out_root: Path) -> keras.Model:
    backend.configure(cfg.seed, cfg.trainer.deterministic, cfg.trainer.precision)
    meta = read_meta(out_root / cfg.paths.prepared)
    model = model_from_config(cfg.model, meta, cfg.augment)
    report = parameter_report(model)
    with atomic_dir(out_root / cfg.paths.build) as out_dir:  # appears whole or not at all
        model.save(out_dir / MODEL_FILE)
        write_json(out_dir / REPORT_JSON, report)
        write_text(out_dir / REPORT_MD, report_markdown(report))
    print(f"build: {cfg.model.name}, {report['total_params']:,} parameters "
          f"-> {cfg.paths.build}/{MODEL_FILE}, {REPORT_MD}", flush=True)
    return model


def main() -> None:
    run(load_params(), Path.cwd())


if __name__ == "__main__":
    run_cli(main)
