"""Tier (b): parameter sharing and sparse connections against hand-computed values.

Dense equivalents of conv layers (padding, stride, channels, no bias), the model totals, and the
receptive-field recurrence (kernel, stride, dilation; padding changes nothing).
"""

from __future__ import annotations

import keras
import pytest
from keras import layers

from pipeline.anatomy import ReceptiveField, dense_equivalent_params
from pipeline.build import model_from_config
from pipeline.models import parameter_report, report_markdown
from tests.conftest import compose

pytestmark = pytest.mark.unit  # make test-unit: no data, no DVC, no training

META = {"input_shape": [28, 28, 1], "num_classes": 10, "pixel_mean": 0.29, "pixel_std": 0.35}


def sequential(input_shape, *stack):
    return keras.Sequential([keras.Input(input_shape), *stack])


def rows_of(model):
    return {row["layer"]: row for row in parameter_report(model)["layers"]}


@pytest.mark.parametrize("channels,conv_params,dense_params", [
    (3, 456, 14_455_392),  # the lecture's image: 3,072 x 4,704 weights + 4,704 biases
    (1, 156, 4_821_600),  # the lecture quotes 156: one channel, 1,024 x 4,704 + 4,704
])
def test_lecture_example_states_each_pair(channels, conv_params, dense_params):
    model = sequential((32, 32, channels), layers.Conv2D(6, 5, name="conv"))
    row = rows_of(model)["conv"]
    assert row["output_shape"] == [28, 28, 6]
    assert row["params"] == conv_params
    assert row["dense_equivalent"] == dense_params
    text = report_markdown(parameter_report(model))
    assert f"| conv | Conv2D | 28×28×6 | {conv_params:,} | {dense_params:,} |" in text


@pytest.mark.parametrize("input_shape,conv,output_shape,params,dense", [
    # 'same' keeps the size: 3,072 inputs -> 32x32x8 = 8,192 outputs
    ((32, 32, 3), layers.Conv2D(8, 3, padding="same"), [32, 32, 8], 8 * (27 + 1),
     3072 * 8192 + 8192),
    # stride 2 with 'same': ceil(32 / 2) = 16
    ((32, 32, 3), layers.Conv2D(8, 3, strides=2, padding="same"), [16, 16, 8], 224,
     3072 * 2048 + 2048),
    # stride 2 with 'valid': floor((28 - 3) / 2) + 1 = 13
    ((28, 28, 1), layers.Conv2D(4, 3, strides=2), [13, 13, 4], 4 * (9 + 1), 784 * 676 + 676),
    # the lecture's 6x6 -> 4x4 edge detector: 9 weights and a bias for all 16 outputs
    ((6, 6, 1), layers.Conv2D(1, 3), [4, 4, 1], 10, 36 * 16 + 16),
    # no bias (before BatchNorm): the dense equivalent still counts one bias per output
    ((10, 10, 2), layers.Conv2D(5, 3, padding="same", use_bias=False), [10, 10, 5], 90,
     200 * 500 + 500),
])
def test_conv_dense_equivalents_by_hand(input_shape, conv, output_shape, params, dense):
    (row,) = parameter_report(sequential(input_shape, conv))["layers"]
    assert row["output_shape"] == output_shape
    assert row["params"] == params
    assert row["dense_equivalent"] == dense == dense_equivalent_params(input_shape, output_shape)
    assert row["dense_ratio"] == pytest.approx(dense / params)


def test_model_totals_replace_only_conv_layers():
    model = sequential((8, 8, 1), layers.Conv2D(2, 3, padding="same"), layers.MaxPooling2D(2),
                       layers.Flatten(), layers.Dense(3))
    report = parameter_report(model)
    assert report["total_params"] == 2 * (9 + 1) + (4 * 4 * 2) * 3 + 3 == 119
    # the conv's 20 become 64 x 128 + 128 = 8,320; the dense layer's 99 stay
    assert report["dense_equivalent_params"] == 8320 + 99
    text = report_markdown(report)
    assert "Total: 119 parameters" in text and "Dense equivalent: 8,419 parameters" in text


