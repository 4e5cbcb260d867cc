"""Prepared splits as shards on disk: written and read back, statistics, workers, bad files."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from pipeline import shards
from pipeline.data import load_dataset
from pipeline.errors import DataError
from pipeline.params import write_params
from pipeline.prepare import prepare, read_meta, read_split, write_prepared
from pipeline.stream import EpochBatches, OrderedBatches, epoch_order
from tests.conftest import compose, env, write_image_folder

CLASSES = {"shirt": 6, "sneaker": 7, "boot": 9}


def random_split(seed, shape, classes):
    """Random uint8 images of `shape` (the count first) and labels of `classes` classes."""
    rng = np.random.default_rng(seed)
    return rng, rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, classes, shape[0])


def write_shards(folder, images, labels, length):
    writer = shards.ShardWriter(folder, images.shape[1:], length=length)
    for start in range(0, len(images), 7):  # in pieces that do not line up with the shards
        writer.add(images[start:start + 7])
    return writer.close(labels)


@pytest.mark.unit
def test_shards_read_back_by_any_index_and_statistics_match_in_memory(tmp_path):
    rng, images, labels = random_split(0, (203, 6, 5, 3), 4)
    summary = write_shards(tmp_path / "split", images, labels, length=32)
    assert sorted(p.name for p in (tmp_path / "split").iterdir())[:2] == [
        "images-00000.npy", "images-00001.npy"]
    assert len(list((tmp_path / "split").glob("images-*.npy"))) == 7  # 6 full shards and 11
    x, y = shards.read_split(tmp_path / "split")
    assert x.shape == images.shape and len(x) == 203
    np.testing.assert_array_equal(y, labels)
    order = rng.permutation(203)[:90]
    np.testing.assert_array_equal(x[order], images[order])  # any order, across shards
    np.testing.assert_array_equal(x[10:150:3], images[10:150:3])
    np.testing.assert_array_equal(x[-1], images[-1])
    np.testing.assert_array_equal(np.asarray(x.subset(order))[::-1], images[order][::-1])
    scaled = images.astype(np.float64) / 255.0
    assert abs(summary.pixel_mean() - scaled.mean()) < 1e-9
    assert abs(summary.pixel_std() - scaled.std()) < 1e-9
    in_memory = shards.summarize(images)
    assert (in_memory.pixel_sum, in_memory.pixel_square_sum, in_memory.pixel_min,
            in_memory.pixel_max) == (summary.pixel_sum, summary.pixel_square_sum,
                                     summary.pixel_min, summary.pixel_max)
    with pytest.raises(IndexError):
        x[np.array([203])]


@pytest.mark.unit
def test_batches_from_shards_equal_batches_from_memory(tmp_path):
    _, images, labels = random_split(1, (100, 4, 4, 1), 3)
    write_shards(tmp_path / "split", images, labels, length=16)
    x, y = shards.read_split(tmp_path / "split")
    on_disk, in_memory = EpochBatches(x, y, 32, seed=5), EpochBatches(images, labels, 32, seed=5)
    for index in range(9):  # across the epoch boundary
        for a, b in zip(on_disk[index], in_memory[index]):
            np.testing.assert_array_equal(a, b)
    chosen = np.sort(epoch_order(100, 5, 1)[:32])
    np.testing.assert_array_equal(on_disk[4][1], labels[chosen])  # batch 4: epoch 1, step 0
    ordered = OrderedBatches(x, y, 32)
    assert ordered.num_batches == 4
    np.testing.assert_array_equal(ordered[3][0], images[96:])


def folder_prepared(tmp_path, data_dir, workers, per_class=40):
    path = tmp_path / "images"
    if not path.exists():
        write_image_folder(path, data_dir, CLASSES, per_class=per_class, size=(30, 30),
                           formats=("png", "jpeg"))
    cfg = compose("data=image_folder", f"data.path={path}", "data.image_size=[28,28]").data
    prepared = prepare(load_dataset(cfg, tmp_path, seed=2), None, 0.2, seed=2)
    out = tmp_path / f"prepared-{workers}"
    write_prepared(prepared, out, workers=workers)
    return out, prepared


def test_prepare_gives_the_same_bytes_with_one_or_two_workers(tmp_path, data_dir):
    one, prepared = folder_prepared(tmp_path, data_dir, workers=1)
    two, _ = folder_prepared(tmp_path, data_dir, workers=2)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    meta = read_meta(two)
    assert set(meta["digests"]) == {"train", "val", "test"}
    x, _ = read_split(two, "train")
    scaled = np.asarray(x).astype(np.float64) / 255.0
    assert abs(meta["pixel_mean"] - scaled.mean()) < 1e-9
    assert abs(meta["pixel_std"] - scaled.std()) < 1e-9
    assert prepared.notes == ["resized 120 of 120 images to 28x28"]


def test_a_corrupt_image_found_by_a_worker_is_named_and_nothing_is_left(tmp_path, data_dir):
    out, _ = folder_prepared(tmp_path, data_dir, workers=2)
    before = sorted(p.name for p in out.rglob("*"))
    (tmp_path / "images" / "boot" / "0031.jpeg").write_bytes(b"\xff\xd8 cut short")
    cfg = compose("data=image_folder", f"data.path={tmp_path / 'images'}",
                  "data.image_size=[28,28]").data
    prepared = prepare(load_dataset(cfg, tmp_path, seed=2), None, 0.2, seed=2)
    with pytest.raises(DataError, match=r"0031\.jpeg is not a readable image"):
        write_prepared(prepared, out, workers=2)
    assert sorted(p.name for p in out.rglob("*")) == before  # the previous output, intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill a worker", "ctrl-c"])
def test_prepare_stopped_midway_ends_with_one_line_and_nothing_half_written(
        tmp_path, data_dir, how):
    path = write_image_folder(tmp_path / "images", data_dir, CLASSES, per_class=700,
                              size=(200, 200), formats=("png",))
    write_params(["data=image_folder", f"data.path={path}", "data.image_size=[160,160]",
                  "data.workers=2", "paths.prepared=prepared"], tmp_path / "params.yaml")
    process = subprocess.Popen([sys.executable, "-m", "pipeline.prepare"], cwd=tmp_path,
                               env=env(), stderr=subprocess.PIPE, text=True)
    def decoding_workers():
        found = []
        for child in psutil.Process(process.pid).children(recursive=True):
            try:
                if "spawn_main" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.NoSuchProcess:
                pass
        return found

    workers = []
    for _ in range(300):
        workers = decoding_workers()
        if len(workers) >= 2:
            break
        time.sleep(0.1)
    workers = psutil.Process(process.pid).children(recursive=True)  # all, for the end check
    time.sleep(0.5)
    if how == "kill a worker":
        decoding_workers()[0].send_signal(signal.SIGKILL)
    else:
        process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    last = stderr.strip().splitlines()[-1]
    if how == "kill a worker":
        assert last.startswith("error: an image-decoding worker died"), stderr
    else:
        assert "interrupted" in last.lower(), stderr
    assert not (tmp_path / "prepared").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".prepared")] == []
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == [], [w.cmdline() for w in alive]


@pytest.mark.unit
def test_images_written_to_their_places_give_the_writers_bytes(tmp_path):
    _, images, labels = random_split(4, (75, 3, 4, 2), 2)
    write_shards(tmp_path / "written", images, labels, length=20)
    layout = shards.ShardLayout(tmp_path / "placed", (3, 4, 2), 75, length=20)
    layout.create()
    for start in reversed(range(0, 75, 16)):  # any order, in runs across shard boundaries
        block = images[start:start + 16]
        shards.write_images(block, layout.places(start, len(block)))
    for shard in range(4):
        name = shards.IMAGES_PATTERN.format(shard)
        assert (tmp_path / "placed" / name).read_bytes() == \
            (tmp_path / "written" / name).read_bytes()
