"""Transfer learning (`model=pretrained`): a Keras Applications backbone with a new head, trained
frozen and then fine-tuned; offline, with the backbone's weights from a local file."""

from __future__ import annotations

import json
from contextlib import contextmanager

import keras
import numpy as np
import pytest
from PIL import Image

from pipeline import backend, distribute
from pipeline.backbones import BACKBONES, Backbone
from pipeline.build import model_from_config
from pipeline.checkpoints import Checkpoint
from pipeline.data import fashion_mnist
from pipeline.errors import ConfigError
from pipeline.models import backbone_of, build_pretrained
from pipeline.train import batchnorm_layers, train
from tests.conftest import compose, copy_project, mlflow_runs, run, write_image_folder
from tests.test_resume import KillAfter, Killed

CATS = {"cat": 7, "non-cat": 9}  # sneakers play the cats, ankle boots the rest
EPOCHS, FREEZE = 3, 1


def first_conv_kernel(network: keras.Model) -> np.ndarray:
    conv = next(layer for layer in network.layers if isinstance(layer, keras.layers.Conv2D))
    return keras.ops.convert_to_numpy(conv.kernel)


def first_batchnorm_mean(network: keras.Model) -> np.ndarray:
    bn = next(layer for layer in network.layers
              if isinstance(layer, keras.layers.BatchNormalization))
    return keras.ops.convert_to_numpy(bn.moving_mean)


@pytest.fixture(scope="module")
def subset(data_dir):
    data = fashion_mnist.load(data_dir, verify_md5=False)
    keep = np.isin(data.y_train, list(CATS.values()))
    x, y = data.x_train[keep][:160], (data.y_train[keep][:160] == CATS["cat"]).astype(int)
    return x, y  # (160, 28, 28, 1) uint8 and 0/1 labels


def tiny_net(include_top=False, weights=None, input_shape=None, pooling=None, name="tiny"):
    """A stand-in for a Keras Applications constructor: conv -> BatchNorm blocks, average
    pooled; for the tests that train it several times over (MobileNetV3Small's training step
    takes 15 s to trace here)."""
    inputs = keras.Input(input_shape)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    for filters in (8, 16):
        x = keras.layers.Conv2D(filters, 3, strides=2, use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name=name)


@contextmanager
def tiny_backbone_offered():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(BACKBONES, "tiny", Backbone("TinyNet", "mobilenet_v3"))
        patch.setattr(keras.applications, "TinyNet", tiny_net, raising=False)
        yield


def network_of(backbone: str) -> keras.Model:
    """A fresh network of `backbone` as build_pretrained makes it from a 32x32 input."""
    with tiny_backbone_offered():
        constructor = getattr(keras.applications, BACKBONES[backbone].constructor)
        return constructor(weights=None, include_top=False, input_shape=(32, 32, 3))


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory, subset) -> dict[str, str]:
    """Stand-ins for downloaded ImageNet weights, per backbone: a network built here (other
    random weights than any build draws), its BatchNorm statistics set from real images."""
    folder = tmp_path_factory.mktemp("weights")
    images = np.repeat(keras.ops.convert_to_numpy(
        keras.ops.image.resize(subset[0][:64].astype("float32"), (32, 32))), 3, axis=-1)
    files = {}
    for backbone in ("mobilenet_v3_small", "tiny"):
        keras.utils.set_random_seed(123)
        network = network_of(backbone)
        for layer in network.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.0  # one batch in training mode sets the statistics
        network(images, training=True)
        files[backbone] = str(folder / f"{backbone}.weights.h5")
        network.save_weights(files[backbone])
    return files


def file_network(backbone: str, path: str) -> keras.Model:
    network = network_of(backbone)
    network.load_weights(path)
    return network


