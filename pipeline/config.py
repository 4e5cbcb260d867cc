"""Typed configuration: the schema behind `conf/` and `params.yaml`.

Hydra composes the YAML files under `conf/`; DVC's stages read the composed `params.yaml`.
Both paths end in :func:`validate`, which checks the plain dictionary against the dataclasses
below, so an unknown key, a missing key, a wrong type or an out-of-range value fails before any
work is done, with one line that names the key, the bad value and the fix.

The dataclasses hold the types and the rules, not the values: every field is MISSING here and
its value lives once, in the YAML of its option under `conf/` (and so in `params.yaml`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import functools
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from pipeline.backbones import BACKBONES, IMAGENET
from pipeline.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PARAMS_FILE = "params.yaml"


def _require(ok: bool, key: str, value: Any, rule: str, example: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {rule}; for example {key}={example}")


@dataclass
class DataConfig:
    """Fields every data source has; each option of the `data` group adds its own."""

    name: str = MISSING
    path: str = MISSING
    test_path: str = MISSING  # the test set; equal to `path` when the source has no separate one
    limit: int | None = MISSING  # max examples per split; None = all
    val_fraction: float = MISSING  # stratified share of the training set held out for validation
    positive_class: str | None = MISSING  # two classes: the one the detector looks for
    workers: int | None = MISSING  # processes that decode images in prepare; None = every core

    def __post_init__(self) -> None:
        _require(self.workers is None or self.workers > 0, "data.workers", self.workers,
                 "must be a positive number of processes, or null for every core", "2")
        _require(self.limit is None or self.limit > 0, "data.limit", self.limit,
                 "must be a positive number of examples per split, or null for all", "1000")
        _require(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction,
                 "must lie strictly between 0 and 1", "0.1")


DATA_SOURCES: dict[str, type[DataConfig]] = {}  # data.name -> schema, filled by @data_source


def data_source(name: str, loader: str):
    """Register the decorated schema as the data source `name` (the `name` in its YAML under
    `conf/data/`), read by `loader`: "module:function", called as function(cfg, root, seed)
    and returning a Dataset (`pipeline.data.load_dataset`). The schema, its name and its
    loader are registered here and nowhere else; a subclass is a source of its own only with
    its own registration."""

    def register(cls: type[DataConfig]) -> type[DataConfig]:
        cls.loader = loader  # read from the class itself, never inherited (load_dataset)
        DATA_SOURCES[name] = cls
        return cls

    return register


COLOR_MODES = ("rgb", "grayscale")


def _check_image_size(size: list[int] | None) -> None:
    _require(size is None or (len(size) == 2 and all(s > 0 for s in size)), "data.image_size",
             size, "must be [height, width] in pixels", "[64,64]")


@data_source("fashion_mnist", loader="pipeline.data.fashion_mnist:load_source")
@dataclass
class FashionMnistConfig(DataConfig):
    """Fashion-MNIST's four IDX files in `path`."""

    verify_md5: bool = MISSING


@data_source("image_folder", loader="pipeline.data.image_folder:load")
@dataclass
class ImageFolderConfig(DataConfig):
    """One subfolder of images per class: `<path>/cat/*.jpg`, `<path>/non-cat/*.png`."""

    test_fraction: float = MISSING  # stratified share held out for testing when test_path == path
    image_size: list[int] = MISSING  # [height, width]
    color_mode: str = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0.0 < self.test_fraction < 1.0, "data.test_fraction", self.test_fraction,
                 "must lie strictly between 0 and 1", "0.2")
        _check_image_size(self.image_size)
        _require(self.color_mode in COLOR_MODES, "data.color_mode", self.color_mode,
                 f"choose one of {', '.join(COLOR_MODES)}", "rgb")


@data_source("hdf5", loader="pipeline.data.hdf5:load")
@dataclass
class Hdf5Config(DataConfig):
    """Image and label arrays in HDF5 files (the layout common course datasets use)."""

    x_key: str = MISSING
    y_key: str = MISSING
    test_x_key: str = MISSING
    test_y_key: str = MISSING
    classes_key: str | None = MISSING  # null: classes are named 0, 1, ...


