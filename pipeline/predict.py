"""Command `predict`: classify your own images with a trained model.

    python -m pipeline.predict outputs/train/model.keras photo.jpg more/     # a .keras file
    python -m pipeline.predict <run id> photos/ --json                       # a run's model
    python -m pipeline.predict models:/m-<id> photos/ --top 3                # a logged model
    python -m pipeline.predict models:/<name>/<version> photos/              # a registered one
    python -m pipeline.predict models:/<name>@champion photos/               # by its alias

Prints one line per image: its path, the predicted class and its probability. Folders are
searched, with their subfolders, for .png, .jpg, .jpeg, .bmp and .gif files.

The model takes raw 0..255 pixels and scales them itself (its first layer), so the only
preprocessing here is what its input shape asks for: grayscale or RGB by its channel count,
resized to its height and width, each file read as the `image_folder` data source reads
training images. The class names come from `labels.json` beside a `.keras` file, or from the
metadata the train stage logs with the MLflow model; without them the class indices serve as
names. A two-class detector has one sigmoid output, the probability of its
second class.

The images are read and predicted `BATCH_SIZE` at a time, and each batch's lines are printed
before the next batch is read: a folder of any size takes the memory of one batch, and the
first lines come at once. `--json` writes its list record by record, the same document as
when written whole. An unreadable image stops the command with an error line, after the lines
of the batches before its own (a `--json` list is then left open).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from pipeline import project, tracking
from pipeline.config import PathsConfig
from pipeline.data.image_folder import EXTENSIONS, image_files, read_image
from pipeline.errors import PipelineError, run_cli
from pipeline.files import read_json
from pipeline.progress import Progress

if TYPE_CHECKING:
    import keras
    from mlflow.entities import LoggedModel, Run

COLOR_MODES = {1: "grayscale", 3: "rgb"}  # the model's channels -> data.color_mode
RUN_ID = re.compile(r"[0-9a-f]{32}")
MLFLOW_URI_PREFIXES = ("runs:/", "models:/")
BATCH_SIZE = 64
# What keras.models.load_model raises for a file that is not a Keras model.
NOT_A_MODEL = (ValueError, OSError, KeyError, TypeError)


class PredictError(PipelineError):
    """A model or image that cannot be used: missing, unreadable or of the wrong kind."""


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """The image files named, with those inside the folders named (sorted, subfolders too).

    A file named directly is taken whatever its suffix; a folder contributes its files with
    an image suffix (any case), hidden files and folders left out.

    Raises:
        PredictError: a path does not exist, or a folder holds no image files.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            images = image_files(path)
            if not images:
                raise PredictError(f"folder {str(path)!r} holds no image files "
                                   f"({' '.join(EXTENSIONS)}); give a folder with images "
                                   "or the image files themselves")
            found.extend(images)
        elif path.exists():
            found.append(path)
        else:
            raise PredictError(f"image {str(path)!r} does not exist; check the path")
    return found


@functools.cache
def stage_paths() -> PathsConfig:
    """Where `dvc repro` writes the model and its labels: the paths `conf/` composes."""
    from pipeline.params import composed  # Hydra, only when a path is needed

    return composed().paths


def load_predictor(model_ref: str,
                   tracking_uri: str | None = None) -> tuple[keras.Model, list[str]]:
    """The model and its class names, in output order.

    Args:
        model_ref: a `.keras` file; an MLflow run id (the run's logged model); a `runs:/`
            or `models:/` URI (a logged model `models:/m-<id>`, or a registered one
            `models:/<name>/<version>` or `models:/<name>@<alias>`, see pipeline.promote).
        tracking_uri: the MLflow store for run ids and URIs; default the project's.

    Raises:
        PredictError: the model does not exist, is not a Keras image classifier, or its
            labels do not fit its outputs.
    """
    if Path(model_ref).exists():
        return _load_keras_file(Path(model_ref))
    if RUN_ID.fullmatch(model_ref) or model_ref.startswith(MLFLOW_URI_PREFIXES):
        uri = tracking_uri or tracking.tracking_uri(None, project.project_root())
        return _load_logged_model(model_ref, uri)
    raise PredictError(f"model {model_ref!r} not found: no such file, nor an MLflow run id or "
                       f"runs:/ or models:/ URI; give a trained .keras file (dvc repro writes "
                       f"{stage_paths().model}), a run id or a models:/ URI")


