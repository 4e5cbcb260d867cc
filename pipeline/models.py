"""The CNN, built from explicit arguments, and its per-layer parameter report."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

POOLING = {"max": layers.MaxPooling2D, "avg": layers.AveragePooling2D}


def build_model(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    pixel_mean: float = 0.0,
    pixel_std: float = 1.0,
    pad_input: int = 0,
    filters: Sequence[int] = (32, 64),
    kernel_size: int = 3,
    convs_per_block: int = 1,
    padding: str = "same",
    pooling: str = "max",
    batch_norm: bool = True,
    activation: str = "relu",
    dense_units: Sequence[int] = (128,),
    dropout: float = 0.0,
    name: str = "cnn",
) -> keras.Model:
    """input -> scaling -> [conv (-> BN) -> activation] x n -> pool, per block -> dense -> softmax.

    The first layer standardises raw 0..255 pixels with the training set's mean and std (in
    0..1 units), so the model takes raw images. The softmax is computed in float32 under
    mixed precision.
    """
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    scale = 1.0 / (255.0 * pixel_std)
    x = layers.Rescaling(scale, offset=-pixel_mean / pixel_std, name="standardize")(inputs)
    if pad_input:
        x = layers.ZeroPadding2D(pad_input, name="pad")(x)
    for b, width in enumerate(filters, start=1):
        for c in range(1, convs_per_block + 1):
            x = layers.Conv2D(width, kernel_size, padding=padding, use_bias=not batch_norm,
                              name=f"block{b}_conv{c}")(x)
            if batch_norm:
                x = layers.BatchNormalization(name=f"block{b}_bn{c}")(x)
            x = layers.Activation(activation, name=f"block{b}_{activation}{c}")(x)
        x = POOLING[pooling](2, name=f"block{b}_pool")(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"block{b}_dropout")(x)
    x = layers.Flatten(name="flatten")(x)
    for d, units in enumerate(dense_units, start=1):
        x = layers.Dense(units, use_bias=not batch_norm, name=f"dense{d}")(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"dense{d}_bn")(x)
        x = layers.Activation(activation, name=f"dense{d}_{activation}")(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"dense{d}_dropout")(x)
    x = layers.Dense(num_classes, name="logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="softmax")(x)
    return keras.Model(inputs, outputs, name=name)


def parameter_report(model: keras.Model) -> dict:
    """Per layer: name, type, output shape and parameter count; totals for the model."""
    rows = []
    for layer in model.layers:
        shape = layer.output.shape if hasattr(layer, "output") else None
        rows.append({
            "layer": layer.name,
            "type": type(layer).__name__,
            "output_shape": [d for d in shape[1:]] if shape is not None else None,
            "params": int(layer.count_params()),
        })
    trainable = sum(int(keras.ops.size(w)) for w in model.trainable_weights)
    return {
        "model": model.name,
        "layers": rows,
        "total_params": int(model.count_params()),
        "trainable_params": trainable,
    }


def report_markdown(report: dict) -> str:
    """The parameter report as a Markdown table."""
    lines = [f"# Parameters of `{report['model']}`", "",
             "| layer | type | output shape | parameters |", "|---|---|---|---:|"]
    for row in report["layers"]:
        shape = "×".join(str(d) for d in row["output_shape"] or [])
        lines.append(f"| {row['layer']} | {row['type']} | {shape} | {row['params']:,} |")
    lines += ["", f"Total: {report['total_params']:,} parameters "
                  f"({report['trainable_params']:,} trainable).", ""]
    return "\n".join(lines)
