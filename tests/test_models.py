"""Tier (b): every model and optimizer builds; output shapes and parameter counts."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.build import model_from_config
from pipeline.config import group_options
from pipeline.models import build_model, parameter_report, report_markdown
from pipeline.train import make_optimizer
from tests.conftest import compose

META = {"input_shape": [28, 28, 1], "num_classes": 10, "pixel_mean": 0.29, "pixel_std": 0.35}


def lecture_conv(input_shape):
    """The lecture's example layer: six 5x5 filters, no padding, stride 1."""
    return keras.Sequential([keras.Input(input_shape), keras.layers.Conv2D(6, 5)])


def params_by_layer(model):
    return {row["layer"]: row for row in parameter_report(model)["layers"]}


@pytest.mark.parametrize("channels,expected", [(1, 156), (3, 456)])
def test_lecture_conv_layer_parameters(channels, expected):
    model = lecture_conv((32, 32, channels))
    (row,) = parameter_report(model)["layers"]
    assert row["output_shape"] == [28, 28, 6]
    assert row["params"] == expected == 6 * (5 * 5 * channels + 1)


def test_lecture_dense_equivalent_parameters():
    dense = keras.Sequential([keras.Input((32 * 32 * 3,)), keras.layers.Dense(28 * 28 * 6)])
    assert parameter_report(dense)["total_params"] == 14_455_392 == 3072 * 4704 + 4704


OFFLINE = {"pretrained": ["model.weights=null"]}  # ImageNet weights need a download