def _load_keras_file(path: Path) -> tuple[keras.Model, list[str]]:
    import keras

    try:
        model = keras.models.load_model(path, compile=False)
    except NOT_A_MODEL as err:
        raise PredictError(f"{str(path)!r} is not a Keras model ({_first_line(err)}); give the "
                           f"trained .keras file, e.g. {stage_paths().model}") from err
    labels_path = path.parent / Path(stage_paths().labels).name  # train writes it there
    labels = _read_labels(labels_path) if labels_path.is_file() else None
    return _checked(model, labels, str(labels_path))


def _read_labels(path: Path) -> dict:
    try:
        labels = read_json(path)
    except (OSError, ValueError) as err:
        raise PredictError(f"{str(path)!r} cannot be read as JSON ({_first_line(err)}); "
                           "restore it from the train stage or delete it") from err
    if not isinstance(labels, dict):
        raise PredictError(f"{str(path)!r} holds {type(labels).__name__}, not "
                           '{"class_names": [...]}; restore it from the train stage')
    return labels


def _load_logged_model(model_ref: str, uri: str) -> tuple[keras.Model, list[str]]:
    """Load a model from the MLflow store at `uri`, its class names from its metadata."""
    import mlflow
    from mlflow.exceptions import MlflowException

    database = tracking.missing_store(uri)
    if database:
        raise PredictError(f"no MLflow store at {database} to find {model_ref!r} in; train a "
                           "run first (dvc repro) or pass --tracking-uri")
    tracking.connect(uri)
    try:
        model_uri = _run_model_uri(model_ref) if RUN_ID.fullmatch(model_ref) else model_ref
        metadata = mlflow.models.get_model_info(model_uri).metadata
        model = mlflow.keras.load_model(model_uri, load_model_kwargs={"compile": False})
    except MlflowException as err:
        raise PredictError(f"cannot load the MLflow model {model_ref!r} from "
                           f"{tracking.shown_uri(uri)} "
                           f"({_first_line(err)}); copy the run id or model URI from the "
                           "MLflow UI, or pass --tracking-uri for another store") from err
    return _checked(model, metadata, f"the MLflow metadata of {model_ref}")


def _run_model_uri(run_id: str) -> str:
    """`models:/<model id>` of the one model the run logged."""
    from mlflow.tracking import MlflowClient

    models = logged_models(MlflowClient().get_run(run_id))
    if len(models) != 1:
        logged = ", ".join(m.model_uri for m in models) or "none"
        raise PredictError(f"run {run_id} must have logged exactly one model to predict with, "
                           f"it logged {len(models)} ({logged}); give a models:/ URI instead")
    return models[0].model_uri


def logged_models(run: Run) -> list[LoggedModel]:
    """The models `run` logged, in the store MLflow is connected to (train logs one)."""
    import mlflow

    return mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                       filter_string=f"source_run_id = '{run.info.run_id}'",
                                       output_format="list")


def _checked(model: keras.Model, labels: dict | None,
             source: str) -> tuple[keras.Model, list[str]]:
    """The model with its class names, once both are known to fit an image classifier."""
    image_shape(model)
    output = model.output_shape
    if not (isinstance(output, tuple) and len(output) == 2 and output[1]):
        raise PredictError(f"the model's output has shape {output}, not (batch, classes); "
                           "give a model trained by this pipeline")
    units = output[1]
    count = 2 if units == 1 else units  # one sigmoid unit: two classes
    names = (labels or {}).get("class_names")
    if names is None:
        return model, [str(i) for i in range(count)]
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise PredictError(f"class_names in {source} is {names!r}, not a list of names")
    if len(names) != count:
        raise PredictError(f"{source} names {len(names)} classes but the model predicts "
                           f"{count}; use the labels written with this model")
    return model, names