# --- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["model.backbone=vgg16"], "model.backbone='vgg16': unknown backbone; choose one of "
                               "mobilenet_v3_small, efficientnet_b0, resnet50"),
    (["model.weights=/nowhere/w.h5"], "model.weights='/nowhere/w.h5': no such weights file"),
    (["model.freeze_epochs=-1"], "model.freeze_epochs=-1: must be >= 0"),
    (["model.fine_tune_lr_factor=0"], "model.fine_tune_lr_factor=0.0: must be positive"),
])
def test_bad_pretrained_config_fails_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose("model=pretrained", *overrides)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_weights_that_do_not_fit_the_backbone_fail_with_one_line(weights_files):
    other = weights_files["tiny"]  # another network's weights
    cfg = compose("model=pretrained", f"model.weights={other}")
    with pytest.raises(ConfigError) as err:
        model_from_config(cfg.model, {"input_shape": [32, 32, 3], "num_classes": 2})
    text = str(err.value)
    assert text.startswith(f"model.weights={other}: these weights do not fit the "
                           "mobilenet_v3_small backbone (")
    assert "keras.applications.MobileNetV3Small(include_top=False)" in text and "\n" not in text


# --- training phases and exact resume, in-process ---------------------------------------------

def pretrained_model(backbone: str, weights: str) -> keras.Model:
    """The built model as a new process sees it: generators seeded anew."""
    backend.configure(7, deterministic=True)
    with tiny_backbone_offered():
        return build_pretrained((28, 28, 1), 2, backbone=backbone, weights=weights,
                                dense_units=(8,), dropout=0.2, augment={"flip": "horizontal"})


def fit(model, subset, checkpoint=None, kill_after=None):
    if kill_after:
        keras_fit = model.fit
        model.fit = lambda *a, callbacks=(), **k: keras_fit(
            *a, callbacks=[*callbacks, KillAfter(kill_after)], **k)
    x, y = subset
    return train(model, (x[:128], y[:128]), (x[128:], y[128:]), compose().optimizer,
                 epochs=EPOCHS, batch_size=32, seed=7, checkpoint=checkpoint, precise_bn=True,
                 freeze_epochs=FREEZE, fine_tune_lr_factor=0.1)


@pytest.fixture(scope="module")
def uninterrupted(subset, weights_files):
    """(model, weights digest, rows) of the training never interrupted, per backbone."""
    trained = {}

    def of(backbone: str):
        if backbone not in trained:
            model = pretrained_model(backbone, weights_files[backbone])
            rows = fit(model, subset)
            trained[backbone] = model, distribute.weights_digest(model), rows
        return trained[backbone]

    return of


def test_frozen_then_fine_tuned_with_batchnorm_kept_frozen(uninterrupted, weights_files):
    model, _, rows = uninterrupted("tiny")
    network, original = backbone_of(model), file_network("tiny", weights_files["tiny"])
    assert not np.array_equal(first_conv_kernel(network), first_conv_kernel(original))
    # the BatchNorm statistics are the file's: frozen in training and skipped by precise BN
    np.testing.assert_array_equal(first_batchnorm_mean(network), first_batchnorm_mean(original))
    assert batchnorm_layers(model) == []
    # a fresh optimizer at 0.1 x the rate, its cosine schedule halfway through the 2 epochs
    rate = compose().optimizer.learning_rate
    assert rows[FREEZE]["learning_rate"] == pytest.approx(0.1 * rate * 0.5)


@pytest.mark.parametrize("backbone", ["tiny", pytest.param("mobilenet_v3_small",
                                                           marks=pytest.mark.slow)])
@pytest.mark.parametrize("kill_after", [FREEZE, FREEZE + 1])  # at the boundary, and after it
def test_resume_across_the_phase_boundary_is_exact(subset, weights_files, uninterrupted,
                                                   tmp_path, backbone, kill_after):
    checkpoint = Checkpoint(tmp_path / "checkpoint")
    killed = pretrained_model(backbone, weights_files[backbone])
    with pytest.raises(Killed):
        fit(killed, subset, checkpoint, kill_after)
    assert len(checkpoint.completed_epochs()) == kill_after
    original = first_conv_kernel(file_network(backbone, weights_files[backbone]))
    tuned = not np.array_equal(first_conv_kernel(backbone_of(killed)), original)
    assert tuned == (kill_after > FREEZE)  # the frozen epochs left the backbone as loaded
    model = pretrained_model(backbone, weights_files[backbone])
    rows = fit(model, subset, checkpoint)
    _, digest, expected = uninterrupted(backbone)
    assert rows == expected
    assert distribute.weights_digest(model) == digest


