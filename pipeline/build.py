"""Stage `build`: the untrained Keras model from config, and its parameter report.

Writes `model.keras` (seeded initial weights; for `model=pretrained` the backbone's weights and
the backbone frozen if training starts frozen), `report.json` and `report.md` under
`paths.build`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras

from pipeline import backend
from pipeline.config import (
    AugmentConfig,
    CnnConfig,
    Config,
    ModelConfig,
    PretrainedConfig,
    check_model_fits,
    load_params,
)
from pipeline.errors import ConfigError, run_cli
from pipeline.files import atomic_dir, write_json, write_text
from pipeline.models import (
    build_model,
    build_pretrained,
    parameter_report,
    report_markdown,
    set_backbone_frozen,
    transfer_report,
)
from pipeline.prepare import read_meta

MODEL_FILE = "model.keras"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def model_from_config(cfg: ModelConfig, meta: dict,
                      augment: AugmentConfig | None = None) -> keras.Model:
    """The one place where config becomes model arguments."""
    if isinstance(cfg, CnnConfig):
        check_model_fits(cfg, meta["input_shape"])  # one line, not Keras's negative-size error
    try:
        return _build(cfg, meta, augment)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _build(cfg: ModelConfig, meta: dict, augment: AugmentConfig | None) -> keras.Model:
    augment_args = dataclasses.asdict(augment) if augment else None
    if isinstance(cfg, PretrainedConfig):
        model = build_pretrained(
            meta["input_shape"], meta["num_classes"], backbone=cfg.backbone,
            weights=cfg.weights, dense_units=cfg.dense_units, dropout=cfg.dropout,
            head=cfg.head, augment=augment_args, name=cfg.name)
        set_backbone_frozen(model, cfg.freeze_epochs > 0)  # as the first epoch trains it
        return model
    return build_model(
        meta["input_shape"], meta["num_classes"],
        pixel_mean=meta["pixel_mean"], pixel_std=meta["pixel_std"],
        pad_input=cfg.pad_input, filters=cfg.filters, kernel_size=cfg.kernel_size,
        convs_per_block=cfg.block_convs(), padding=cfg.padding, pooling=cfg.pooling,
        batch_norm=cfg.batch_norm, activation=cfg.activation, dense_units=cfg.dense_units,
        dropout=cfg.dropout, head=cfg.head, augment=augment_args, name=cfg.name)


def phase_arguments(cfg: ModelConfig) -> dict:
    """The keyword arguments of `pipeline.train.train` that the model config sets: the
    transfer-learning phases of `model=pretrained`; none for the other models."""
    if isinstance(cfg, PretrainedConfig):
        return {"freeze_epochs": cfg.freeze_epochs,
                "fine_tune_lr_factor": cfg.fine_tune_lr_factor}
    return {}


def run(cfg: Config, out_root: Path) -> keras.Model:
    backend.configure(cfg.seed, cfg.trainer.deterministic, cfg.trainer.precision)
    meta = read_meta(out_root / cfg.paths.prepared)
    model = model_from_config(cfg.model, meta, cfg.augment)
    report = parameter_report(model)
    if isinstance(cfg.model, PretrainedConfig):
        report["transfer"] = transfer_report(model, cfg.model.backbone, cfg.model.weights,
                                             cfg.model.freeze_epochs)
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
