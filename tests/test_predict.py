"""`python -m pipeline.predict` on real images written by Pillow, with real Keras models saved as
`.keras` files and logged to a real MLflow SQLite store."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from PIL import Image

from pipeline import tracking
from pipeline.errors import DataError
from pipeline.models import build_model
from pipeline.predict import (
    JsonList,
    PredictError,
    batches,
    find_images,
    format_line,
    image_shape,
    load_images,
    load_predictor,
    main,
    predict,
    predict_batches,
    records,
    top_classes,
)
from pipeline.tracking import log_keras_model
from tests.conftest import REPO, env
from tests.servers import free_port, stop, wait_until_ok

CLASSIFIER_SHAPE = (28, 28, 1)
FILE_NAMES = ["ankle boot", "bag", "coat"]  # labels.json beside the .keras file
LOGGED_NAMES = ["shirt", "sneaker", "trouser"]  # the MLflow metadata: a different source
DETECTOR_SHAPE = (32, 32, 3)
DETECTOR_NAMES = ["dark", "bright"]  # the second is the positive class
REGISTERED = "predict-test"
BILINEAR = Image.Resampling.BILINEAR
SERVER_START_TIMEOUT_S = 120

YY, XX = np.mgrid[0:28, 0:28]
# Grayscale 28x28 pictures, unlike each other so that the model's classes differ between them.
PICTURES = {
    "gradient": XX * 255 / 27,
    "stripes": (YY // 7 % 2) * 200 + 30,
    "checker": ((XX // 4 + YY // 4) % 2) * 255,
    "circle": (((XX - 14) ** 2 + (YY - 14) ** 2) < 64) * 255,
    "noise": np.random.default_rng(0).integers(0, 256, (28, 28)),
}


def gray(name: str) -> np.ndarray:
    return PICTURES[name].astype(np.uint8)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, the grayscale Pillow's convert("L") gives."""
    return rgb @ np.array([0.299, 0.587, 0.114])


@dataclass
class Images:
    """The files of the classifier's image folder and what the model should see for each."""

    folder: Path
    paths: list[Path]  # in the order predict finds them
    expected: np.ndarray  # (N, 28, 28, 1) float32, as computed here without pipeline.predict
    resized: list[bool]
    rgb: np.ndarray  # the colour picture behind expected[4]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("predict")


@pytest.fixture(scope="module")
def classifier(tmp: Path) -> tuple[keras.Model, Path]:
    """A seeded, untrained 3-class CNN of the pipeline, saved with its labels.json."""
    keras.utils.set_random_seed(1)
    model = build_model(CLASSIFIER_SHAPE, 3, filters=[4], dense_units=[8])
    folder = tmp / "classifier"
    folder.mkdir()
    model.save(folder / "model.keras")
    (folder / "labels.json").write_text(json.dumps({"class_names": FILE_NAMES}))
    return model, folder / "model.keras"


def make_detector(shape=DETECTOR_SHAPE) -> keras.Model:
    """One sigmoid unit: P(bright) = sigmoid(10 * mean brightness in 0..1 - 5)."""
    inputs = keras.Input(shape=shape)
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Flatten()(x)
    dense = keras.layers.Dense(1, activation="sigmoid")
    outputs = dense(x)
    size = int(np.prod(shape))
    dense.set_weights([np.full((size, 1), 10 / size), np.array([-5.0])])
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def detector(tmp: Path) -> Path:
    folder = tmp / "detector"
    folder.mkdir()
    make_detector().save(folder / "model.keras")
    (folder / "labels.json").write_text(json.dumps({"class_names": DETECTOR_NAMES,
                                                    "positive_class": "bright"}))
    return folder / "model.keras"