@data_source("keras", loader="pipeline.data.keras_datasets:load_source")
@dataclass
class KerasDatasetConfig(DataConfig):
    """A dataset Keras downloads by name (needs the network, or Keras's cache)."""

    dataset: str = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.dataset in KERAS_DATASETS, "data.dataset", self.dataset,
                 f"choose one of {', '.join(KERAS_DATASETS)}", "cifar10")


KERAS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")


@dataclass
class AugmentConfig:
    """Random transformations of the training images (inactive at evaluation and prediction)."""

    flip: str = MISSING  # none | horizontal | vertical | horizontal_and_vertical
    translate: float = MISSING  # fraction of height/width
    rotate: float = MISSING  # fraction of a full turn
    zoom: float = MISSING  # fraction
    contrast: float = MISSING  # factor
    erase: float = MISSING  # random erasing: the chance that a rectangle of an image is noise

    def __post_init__(self) -> None:
        _require(self.flip in FLIPS, "augment.flip", self.flip,
                 f"choose one of {', '.join(FLIPS)}", "horizontal")
        _require(0.0 <= self.erase <= 1.0, "augment.erase", self.erase, "must lie in [0, 1]",
                 "0.5")
        for key in ("translate", "rotate", "zoom", "contrast"):
            value = getattr(self, key)
            _require(0.0 <= value < 1.0, f"augment.{key}", value, "must lie in [0, 1)", "0.1")


FLIPS = ("none", "horizontal", "vertical", "horizontal_and_vertical")


@dataclass
class ModelConfig:
    """Fields every model has; each option of the `model` group adds its own."""

    name: str = MISSING

    def __post_init__(self) -> None:
        names = model_presets()
        _require(self.name in names, "model", self.name,
                 f"unknown model; choose one of {', '.join(names)}", names[0])


def _check_head(dense_units: list[int], dropout: float, head: str) -> None:
    _require(all(u > 0 for u in dense_units), "model.dense_units", dense_units,
             "every dense layer needs a positive number of units", "[128]")
    _require(0.0 <= dropout < 1.0, "model.dropout", dropout, "must lie in [0, 1)", "0.25")
    _require(head in HEADS, "model.head", head, f"choose one of {', '.join(HEADS)}", "auto")


@dataclass
class CnnConfig(ModelConfig):
    """A CNN: conv/pooling blocks, then fully connected layers, then the softmax output."""

    pad_input: int = MISSING  # zero padding around the input image (LeNet-5 pads 28x28 to 32x32)
    filters: list[int] = MISSING  # one conv block per entry
    kernel_size: int = MISSING
    convs_per_block: Any = MISSING  # convs in each block: one count for all, or one per block
    padding: str = MISSING
    pooling: str = MISSING
    batch_norm: bool = MISSING
    activation: str = MISSING
    dense_units: list[int] = MISSING
    dropout: float = MISSING
    head: str = MISSING  # auto: one sigmoid unit for two classes, else softmax

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.pad_input >= 0, "model.pad_input", self.pad_input, "must be >= 0", "0")
        _require(all(f > 0 for f in self.filters), "model.filters", self.filters,
                 "every block needs a positive number of filters", "[32,64]")
        _require(self.kernel_size > 0, "model.kernel_size", self.kernel_size,
                 "must be positive", "3")
        counts = self.convs_per_block
        if isinstance(counts, list):
            _require(len(counts) == len(self.filters), "model.convs_per_block", counts,
                     f"give one count per block of model.filters={list(self.filters)!r}, or "
                     "one count for every block", str([2] * len(self.filters)).replace(" ", ""))
        _require(all(isinstance(c, int) and not isinstance(c, bool) and c > 0
                     for c in self.block_convs()), "model.convs_per_block", counts,
                 "every block needs a positive whole number of convs", "2")
        _require(self.padding in ("same", "valid"), "model.padding", self.padding,
                 "choose same or valid", "same")
        _require(self.pooling in ("max", "avg"), "model.pooling", self.pooling,
                 "choose max or avg", "max")
        _require(self.activation in ACTIVATIONS, "model.activation", self.activation,
                 f"choose one of {', '.join(ACTIVATIONS)}", "relu")
        _check_head(self.dense_units, self.dropout, self.head)

    def block_convs(self) -> list[int]:
        """The number of convs in each block, one entry per entry of `filters`."""
        counts = self.convs_per_block
        return list(counts) if isinstance(counts, list) else [counts] * len(self.filters)