@pytest.mark.parametrize("name", group_options("model"))
def test_every_model_builds_and_predicts(name):
    model = model_from_config(compose(f"model={name}", *OFFLINE.get(name, [])).model, META)
    x = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1)).astype("float32")
    probabilities = model.predict(x, verbose=0)
    assert probabilities.shape == (2, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    report = parameter_report(model)
    assert report["total_params"] == model.count_params()
    assert sum(row["params"] for row in report["layers"]) == report["total_params"]


def test_convs_per_block_takes_one_count_per_block():
    """[2, 1]: two convs in the first block, one in the second; an int means every block."""
    model = model_from_config(compose("model.convs_per_block=[2,1]").model, META)
    convs = [layer.name for layer in model.layers if layer.name.startswith("block")
             and "_conv" in layer.name]
    assert convs == ["block1_conv1", "block1_conv2", "block2_conv1"]
    rows = params_by_layer(model)
    assert rows["block2_conv1"]["params"] == 3 * 3 * 32 * 64  # no bias under BatchNorm
    default = model_from_config(compose().model, META)
    assert model.count_params() == default.count_params() - 3 * 3 * 64 * 64 - 4 * 64


def test_lenet5_is_the_classic_architecture():
    model = model_from_config(compose("model=lenet5").model, META)
    rows = params_by_layer(model)
    assert rows["pad"]["output_shape"] == [32, 32, 1]
    assert rows["block1_conv1"]["output_shape"] == [28, 28, 6]
    assert rows["block1_conv1"]["params"] == 156
    assert rows["block1_pool"]["output_shape"] == [14, 14, 6]
    assert rows["block2_conv1"]["output_shape"] == [10, 10, 16]
    assert rows["block2_conv1"]["params"] == 16 * (5 * 5 * 6 + 1)
    assert rows["flatten"]["output_shape"] == [400]
    assert rows["dense1"]["params"] == 400 * 120 + 120
    assert rows["dense2"]["params"] == 120 * 84 + 84
    assert rows["logits"]["params"] == 84 * 10 + 10
    assert parameter_report(model)["total_params"] == 61_706


def test_batch_norm_replaces_conv_bias():
    model = build_model((28, 28, 1), 10, filters=[8], batch_norm=True, dense_units=[])
    rows = params_by_layer(model)
    assert rows["block1_conv1"]["params"] == 3 * 3 * 1 * 8  # no bias before BatchNorm
    assert rows["block1_bn1"]["params"] == 4 * 8  # gamma, beta, moving mean and variance
    assert parameter_report(model)["trainable_params"] == model.count_params() - 2 * 8


def test_input_standardisation_uses_training_statistics():
    model = build_model((2, 2, 1), 2, pixel_mean=0.5, pixel_std=0.25, filters=[],
                        dense_units=[], batch_norm=False)
    standardize = keras.Model(model.input, model.get_layer("standardize").output)
    out = standardize.predict(np.full((1, 2, 2, 1), 255.0, "float32"), verbose=0)
    np.testing.assert_allclose(out, (1.0 - 0.5) / 0.25, rtol=1e-6)


def test_report_markdown_lists_every_layer():
    model = build_model((28, 28, 1), 10, filters=[4], dense_units=[8])
    text = report_markdown(parameter_report(model))
    for layer in model.layers:
        assert f"| {layer.name} |" in text
    assert f"Total: {model.count_params():,} parameters" in text


@pytest.mark.parametrize("name", group_options("optimizer"))
@pytest.mark.parametrize("schedule", ["constant", "cosine", "exponential"])
def test_every_optimizer_builds_with_every_schedule(name, schedule):
    cfg = compose(f"optimizer={name}", f"optimizer.schedule={schedule}").optimizer
    optimizer = make_optimizer(cfg, steps_per_epoch=10, epochs=2)
    assert type(optimizer) is getattr(keras.optimizers, cfg.class_name)
    for key, value in cfg.arguments().items():  # every argument of the YAML reaches Keras
        assert getattr(optimizer, key) == value, key
    model = build_model((8, 8, 1), 3, filters=[2], dense_units=[])
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    model.fit(np.zeros((4, 8, 8, 1), "float32"), np.array([0, 1, 2, 0]), epochs=1, verbose=0)
    lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    if schedule == "constant":
        assert lr == pytest.approx(cfg.learning_rate)
    else:
        assert 0 < lr < cfg.learning_rate  # decayed after one step


def test_gd_has_no_momentum_and_momentum_has():
    gd = make_optimizer(compose("optimizer=gd").optimizer)
    momentum = make_optimizer(compose("optimizer=momentum").optimizer)
    assert gd.momentum == 0.0
    assert momentum.momentum == 0.9


def test_mixed_precision_builds_and_trains_with_a_float32_output():
    from pipeline import backend
    from pipeline.train import train

    cfg = compose("model=small_cnn", "trainer.precision=mixed_bfloat16")
    backend.configure(cfg.seed, deterministic=False, precision=cfg.trainer.precision)
    try:
        model = model_from_config(cfg.model, META)
        assert model.get_layer("block1_conv1").compute_dtype == "bfloat16"
        assert model.output.dtype == "float32"  # the softmax stays in float32
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (64, 28, 28, 1)).astype("float32")
        y = rng.integers(0, 10, 64)
        rows = train(model, (x, y), (x[:16], y[:16]), cfg.optimizer, epochs=1, batch_size=32)
        assert np.isfinite(rows[0]["loss"])
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_label_smoothing_trains_against_smoothed_targets():
    from pipeline.stream import OrderedBatches
    from pipeline.train import compile_model, cost_j, smoothed_classes, train

    # a softmax whose probabilities do not depend on the image: p = softmax(bias)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    bias = np.array([2.0, 0.0, -1.0], "float32")
    model.set_weights([np.zeros((4, 3), "float32"), bias])
    log_p = bias - np.log(np.exp(bias).sum())
    x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    y = np.array([0, 1, 2, 0, 1, 2])
    eps = 0.3
    targets = (1 - eps) * np.eye(3)[y] + eps / 3
    assert smoothed_classes(model, eps) == 3 and smoothed_classes(model, 0.0) is None
    compile_model(model, keras.optimizers.SGD(0.0), label_smoothing=eps)
    smoothed = model.evaluate(OrderedBatches(x, y, 3, classes=3), verbose=0, return_dict=True)
    assert smoothed["loss"] == pytest.approx(-np.mean((targets * log_p).sum(axis=1)), rel=1e-5)
    assert smoothed["accuracy"] == pytest.approx(2 / 6)  # argmax 0, right for the two 0s
    compile_model(model, keras.optimizers.SGD(0.0))
    plain = model.evaluate(OrderedBatches(x, y, 3), verbose=0, return_dict=True)
    assert plain["loss"] == pytest.approx(-np.mean(log_p[y]), rel=1e-5)

    cfg = compose("optimizer=gd", "optimizer.learning_rate=1e-9")
    rows = train(model, (x, y), (x, y), cfg.optimizer, epochs=1, batch_size=3,
                 label_smoothing=eps)
    assert rows[0]["val_loss"] == pytest.approx(smoothed["loss"], rel=1e-4)
    assert rows[0]["val_accuracy"] == pytest.approx(2 / 6)
    assert isinstance(cost_j("sigmoid", 0.1), keras.losses.BinaryCrossentropy)
    assert cost_j("softmax") == "sparse_categorical_crossentropy"


def test_warmup_rises_to_the_learning_rate_then_the_cosine_falls_to_zero():
    from pipeline.train import make_schedule

    cfg = compose("optimizer=adam", "optimizer.learning_rate=0.01",
                  "optimizer.warmup_epochs=1.5").optimizer
    schedule = make_schedule(cfg, steps_per_epoch=10, epochs=4)  # 15 steps up, 25 down
    rate = [float(keras.ops.convert_to_numpy(schedule(step))) for step in range(41)]
    assert rate[0] == 0.0
    assert rate[15] == pytest.approx(0.01)
    assert all(a < b for a, b in zip(rate[:15], rate[1:16]))  # up to the peak
    assert all(a > b for a, b in zip(rate[15:40], rate[16:41]))  # then down to 0
    assert rate[40] == pytest.approx(0.0, abs=1e-9)
    plain = make_schedule(compose("optimizer=adam").optimizer, 10, 4)
    assert float(keras.ops.convert_to_numpy(plain(0))) == pytest.approx(0.001)
