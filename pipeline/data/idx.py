"""The IDX file format (LeCun's MNIST format): decoding with the checks a corrupt file fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import DataError

UBYTE = 0x08  # the only element type the MNIST-family files use


def decode_idx(buffer: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into a uint8 array of the shape the header declares.

    The header is two zero bytes, the element type, the number of dimensions, then one
    big-endian uint32 per dimension.

    Raises:
        DataError: bad magic number, unsupported type, or a body that is truncated or too long.
    """
    if len(buffer) < 4 or buffer[0] != 0 or buffer[1] != 0:
        raise DataError(f"{name} is not an IDX file (bad magic number); "
                        "restore it with `make data` or `dvc checkout data.dvc`")
    if buffer[2] != UBYTE:
        raise DataError(f"{name}: IDX element type 0x{buffer[2]:02x} is not unsigned byte (0x08)")
    ndim = buffer[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(buffer) < header:
        raise DataError(f"{name}: truncated IDX header; restore it with `make data`")
    shape = tuple(int(d) for d in np.frombuffer(buffer, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    body = len(buffer) - header
    if body != expected:
        raise DataError(f"{name}: {body} data bytes but the header declares shape {shape} "
                        f"({expected} bytes): the file is truncated or corrupt; restore it "
                        "with `make data` or `dvc checkout data.dvc`")
    return np.frombuffer(buffer, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    """Read and decode one IDX file."""
    return decode_idx(Path(path).read_bytes(), name=str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX bytes (the inverse of :func:`decode_idx`)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, UBYTE, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()