@dataclass
class PretrainedConfig(ModelConfig):
    """Transfer learning: a Keras Applications network (the backbone) with a new head.

    The backbone trains frozen for `freeze_epochs` epochs, then is fine-tuned (its BatchNorm
    layers stay frozen) at `fine_tune_lr_factor` times `optimizer.learning_rate`.
    """

    backbone: str = MISSING  # a name in pipeline.backbones.BACKBONES
    weights: str | None = MISSING  # imagenet | a .weights.h5 / .h5 file | null: random weights
    freeze_epochs: int = MISSING  # epochs with the backbone frozen; 0: fine-tune from the start
    fine_tune_lr_factor: float = MISSING  # learning rate after unfreezing, x the optimizer's
    dense_units: list[int] = MISSING  # dense layers of the head, between backbone and output
    dropout: float = MISSING
    head: str = MISSING  # auto: one sigmoid unit for two classes, else softmax

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.backbone in BACKBONES, "model.backbone", self.backbone,
                 f"unknown backbone; choose one of {', '.join(BACKBONES)}",
                 next(iter(BACKBONES)))
        _require(self.weights in (None, IMAGENET) or Path(self.weights).expanduser().is_file(),
                 "model.weights", self.weights,
                 "no such weights file; give the path of a .weights.h5 or .h5 file that holds "
                 f"the backbone's weights, {IMAGENET} (Keras downloads them) or null (random "
                 "weights)", "path/to/backbone.weights.h5")
        _require(self.freeze_epochs >= 0, "model.freeze_epochs", self.freeze_epochs,
                 "must be >= 0 (0: fine-tune the backbone from the first epoch)", "5")
        _require(self.fine_tune_lr_factor > 0, "model.fine_tune_lr_factor",
                 self.fine_tune_lr_factor, "must be positive", "0.1")
        _check_head(self.dense_units, self.dropout, self.head)


MODEL_SCHEMAS: dict[str, type[ModelConfig]] = {"pretrained": PretrainedConfig}  # else CnnConfig


HEADS = ("auto", "softmax", "sigmoid")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "elu", "gelu", "swish")
SCHEDULES = ("constant", "cosine", "exponential")


@dataclass
class OptimizerConfig:
    """One option of the `optimizer` group: a class of `keras.optimizers` and its arguments.

    These fields are the pipeline's own: `name` (the option, logged as `optimizer.name`), the
    class, and the learning rate with its schedule and clipping, which `train.make_optimizer`
    builds. Every other key of the option's YAML is a keyword argument of the class
    (`momentum`, `rho`, `beta_1`, `weight_decay`, ...): `optimizer_schema` adds one field per
    key, typed from the class's constructor, so adding an optimizer Keras has is one file.
    """

    name: str = MISSING
    class_name: str = MISSING  # a class of keras.optimizers: SGD, RMSprop, Adam, AdamW, Nadam...
    learning_rate: float = MISSING
    schedule: str = MISSING  # constant | cosine (to 0 over training) | exponential
    decay_rate: float = MISSING  # exponential schedule: factor per epoch
    warmup_epochs: float = MISSING  # cosine schedule: epochs of linear warm-up to learning_rate
    clipnorm: float | None = MISSING

    def __post_init__(self) -> None:
        names = group_options("optimizer")
        _require(self.name in names, "optimizer", self.name,
                 f"unknown optimizer; choose one of {', '.join(names)}", "adam")
        _require(self.learning_rate > 0, "optimizer.learning_rate", self.learning_rate,
                 "must be positive", "0.001")
        _require(self.schedule in SCHEDULES, "optimizer.schedule", self.schedule,
                 f"choose one of {', '.join(SCHEDULES)}", "cosine")
        _require(0.0 < self.decay_rate <= 1.0, "optimizer.decay_rate", self.decay_rate,
                 "must lie in (0, 1]", "0.9")
        _require(self.warmup_epochs >= 0, "optimizer.warmup_epochs", self.warmup_epochs,
                 "must be 0 or more epochs", "1")
        _require(self.warmup_epochs == 0 or self.schedule == "cosine", "optimizer.warmup_epochs",
                 self.warmup_epochs, f"warms up the cosine schedule only, not optimizer.schedule="
                 f"{self.schedule} (add optimizer.schedule=cosine)", "0")
        _require(self.clipnorm is None or self.clipnorm > 0, "optimizer.clipnorm", self.clipnorm,
                 "must be positive or null", "1.0")
        for key, value in self.arguments().items():
            if key in ARGUMENT_RULES and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                ok, rule, example = ARGUMENT_RULES[key]
                _require(ok(value), f"optimizer.{key}", value, rule, example)

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of `class_name` from the YAML, beyond the learning rate and
        clipnorm (which `train.make_optimizer` passes itself)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in OPTIMIZER_FIELDS}

    def __reduce__(self):  # the class is made at validation: pickle the values, not the class
        return _optimizer_config, (dataclasses.asdict(self),)