@pytest.fixture(scope="module")
def images(tmp: Path) -> Images:
    """PNG, JPEG, BMP and GIF files (suffixes in any case) in a folder and a subfolder, one RGB
    and one of another size, and a text file that must be passed over."""
    folder = tmp / "images"
    (folder / "more").mkdir(parents=True)
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(gray("gradient")).save(folder / "a_gradient.png")
    Image.fromarray(gray("stripes")).save(folder / "b_stripes.JPG")
    Image.fromarray(gray("checker")).save(folder / "c_checker.BMP")
    Image.fromarray(gray("circle")).save(folder / "d_circle.gif")
    rgb = np.stack([gray("noise"), gray("gradient"), 255 - gray("circle")], axis=-1)
    Image.fromarray(rgb).save(folder / "e_rgb.png")
    wide = np.zeros((40, 56), dtype=np.uint8)  # height 40, width 56: left dark, right bright
    wide[:, 28:] = 250
    Image.fromarray(wide).save(folder / "more" / "f_wide.jpeg")

    jpeg = np.asarray(Image.open(folder / "b_stripes.JPG"))  # what JPEG's loss left
    assert np.abs(jpeg.astype(int) - gray("stripes")).max() < 40
    wide_jpeg = Image.open(folder / "more" / "f_wide.jpeg")
    # Pillow's own conversion and resizing, which `test_load_images_...` checks against
    # numbers worked out here
    expected = [gray("gradient"), jpeg, gray("checker"), gray("circle"),
                np.asarray(Image.fromarray(rgb).convert("L")),
                np.asarray(wide_jpeg.resize((28, 28), BILINEAR))]
    names = ["a_gradient.png", "b_stripes.JPG", "c_checker.BMP", "d_circle.gif", "e_rgb.png",
             "more/f_wide.jpeg"]
    return Images(folder, [folder / n for n in names],
                  np.stack(expected).astype(np.float32)[..., None],
                  [False] * 5 + [True], rgb)


@pytest.fixture(scope="module")
def expected(classifier, images) -> np.ndarray:
    """The classifier's probabilities for the images; clear winners, and not all the same."""
    probabilities = classifier[0].predict(images.expected, verbose=0)
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, "near ties: choose other pictures"
    assert len(set(probabilities.argmax(axis=1))) > 1, "one class for all: choose another seed"
    return probabilities


def classes(probabilities: np.ndarray, names=FILE_NAMES) -> list[str]:
    return [names[i] for i in probabilities.argmax(axis=1)]


# --- finding and reading images ---------------------------------------------------------------

@pytest.mark.unit
def test_find_images_walks_folders_sorted_and_takes_named_files_as_they_are(images, tmp):
    named = tmp / "named.dat"
    Image.fromarray(gray("noise")).save(named, format="PNG")
    assert find_images([images.folder, named]) == [*images.paths, named]
    assert find_images([images.folder / "more"]) == [images.paths[-1]]


@pytest.mark.unit
def test_find_images_leaves_out_hidden_files_and_folders(tmp_path):
    Image.fromarray(gray("noise")).save(tmp_path / "shoe.png")
    (tmp_path / "._shoe.png").write_bytes(b"\0\5\26\7 macOS resource fork")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    Image.fromarray(gray("noise")).save(tmp_path / ".ipynb_checkpoints" / "shoe-checkpoint.png")
    assert find_images([tmp_path]) == [tmp_path / "shoe.png"]


@pytest.mark.unit
def test_find_images_refuses_a_missing_path_and_a_folder_without_images(images, tmp):
    with pytest.raises(PredictError, match=r"image '.*nope\.png' does not exist"):
        find_images([images.folder, tmp / "nope.png"])
    empty = tmp / "no_images"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(PredictError, match=r"folder '.*no_images' holds no image files"):
        find_images([empty])


@pytest.mark.unit
def test_load_images_converts_and_resizes_as_the_model_asks(images):
    loaded, resized = load_images(images.paths, CLASSIFIER_SHAPE)
    assert loaded.dtype == np.float32 and loaded.shape == (6, 28, 28, 1)
    assert resized == images.resized
    np.testing.assert_array_equal(loaded, images.expected)
    assert np.abs(loaded[[0, 2, 3], ..., 0] - [gray(n) for n in ("gradient", "checker",
                                                                 "circle")]).max() == 0
    assert np.abs(loaded[4, :, :, 0] - luma(images.rgb)).max() <= 1  # RGB -> gray
    wide = loaded[5, :, :, 0]  # 56x40 -> 28x28: the halves stay dark and bright
    assert wide[:, :13].max() < 10 and wide[:, 15:].min() > 240


@pytest.mark.unit
def test_load_images_replicates_grayscale_into_rgb(images):
    loaded, resized = load_images(images.paths[:1], DETECTOR_SHAPE)
    assert loaded.shape == (1, 32, 32, 3) and resized == [True]
    np.testing.assert_array_equal(loaded[..., 0], loaded[..., 1])
    np.testing.assert_array_equal(loaded[..., 0], loaded[..., 2])
    expected = np.asarray(Image.fromarray(gray("gradient")).resize((32, 32), BILINEAR))
    np.testing.assert_allclose(loaded[0, :, :, 0], expected, atol=1)


