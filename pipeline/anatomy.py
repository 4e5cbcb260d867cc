"""Why convolutions, counted: parameter sharing and sparse connections, layer by layer.

Parameter sharing: a conv layer's parameters against those of the fully connected layer that
would join the same input to the same output (its *dense equivalent*: every input value to every
output value, plus one bias per output value). Sparse connections: how many values of the input
image one output unit of a conv or pooling layer depends on (its receptive field), against the
whole image that a unit of a fully connected layer sees.

The receptive field follows the standard recurrence along a chain of layers (every model that
`build_model` makes is one): a window of `k` pixels with dilation `d` and stride `s` widens the
field by `(d·(k-1)) · jump` and multiplies the jump (the input-pixel distance between neighbouring
output units) by `s`. Padding moves the field, not its size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

CONV_LAYERS = (layers.Conv2D, layers.DepthwiseConv2D, layers.SeparableConv2D)
POOLING_LAYERS = (layers.MaxPooling2D, layers.AveragePooling2D)


def dense_equivalent_params(input_shape: Sequence[int], output_shape: Sequence[int]) -> int:
    """Weights and biases of a fully connected layer from `input_shape` to `output_shape`.

    `(32, 32, 3) -> (28, 28, 6)`: 3,072 × 4,704 weights + 4,704 biases = 14,455,392.
    """
    n_in, n_out = math.prod(input_shape), math.prod(output_shape)
    return n_in * n_out + n_out


@dataclass(frozen=True)
class ReceptiveField:
    """The input region (rows × cols pixels) one unit depends on, and the jump: how many input
    pixels apart two neighbouring units' regions start."""

    rows: int = 1
    cols: int = 1
    jump_rows: int = 1
    jump_cols: int = 1

    def through(self, kernel: Sequence[int], strides: Sequence[int],
                dilation: Sequence[int] = (1, 1)) -> ReceptiveField:
        """The field of a unit of a window layer (conv or pooling) applied to units with
        this field."""
        span_rows = dilation[0] * (kernel[0] - 1)
        span_cols = dilation[1] * (kernel[1] - 1)
        return ReceptiveField(rows=self.rows + span_rows * self.jump_rows,
                              cols=self.cols + span_cols * self.jump_cols,
                              jump_rows=self.jump_rows * strides[0],
                              jump_cols=self.jump_cols * strides[1])

    def input_values(self, image_shape: Sequence[int]) -> int:
        """Input values the unit depends on: its region, clipped to the image, × channels."""
        height, width, channels = image_shape
        return min(self.rows, height) * min(self.cols, width) * channels


def sliding_window(layer: keras.layers.Layer):
    """(kernel, strides, dilation) of a conv or pooling layer; None for any other layer."""
    if isinstance(layer, CONV_LAYERS):
        return layer.kernel_size, layer.strides, layer.dilation_rate
    if isinstance(layer, POOLING_LAYERS):
        return layer.pool_size, layer.strides, (1, 1)
    return None


def layer_anatomy(model: keras.Model) -> dict[str, dict]:
    """Per conv layer its dense equivalent and the ratio; per conv and pooling layer its
    receptive field in the input image. Keyed by layer name; other layers are absent.
    """
    image_shape = tuple(model.inputs[0].shape[1:])  # (H, W, C) of the raw image
    image_values = math.prod(image_shape)
    field = ReceptiveField()
    found: dict[str, dict] = {}
    for layer in model.layers:
        window = sliding_window(layer)
        if window is None:
            continue
        field = field.through(*window)
        seen = field.input_values(image_shape)
        entry = {"receptive_field": {"rows": field.rows, "cols": field.cols,
                                     "input_values": seen,
                                     "input_share": seen / image_values}}
        if isinstance(layer, CONV_LAYERS):
            dense = dense_equivalent_params(layer.input.shape[1:], layer.output.shape[1:])
            entry["dense_equivalent"] = dense
            entry["dense_ratio"] = dense / max(layer.count_params(), 1)
        found[layer.name] = entry
    return found


def first_conv_layer(model: keras.Model) -> keras.layers.Layer | None:
    """The model's first conv layer (the one that sees the image), or None for an MLP."""
    return next((layer for layer in model.layers if isinstance(layer, CONV_LAYERS)), None)


def first_layer_filters(layer: keras.layers.Layer) -> np.ndarray:
    """The kernel of a conv layer: (kernel rows, kernel cols, input channels, filters)."""
    return np.asarray(layer.get_weights()[0])


def feature_maps(model: keras.Model, layer: keras.layers.Layer, images: np.ndarray) -> np.ndarray:
    """The output of `layer` for raw `images`: (n, H', W', filters), one map per filter."""
    probe = keras.Model(model.input, layer.output)
    return np.asarray(probe.predict(images, verbose=0), dtype=np.float32)