def image_shape(model: keras.Model) -> tuple[int, int, int]:
    """(height, width, channels) of the images the model takes.

    Raises:
        PredictError: the model does not take one batch of fixed-size grayscale or RGB images.
    """
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4
            and all(isinstance(d, int) for d in shape[1:])):
        raise PredictError(f"the model takes input of shape {shape}, not images of a fixed "
                           "size (batch, height, width, channels); give an image classifier")
    height, width, channels = shape[1:]
    if channels not in COLOR_MODES:
        raise PredictError(f"the model takes images with {channels} channels; predict reads "
                           "grayscale (1) or RGB (3) images")
    return height, width, channels


def load_images(paths: Sequence[Path],
                shape: tuple[int, int, int]) -> tuple[np.ndarray, list[bool]]:
    """Read the images as the model takes them: raw float32 pixels 0..255.

    Each is converted to grayscale or RGB by the channel count and resized (bilinear, aspect
    ratio not kept) when its size differs, as the training images were.

    Args:
        shape: (height, width, channels), see `image_shape`.

    Returns:
        The images, (N, height, width, channels), and per image whether it was resized.

    Raises:
        DataError: a file is not an image Pillow can read.
    """
    height, width, channels = shape
    images = np.empty((len(paths), height, width, channels), dtype=np.float32)
    resized = []
    for i, path in enumerate(paths):
        images[i], was_resized = read_image(path, (height, width), COLOR_MODES[channels])
        resized.append(was_resized)
    return images, resized


def batches(paths: Sequence[Path], size: int | None = None) -> Iterator[Sequence[Path]]:
    """`paths` in consecutive batches of `size` (default `BATCH_SIZE`), the last one shorter."""
    size = size or BATCH_SIZE
    for start in range(0, len(paths), size):
        yield paths[start:start + size]


def predict_batches(model: keras.Model, paths: Sequence[Path], class_names: Sequence[str]
                    ) -> Iterator[tuple[Sequence[Path], list[dict], list[bool]]]:
    """Read and predict the images one batch (`BATCH_SIZE`) at a time: per batch its paths,
    their predictions (see `predict`) and whether each image was resized.

    A batch is read only when the one before it has been taken, so memory holds one batch of
    images, however many there are.

    Raises:
        DataError: a file is not an image Pillow can read (when its batch is reached).
    """
    shape = image_shape(model)
    for batch in batches(paths):
        images, resized = load_images(batch, shape)
        yield batch, predict(model, images, class_names), resized


