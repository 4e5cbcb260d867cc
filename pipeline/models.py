"""The models, built from explicit arguments, and their per-layer parameter report: the CNN,
and a pretrained Keras Applications network with a new head (transfer learning)."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import keras
from keras import layers

from pipeline.anatomy import layer_anatomy
from pipeline.backbones import BACKBONES, IMAGENET, MIN_INPUT_SIZE
from pipeline.errors import ConfigError

POOLING = {"max": layers.MaxPooling2D, "avg": layers.AveragePooling2D}
BACKBONE = "backbone"  # the name of the pretrained network's layer in the model


def build_model(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    pixel_mean: float = 0.0,
    pixel_std: float = 1.0,
    pad_input: int = 0,
    filters: Sequence[int] = (32, 64),
    kernel_size: int = 3,
    convs_per_block: int | Sequence[int] = 1,
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
    output is computed in float32 under mixed precision. `convs_per_block`: the number of
    convs in every block, or one number per entry of `filters`.
    """
    counts = ([convs_per_block] * len(filters) if isinstance(convs_per_block, int)
              else list(convs_per_block))
    if len(counts) != len(filters):
        raise ValueError(f"convs_per_block={convs_per_block!r}: one count per block of "
                         f"filters={list(filters)!r}")
    out_units, activation_out = output_head(head, num_classes)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = augmentation(inputs, **(augment or {}))
    scale = 1.0 / (255.0 * pixel_std)
    x = layers.Rescaling(scale, offset=-pixel_mean / pixel_std, name="standardize")(x)
    if pad_input:
        x = layers.ZeroPadding2D(pad_input, name="pad")(x)
    for b, (width, convs) in enumerate(zip(filters, counts), start=1):
        for c in range(1, convs + 1):
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


def build_pretrained(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    backbone: str = "mobilenet_v3_small",
    weights: str | None = IMAGENET,
    dense_units: Sequence[int] = (),
    dropout: float = 0.0,
    head: str = "auto",
    augment: dict | None = None,
    name: str = "pretrained",
) -> keras.Model:
    """input (-> augmentation) (-> grayscale to RGB) (-> resize up to 32x32) -> the backbone's
    own preprocessing -> the backbone with global average pooling -> [dropout -> dense] ->
    dropout -> softmax, or one sigmoid unit for a two-class detector.

    The model takes raw 0..255 pixels, as `build_model`'s does. The backbone (the layer named
    `BACKBONE`) comes trainable but for its BatchNorm layers, which stay frozen, and so in
    inference mode with their ImageNet statistics (`set_backbone_frozen`). `weights`:
    `imagenet` (Keras downloads them), the path of a weights file of the backbone
    (`.weights.h5`, or Keras Applications' `.h5`), or None for random weights.

    Raises:
        ConfigError: the ImageNet weights could not be downloaded, or the weights file does
            not fit the backbone.
        ValueError: a backbone, head or input these networks do not take.
    """
    height, width, channels = input_shape
    if channels not in (1, 3):
        raise ValueError(f"model=pretrained takes grayscale or RGB images; these have "
                         f"{channels} channels")
    out_units, activation_out = output_head(head, num_classes)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = augmentation(inputs, **(augment or {}))
    if channels == 1:  # ImageNet networks see colour: the gray value in all three channels
        x = layers.Concatenate(name="gray_to_rgb")([x, x, x])
    size = (max(height, MIN_INPUT_SIZE), max(width, MIN_INPUT_SIZE))
    if size != (height, width):
        x = layers.Resizing(*size, name="resize")(x)
    spec = BACKBONES[backbone]
    x = getattr(keras.applications, spec.preprocessing).preprocess_input(x)
    network = make_backbone(backbone, (*size, 3), weights)
    # Its BatchNorm layers run in inference mode because they are frozen (set_backbone_frozen):
    # `network(x, training=False)` alone did not hold in Keras 3.15 once the outer model was
    # called with training=True (as `fit` does), and the layers used their batch statistics.
    x = network(x)  # (batch, features)
    for d, units in enumerate(dense_units, start=1):
        if dropout:
            x = layers.Dropout(dropout, name=f"dense{d}_dropout")(x)
        x = layers.Dense(units, activation="relu", name=f"dense{d}")(x)
    if dropout:
        x = layers.Dropout(dropout, name="logits_dropout")(x)
    x = layers.Dense(out_units, name="logits")(x)
    outputs = layers.Activation(activation_out, dtype="float32", name=activation_out)(x)
    model = keras.Model(inputs, outputs, name=name)
    set_backbone_frozen(model, False)  # trainable, its BatchNorm layers frozen
    return model


def make_backbone(backbone: str, input_shape: Sequence[int], weights: str | None) -> keras.Model:
    """The Keras Applications network `backbone` without its classifier top, its output
    globally average-pooled, named `BACKBONE`, with `weights` loaded."""
    constructor = BACKBONES[backbone].constructor
    build = getattr(keras.applications, constructor)
    kwargs = dict(include_top=False, pooling="avg", input_shape=tuple(input_shape), name=BACKBONE)
    if weights != IMAGENET:
        network = build(weights=None, **kwargs)
        if weights is not None:
            load_backbone_weights(network, weights, backbone)
        return network
    try:
        with warnings.catch_warnings():  # the 224x224 weights fit any input size: no news
            warnings.filterwarnings("ignore", message=r".*Weights for input shape \(224, 224\)")
            return build(weights=IMAGENET, **kwargs)
    except ValueError:  # an input these networks do not take, a corrupt download
        raise
    except Exception as err:  # Keras's download raises a bare Exception when the fetch fails
        raise ConfigError(_download_failure(constructor, str(err))) from err