@pytest.mark.unit
def test_a_corrupt_image_is_refused_naming_the_file(tmp):
    corrupt = tmp / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(1).bytes(300))
    truncated = tmp / "truncated.png"
    Image.fromarray(gray("noise")).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    for path in (corrupt, truncated):
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))} is not a readable image"):
            load_images([path], CLASSIFIER_SHAPE)


# --- models and their class names ----------------------------------------------------------

@pytest.mark.unit
def test_load_predictor_takes_the_class_names_from_labels_json(classifier, detector):
    model, names = load_predictor(str(classifier[1]))
    assert names == FILE_NAMES and image_shape(model) == CLASSIFIER_SHAPE
    model, names = load_predictor(str(detector))
    assert names == DETECTOR_NAMES and image_shape(model) == DETECTOR_SHAPE


@pytest.mark.unit
def test_without_labels_json_the_class_indices_are_the_names(tmp):
    folder = tmp / "unlabelled"
    folder.mkdir()
    make_detector().save(folder / "detector.keras")
    build_model(CLASSIFIER_SHAPE, 4, filters=[4], dense_units=[8]).save(folder / "cnn.keras")
    assert load_predictor(str(folder / "detector.keras"))[1] == ["0", "1"]
    assert load_predictor(str(folder / "cnn.keras"))[1] == ["0", "1", "2", "3"]


@pytest.mark.parametrize("labels, message", [
    ({"class_names": ["a", "b"]}, r"names 2 classes but the model predicts 3"),
    ({"class_names": "abc"}, r"class_names in .*labels\.json is 'abc', not a list of names"),
    ([1, 2, 3], r"labels\.json' holds list, not"),
    ("{not json", r"labels\.json' cannot be read as JSON"),
])
@pytest.mark.unit
def test_labels_that_do_not_fit_are_refused(tmp_path, classifier, labels, message):
    classifier[0].save(tmp_path / "model.keras")
    text = labels if isinstance(labels, str) else json.dumps(labels)
    (tmp_path / "labels.json").write_text(text)
    with pytest.raises(PredictError, match=message):
        load_predictor(str(tmp_path / "model.keras"))


@pytest.mark.unit
def test_models_that_are_not_image_classifiers_are_refused(tmp):
    not_keras = tmp / "random.keras"
    not_keras.write_bytes(np.random.default_rng(2).bytes(500))
    with pytest.raises(PredictError, match=r"'.*random\.keras' is not a Keras model"):
        load_predictor(str(not_keras))
    vector = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3, activation="softmax")])
    vector.save(tmp / "vector.keras")
    with pytest.raises(PredictError, match=r"takes input of shape \(None, 10\), not images"):
        load_predictor(str(tmp / "vector.keras"))
    make_detector((8, 8, 4)).save(tmp / "rgba.keras")
    with pytest.raises(PredictError, match=r"images with 4 channels"):
        load_predictor(str(tmp / "rgba.keras"))


@pytest.mark.unit
def test_a_model_that_is_neither_a_file_nor_an_mlflow_reference_is_refused(tmp):
    with pytest.raises(PredictError, match=r"model '.*nope\.keras' not found: no such file"):
        load_predictor(str(tmp / "nope.keras"))


# --- predictions ---------------------------------------------------------------------------

@pytest.mark.unit
def test_predict_gives_the_models_argmax_and_its_probabilities(classifier, images, expected):
    model = load_predictor(str(classifier[1]))[0]
    loaded, _ = load_images(images.paths, CLASSIFIER_SHAPE)
    predictions = predict(model, loaded, FILE_NAMES)
    assert [p["class"] for p in predictions] == classes(expected)
    for p, row in zip(predictions, expected):
        assert list(p["probabilities"]) == FILE_NAMES
        np.testing.assert_allclose(list(p["probabilities"].values()), row, atol=1e-5)
        assert p["probability"] == p["probabilities"][p["class"]]
        assert p["probability"] == pytest.approx(row.max(), abs=1e-5)