OPTIMIZER_FIELDS = tuple(f.name for f in dataclasses.fields(OptimizerConfig))
# Keyword arguments of Keras's constructors that the pipeline sets itself, or that are its own.
NOT_ARGUMENTS = ("name", "learning_rate", "clipnorm")
# Checks by argument name, for whichever optimizer class takes the argument: (rule, text, example).
ARGUMENT_RULES: dict[str, tuple[Any, str, str]] = {
    "momentum": (lambda v: 0.0 <= v < 1.0, "must lie in [0, 1)", "0.9"),
    "beta_1": (lambda v: 0.0 <= v < 1.0, "must lie in [0, 1)", "0.9"),
    "beta_2": (lambda v: 0.0 <= v < 1.0, "must lie in [0, 1)", "0.999"),
    "rho": (lambda v: 0.0 < v < 1.0, "must lie in (0, 1)", "0.9"),
    "epsilon": (lambda v: v > 0, "must be positive", "1e-7"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0", "0.004"),
}


@functools.cache
def keras_optimizers() -> dict[str, type]:
    """The classes of `keras.optimizers` an option can name: each optimizer that takes no
    required argument (not the base class, nor wrappers such as LossScaleOptimizer)."""
    import keras  # here, not at the top: composing a config needs no backend until now

    found = {}
    for attr in sorted(dir(keras.optimizers)):
        cls = getattr(keras.optimizers, attr)
        if (isinstance(cls, type) and issubclass(cls, keras.optimizers.Optimizer)
                and cls is not keras.optimizers.Optimizer
                and all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                        for p in inspect.signature(cls).parameters.values())):
            found[attr] = cls
    return found


def optimizer_class(class_name: Any) -> type:
    """The class of `keras.optimizers` named `class_name`.

    Raises:
        ConfigError: one line naming the bad name and the classes there are.
    """
    classes = keras_optimizers()
    if isinstance(class_name, str) and class_name in classes:
        return classes[class_name]
    folded = {name.lower(): name for name in classes}
    close = folded.get(str(class_name).lower()) or next(
        iter(difflib.get_close_matches(str(class_name), classes, n=1)), "Nadam")
    raise ConfigError(f"optimizer.class_name={class_name!r}: not an optimizer class of "
                      f"keras.optimizers; choose one of {', '.join(classes)}; for example "
                      f"optimizer.class_name={close}")


