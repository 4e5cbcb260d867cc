"""Tier (a): every option of every config group composes and validates; bad values fail."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml
from omegaconf import MISSING

from pipeline.config import (
    DATA_SOURCES,
    OPTIMIZERS,
    Config,
    group_options,
    to_dict,
    validate,
)
from pipeline.errors import ConfigError
from pipeline.params import compose_config, params_yaml, write_params
from tests.conftest import REPO, compose

GROUPS = ["data", "model", "augment", "optimizer", "trainer", "experiment"]


@pytest.mark.parametrize("group,option",
                         [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_option_composes_and_validates(group, option):
    raw = compose_config([f"{group}={option}"])
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
    found, todo = set(), [cls, *DATA_SOURCES.values(), *OPTIMIZERS.values()]
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
