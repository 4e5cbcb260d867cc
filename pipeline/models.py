"""The CNN, built from explicit arguments, and its per-layer parameter report."""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import layers

from pipeline.anatomy import layer_anatomy

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
    head: str = "auto",
    augment: dict | None = None,
    name: str = "cnn",
) -> keras.Model:
    """input (-> augmentation) -> scaling -> [conv (-> BN) -> activation] x n -> pool, per
    block -> dense -> softmax, or one sigmoid unit for a two-class detector.

    The scaling layer standardises raw 0..255 pixels with the training set's mean and std (in
    0..1 units), so the model takes raw images. Augmentation layers act only in training. The
    output is computed in float32 under mixed precision.
    """
    out_units, activation_out = output_head(head, num_classes)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = augmentation(inputs, **(augment or {}))
    scale = 1.0 / (255.0 * pixel_std)
    x = layers.Rescaling(scale, offset=-pixel_mean / pixel_std, name="standardize")(x)
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
    x = layers.Dense(out_units, name="logits")(x)
    outputs = layers.Activation(activation_out, dtype="float32", name=activation_out)(x)
    return keras.Model(inputs, outputs, name=name)


def output_head(head: str, num_classes: int) -> tuple[int, str]:
    """(units, activation) of the output: `auto` is one sigmoid unit for two classes."""
    if head == "sigmoid" or (head == "auto" and num_classes == 2):
        if num_classes != 2:
            raise ValueError(f"model.head=sigmoid needs two classes; the data has {num_classes}")
        return 1, "sigmoid"
    return num_classes, "softmax"


def augmentation(x, flip: str = "none", translate: float = 0.0, rotate: float = 0.0,
                 zoom: float = 0.0, contrast: float = 0.0):
    """Random training-time transformations of raw images; identity at inference."""
    if flip != "none":
        x = layers.RandomFlip(flip, name="augment_flip")(x)
    if translate:
        x = layers.RandomTranslation(translate, translate, name="augment_translate")(x)
    if rotate:
        x = layers.RandomRotation(rotate, name="augment_rotate")(x)
    if zoom:
        x = layers.RandomZoom(zoom, name="augment_zoom")(x)
    if contrast:
        x = layers.RandomContrast(contrast, value_range=(0, 255), name="augment_contrast")(x)
    return x


def parameter_report(model: keras.Model) -> dict:
    """Per layer: name, type, output shape and parameter count; per conv layer also its dense
    equivalent and per conv and pooling layer its receptive field (see `pipeline.anatomy`).
    Totals for the model, and for the model with every conv layer replaced by its dense
    equivalent (the other layers as they are).
    """
    anatomy = layer_anatomy(model)
    rows = []
    for layer in model.layers:
        shape = layer.output.shape if hasattr(layer, "output") else None
        rows.append({
            "layer": layer.name,
            "type": type(layer).__name__,
            "output_shape": [d for d in shape[1:]] if shape is not None else None,
            "params": int(layer.count_params()),
            **anatomy.get(layer.name, {}),
        })
    total = int(model.count_params())
    trainable = sum(int(keras.ops.size(w)) for w in model.trainable_weights)
    extra = sum(row["dense_equivalent"] - row["params"] for row in rows
                if "dense_equivalent" in row)
    return {
        "model": model.name,
        "layers": rows,
        "total_params": total,
        "trainable_params": trainable,
        "dense_equivalent_params": total + extra,
        "input_shape": list(model.inputs[0].shape[1:]),
    }


def _anatomy_cells(row: dict, input_values: int) -> str:
    """The dense-equivalent and receptive-field cells of one row of the Markdown table."""
    dense = ratio = field = seen = ""
    if "dense_equivalent" in row:
        dense, ratio = f"{row['dense_equivalent']:,}", f"{row['dense_ratio']:,.0f}×"
    if "receptive_field" in row:
        rf = row["receptive_field"]
        field = f"{rf['rows']}×{rf['cols']}"
        seen = f"{rf['input_values']:,} of {input_values:,} ({rf['input_share']:.1%})"
    return f"{dense} | {ratio} | {field} | {seen}"


def report_markdown(report: dict) -> str:
    """The parameter report as a Markdown table, with the dense equivalents and receptive
    fields, and a note that reads them."""
    input_values = math.prod(report["input_shape"])
    image = "×".join(str(d) for d in report["input_shape"])
    lines = [f"# Parameters of `{report['model']}`", "",
             "| layer | type | output shape | parameters | dense equivalent | ratio "
             "| receptive field | input values seen |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in report["layers"]:
        shape = "×".join(str(d) for d in row["output_shape"] or [])
        lines.append(f"| {row['layer']} | {row['type']} | {shape} | {row['params']:,} | "
                     f"{_anatomy_cells(row, input_values)} |")
    total, dense = report["total_params"], report["dense_equivalent_params"]
    lines += ["", f"Total: {total:,} parameters ({report['trainable_params']:,} trainable)."]
    if dense != total:
        lines += ["", f"Dense equivalent: {dense:,} parameters, {dense / total:,.0f}× as many. "
                      "That is the model with every conv layer replaced by a fully connected "
                      "layer between the same input and output sizes (weights + biases), the "
                      "other layers as they are: parameter sharing saves the difference."]
    lines += ["", f"Receptive field: the input pixels (rows×cols, and values with the channels) "
                  f"one output unit of a conv or pooling layer depends on. A unit of a fully "
                  f"connected layer sees the whole {image} input: {input_values:,} values.", ""]
    return "\n".join(lines)
