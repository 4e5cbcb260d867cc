"""Users' own images: image folders, HDF5 files, Keras datasets by name, the binary detector."""

from __future__ import annotations

import dataclasses
import json

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import ImageFolderConfig
from pipeline.data import hdf5, load_dataset, with_positive_class
from pipeline.data.dataset import Dataset
from pipeline.data.image_folder import read_image
from pipeline.errors import DataError
from pipeline.prepare import prepare, read_split, write_prepared
from tests.conftest import compose, mlflow_runs, run, write_image_folder

CATS = {"cat": 7, "non-cat": 9}  # sneakers play the cats, ankle boots the rest
# a class folder named as people name them, with characters MLflow's metric names refuse
NOT_CAT = "not a cat (boots, etc.)"


def folder_config(path, **overrides) -> ImageFolderConfig:
    cfg = compose("data=image_folder", f"data.path={path}").data
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_image_folder_reads_every_format_with_a_stratified_split(tmp_path, data_dir):
    write_image_folder(tmp_path / "images", data_dir, CATS, per_class=20, size=(40, 40))
    data = load_dataset(folder_config(tmp_path / "images"), tmp_path, seed=3)
    assert data.class_names == ["cat", "non-cat"]
    assert data.x_train.shape == (32, 64, 64, 3) and data.x_test.shape == (8, 64, 64, 3)
    assert np.bincount(data.y_test).tolist() == [4, 4]
    prepared = prepare(data, None, 0.25, seed=3)
    write_prepared(prepared, tmp_path / "prepared", workers=1)
    assert prepared.notes == ["resized 40 of 40 images to 64x64"]
    again = load_dataset(folder_config(tmp_path / "images"), tmp_path, seed=3)
    x_test, y_test = read_split(tmp_path / "prepared", "test")
    np.testing.assert_array_equal(np.asarray(x_test), np.asarray(again.x_test))
    np.testing.assert_array_equal(y_test, again.y_test)


def test_image_folder_separate_test_folder_and_grayscale(tmp_path, data_dir):
    write_image_folder(tmp_path / "train", data_dir, CATS, per_class=6, size=(28, 28))
    write_image_folder(tmp_path / "test", data_dir, CATS, per_class=3, size=(28, 28))
    cfg = folder_config(tmp_path / "train", test_path=str(tmp_path / "test"),
                        image_size=[28, 28], color_mode="grayscale")
    data = load_dataset(cfg, tmp_path)
    assert data.x_train.shape == (12, 28, 28, 1) and data.x_test.shape == (6, 28, 28, 1)
    assert np.asarray(data.x_test).shape == (6, 28, 28, 1)
    prepared = prepare(data, None, 0.25, seed=0)
    write_prepared(prepared, tmp_path / "prepared", workers=1)
    assert prepared.notes == []


def test_mixed_sizes_are_resized_and_reported(tmp_path, data_dir):
    write_image_folder(tmp_path / "images", data_dir, CATS, per_class=4, size=(64, 64))
    Image.new("RGB", (100, 30), "white").save(tmp_path / "images" / "cat" / "wide.png")
    data = load_dataset(folder_config(tmp_path / "images", test_fraction=0.25), tmp_path)
    prepared = prepare(data, None, 0.2, seed=0)
    write_prepared(prepared, tmp_path / "prepared", workers=1)
    assert prepared.notes == ["resized 1 of 9 images to 64x64"]
    assert read_split(tmp_path / "prepared", "train")[0].shape[1:] == (64, 64, 3)


