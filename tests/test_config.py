"""Tier (a): every option of every config group composes and validates; bad values fail."""

from __future__ import annotations

import dataclasses
import shutil
import typing

import numpy as np
import pytest
import yaml
from omegaconf import MISSING

from pipeline import config, params
from pipeline.config import (
    DATA_SOURCES,
    MODEL_SCHEMAS,
    CnnConfig,
    Config,
    check_model_fits,
    group_options,
    optimizer_arguments,
    optimizer_class,
    to_dict,
    validate,
)
from pipeline.errors import ConfigError
from pipeline.params import compose_config, params_yaml, write_params
from tests.conftest import REPO, compose

pytestmark = pytest.mark.unit  # make test-unit: no data, no DVC, no training

GROUPS = ["data", "model", "augment", "optimizer", "trainer", "experiment"]


@pytest.mark.parametrize("group,option",
                         [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_option_composes_and_validates(group, option):
    raw = compose_config([f"{group}={option}"], sweep=True)  # a preset may be a sweep
    cfg = validate(raw)
    if group in ("data", "model", "optimizer"):
        assert getattr(cfg, group).name == option
    # each YAML option spells out every field, so DVC's own composition of conf/
    # (which knows no schema) writes the same params.yaml as ours
    assert to_dict(cfg) == raw


@pytest.mark.parametrize("option", group_options("optimizer"))
def test_every_optimizer_option_names_a_keras_class_and_its_arguments(option):
    cfg = compose(f"optimizer={option}").optimizer
    assert set(cfg.arguments()) <= set(optimizer_arguments(optimizer_class(cfg.class_name)))


@pytest.mark.parametrize("option", group_options("data"))
def test_every_data_option_is_a_registered_source_with_a_loader(option):
    from pipeline.data import source_loader

    schema = type(compose(f"data={option}").data)
    assert DATA_SOURCES[option] is schema
    assert callable(source_loader(schema))


def test_a_source_schema_without_its_own_registration_has_no_loader():
    from pipeline.data import source_loader

    @dataclasses.dataclass
    class TarballConfig(DATA_SOURCES["hdf5"]):  # a subclass does not inherit hdf5's loader
        member: str = MISSING

    with pytest.raises(ConfigError, match=r"^data source TarballConfig has no loader; "
                                          r"register it with @data_source"):
        source_loader(TarballConfig)


def test_the_optimizer_options_keep_their_keras_classes():
    expected = {"gd": "SGD", "momentum": "SGD", "rmsprop": "RMSprop", "adam": "Adam",
                "adamw": "AdamW"}
    assert {o: compose(f"optimizer={o}").optimizer.class_name for o in expected} == expected


def test_committed_params_yaml_is_the_default_composition():
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert committed == to_dict(compose())


def test_write_params_applies_overrides(tmp_path):
    path = tmp_path / "params.yaml"
    write_params(["optimizer=rmsprop", "optimizer.learning_rate=0.01"], path)
    written = yaml.safe_load(path.read_text())
    assert written["optimizer"]["name"] == "rmsprop"
    assert written["optimizer"]["learning_rate"] == 0.01
    assert "rho" in written["optimizer"] and "beta_1" not in written["optimizer"]


def test_params_yaml_round_trips():
    cfg = compose("optimizer=momentum", "trainer.epochs=3")
    assert validate(yaml.safe_load(params_yaml(cfg))) == cfg


@pytest.mark.parametrize("overrides,message", [
    (["trainer.batch_size=0"], "trainer.batch_size=0"),
    (["optimizer.learning_rate=-1"], "optimizer.learning_rate=-1.0"),
    (["data.limit=-5"], "data.limit=-5"),
    (["trainer.epochs=abc"], "trainer.epochs"),
    (["optimizer=adma"], "optimizer='adma': unknown optimizer; choose one of"),
    (["model=resnet"], "model='resnet': unknown model; choose one of"),
    (["trainer.foo=1"], "unknown config key 'trainer.foo'"),
    (["optimizer=adam", "optimizer.beta_1=1.5"], "optimizer.beta_1=1.5"),
    (["trainer.precision=float8"], "trainer.precision='float8'"),
    (["trainer.label_smoothing=1.0"], "trainer.label_smoothing=1.0: must lie in [0, 1)"),
    (["optimizer.schedule=constant", "optimizer.warmup_epochs=1"],
     "optimizer.warmup_epochs=1.0: warms up the cosine schedule only, not "
     "optimizer.schedule=constant (add optimizer.schedule=cosine); for example "
     "optimizer.warmup_epochs=0"),
    (["evaluate.tta=rotate"], "evaluate.tta='rotate': must be one of none, flip; for example "
     "evaluate.tta=flip"),
    (["mlflow.sweep_id='a/b'"], "mlflow.sweep_id='a/b': must be letters, digits"),
    (["optimizer.class_name=Foo"], "optimizer.class_name='Foo': not an optimizer class of "
     "keras.optimizers; choose one of "),
    (["+optimizer.betta_1=0.9"], "optimizer.betta_1=0.9: not an argument of "
     "keras.optimizers.Adam; its arguments are beta_1, beta_2, "),
    (["optimizer=rmsprop", "optimizer.rho=1.0"], "optimizer.rho=1.0: must lie in (0, 1)"),
    (["optimizer=adamw", "optimizer.weight_decay=-1"], "optimizer.weight_decay=-1.0: must be"),
    (["invariance.max_shift=-1"], "invariance.max_shift=-1: must be a number of pixels, or 0"),
    (["invariance.max_shift=0", "invariance.baseline_run=abc"], "invariance.max_shift=0: "
     "leaves out the shift analysis that invariance.baseline_run compares with"),
])
def test_bad_overrides_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(*overrides)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_unknown_key_and_wrong_type_in_params_yaml_fail():
    raw = to_dict(compose())
    raw["trainer"]["epoch"] = 3
    with pytest.raises(ConfigError, match="unknown config key 'trainer.epoch'"):
        validate(raw)
    raw = to_dict(compose())
    raw["optimizer"]["name"] = "sgd"
    with pytest.raises(ConfigError, match="unknown optimizer"):
        validate(raw)
    raw = to_dict(compose())
    raw["model"]["filters"] = "wide"
    with pytest.raises(ConfigError, match="model.filters"):
        validate(raw)


def test_a_key_missing_from_params_yaml_fails_with_the_fix():
    raw = to_dict(compose())
    del raw["trainer"]["epochs"]
    fix = "add it, or compose the file again with `python -m pipeline.params`"
    with pytest.raises(ConfigError, match=rf"^config key 'trainer.epochs' is missing; {fix}"):
        validate(raw)
    raw = to_dict(compose())
    del raw["paths"]
    with pytest.raises(ConfigError, match="config key 'paths' is missing"):
        validate(raw)


def schema_classes(cls: type) -> set[type]:
    """`cls` and every dataclass that its fields or its subclasses' fields name."""
    optimizers = [type(compose(f"optimizer={o}").optimizer) for o in group_options("optimizer")]
    found, todo = set(), [cls, *DATA_SOURCES.values(), *optimizers, CnnConfig,
                          *MODEL_SCHEMAS.values()]
    while todo:
        current = todo.pop()
        if current in found:
            continue
        found.add(current)
        hints = typing.get_type_hints(current)
        todo += [hints[f.name] for f in dataclasses.fields(current)
                 if dataclasses.is_dataclass(hints[f.name])]
    return found


def test_values_live_in_conf_and_the_schema_holds_none():
    classes = schema_classes(Config)
    assert len(classes) > 15
    with_value = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
                  if f.default is not MISSING or f.default_factory is not dataclasses.MISSING]
    assert with_value == []


def test_optimizer_fields_match_their_option():
    rms = compose("optimizer=rmsprop").optimizer
    assert {f.name for f in dataclasses.fields(rms)} >= {"rho", "momentum", "epsilon"}
    adam = compose("optimizer=adam").optimizer
    assert (adam.beta_1, adam.beta_2) == (0.9, 0.999)


# An optimizer Keras has, added as one file: conf/optimizer/nadam.yaml.
NADAM = """\
# Nadam: Adam with Nesterov momentum.
name: nadam
class_name: Nadam
learning_rate: 0.002
beta_1: 0.85
beta_2: 0.99
epsilon: 1.0e-06
weight_decay: 0.001
schedule: exponential
decay_rate: 0.5
warmup_epochs: 0.0
clipnorm: 2.0
"""


@pytest.fixture
def conf_copy(tmp_path, monkeypatch):
    """A copy of conf/ that composes and validates in place of the project's."""
    conf = shutil.copytree(config.CONF_DIR, tmp_path / "conf")
    monkeypatch.setattr(config, "CONF_DIR", conf)
    monkeypatch.setattr(params, "CONF_DIR", conf)
    return conf


def test_a_new_optimizer_is_one_yaml_file(conf_copy):
    import keras

    from pipeline.distribute import scaled_optimizer
    from pipeline.models import build_model
    from pipeline.train import make_optimizer

    (conf_copy / "optimizer" / "nadam.yaml").write_text(NADAM)
    cfg = compose("optimizer=nadam", "trainer.epochs=2")
    assert to_dict(cfg)["optimizer"] == yaml.safe_load(NADAM)  # what params.yaml and MLflow get
    assert validate(yaml.safe_load(params_yaml(cfg))) == cfg
    assert scaled_optimizer(cfg.optimizer, 4).learning_rate == pytest.approx(0.008)
    assert scaled_optimizer(cfg.optimizer, 4).arguments() == cfg.optimizer.arguments()

    optimizer = make_optimizer(cfg.optimizer, steps_per_epoch=4, epochs=2)
    assert type(optimizer) is keras.optimizers.Nadam
    assert (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon, optimizer.weight_decay,
            optimizer.clipnorm) == (0.85, 0.99, 1e-6, 0.001, 2.0)
    model = build_model((8, 8, 1), 3, filters=[2], dense_units=[])
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    model.fit(np.zeros((16, 8, 8, 1), "float32"), np.array([0, 1, 2, 0] * 4), batch_size=4,
              epochs=1, verbose=0)
    lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    assert lr == pytest.approx(0.002 * 0.5)  # the exponential schedule: x0.5 per epoch of 4 steps


@pytest.mark.parametrize("line,new_line,message", [
    ("class_name: Nadam", "class_name: Nadma", "optimizer.class_name='Nadma': not an optimizer "
     "class of keras.optimizers; choose one of Adadelta, "),
    ("class_name: Nadam", "class_name: nadam", "; for example optimizer.class_name=Nadam"),
    ("beta_1: 0.85", "betta_1: 0.85", "optimizer.betta_1=0.85: not an argument of "
     "keras.optimizers.Nadam; its arguments are beta_1, beta_2, epsilon, weight_decay, "),
    ("clipnorm: 2.0", "clipnorm: 2.0\nmomentum: 0.9",
     "optimizer.momentum=0.9: not an argument of keras.optimizers.Nadam"),
    ("learning_rate: 0.002", "learning_rate: -0.1",
     "optimizer.learning_rate=-0.1: must be positive"),
    ("beta_2: 0.99", "beta_2: 1.0", "optimizer.beta_2=1.0: must lie in [0, 1)"),
])
def test_a_misspelt_class_or_argument_in_the_yaml_is_one_line(conf_copy, line, new_line,
                                                                 message):
    assert line in NADAM
    (conf_copy / "optimizer" / "nadam.yaml").write_text(NADAM.replace(line, new_line))
    with pytest.raises(ConfigError) as err:
        compose("optimizer=nadam")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_an_optimizer_that_cannot_be_built_raises_rather_than_training_another():
    from pipeline.train import make_optimizer

    cfg = dataclasses.replace(compose().optimizer, class_name="Nadma")
    with pytest.raises(ConfigError, match="optimizer.class_name='Nadma': not an optimizer"):
        make_optimizer(cfg)


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_seed_in_the_32_bit_range_is_accepted(seed):
    assert compose(f"seed={seed}").seed == seed


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_outside_the_32_bit_range_fails_with_one_line(seed):
    with pytest.raises(ConfigError) as err:
        compose(f"seed={seed}")
    assert str(err.value) == (f"seed={seed}: must be an integer from 0 to 4294967295 (NumPy "
                              "and TensorFlow seeds are 32-bit); for example seed=42")


# (image height, width), model overrides, the most conv blocks that fit; the model is refused
# with one block more. The default model (bn_cnn) has two 3x3 convs per block; each `valid`
# conv trims kernel_size - 1, then the 2x2 pooling halves (rounding down).
DEPTH_CASES = [
    ((28, 28), [], 4),                                       # 28 14 7 3 1
    ((64, 64), [], 6),                                       # 64 32 16 8 4 2 1
    ((28, 28), ["model.padding=valid", "model.convs_per_block=1"], 3),  # 26>13 11>5 3>1
    ((64, 64), ["model.padding=valid", "model.convs_per_block=1"], 4),  # 62>31 29>14 12>6 4>2
    ((64, 64), ["model.padding=valid", "model.convs_per_block=2"], 3),  # 60>30 26>13 9>4
    ((28, 28), ["model=lenet5"], 2),                         # pad 32, 5x5: 28>14 10>5
    ((28, 64), ["model=small_cnn"], 4),                      # the smaller side decides
    ((2, 2), ["model.padding=valid"], 0),                    # a 3x3 conv finds nothing
]


def depth_model(overrides: list[str], blocks: int):
    return dataclasses.replace(compose(*overrides).model, filters=[1] * blocks)


@pytest.mark.parametrize("size,overrides,fits", DEPTH_CASES)
def test_model_depth_check_accepts_and_refuses_at_the_boundary(size, overrides, fits):
    if fits:
        check_model_fits(depth_model(overrides, fits), [*size, 1])
    with pytest.raises(ConfigError) as err:
        check_model_fits(depth_model(overrides, fits + 1), [*size, 1])
    text = str(err.value)
    image = f"{size[0]}x{size[1]}"
    assert text.startswith(f"model.filters={[1] * (fits + 1)}: ")
    assert f"a {image} input to " in text and f"after block {fits + 1};" in text
    assert (f"use at most {fits} blocks for {image} images" if fits else "larger images") in text
    assert "\n" not in text


def test_model_depth_message_names_the_key_the_size_and_the_fix():
    model = dataclasses.replace(compose().model, filters=[8] * 6)
    with pytest.raises(ConfigError) as err:
        check_model_fits(model, [28, 28, 1])
    assert str(err.value) == ("model.filters=[8, 8, 8, 8, 8, 8]: 6 conv blocks shrink a 28x28 "
                              "input to 0x0 after block 5; use at most 4 blocks for 28x28 "
                              "images, or larger images")


@pytest.mark.parametrize("counts,fits", [([2, 1], True), ([1, 2], False)])
def test_model_depth_check_follows_the_convs_of_each_block(counts, fits):
    """Three valid 3x3 convs in two blocks on 12x12: 12>10>8>4 4>2>1 fits; 12>10>5 5>3>1>0
    does not. The check agrees with the Keras model either way."""
    from pipeline.models import build_model

    cfg = dataclasses.replace(compose("model.padding=valid").model, filters=[4, 4],
                              convs_per_block=counts)
    if fits:
        check_model_fits(cfg, [12, 12, 1])
        model = build_model([12, 12, 1], 10, filters=[4, 4], convs_per_block=counts,
                            padding="valid", batch_norm=False, dense_units=[])
        assert model.get_layer("flatten").input.shape[1:3] == (1, 1)
    else:
        with pytest.raises(ConfigError, match=r"^model.filters=\[4, 4\]: 2 conv blocks shrink "
                           r"a 12x12 input to 0x0 after block 2; use at most 1 block "):
            check_model_fits(cfg, [12, 12, 1])


@pytest.mark.parametrize("override,message", [
    ("model.convs_per_block=[2,1,1]", "model.convs_per_block=[2, 1, 1]: give one count per "
     "block of model.filters=[32, 64], or one count for every block; for example "
     "model.convs_per_block=[2,2]"),
    ("model.convs_per_block=[2,0]", "model.convs_per_block=[2, 0]: every block needs a "
     "positive whole number of convs; for example model.convs_per_block=2"),
    ("model.convs_per_block=0", "model.convs_per_block=0: every block needs a positive whole "
     "number of convs; for example model.convs_per_block=2"),
    ("model.convs_per_block=1.5", "model.convs_per_block=1.5: every block needs a positive "
     "whole number of convs; for example model.convs_per_block=2"),
])
def test_bad_convs_per_block_is_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        compose(override)
    assert str(err.value) == message


def test_model_depth_is_checked_at_validation_when_the_image_size_is_in_the_config():
    folder = ["data=image_folder", "data.image_size=[28,28]"]
    compose(*folder, "model.filters=[8,8,8,8]")
    with pytest.raises(ConfigError, match=r"^model.filters=\[8, 8, 8, 8, 8\]: 5 conv blocks"):
        compose(*folder, "model.filters=[8,8,8,8,8]")


@pytest.mark.parametrize("size,overrides,fits", DEPTH_CASES)
def test_model_depth_check_agrees_with_the_real_keras_model(size, overrides, fits):
    """The check passes exactly when Keras builds the model and its last block is >= 1x1."""
    from pipeline.models import build_model

    for blocks in (fits, fits + 1):
        cfg = depth_model(overrides, blocks)
        try:
            model = build_model(
                [*size, 1], 10, pad_input=cfg.pad_input, filters=cfg.filters,
                kernel_size=cfg.kernel_size, convs_per_block=cfg.convs_per_block,
                padding=cfg.padding, pooling=cfg.pooling, batch_norm=False, dense_units=[])
            built = min(model.get_layer("flatten").input.shape[1:3]) >= 1
        except ValueError:
            built = False
        try:
            check_model_fits(cfg, [*size, 1])
            passed = True
        except ConfigError:
            passed = False
        assert passed == built == (blocks == fits), (blocks, cfg)