def _download_failure(constructor: str, message: str) -> str:
    """One line from Keras's "URL fetch failure on <url>: <errno> -- <reason>"."""
    fetch = re.match(r"URL fetch failure on (\S+): .*? -- (.*)", message.splitlines()[0]
                     if message else "")
    url, reason = fetch.groups() if fetch else ("", message.splitlines()[0] if message else "")
    return (f"model.weights=imagenet: Keras could not download the ImageNet weights of "
            f"{constructor} ({reason[:100]}); this machine may not reach the download site: "
            f"download {url or 'them'} where you can and give model.weights=<path to that .h5 "
            "file>")


def load_backbone_weights(network: keras.Model, path: str, backbone: str) -> None:
    """Load a weights file into the backbone; one line if it cannot be read or does not fit.

    Keras warns once per part of the network that the file lacks ("Skipping nested
    container", a hundred lines for a file of another network) and leaves that part random:
    here that is a file that does not fit, and the warnings become its one line.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            network.load_weights(Path(path).expanduser())
            error = None
        except (ValueError, OSError) as err:
            error = err
    missing = [w for w in caught if "no matching group found" in str(w.message)]
    for w in caught:
        if w not in missing:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if error is None and not missing:
        return
    reason = (_first_lines(str(error)) if error is not None else
              f"{len(missing)} parts of the network are not in the file")
    raise ConfigError(
        f"model.weights={path}: these weights do not fit the {backbone} backbone ({reason}); "
        f"give the weights of keras.applications.{BACKBONES[backbone].constructor}"
        "(include_top=False) as a .weights.h5 or .h5 file, or model.weights=imagenet"
    ) from error


def _first_lines(message: str, limit: int = 200) -> str:
    """The start of a multi-line Keras message as one line: its first line, and the next
    one where the first ends in a colon."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else \
        (lines[0] if lines else "")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def backbone_of(model: keras.Model) -> keras.Model | None:
    """The pretrained network inside a `build_pretrained` model; None for other models."""
    return next((layer for layer in model.layers if layer.name == BACKBONE), None)


def sublayers(layer: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    """Every layer inside `layer`, at any depth."""
    for inner in getattr(layer, "layers", []):
        yield inner
        yield from sublayers(inner)


def set_backbone_frozen(model: keras.Model, frozen: bool) -> None:
    """Freeze the backbone (only the head trains) or unfreeze it for fine-tuning. Its BatchNorm
    layers stay frozen either way (Keras's transfer-learning guide): fine-tuning on a few
    hundred images would otherwise replace their ImageNet statistics and scales. Compile the
    model again after this."""
    network = backbone_of(model)
    if network is None:
        raise ValueError(f"model {model.name!r} has no layer {BACKBONE!r} to freeze")
    network.trainable = not frozen
    for layer in sublayers(network):
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False


def transfer_report(model: keras.Model, backbone: str, weights: str | None,
                    freeze_epochs: int) -> dict:
    """The parameters that train in each phase of transfer learning: the frozen phase (the head
    only) and fine-tuning (all but the backbone's BatchNorm layers)."""
    network = backbone_of(model)
    backbone_params = int(network.count_params())
    batchnorm = sum(int(layer.count_params()) for layer in sublayers(network)
                    if isinstance(layer, layers.BatchNormalization))
    head = int(model.count_params()) - backbone_params
    return {
        "backbone": backbone,
        "weights": weights,
        "freeze_epochs": freeze_epochs,
        "backbone_params": backbone_params,
        "backbone_batchnorm_params": batchnorm,
        "head_params": head,
        "frozen_phase": {"trainable": head, "frozen": backbone_params},
        "fine_tune_phase": {"trainable": head + backbone_params - batchnorm, "frozen": batchnorm},
    }


def _transfer_markdown(transfer: dict) -> list[str]:
    k = transfer["freeze_epochs"]
    frozen_for = (f"frozen for the first {k} epoch{'s' * (k != 1)}, then fine-tuned"
                  if k else "fine-tuned from the first epoch")
    lines = ["## Transfer learning", "",
             f"Backbone {transfer['backbone']} (weights: {transfer['weights'] or 'random'}): "
             f"{transfer['backbone_params']:,} parameters, {frozen_for}; its BatchNorm layers "
             f"({transfer['backbone_batchnorm_params']:,} parameters) stay frozen throughout. "
             f"Head: {transfer['head_params']:,} trainable parameters.", "",
             "| phase | trainable parameters | frozen parameters |", "|---|---:|---:|"]
    if k:
        phase = transfer["frozen_phase"]
        epochs = f"epochs 1–{k}" if k > 1 else "epoch 1"
        lines.append(f"| {epochs}: backbone frozen | {phase['trainable']:,} | "
                     f"{phase['frozen']:,} |")
    phase = transfer["fine_tune_phase"]
    lines += [f"| epochs {k + 1}–: fine-tuning | {phase['trainable']:,} | {phase['frozen']:,} |",
              ""]
    return lines


def output_head(head: str, num_classes: int) -> tuple[int, str]:
    """(units, activation) of the output: `auto` is one sigmoid unit for two classes."""
    if head == "sigmoid" or (head == "auto" and num_classes == 2):
        if num_classes != 2:
            raise ValueError(f"model.head=sigmoid needs two classes; the data has {num_classes}")
        return 1, "sigmoid"
    return num_classes, "softmax"


def augmentation(x, flip: str = "none", translate: float = 0.0, rotate: float = 0.0,
                 zoom: float = 0.0, contrast: float = 0.0, erase: float = 0.0):
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
    if erase:  # a rectangle of 2% to 33% of the image replaced by noise, with chance `erase`
        x = layers.RandomErasing(erase, value_range=(0, 255), name="augment_erase")(x)
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
    if "transfer" in report:
        lines += _transfer_markdown(report["transfer"])
    return "\n".join(lines)