# --- the whole path on a folder of photos, through the command --------------------------------

FOLDER = ["data=image_folder", "data.path=images", "data.image_size=[32,32]",
          "model=pretrained", "model.backbone=mobilenet_v3_small", "model.freeze_epochs=1",
          "trainer.epochs=2", "trainer.batch_size=16", "invariance.max_shift=1"]


@pytest.fixture(scope="module")
def folder_project(tmp_path_factory, data_dir):
    project = copy_project(tmp_path_factory.mktemp("pretrained") / "project", data_dir)
    write_image_folder(project / "images", data_dir, CATS, per_class=24, size=(32, 32))
    return project


@pytest.fixture(scope="module")
def folder_run(folder_project, weights_files):
    weights = weights_files["mobilenet_v3_small"]
    result = run(["python", "-m", "pipeline", *FOLDER, f"model.weights={weights}"],
                 folder_project)
    (outputs,) = (folder_project / "runs").rglob("outputs")
    return result, outputs


@pytest.mark.slow  # a pretrained backbone trained on a photo folder (~50 s); CI runs it
def test_pretrained_run_on_a_photo_folder(folder_project, folder_run, weights_files):
    weights_file = weights_files["mobilenet_v3_small"]
    result, outputs = folder_run
    assert "epoch 2/2" in result.stdout
    report = json.loads((outputs / "build" / "report.json").read_text())["transfer"]
    assert report["frozen_phase"]["trainable"] == report["head_params"] > 0
    assert report["frozen_phase"]["frozen"] == report["backbone_params"] > 0
    assert report["fine_tune_phase"]["frozen"] == report["backbone_batchnorm_params"] > 0
    text = (outputs / "build" / "report.md").read_text()
    assert (f"Backbone mobilenet_v3_small (weights: {weights_file}): "
            f"{report['backbone_params']:,} parameters, frozen for the first 1 epoch") in text
    assert f"Head: {report['head_params']:,} trainable parameters" in text
    # the backbone holds the file's weights after the build stage; training fine-tuned them
    # but for the BatchNorm statistics
    original = file_network("mobilenet_v3_small", weights_file)
    built = keras.models.load_model(outputs / "build" / "model.keras")
    np.testing.assert_array_equal(first_conv_kernel(backbone_of(built)),
                                  first_conv_kernel(original))
    # the trained model takes raw pixels, as the other models do
    trained = keras.models.load_model(outputs / "train" / "model.keras")
    assert not np.array_equal(first_conv_kernel(backbone_of(trained)),
                              first_conv_kernel(original))
    np.testing.assert_array_equal(first_batchnorm_mean(backbone_of(trained)),
                                  first_batchnorm_mean(original))
    photos = sorted((folder_project / "images" / "cat").iterdir())[:3]
    raw = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in photos]).astype("float32")
    scores = trained.predict(raw, verbose=0)
    assert scores.shape == (3, 1) and np.all((scores >= 0) & (scores <= 1))
    metrics = json.loads((outputs / "evaluate" / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert [r.info.status for r in mlflow_runs(folder_project)] == ["FINISHED"]


def test_imagenet_weights_offline_fail_with_one_line(folder_project, tmp_path):
    nowhere = "http://127.0.0.1:9"  # refuses connections: no download even where there is network
    result = run(["python", "-m", "pipeline", *FOLDER, "model.weights=imagenet"],
                 folder_project, check=False,
                 extra_env={"KERAS_HOME": str(tmp_path), "HTTPS_PROXY": nowhere,
                            "https_proxy": nowhere, "HTTP_PROXY": nowhere, "http_proxy": nowhere})
    assert result.returncode != 0
    (last,) = result.stderr.strip().splitlines()  # one line, no traceback, no warnings
    assert last.startswith("error: model.weights=imagenet: Keras could not download the "
                           "ImageNet weights of MobileNetV3Small (")
    assert "give model.weights=<path to that .h5 file>" in last
    assert all(r.info.status != "RUNNING" for r in mlflow_runs(folder_project))