def optimizer_arguments(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword arguments an option may give `cls`, in the order of its constructor."""
    return {name: p for name, p in inspect.signature(cls).parameters.items()
            if name not in NOT_ARGUMENTS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _argument_type(parameter: inspect.Parameter) -> Any:
    """A field type from the constructor's default: bool, float, str; Any where the default
    does not tell (None, or an int that may as well be a float)."""
    default = parameter.default
    for kind in (bool, float, str):
        if type(default) is kind:
            return kind
    return Any


def _missing(key: str) -> str:
    return (f"config key {key!r} is missing; add it, or compose the file again with "
            "`python -m pipeline.params`, which writes every key")


_CHECK_OPTIMIZER: contextvars.ContextVar[bool] = contextvars.ContextVar("check_optimizer",
                                                                        default=True)


def optimizer_schema(section: Any) -> type[OptimizerConfig]:
    """The dataclass for an `optimizer` section: OptimizerConfig's fields, then one field per
    other key, each a keyword argument of the Keras class that `class_name` names.

    Raises:
        ConfigError: one line for a missing or unknown class, or a key the class does not take.
    """
    if not isinstance(section, dict):
        return OptimizerConfig  # merging names what is wrong with it
    if "class_name" not in section:
        raise ConfigError(_missing("optimizer.class_name"))
    class_name = section["class_name"]
    if not _CHECK_OPTIMIZER.get():  # see load_params: the keys as they are, not checked
        return _optimizer_dataclass(str(class_name), tuple(
            (key, Any) for key in section if key not in OPTIMIZER_FIELDS))
    arguments = optimizer_arguments(optimizer_class(class_name))
    for key, value in section.items():
        if key not in OPTIMIZER_FIELDS and key not in arguments:
            close = difflib.get_close_matches(str(key), arguments, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"optimizer.{key}={value!r}: not an argument of "
                              f"keras.optimizers.{class_name}; its arguments are "
                              f"{', '.join(arguments)}{hint}")
    fields = tuple((key, _argument_type(p)) for key, p in arguments.items() if key in section)
    return _optimizer_dataclass(class_name, fields)


@functools.cache
def _optimizer_dataclass(class_name: str, fields: tuple[tuple[str, Any], ...]) -> type:
    """One class per class name and set of arguments, so that equal configs compare equal."""
    return dataclasses.make_dataclass(
        f"{class_name}Config", [(key, kind, MISSING) for key, kind in fields],
        bases=(OptimizerConfig,), namespace={"__module__": __name__})


def _optimizer_config(values: dict[str, Any]) -> OptimizerConfig:
    return optimizer_schema(values)(**values)


PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16", "auto")
JIT_COMPILE = ("auto", True, False)
DISTRIBUTE = ("none", "mirrored", "multi_worker")


EARLY_STOPPING_MONITORS = ("val_accuracy", "val_loss")


@dataclass
class EarlyStoppingConfig:
    """Stop when `monitor` has not improved by more than `min_delta` for `patience` epochs;
    the model keeps the weights of its best epoch (`train.best_epoch`)."""

    patience: int | None = MISSING  # null: off, train every epoch and keep the last
    monitor: str = MISSING  # val_accuracy (higher is better) | val_loss (lower is better)
    min_delta: float = MISSING

    def __post_init__(self) -> None:
        _require(self.patience is None or self.patience > 0, "trainer.early_stopping.patience",
                 self.patience, "must be a positive number of epochs, or null for off", "3")
        _require(self.monitor in EARLY_STOPPING_MONITORS, "trainer.early_stopping.monitor",
                 self.monitor, f"choose one of {', '.join(EARLY_STOPPING_MONITORS)}",
                 "val_accuracy")
        _require(self.min_delta >= 0, "trainer.early_stopping.min_delta", self.min_delta,
                 "must be >= 0", "0.0")


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    precision: str = MISSING
    deterministic: bool = MISSING  # TensorFlow op determinism: bit-identical runs on CPU
    class_weight: str = MISSING  # none | balanced: weight classes by inverse frequency
    jit_compile: Any = MISSING  # auto | true | false; auto: Keras's rule (docs/gpu.md, "XLA")
    distribute: str = MISSING  # none | mirrored (GPUs of one machine) | multi_worker (machines)
    precise_bn: bool = MISSING  # BatchNorm statistics recomputed over the training data at the end
    label_smoothing: float = MISSING  # targets moved from 1 and 0 towards 1/K in the cost J
    early_stopping: EarlyStoppingConfig = MISSING

    def __post_init__(self) -> None:
        _require(self.jit_compile in JIT_COMPILE, "trainer.jit_compile", self.jit_compile,
                 "choose auto, true or false", "auto")
        _require(self.distribute in DISTRIBUTE, "trainer.distribute", self.distribute,
                 f"choose one of {', '.join(DISTRIBUTE)}", "none")
        _require(self.class_weight in ("none", "balanced"), "trainer.class_weight",
                 self.class_weight, "choose none or balanced", "balanced")
        _require(self.epochs > 0, "trainer.epochs", self.epochs, "must be a positive integer", "10")
        _require(self.batch_size > 0, "trainer.batch_size", self.batch_size,
                 "must be a positive integer", "128")
        _require(self.precision in PRECISIONS, "trainer.precision", self.precision,
                 f"choose one of {', '.join(PRECISIONS)}", "float32")
        _require(0.0 <= self.label_smoothing < 1.0, "trainer.label_smoothing",
                 self.label_smoothing, "must lie in [0, 1)", "0.1")


@dataclass
class InvarianceConfig:
    """The translation-invariance measurement in `evaluate`: the test images shifted by
    1..max_shift pixels up, down, left and right (zero-filled); 0 leaves it out (each pixel
    of shift costs four more passes over the test split)."""

    max_shift: int = MISSING
    baseline_run: str | None = MISSING  # MLflow run id of a baseline (e.g. model=mlp) to compare

    def __post_init__(self) -> None:
        _require(self.max_shift >= 0, "invariance.max_shift", self.max_shift,
                 "must be a number of pixels, or 0 to leave the shift analysis out", "4")
        _require(not (self.max_shift == 0 and self.baseline_run), "invariance.max_shift",
                 self.max_shift, "leaves out the shift analysis that invariance.baseline_run "
                 "compares with", "4")


TTA_MODES = ("none", "flip")


@dataclass
class EvaluateConfig:
    """What `evaluate` scores besides the model's plain predictions."""

    tta: str = MISSING  # none | flip: also the mean prediction of each image and its mirror

    def __post_init__(self) -> None:
        _require(self.tta in TTA_MODES, "evaluate.tta", self.tta,
                 f"must be one of {', '.join(TTA_MODES)}", "flip")


@dataclass
class MlflowConfig:
    """Where runs are logged. A null tracking_uri means SQLite `mlflow.db` at the project root."""

    tracking_uri: str | None = MISSING
    experiment_name: str = MISSING
    sweep_id: str | None = MISSING  # groups `dvc exp run`s; null = by their DVC baseline commit

    def __post_init__(self) -> None:
        # MLflow's search filters quote the id, and sweep folders and tags carry it
        _require(self.sweep_id is None or re.fullmatch(r"[\w.:-]+", str(self.sweep_id)) is not None,
                 "mlflow.sweep_id", self.sweep_id,
                 "must be letters, digits and _ . : - only", "lr-search")


@dataclass
class PathsConfig:
    """Every file and folder the stages exchange, relative to the output root.

    `dvc.yaml` reads the same keys through DVC templating, so each path is written once.
    """

    prepared: str = MISSING
    build: str = MISSING
    model: str = MISSING
    history: str = MISSING
    run: str = MISSING
    labels: str = MISSING
    metrics: str = MISSING
    per_class: str = MISSING
    confusion: str = MISSING
    roc: str = MISSING
    precision_recall: str = MISSING
    shift: str = MISSING
    figures: str = MISSING


@dataclass
class Config:
    seed: int = MISSING
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    augment: AugmentConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    trainer: TrainerConfig = MISSING
    invariance: InvarianceConfig = MISSING
    evaluate: EvaluateConfig = MISSING
    mlflow: MlflowConfig = MISSING
    paths: PathsConfig = MISSING

    def __post_init__(self) -> None:
        _require(0 <= self.seed <= MAX_SEED, "seed", self.seed,
                 f"must be an integer from 0 to {MAX_SEED} (NumPy and TensorFlow seeds are "
                 "32-bit)", "42")
        if isinstance(self.data, ImageFolderConfig) and isinstance(self.model, CnnConfig):
            check_model_fits(self.model, self.data.image_size)  # the input size is known now


MAX_SEED = 2**32 - 1


def _block_output(size: int, convs: int, model: CnnConfig) -> int:
    """The height (or width) after one conv block of `build_model`: `convs` convs (a `valid`
    conv trims kernel_size - 1, a `same` one keeps the size), then a 2x2 pooling with stride 2
    (floor(size / 2)); 0 where a layer would get an empty input."""
    for _ in range(convs):
        if model.padding == "valid":
            size -= model.kernel_size - 1
        if size < 1:
            return 0
    return size // 2


def check_model_fits(model: CnnConfig, input_shape: Sequence[int]) -> None:
    """Refuse conv blocks that shrink the input to nothing, before Keras fails on them.

    `input_shape` is the image's (height, width[, channels]): `input_shape` in prepare's
    meta.json, or `data.image_size`. Every block must leave at least 1x1.

    Raises:
        ConfigError: one line naming model.filters, where the input runs out and the most
            blocks that fit.
    """
    height, width = (int(s) for s in input_shape[:2])
    image = f"{height}x{width}"
    h, w = height + 2 * model.pad_input, width + 2 * model.pad_input
    counts = model.block_convs() or [1]
    fits = 0
    while True:  # ends: each block at least halves the size
        convs = counts[min(fits, len(counts) - 1)]  # past the last block: as many as the last
        h, w = _block_output(h, convs, model), _block_output(w, convs, model)
        if h < 1 or w < 1:
            break
        fits += 1
    blocks = len(model.filters)
    if blocks <= fits:
        return
    shrink = "conv block shrinks" if blocks == 1 else "conv blocks shrink"
    fix = (f"use at most {fits} block{'s' * (fits > 1)} for {image} images, or larger images"
           if fits else
           f"no conv block fits {image} images; use larger images, padding=same or a smaller "
           "kernel_size")
    raise ConfigError(f"model.filters={list(model.filters)!r}: {blocks} {shrink} a {image} "
                      f"input to {h}x{w} after block {fits + 1}; {fix}")


def group_options(group: str) -> list[str]:
    """The options of a Hydra config group: the YAML files in `conf/<group>/`."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def model_presets() -> list[str]:
    """Names of the model presets: the options of the Hydra group `model`."""
    return group_options("model")


def _option(raw: dict[str, Any], group: str, options: dict[str, type], example: str):
    name = (raw.get(group) or {}).get("name", example)
    if name not in options:
        raise ConfigError(f"{group}={name!r}: unknown {group}; choose one of "
                          f"{', '.join(options)}; for example {group}={example}")
    return options[name]


def section_schema(group: str, raw: dict[str, Any]) -> type:
    """The dataclass of the `data`, `model` or `optimizer` section of `raw`: the data source
    and the model that their `name` names, the optimizer's with the arguments of its class."""
    if group == "optimizer":
        return optimizer_schema(raw.get("optimizer"))
    if group == "data":
        return _option(raw, "data", DATA_SOURCES, "fashion_mnist")
    models = {name: MODEL_SCHEMAS.get(name, CnnConfig) for name in model_presets()}
    return _option(raw, "model", models, "bn_cnn")


SECTIONS = ("model", "data", "optimizer")  # the sections whose schema their values choose


def _schema_for(raw: dict[str, Any]):
    """The schema with the dataclass of each of the SECTIONS that `raw` chooses."""
    schema = OmegaConf.structured(Config)
    for group in SECTIONS:
        setattr(schema, group, OmegaConf.structured(section_schema(group, raw)))
    return schema


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", "") or ""
    msg = str(err).splitlines()[0]
    if isinstance(err, MissingMandatoryValue):
        return _missing(key)
    if "not in" in msg or "Key '" in msg:
        return f"unknown config key {key!r}; check the spelling against conf/ (see params.yaml)"
    return f"{key}: {msg}; fix the value in params.yaml or on the command line"


# `hparams_search=optuna` adds the search's settings: the sweeper's, which pipeline/search.py
# checks; no stage reads them.
SEARCH_KEY = "hparams_search"


def validate(raw: dict[str, Any]) -> Config:
    """Check a plain config dictionary against the schema and return the typed config.

    Raises:
        ConfigError: one line naming the bad key or value and the fix.
    """
    raw = {key: value for key, value in raw.items() if key != SEARCH_KEY}
    try:
        merged = OmegaConf.merge(_schema_for(raw), raw)
        return OmegaConf.to_object(merged)  # runs each dataclass's __post_init__ checks
    except OmegaConfBaseException as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(_one_line(err)) from None


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain, ordered data (what `params.yaml` holds)."""
    return dataclasses.asdict(cfg)


def load_params(path: Path | str = PARAMS_FILE, check_optimizer: bool = True) -> Config:
    """Read and validate `params.yaml`, the composed config that DVC's stages use.

    `check_optimizer=False` leaves the optimizer's class and arguments unchecked, for a stage
    that never builds an optimizer (prepare): checking them imports Keras and its backend,
    seconds and most of a gigabyte before the first image is decoded. The stages that build
    one check them.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; write it with `python -m pipeline.params`")
    with path.open() as f:
        raw = yaml.safe_load(f) or {}
    token = _CHECK_OPTIMIZER.set(check_optimizer)
    try:
        return validate(raw)
    finally:
        _CHECK_OPTIMIZER.reset(token)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optimizer": {"name": "adam"}}` -> `{"optimizer.name": "adam"}`; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat
