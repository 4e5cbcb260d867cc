"""Tier (a): every option of every config group composes and validates; bad values fail."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml
from omegaconf import MISSING

from pipeline.config import (
    DATA_SOURCES,
    MODEL_SCHEMAS,
    OPTIMIZERS,
    CnnConfig,
    Config,
    check_model_fits,
    group_options,
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


def test_every_optimizer_has_an_option_and_a_schema():
    assert sorted(OPTIMIZERS) == group_options("optimizer")
    assert {"gd", "momentum", "rmsprop", "adam"} <= set(OPTIMIZERS)


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
    (["mlflow.sweep_id='a/b'"], "mlflow.sweep_id='a/b': must be letters, digits"),
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
    found, todo = set(), [cls, *DATA_SOURCES.values(), *OPTIMIZERS.values(), CnnConfig,
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