def test_subfolders_count_and_hidden_files_and_other_files_do_not(tmp_path, data_dir):
    path = write_image_folder(tmp_path / "images", data_dir, CATS, per_class=4,
                              formats=("png", "webp", "tiff", "TIF"))
    (path / "cat" / "indoor").mkdir()
    (path / "cat" / "0000.png").rename(path / "cat" / "indoor" / "0000.png")
    (path / "cat" / "._0001.png").write_bytes(b"\0\5\26\7 macOS resource fork")
    (path / "non-cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (path / "non-cat" / ".ipynb_checkpoints").mkdir()
    (path / "non-cat" / ".ipynb_checkpoints" / "0000-checkpoint.png").write_bytes(b"stale")
    (path / "non-cat" / "notes.txt").write_text("where these came from")
    data = load_dataset(folder_config(path, test_fraction=0.25), tmp_path, seed=0)
    assert len(data.y_train) + len(data.y_test) == 8
    assert np.bincount(np.r_[data.y_train, data.y_test]).tolist() == [4, 4]
    assert data.notes[-1] == ("skipped 1 file(s) that are not images (.txt); the image formats "
                              "are .png .jpg .jpeg .bmp .gif .webp .tif .tiff")


@pytest.mark.unit
def test_sixteen_bit_and_transparent_images_read_as_a_viewer_shows_them(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # a 16-bit grayscale PNG
    pixels, _ = read_image(tmp_path / "deep.png", (8, 8), "grayscale")
    np.testing.assert_array_equal(pixels[..., 0], np.rint(ramp / 257).astype(np.uint8))
    logo = np.zeros((8, 8, 4), np.uint8)
    logo[2:6, 2:6] = (200, 0, 0, 255)  # a red square on a transparent background
    Image.fromarray(logo, "RGBA").save(tmp_path / "logo.png")
    for mode, background, square in (("rgb", [255, 255, 255], [200, 0, 0]),
                                     ("grayscale", [255], [60])):
        pixels, _ = read_image(tmp_path / "logo.png", (8, 8), mode)
        assert pixels[0, 0].tolist() == background and pixels[3, 3].tolist() == square


@pytest.mark.parametrize("break_it,message", [
    (lambda p: [f.unlink() for f in (p / "non-cat").iterdir()], "holds no images"),
    (lambda p: [f.unlink() for f in (p / "non-cat").iterdir()] and (p / "non-cat").rmdir(),
     "has 1 class folder(s) (cat)"),
])
def test_bad_image_folders(tmp_path, data_dir, break_it, message):
    path = write_image_folder(tmp_path / "images", data_dir, CATS, per_class=4)
    break_it(path)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(folder_config(path), tmp_path)
    with pytest.raises(DataError, match="nowhere not found"):
        load_dataset(folder_config(tmp_path / "nowhere"), tmp_path)


def write_h5(path, x, y, classes=(b"non-cat", b"cat"), x_key="train_set_x", y_key="train_set_y"):
    with h5py.File(path, "w") as f:
        f[x_key] = x
        f[y_key] = y
        if classes is not None:
            f["list_classes"] = np.array(classes)


def course_layout(tmp_path, n_train=30, n_test=10):
    rng = np.random.default_rng(0)
    write_h5(tmp_path / "train.h5", rng.integers(0, 256, (n_train, 16, 16, 3), dtype=np.uint8),
             rng.integers(0, 2, (1, n_train)))
    write_h5(tmp_path / "test.h5", rng.integers(0, 256, (n_test, 16, 16, 3), dtype=np.uint8),
             rng.integers(0, 2, (1, n_test)), x_key="test_set_x", y_key="test_set_y")
    cfg = compose("data=hdf5", f"data.path={tmp_path / 'train.h5'}",
                  f"data.test_path={tmp_path / 'test.h5'}").data
    return cfg


@pytest.mark.unit
def test_hdf5_course_layout(tmp_path):
    data = load_dataset(course_layout(tmp_path), tmp_path)
    assert data.class_names == ["non-cat", "cat"]
    assert data.x_train.shape == (30, 16, 16, 3) and data.y_train.shape == (30,)
    assert data.x_test.shape == (10, 16, 16, 3)


@pytest.mark.unit
def test_hdf5_configurable_names_and_float_images(tmp_path):
    x = np.random.default_rng(1).random((12, 8, 8))
    write_h5(tmp_path / "a.h5", x, np.arange(12) % 3, classes=None, x_key="X", y_key="Y")
    h5 = str(tmp_path / "a.h5")
    cfg = dataclasses.replace(compose("data=hdf5").data, path=h5, test_path=h5, x_key="X",
                              y_key="Y", test_x_key="X", test_y_key="Y", classes_key=None)
    data = hdf5.load(cfg, tmp_path)
    assert data.class_names == ["0", "1", "2"]
    assert data.x_train.shape == (12, 8, 8, 1) and data.x_train.dtype == np.uint8
    assert data.x_train.max() == round(x.max() * 255)


@pytest.mark.unit
def test_hdf5_sixteen_bit_images_scale_and_standardised_ones_are_refused(tmp_path):
    x = np.linspace(0, 65535, 12 * 16, dtype=np.uint16).reshape(12, 4, 4)
    write_h5(tmp_path / "a.h5", x, np.arange(12) % 2)
    h5 = str(tmp_path / "a.h5")
    cfg = dataclasses.replace(compose("data=hdf5").data, path=h5, test_path=h5,
                              test_x_key="train_set_x", test_y_key="train_set_y")
    data = hdf5.load(cfg, tmp_path)
    assert data.x_train.min() == 0 and data.x_train.max() == 255
    write_h5(tmp_path / "a.h5", (x - 30000.0) / 20000.0, np.arange(12) % 2)
    with pytest.raises(DataError, match=r"train_set_x holds negative values \(from -1\.5 to "
                       r"1\.77675\); store raw pixels"):
        hdf5.load(cfg, tmp_path)


@pytest.mark.parametrize("mutate,message", [
    (lambda f: f.__delitem__("train_set_x"), "has no dataset 'train_set_x'.*set data.x_key"),
    (lambda f: (f.__delitem__("train_set_y"), f.__setitem__("train_set_y", np.zeros(29))),
     "30 images but 29 labels"),
    (lambda f: (f.__delitem__("train_set_y"), f.__setitem__("train_set_y", np.full(30, 5))),
     "train labels range over 5..5 but there are 2 classes"),
])
@pytest.mark.unit
def test_bad_hdf5_files(tmp_path, mutate, message):
    cfg = course_layout(tmp_path)
    with h5py.File(tmp_path / "train.h5", "a") as f:
        mutate(f)
    with pytest.raises(DataError, match=message):
        load_dataset(cfg, tmp_path)


@pytest.mark.unit
def test_keras_dataset_without_network_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cfg = compose("data=keras", "data.dataset=cifar10").data
    with pytest.raises(DataError, match="Keras could not load the dataset 'cifar10'"):
        load_dataset(cfg, tmp_path)


@pytest.mark.unit
def test_positive_class_becomes_class_one():
    data = Dataset(np.zeros((3, 2, 2, 1)), np.array([0, 1, 1]), np.zeros((1, 2, 2, 1)),
                   np.array([0]), ["cat", "non-cat"])
    flipped = with_positive_class(data, "cat")
    assert flipped.class_names == ["non-cat", "cat"]
    assert flipped.y_train.tolist() == [1, 0, 0] and flipped.y_test.tolist() == [1]
    with pytest.raises(DataError, match="'dog' is not a class"):
        with_positive_class(data, "dog")


@pytest.fixture(scope="module")
def detector_run(tmp_path_factory, data_dir):
    """A binary detector trained by `dvc repro` on an image folder, in a copy of the project."""
    from tests.conftest import copy_project

    project = copy_project(tmp_path_factory.mktemp("detector") / "project", data_dir)
    write_image_folder(project / "images", data_dir, {"cat": 7, NOT_CAT: 9}, per_class=60,
                       size=(32, 32))
    overrides = ["data=image_folder", "data.image_size=[32,32]", "data.positive_class=cat",
                 "model=small_cnn", "trainer.epochs=2", "trainer.batch_size=16",
                 "augment=light", "trainer.class_weight=balanced"]
    run(["python", "-m", "pipeline.params", *overrides], project)
    result = run(["dvc", "repro"], project)
    return project, result


@pytest.mark.slow  # a detector trained through dvc repro (~55 s); CI runs it
def test_detector_has_one_sigmoid_unit_and_binary_metrics(detector_run):
    import keras

    project, result = detector_run
    params = yaml.safe_load((project / "params.yaml").read_text())
    model = keras.models.load_model(project / params["paths"]["model"])
    assert model.output.shape[-1] == 1 and model.layers[-1].name == "sigmoid"
    assert any(layer.name.startswith("augment_") for layer in model.layers)
    metrics = json.loads((project / params["paths"]["metrics"]).read_text())
    for key in ("precision", "recall", "f1", "roc_auc", "average_precision"):
        assert 0.0 <= metrics[key] <= 1.0, key
    per_class = json.loads((project / params["paths"]["per_class"]).read_text())
    assert metrics["f1"] == per_class["cat"]["f1"]
    roc = (project / params["paths"]["roc"]).read_text().splitlines()
    assert roc[0] == "fpr,tpr,threshold" and roc[1].startswith("0,0,")
    assert (project / params["paths"]["figures"] / "roc_precision_recall.png").exists()
    labels = json.loads((project / params["paths"]["labels"]).read_text())
    assert labels["class_names"] == [NOT_CAT, "cat"]
    (mlrun,) = mlflow_runs(project)
    assert mlrun.info.status == "FINISHED" and "roc_auc" in mlrun.data.metrics
    assert mlrun.data.metrics["test_f1.not a cat _boots_ etc._"] == \
        per_class[NOT_CAT]["f1"]
    shown = run(["dvc", "plots", "show", "-o", "plots_html"], project)
    html = (project / "plots_html" / "index.html").read_text()
    assert "ROC" in html and "precision-recall" in html, shown.stdout


@pytest.mark.unit
def test_roc_auc_and_average_precision_by_hand():
    from pipeline.evaluate import area_under, average_precision, precision_recall_curve, roc_curve

    positive = np.array([1, 0, 1, 0], dtype=bool)
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    fpr, tpr, _ = roc_curve(positive, scores)
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    assert area_under(fpr, tpr) == 0.75  # 3 of the 4 (pos, neg) pairs ranked right
    recall, precision, _ = precision_recall_curve(positive, scores)
    assert average_precision(recall, precision) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
