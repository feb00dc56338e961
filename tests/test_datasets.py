"""Data loaders (digits, IDX) and the PNG writer."""

import gzip
import struct
import zlib

import numpy as np
import pytest

from opentsu.datasets import DataError, load_dataset, load_digits, load_idx_images, read_idx
from opentsu.png import encode_png, image_grid


def idx_bytes(array, code=0x08):
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_digits_are_binarized_at_eight():
    from sklearn.datasets import load_digits as raw
    images, labels = load_digits()
    bunch = raw()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert np.array_equal(images == 1, bunch.images >= 8) and np.array_equal(labels, bunch.target)


def test_idx_files_plain_and_gzipped(tmp_path):
    pixels = np.arange(3 * 2 * 4, dtype=np.uint8).reshape(3, 2, 4) * 10
    (tmp_path / "x.idx").write_bytes(idx_bytes(pixels))
    (tmp_path / "x.idx.gz").write_bytes(gzip.compress(idx_bytes(pixels)))
    (tmp_path / "y.idx").write_bytes(idx_bytes(np.array([7, 1, 3], dtype=np.uint8)))
    assert np.array_equal(read_idx(tmp_path / "x.idx"), pixels)
    images, labels = load_idx_images(tmp_path / "x.idx.gz", tmp_path / "y.idx", threshold=100)
    assert np.array_equal(images, (pixels >= 100).astype(np.uint8)) and labels.tolist() == [7, 1, 3]
    assert load_dataset(str(tmp_path / "x.idx"))[0].shape == (3, 2, 4)


@pytest.mark.parametrize("raw, message", [
    (b"\x08\x03\x00\x00", "bad magic"),
    (bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 0]), "element type"),
    (bytes([0, 0, 8, 3, 0, 0, 0, 2]), "truncated"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2]), "needs 3"),
    (b"\x1f\x8b\x08\x00broken", "gzip"),
])
def test_bad_idx_files_are_named(tmp_path, raw, message):
    path = tmp_path / "bad.idx"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_idx_labels_must_match(tmp_path):
    (tmp_path / "x.idx").write_bytes(idx_bytes(np.zeros((3, 2, 2), np.uint8)))
    (tmp_path / "y.idx").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match="3 labels"):
        load_idx_images(tmp_path / "x.idx", tmp_path / "y.idx")
    with pytest.raises(DataError, match="no such file"):
        load_idx_images(tmp_path / "missing.idx")


def test_png_decodes_to_the_pixels():
    images = np.random.default_rng(0).integers(0, 2, size=(5, 3, 4)).astype(np.uint8)
    picture = image_grid(images, columns=2, scale=2, border=1)
    assert picture.shape == (3 * 7 + 1, 2 * 9 + 1)
    assert picture[1 + 2 * 0, 1 + 2 * 1] == (0 if images[0, 0, 1] else 255)
    data = encode_png(picture)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, colour_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (width, height, depth, colour_type) == (picture.shape[1], picture.shape[0], 8, 0)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, width + 1)
    assert np.all(rows[:, 0] == 0) and np.array_equal(rows[:, 1:], picture)
    assert b"IEND" in chunks