def test_receptive_field_recurrence_by_hand():
    field = ReceptiveField()
    field = field.through((3, 3), (1, 1))
    assert (field.rows, field.jump_rows) == (3, 1)
    field = field.through((2, 2), (2, 2))  # 3 + 1 x 1 = 4, jump 2
    assert (field.rows, field.jump_rows) == (4, 2)
    field = field.through((3, 3), (1, 1), dilation=(2, 2))  # 4 + (2 x 2) x 2 = 12
    assert (field.rows, field.cols, field.jump_rows) == (12, 12, 2)
    assert field.input_values((28, 28, 3)) == 12 * 12 * 3
    assert field.input_values((10, 10, 1)) == 100  # clipped to the image


def test_receptive_fields_grow_with_depth_in_a_model():
    model = sequential(
        (32, 32, 3),
        layers.Conv2D(4, 3, padding="same", name="same3"),  # 3
        layers.Conv2D(4, 3, padding="valid", name="valid3"),  # 3 + 2 = 5
        layers.MaxPooling2D(2, name="pool2"),  # 5 + 1 = 6, jump 2
        layers.Conv2D(4, 3, strides=2, padding="same", name="stride2"),  # 6 + 2 x 2 = 10, jump 4
        layers.Conv2D(4, 3, dilation_rate=2, padding="same", name="dilated"),  # 10 + 4 x 4 = 26
        layers.AveragePooling2D(3, strides=1, padding="same", name="avg3"),  # 26 + 2 x 4 = 34
        layers.Flatten(), layers.Dense(2, name="dense"))
    rows = rows_of(model)
    expected = {"same3": 3, "valid3": 5, "pool2": 6, "stride2": 10, "dilated": 26, "avg3": 34}
    for name, size in expected.items():
        field = rows[name]["receptive_field"]
        assert (field["rows"], field["cols"]) == (size, size), name
        assert field["input_values"] == min(size, 32) ** 2 * 3, name
    assert rows["avg3"]["receptive_field"]["input_share"] == 1.0  # the whole 32x32x3 image
    assert rows["same3"]["receptive_field"]["input_share"] == pytest.approx(27 / 3072)
    assert "receptive_field" not in rows["dense"]  # a dense unit sees everything
    assert "dense_equivalent" not in rows["pool2"]


def test_padding_and_rectangular_kernels():
    plain = sequential((9, 9, 1), layers.Conv2D(1, (1, 5), name="conv"))
    padded = sequential((9, 9, 1), layers.ZeroPadding2D(2),
                        layers.Conv2D(1, (1, 5), padding="same", name="conv"))
    for model in (plain, padded):
        field = rows_of(model)["conv"]["receptive_field"]
        assert (field["rows"], field["cols"], field["input_values"]) == (1, 5, 5)


def test_default_cnn_and_mlp_baseline():
    cnn = parameter_report(model_from_config(compose().model, META))
    mlp = parameter_report(model_from_config(compose("model=mlp").model, META))
    # comparable sizes, so that shift invariance compares architectures, not capacity
    assert abs(mlp["total_params"] - cnn["total_params"]) < 0.01 * cnn["total_params"]
    assert not any("dense_equivalent" in row for row in mlp["layers"])
    assert mlp["dense_equivalent_params"] == mlp["total_params"]
    convs = [row for row in cnn["layers"] if row["type"] == "Conv2D"]
    assert len(convs) == 4
    assert cnn["dense_equivalent_params"] == (cnn["total_params"]
                                              + sum(r["dense_equivalent"] - r["params"]
                                                    for r in convs))
    # 28x28x1 -> 28x28x32 without bias: 784 x 25,088 + 25,088
    assert convs[0]["dense_equivalent"] == 784 * 25088 + 25088
    assert [r["receptive_field"]["rows"] for r in convs] == [3, 5, 10, 14]
