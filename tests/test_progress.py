"""Progress while work runs: a line redrawn on a terminal (a real pseudo-terminal here), a line
every few seconds into a pipe; for training steps, prepare's decoding and predict."""

from __future__ import annotations

import json
import os
import pty
import re
import sys

import numpy as np
import pytest

from pipeline import progress
from pipeline.progress import Progress


class Output:
    """A writable text stream on a pseudo-terminal or a pipe, and what reached its other end."""

    def __init__(self, mode: str):
        if mode == "terminal":
            self._read, write = pty.openpty()
        else:
            self._read, write = os.pipe()
        self.stream = os.fdopen(write, "w")
        os.set_blocking(self._read, False)

    def text(self) -> str:
        self.stream.flush()
        chunks = []
        while True:
            try:
                chunk = os.read(self._read, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode().replace("\r\n", "\n")

    def close(self) -> None:
        self.stream.close()
        os.close(self._read)


@pytest.fixture(params=["terminal", "pipe"])
def output(request):
    out = Output(request.param)
    out.mode = request.param
    yield out
    out.close()


@pytest.mark.unit
def test_progress_redraws_one_line_on_a_terminal_and_writes_lines_into_a_pipe(output):
    bar = Progress("prepare: decoded", 300, stream=output.stream, every=0)
    assert bar.terminal == (output.mode == "terminal")
    for done in (100, 200, 300):
        bar.update(done)
    bar.close()
    text = output.text()
    assert re.search(r"prepare: decoded 100/300 images, \d+ images/s", text)
    if output.mode == "terminal":
        assert "\n" not in text and text.count("\r\033[K") == 4  # 3 redraws and the clearing
    else:
        assert text.count("\n") == 3 and "\r" not in text and "\033" not in text


@pytest.mark.unit
def test_progress_waits_between_lines():
    out = Output("pipe")
    bar = Progress("x", 10, stream=out.stream, every=3600)
    for done in range(10):
        bar.update(done)
    assert out.text() == ""  # within the interval: nothing yet
    out.close()


@pytest.mark.unit
def test_training_steps_show_within_each_epoch(output):
    import keras

    from pipeline.train import StepProgress

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(40, 4)).astype("float32")
    y = (x[:, 0] > 0).astype(int)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[StepProgress(2, 5, 8, stream=output.stream, every=0)])
    text = output.text()
    assert re.search(r"epoch 2/2  step 5/5, \d+ images/s, loss \d\.\d{4}", text)
    assert ("\n" in text) == (output.mode == "pipe")


def test_prepare_reports_images_decoded(output, tmp_path, data_dir, monkeypatch):
    from pipeline.data import load_dataset
    from pipeline.prepare import prepare, write_prepared
    from tests.conftest import compose, write_image_folder

    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)
    monkeypatch.setattr(progress, "TERMINAL_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(sys, "stdout", output.stream)
    path = write_image_folder(tmp_path / "images", data_dir, {"a": 0, "b": 1}, per_class=24)
    cfg = compose("data=image_folder", f"data.path={path}", "data.image_size=[32,32]").data
    write_prepared(prepare(load_dataset(cfg, tmp_path), None, 0.2, 0), tmp_path / "out", 1)
    text = output.text()
    assert re.search(r"prepare: decoded 48/48 images, \d+ images/s", text)


def test_predict_reports_progress_on_stderr_and_keeps_json_clean(output, tmp_path, data_dir,
                                                                 monkeypatch, capsys):
    import keras

    from pipeline import predict
    from tests.conftest import write_image_folder

    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)
    monkeypatch.setattr(progress, "TERMINAL_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(predict, "BATCH_SIZE", 4)
    path = write_image_folder(tmp_path / "images", data_dir, {"a": 0, "b": 1}, per_class=5,
                              size=(8, 8), mode="L", formats=("png",))
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(2, activation="softmax")])
    model.save(tmp_path / "model.keras")
    (tmp_path / "labels.json").write_text(json.dumps({"class_names": ["a", "b"]}))
    monkeypatch.setattr(sys, "stderr", output.stream)
    predict.main([str(tmp_path / "model.keras"), str(path), "--json"])
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 10
    assert re.search(r"predict: \d+/10 images", output.text())
