"""Binary image data sets for the DTM: scikit-learn's 8×8 digits and IDX files (MNIST, Fashion-MNIST).

Every loader returns ``(images, labels)``: ``images`` is uint8 of shape (N, H, W) holding 0 and 1, ``labels``
is int64 of shape (N,) or None. Nothing is downloaded: the digits ship with scikit-learn, and IDX files come
from a path the user gives (plain or gzip-compressed, e.g. ``train-images-idx3-ubyte.gz``).
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from .fileio import read_input

__all__ = ["DataError", "load_digits", "read_idx", "load_idx_images", "load_dataset", "DIGITS_THRESHOLD"]

#: The digits' pixel values run from 0 to 16; a pixel is on when its value is at least this.
DIGITS_THRESHOLD = 8

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataError(ValueError):
    """A data file that cannot be read, or that holds the wrong kind of data. The message names the problem."""


def load_digits(threshold: int = DIGITS_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8×8 digits, binarized at value >= ``threshold``: ((1797, 8, 8) uint8, (1797,) labels)."""
    from sklearn.datasets import load_digits as sk_load_digits
    bunch = sk_load_digits()
    images = (bunch.images >= threshold).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def read_idx(path) -> np.ndarray:
    """The array stored in an IDX file (LeCun's format: magic ``00 00 type ndim``, big-endian u32 dimensions).

    Gzip files are recognised by their content, not their name. Raises ``DataError`` naming the problem.
    """
    path = os.fspath(path)
    raw = read_input(path, DataError)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip data ({exc})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise DataError(f"{path}: not an IDX file (bad magic)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise DataError(f"{path}: unknown IDX element type 0x{code:02x}")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX header is truncated")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[code])
    count = int(np.prod(shape, dtype=np.int64))
    body = raw[4 + 4 * ndim:]
    if len(body) != count * dtype.itemsize:
        raise DataError(f"{path}: IDX body holds {len(body)} bytes, the header {tuple(shape)} needs "
                        f"{count * dtype.itemsize}")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def load_idx_images(path, labels_path=None, threshold: float = 128) -> tuple[np.ndarray, np.ndarray | None]:
    """Images from an IDX file of shape (N, H, W), binarized at value >= ``threshold``, and optional labels."""
    array = read_idx(path)
    if array.ndim != 3 or min(array.shape) < 1:
        raise DataError(f"{os.fspath(path)}: expected images of shape (N, H, W), found {array.shape}")
    images = (array >= threshold).astype(np.uint8)
    labels = None
    if labels_path is not None:
        labels = read_idx(labels_path)
        if labels.shape != (array.shape[0],):
            raise DataError(f"{os.fspath(labels_path)}: expected {array.shape[0]} labels, found shape {labels.shape}")
        labels = labels.astype(np.int64)
    return images, labels


def load_dataset(spec: str = "digits", labels_path=None, threshold=None) -> tuple[np.ndarray, np.ndarray | None]:
    """``"digits"`` or a path to an IDX image file (with ``labels_path`` for its labels)."""
    if spec == "digits":
        return load_digits(DIGITS_THRESHOLD if threshold is None else int(threshold))
    return load_idx_images(spec, labels_path, 128 if threshold is None else threshold)
