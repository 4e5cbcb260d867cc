"""The IDX format, Fashion-MNIST validation, the split, and every way the data gets in place."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from pipeline.data import fashion_mnist, fetch
from pipeline.data.dataset import Dataset
from pipeline.data.idx import decode_idx, encode_idx, read_idx
from pipeline.data.split import stratified_order
from pipeline.errors import DataError
from pipeline.prepare import prepare


@pytest.mark.unit
def test_idx_round_trip():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(decode_idx(encode_idx(array)), array)


@pytest.mark.parametrize("mutate,message", [
    (lambda b: b"\x01" + b[1:], "bad magic number"),
    (lambda b: b[:2] + b"\x0d" + b[3:], "element type 0x0d"),
    (lambda b: b[:-5], "truncated or corrupt"),
    (lambda b: b + b"\x00", "truncated or corrupt"),
    (lambda b: b[:6], "truncated IDX header"),
])
@pytest.mark.unit
def test_idx_rejects_corrupt_bytes(mutate, message):
    good = encode_idx(np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(DataError, match=message):
        decode_idx(mutate(good), name="x")


def test_real_files_decode_with_expected_counts(data_dir):
    data = fashion_mnist.load(data_dir)
    assert data.x_train.shape == (60_000, 28, 28, 1)
    assert data.x_test.shape == (10_000, 28, 28, 1)
    assert data.x_train.dtype == np.uint8
    assert np.bincount(data.y_train).tolist() == [6000] * 10
    assert np.bincount(data.y_test).tolist() == [1000] * 10
    assert read_idx(data_dir / "t10k-labels-idx1-ubyte")[:5].tolist() == [9, 2, 1, 1, 6]


def copy_data(data_dir, dest):
    shutil.copytree(data_dir, dest)
    return dest


def test_md5_mismatch_names_the_file(data_dir, tmp_path):
    data = copy_data(data_dir, tmp_path / "data")
    path = data / "t10k-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # same size, one pixel changed
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte has md5 \w+, expected 8181f547"):
        fashion_mnist.load(data)


def test_truncated_and_missing_files(data_dir, tmp_path):
    data = copy_data(data_dir, tmp_path / "data")
    labels = data / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: 59900 data bytes"):
        fashion_mnist.load(data, verify_md5=False)
    labels.unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte not found; .*make data"):
        fashion_mnist.load(data, verify_md5=False)
    with pytest.raises(DataError, match="data folder .*nowhere not found"):
        fashion_mnist.load(tmp_path / "nowhere")


def test_labels_out_of_range_and_wrong_counts(data_dir, tmp_path):
    data = copy_data(data_dir, tmp_path / "data")
    labels = read_idx(data / "t10k-labels-idx1-ubyte").copy()
    labels[0] = 12
    (data / "t10k-labels-idx1-ubyte").write_bytes(encode_idx(labels))
    with pytest.raises(DataError, match="label 12, outside 0..9"):
        fashion_mnist.load(data, verify_md5=False)
    (data / "t10k-labels-idx1-ubyte").write_bytes(encode_idx(labels[:-1] % 10))
    with pytest.raises(DataError, match="10000 images and 9999 labels"):
        fashion_mnist.load(data, verify_md5=False)


@pytest.mark.unit
def test_stratified_order_keeps_class_proportions_in_every_prefix():
    labels = np.repeat(np.arange(4), [400, 300, 200, 100])
    order = stratified_order(labels, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(1000))
    counts = np.bincount(labels[order[:100]], minlength=4)
    assert counts.tolist() == [40, 30, 20, 10]
    again = stratified_order(labels, np.random.default_rng(0))
    np.testing.assert_array_equal(order, again)
    assert not np.array_equal(order, stratified_order(labels, np.random.default_rng(1)))


def test_prepare_limits_splits_and_records_statistics(data_dir):
    data = fashion_mnist.load(data_dir, verify_md5=False)
    prepared = prepare(data, limit=1000, val_fraction=0.2, seed=7)
    sizes = prepared.meta["sizes"]
    assert sizes == {"train": 800, "val": 200, "test": 1000}
    for split in ("train", "val", "test"):
        counts = np.bincount(prepared.splits[split][1], minlength=10)
        assert counts.min() == counts.max()  # stratified: 80, 20 and 100 per class
    train_x = prepared.splits["train"][0]
    assert prepared.meta["pixel_mean"] == pytest.approx(train_x.mean() / 255)
    assert prepared.meta["input_shape"] == [28, 28, 1]
    full = prepare(data, limit=None, val_fraction=0.1, seed=7).meta["sizes"]
    assert full == {"train": 54_000, "val": 6_000, "test": 10_000}


def tiny_dataset(y_train, y_test, x_value=None) -> Dataset:
    """Random 4x4 images (or all `x_value`) with the given labels, classes a, b, c."""
    rng = np.random.default_rng(0)

    def images(n):
        return (np.full((n, 4, 4, 1), x_value, np.uint8) if x_value is not None
                else rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8))

    return Dataset(images(len(y_train)), np.asarray(y_train), images(len(y_test)),
                   np.asarray(y_test), ["a", "b", "c"])


@pytest.mark.parametrize("y_train,y_test,limit,val_fraction,message", [
    ([0, 1, 2], [0, 1, 2], 1, 0.1, r"the train split is empty \(train 0, val 1, test 1; "
     r"data.limit=1, data.val_fraction=0.1\); add images, raise data.limit"),
    ([1, 2] * 10, [0, 1, 2], None, 0.2, r"the train split has no images of class\(es\) 'a' "
     r"\(train 16, val 4, test 3;.*or fix the labels"),
    ([0, 1, 2] * 10, [0, 1, 1], None, 0.2, r"the test split has no images of class\(es\) 'c'"),
    ([0, 1, 2] * 10, [0, 1, 2, 0, 1, 2], 2, 0.2, r"the train split has no images of class"),
])
@pytest.mark.unit
def test_prepare_refuses_splits_that_cannot_train_or_be_scored(y_train, y_test, limit,
                                                               val_fraction, message):
    with pytest.raises(DataError, match=message):
        prepare(tiny_dataset(y_train, y_test), limit=limit, val_fraction=val_fraction, seed=0)


@pytest.mark.unit
def test_prepare_refuses_images_that_are_all_one_value():
    with pytest.raises(DataError, match="every training pixel has the value 7: the images carry "
                       "nothing to learn"):
        prepare(tiny_dataset([0, 1, 2] * 4, [0, 1, 2], x_value=7), None, 0.25, seed=0)


def make_gz_dir(data_dir, dest):
    dest.mkdir()
    for name in fashion_mnist.FILES:
        with open(data_dir / name, "rb") as src, \
                gzip.open(dest / f"{name}.gz", "wb", compresslevel=1) as out:
            shutil.copyfileobj(src, out)
    return dest


def test_fetch_keeps_files_already_in_place(data_dir, tmp_path):
    data = copy_data(data_dir, tmp_path / "data")
    assert fetch.fetch(data, download=False) == "already in place"


def test_fetch_from_debian_package_layout(data_dir, tmp_path):
    gz_dir = make_gz_dir(data_dir, tmp_path / "debian")
    dest = tmp_path / "data"
    assert fetch.from_debian(dest, gz_dir)
    fashion_mnist.verify(dest)
    assert not list(dest.glob(".*.tmp"))


def test_fetch_by_keras_download_offline_origin(data_dir, tmp_path):
    gz_dir = make_gz_dir(data_dir, tmp_path / "mirror")
    dest = tmp_path / "data"
    assert fetch.from_keras_download(dest, origin=f"{gz_dir.as_uri()}/",
                                     cache_dir=tmp_path / "keras")
    fashion_mnist.verify(dest)


def test_fetch_refuses_wrong_bytes_and_leaves_nothing(data_dir, tmp_path):
    gz_dir = make_gz_dir(data_dir, tmp_path / "debian")
    with gzip.open(gz_dir / "train-labels-idx1-ubyte.gz", "wb") as out:
        out.write(encode_idx(np.zeros(60_000, np.uint8)))
    dest = tmp_path / "data"
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz decompresses to md5"):
        fetch.decompress_into(gz_dir, dest)
    assert not (dest / "train-labels-idx1-ubyte").exists()
    assert not list(dest.glob(".*"))