class FixedSigmoid:
    """A stand-in model whose one sigmoid output is given."""

    def __init__(self, outputs):
        self.outputs = np.array(outputs, dtype=np.float32)[:, None]

    def predict(self, images, batch_size, verbose):
        return self.outputs


@pytest.mark.unit
def test_a_sigmoid_output_is_the_probability_of_the_second_class():
    predictions = predict(FixedSigmoid([0.2, 0.5, 0.9]), np.zeros((3, 1, 1, 1)), DETECTOR_NAMES)
    assert [(p["class"], round(p["probability"], 6)) for p in predictions] == [
        ("dark", 0.8), ("bright", 0.5), ("bright", 0.9)]
    assert {k: round(v, 6) for k, v in predictions[0]["probabilities"].items()} == {
        "dark": 0.8, "bright": 0.2}


@pytest.mark.unit
def test_the_detector_sees_dark_and_bright_images_after_conversion_and_resizing(detector, tmp):
    folder = tmp / "shades"
    folder.mkdir()
    Image.new("L", (20, 20), 10).save(folder / "dark.png")  # gray into an RGB model
    Image.new("RGB", (50, 30), (250, 240, 230)).save(folder / "light.jpg")
    Image.new("RGB", (32, 32), (100, 100, 100)).save(folder / "mid.bmp")
    model, names = load_predictor(str(detector))
    loaded, resized = load_images(find_images([folder]), image_shape(model))
    assert resized == [True, True, False]
    predictions = predict(model, loaded, names)
    assert [p["class"] for p in predictions] == ["dark", "bright", "dark"]
    mean = np.array([10, 240, 100]) / 255  # sigmoid(10 mean - 5): P(bright)
    bright = 1 / (1 + np.exp(-(10 * mean - 5)))
    np.testing.assert_allclose([p["probabilities"]["bright"] for p in predictions], bright,
                               atol=2e-3)
    assert predictions[0]["probability"] == pytest.approx(1 - bright[0])


@pytest.mark.unit
def test_the_pipelines_two_class_model_is_a_detector_predict_reads(tmp, images):
    keras.utils.set_random_seed(3)
    model = build_model(CLASSIFIER_SHAPE, 2, filters=[4], dense_units=[8])
    assert model.output_shape == (None, 1)
    folder = tmp / "pipeline_detector"
    folder.mkdir()
    model.save(folder / "model.keras")
    (folder / "labels.json").write_text(json.dumps({"class_names": ["shirt", "T-shirt"]}))
    loaded_model, names = load_predictor(str(folder / "model.keras"))
    assert names == ["shirt", "T-shirt"]
    positive = model.predict(images.expected, verbose=0)[:, 0]
    assert (positive < 0.499).any() and (positive > 0.501).any(), "choose another seed"
    assert np.abs(positive - 0.5).min() > 1e-4, "too near 0.5: choose another seed"
    predictions = predict(loaded_model, load_images(images.paths, CLASSIFIER_SHAPE)[0], names)
    assert [p["class"] for p in predictions] == [names[int(p >= 0.5)] for p in positive]
    np.testing.assert_allclose([p["probabilities"]["T-shirt"] for p in predictions], positive,
                               atol=1e-5)


@pytest.mark.unit
def test_top_classes_and_the_output_formats():
    prediction = {"class": "b", "probability": 0.5,
                  "probabilities": {"a": 0.2, "b": 0.5, "c": 0.3}}
    assert list(top_classes(prediction, 2).items()) == [("b", 0.5), ("c", 0.3)]
    assert list(top_classes(prediction, None)) == ["b", "c", "a"]
    tie = {"class": "y", "probability": 0.5, "probabilities": {"x": 0.5, "y": 0.5}}
    assert list(top_classes(tie, 1)) == ["y"]
    assert format_line(Path("p.png"), prediction, 1, None) == "p.png\tb\t0.5000"
    assert format_line(Path("p.png"), prediction, 2, "28x28") == (
        "p.png\tb\t0.5000\tc\t0.3000\t(resized to 28x28)")
    assert records([Path("p.png")], [prediction], [True], 1) == [
        {"path": "p.png", "class": "b", "probability": 0.5, "probabilities": {"b": 0.5},
         "resized": True}]