def predict(model: keras.Model, images: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """The predicted class of each image, its probability and every class's probability.

    A model with one sigmoid output gives P(class_names[1]); the class is class_names[1]
    when that is at least 0.5, else class_names[0].

    Returns:
        Per image {"class", "probability", "probabilities": {class name: p}}, probabilities
        in the model's class order.
    """
    outputs = np.asarray(model.predict(images, batch_size=BATCH_SIZE, verbose=0),
                         dtype=np.float64)  # (N, classes), or (N, 1) for a sigmoid
    if outputs.shape[1] == 1:
        positive = outputs[:, 0]
        probabilities = np.stack([1.0 - positive, positive], axis=1)
        chosen = (positive >= 0.5).astype(int)
    else:
        probabilities = outputs
        chosen = outputs.argmax(axis=1)
    return [{"class": class_names[c], "probability": float(row[c]),
             "probabilities": {name: float(p) for name, p in zip(class_names, row)}}
            for c, row in zip(chosen, probabilities)]


def top_classes(prediction: dict, k: int | None) -> dict[str, float]:
    """The `k` most probable classes (all when None), most probable first, the predicted one
    leading ties."""
    ranked = sorted(prediction["probabilities"].items(),
                    key=lambda item: (-item[1], item[0] != prediction["class"]))
    return dict(ranked[:k])


def format_line(path: Path, prediction: dict, k: int, resized_to: str | None = None) -> str:
    """`path<TAB>class<TAB>probability`, with the next k-1 classes and, for an image that was
    resized, `(resized to <resized_to>)` (height x width, as `data.image_size`)."""
    cells = [str(path)]
    for name, p in top_classes(prediction, k).items():
        cells += [name, f"{p:.4f}"]
    if resized_to:
        cells.append(f"(resized to {resized_to})")
    return "\t".join(cells)


def records(paths: Sequence[Path], predictions: Sequence[dict], resized: Sequence[bool],
            k: int | None) -> list[dict[str, Any]]:
    """The `--json` output: per image its path, class, probability, the probabilities of all
    (or the top k) classes, and whether it was resized."""
    return [{"path": str(path), "class": p["class"], "probability": p["probability"],
             "probabilities": top_classes(p, k) if k else p["probabilities"],
             "resized": was_resized}
            for path, p, was_resized in zip(paths, predictions, resized)]


class JsonList:
    """A JSON list written one item at a time to `out`, in the text `json.dumps(items,
    indent=2)` gives the whole list, and a newline; `close` ends it."""

    def __init__(self, out: TextIO):
        self.out = out
        self.count = 0

    def append(self, item: Any) -> None:
        """Write `item`, after the opening bracket or the comma that goes before it."""
        self.out.write("[\n" if self.count == 0 else ",\n")
        self.out.write(textwrap.indent(json.dumps(item, indent=2), "  "))
        self.count += 1

    def close(self) -> None:
        """Write the closing bracket (the whole `[]` when no item came)."""
        self.out.write("\n]\n" if self.count else "[]\n")


def _first_line(err: BaseException) -> str:
    """An exception's message on one line, for an error that must stay one line."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.predict",
        description="Predict the classes of images with a trained model.")
    parser.add_argument("model", help="a .keras file, an MLflow run id, or a runs:/ or "
                        "models:/ URI")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files (.png .jpg .jpeg .bmp .gif) or folders of them")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list of {path, class, probability, probabilities}")
    parser.add_argument("--tracking-uri", metavar="URI", help="the MLflow store for run ids "
                        "and URIs (default: $MLFLOW_TRACKING_URI, else the project's mlflow.db)")
    parser.add_argument("--top", type=int, metavar="K", help="show the K most probable "
                        "classes per image (default: 1; with --json, all)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    paths = find_images(args.images)  # before loading the model: a typo fails at once
    model, class_names = load_predictor(args.model, args.tracking_uri)
    if args.top is not None and not 1 <= args.top <= len(class_names):
        raise PredictError(f"--top {args.top}: the model has {len(class_names)} classes; "
                           f"choose 1 to {len(class_names)}")
    height, width, _ = image_shape(model)
    listing = JsonList(sys.stdout) if args.json else None
    progress = Progress("predict:", len(paths), stream=sys.stderr)  # stdout stays the results
    done = 0
    for batch, predictions, resized in predict_batches(model, paths, class_names):
        done += len(batch)
        progress.update(done)
        if listing is not None:
            for record in records(batch, predictions, resized, args.top):
                listing.append(record)
        else:
            for path, prediction, was_resized in zip(batch, predictions, resized):
                print(format_line(path, prediction, args.top or 1,
                                  f"{height}x{width}" if was_resized else None))
        sys.stdout.flush()  # this batch's lines out before the next batch is read
    progress.close()
    if listing is not None:
        listing.close()
        sys.stdout.flush()


if __name__ == "__main__":
    run_cli(main)