@pytest.mark.unit
def test_main_prints_the_top_k_and_refuses_k_beyond_the_classes(classifier, images, expected,
                                                                 capsys):
    main([str(classifier[1]), str(images.paths[0]), "--top", "3"])
    path, *cells = capsys.readouterr().out.rstrip("\n").split("\t")
    ranked = sorted(zip(expected[0], FILE_NAMES), reverse=True)
    assert path == str(images.paths[0])
    assert cells[::2] == [name for _, name in ranked]
    np.testing.assert_allclose([float(c) for c in cells[1::2]], [p for p, _ in ranked],
                               atol=1e-4)
    with pytest.raises(PredictError, match=r"--top 4: the model has 3 classes; choose 1 to 3"):
        main([str(classifier[1]), str(images.paths[0]), "--top", "4"])
    assert capsys.readouterr().out == ""


# --- streaming: one batch at a time ----------------------------------------------------------

BATCH = 4  # BATCH_SIZE in the tests that predict several batches


@pytest.fixture(scope="module")
def many(tmp: Path) -> list[Path]:
    """Two batches of BATCH images and three more: the pictures shifted one more pixel each."""
    folder = tmp / "many"
    folder.mkdir()
    names = list(PICTURES)
    for i in range(2 * BATCH + 3):
        Image.fromarray(np.roll(gray(names[i % len(names)]), i, axis=1)).save(
            folder / f"{i:02d}.png")
    return find_images([folder])


@pytest.fixture(scope="module")
def many_expected(classifier, many) -> np.ndarray:
    """The classifier's probabilities for `many`, predicted all at once; clear winners, not
    all the same."""
    probabilities = classifier[0].predict(load_images(many, CLASSIFIER_SHAPE)[0],
                                          batch_size=len(many), verbose=0)
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, "near ties: choose other pictures"
    assert len(set(probabilities.argmax(axis=1))) > 1, "one class for all: choose others"
    return probabilities


@pytest.fixture
def small_batches(monkeypatch):
    """predict reads and predicts BATCH images at a time."""
    monkeypatch.setattr("pipeline.predict.BATCH_SIZE", BATCH)


class FlushedOnly:
    """A stdout whose `flushed` holds only what was written and then flushed."""

    def __init__(self):
        self.pending: list[str] = []
        self.flushed = ""

    def write(self, text: str) -> int:
        self.pending.append(text)
        return len(text)

    def flush(self) -> None:
        self.flushed += "".join(self.pending)
        self.pending.clear()


@pytest.mark.unit
def test_batches_split_the_paths_in_order_the_last_one_shorter():
    assert [list(b) for b in batches(list(range(11)), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                               [8, 9, 10]]
    assert [list(b) for b in batches(list(range(8)), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(batches([], 4)) == []


@pytest.mark.unit
def test_predict_batches_reads_a_batch_only_when_the_one_before_is_taken(
        classifier, many, small_batches, monkeypatch):
    read: list[int] = []  # the size of each batch read

    def recording(paths, shape):
        read.append(len(paths))
        return load_images(paths, shape)

    monkeypatch.setattr("pipeline.predict.load_images", recording)
    stream = predict_batches(classifier[0], many, FILE_NAMES)
    assert read == []
    first, predictions, resized = next(stream)
    assert read == [BATCH] and list(first) == many[:BATCH]
    assert len(predictions) == len(resized) == BATCH
    assert [len(batch) for batch, _, _ in stream] == [BATCH, 3]
    assert read == [BATCH, BATCH, 3]


@pytest.mark.unit
def test_images_beyond_one_batch_give_one_line_each_as_predicted_all_at_once(
        classifier, many, many_expected, small_batches, capsys):
    main([str(classifier[1]), str(many[0].parent)])
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert len(many) == 2 * BATCH + 3
    assert [row[0] for row in rows] == [str(p) for p in many]
    assert [row[1] for row in rows] == classes(many_expected)
    np.testing.assert_allclose([float(row[2]) for row in rows], many_expected.max(axis=1),
                               atol=1e-4)
    assert all(len(row) == 3 for row in rows)


@pytest.mark.parametrize("options, per_image", [([], "\n"), (["--json"], '"path": ')])
@pytest.mark.unit
def test_each_batch_is_printed_and_flushed_before_the_next_is_read(
        classifier, many, small_batches, monkeypatch, options, per_image):
    stdout = FlushedOnly()
    monkeypatch.setattr(sys, "stdout", stdout)
    shown: list[int] = []  # images on stdout, flushed, as each batch is read

    def counting(paths, shape):
        shown.append(stdout.flushed.count(per_image))
        return load_images(paths, shape)

    monkeypatch.setattr("pipeline.predict.load_images", counting)
    main([str(classifier[1]), str(many[0].parent), *options])
    assert shown == [0, BATCH, 2 * BATCH]
    assert stdout.flushed.count(per_image) == len(many)
    assert stdout.pending == []


@pytest.mark.unit
def test_json_over_several_batches_is_one_document_with_a_record_per_image(
        classifier, many, many_expected, small_batches, capsys):
    main([str(classifier[1]), str(many[0].parent), "--json"])
    text = capsys.readouterr().out
    out = json.loads(text)
    assert text == json.dumps(out, indent=2) + "\n"  # as when the list was written whole
    assert [r["path"] for r in out] == [str(p) for p in many]
    assert [r["class"] for r in out] == classes(many_expected)
    np.testing.assert_allclose([list(r["probabilities"].values()) for r in out], many_expected,
                               atol=1e-5)
    assert [r["resized"] for r in out] == [False] * len(many)


@pytest.mark.parametrize("items", [[], [{"path": "a.png", "p": {"x": 0.5}}],
                                   [{"a": [1, 2], "b": {}}, "x\ny", None, 1.5]])
@pytest.mark.unit
def test_json_list_writes_what_json_dumps_writes_for_the_whole_list(items):
    out = io.StringIO()
    listing = JsonList(out)
    for item in items:
        listing.append(item)
    listing.close()
    assert out.getvalue() == json.dumps(items, indent=2) + "\n"


@pytest.mark.unit
def test_an_unreadable_image_stops_at_its_batch_after_the_lines_before_it(
        classifier, many, small_batches, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(4).bytes(300))
    paths = [*many[:BATCH], *many[BATCH:2 * BATCH - 1], corrupt, *many[2 * BATCH:]]
    with pytest.raises(DataError, match=rf"^{re.escape(str(corrupt))} is not a readable image"):
        main([str(classifier[1]), *map(str, paths)])
    printed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert printed == [str(p) for p in many[:BATCH]]


# --- models from MLflow --------------------------------------------------------------------

@dataclass
class Store:
    uri: str
    run_id: str
    model_uri: str  # models:/m-<id>


@pytest.fixture(scope="module")
def store(tmp: Path, classifier, images) -> Iterator[Store]:
    """A SQLite store with one run that logged the classifier as train does, with metadata
    class names unlike labels.json's, and the model registered as REGISTERED version 1."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracking.connect(uri)
    experiment_id = tracking.ensure_experiment("predict")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        log_keras_model(classifier[0], images.expected[:2], {"class_names": LOGGED_NAMES})
    logged = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
    assert [m.source_run_id for m in logged] == [run.info.run_id]
    mlflow.register_model(logged[0].model_uri, REGISTERED)
    yield Store(uri, run.info.run_id, logged[0].model_uri)
    mlflow.set_tracking_uri(previous)


@pytest.mark.parametrize("reference", ["run id", "runs:/", "models:/m-", "registered"])
def test_a_logged_model_predicts_with_the_class_names_of_its_metadata(store, images, expected,
                                                                      reference):
    model_ref = {"run id": store.run_id, "runs:/": f"runs:/{store.run_id}/model",
                 "models:/m-": store.model_uri, "registered": f"models:/{REGISTERED}/1"}[reference]
    assert store.model_uri.startswith("models:/m-")
    model, names = load_predictor(model_ref, store.uri)
    assert names == LOGGED_NAMES
    loaded, _ = load_images(images.paths, image_shape(model))
    predictions = predict(model, loaded, names)
    assert [p["class"] for p in predictions] == classes(expected, LOGGED_NAMES)


@pytest.mark.parametrize("model_ref, message", [
    ("0" * 32, r"cannot load the MLflow model '0{32}' from sqlite:.*Run with id=0{32} not found"),
    ("models:/m-0000", r"cannot load the MLflow model 'models:/m-0000' .*not found"),
    (f"models:/{REGISTERED}/7", r"'models:/predict-test/7' .*Model Version .*not found"),
])
def test_unknown_mlflow_references_are_refused(store, model_ref, message):
    with pytest.raises(PredictError, match=message) as err:
        load_predictor(model_ref, store.uri)
    assert "\n" not in str(err.value)


@pytest.mark.unit
def test_a_missing_sqlite_store_is_refused_not_created(tmp):
    missing = tmp / "elsewhere" / "mlflow.db"
    with pytest.raises(PredictError, match=rf"no MLflow store at {missing}"):
        load_predictor("a" * 32, f"sqlite:///{missing}")
    assert not missing.parent.exists()


# --- the command line ----------------------------------------------------------------------

def predict_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.predict", *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_one_line_per_image(classifier, images, expected):
    result = predict_cli(str(classifier[1]), str(images.folder))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [row[0] for row in rows] == [str(p) for p in images.paths]
    assert [row[1] for row in rows] == classes(expected)
    np.testing.assert_allclose([float(row[2]) for row in rows], expected.max(axis=1), atol=1e-4)
    assert [row[3:] for row in rows] == [[]] * 5 + [["(resized to 28x28)"]]


def test_cli_json_is_a_list_of_predictions(classifier, images, expected):
    result = predict_cli(str(classifier[1]), *map(str, images.paths[4:]), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [r["path"] for r in out] == [str(p) for p in images.paths[4:]]
    assert [r["class"] for r in out] == classes(expected[4:])
    for record, row in zip(out, expected[4:]):
        assert set(record) == {"path", "class", "probability", "probabilities", "resized"}
        assert list(record["probabilities"]) == FILE_NAMES
        np.testing.assert_allclose(list(record["probabilities"].values()), row, atol=1e-5)
        assert record["probability"] == record["probabilities"][record["class"]]
    assert [r["resized"] for r in out] == [False, True]


BAD_INPUTS = {  # case: (arguments, what the error line says)
    "missing image": (["{model}", "{dir}/nope.png"], r"image '.*nope\.png' does not exist"),
    "folder without images": (["{model}", "{dir}/empty"], r"folder '.*empty' holds no image"),
    "missing model": (["{dir}/nope.keras", "{dir}/x.bmp"], r"model '.*nope\.keras' not found"),
    "corrupt image": (["{model}", "{dir}/x.bmp", "{dir}/random.png"],
                      r"random\.png is not a readable image"),
    "not a Keras model": (["{dir}/random.png", "{dir}/x.bmp"],
                          r"'.*random\.png' is not a Keras model"),
    "unknown run id": (["f" * 32, "{dir}/x.bmp", "--tracking-uri", "{uri}"],
                       r"cannot load the MLflow model 'f{32}' .*not found"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_cli_bad_input_is_one_error_line_and_exit_2(tmp, classifier, store, case):
    bad = tmp / "cli"
    (bad / "empty").mkdir(parents=True, exist_ok=True)
    (bad / "empty" / "notes.txt").write_text("not an image")
    Image.fromarray(gray("noise")).save(bad / "x.bmp")
    (bad / "random.png").write_bytes(np.random.default_rng(3).bytes(400))
    template, message = BAD_INPUTS[case]
    result = predict_cli(*(arg.replace("{model}", str(classifier[1])).replace("{dir}", str(bad))
                           .replace("{uri}", store.uri) for arg in template))
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ")
    assert re.search(message, result.stderr), result.stderr


# --- serving -------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_served_model_predicts_what_predict_does(store, images, tmp, request):
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = tmp / "serve.log"
    environ = {**env(), "MLFLOW_TRACKING_URI": store.uri, "MLFLOW_DISABLE_TELEMETRY": "true",
               "DO_NOT_TRACK": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
           store.model_uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with log.open("w") as out:
        server = subprocess.Popen(cmd, cwd=tmp, env=environ, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    request.addfinalizer(lambda: stop(server))
    wait_until_ok(f"{base_url}/ping", server, log, SERVER_START_TIMEOUT_S, poll_s=0.5)

    model, names = load_predictor(store.model_uri, store.uri)
    loaded, _ = load_images(images.paths[4:5], image_shape(model))  # the RGB one, as gray
    local = predict(model, loaded, names)[0]
    body = json.dumps({"inputs": loaded.tolist()}).encode()
    post = urllib.request.Request(f"{base_url}/invocations", data=body,
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=60) as response:
        served = np.array(json.loads(response.read())["predictions"])
    assert served.shape == (1, 3)
    assert names[int(served.argmax())] == local["class"]
    np.testing.assert_allclose(served[0], list(local["probabilities"].values()), atol=1e-5)
