"""A tiny PNG writer (8-bit greyscale, zlib + struct only) and a sample-grid layout for binary images."""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["encode_png", "write_png", "image_grid"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes for a (height, width) uint8 greyscale image (0 black, 255 white)."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise ValueError(f"expected a non-empty 2-D image, got shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    height, width = pixels.shape
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels], axis=1)  # filter type 0 per row
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + _chunk(b"IEND", b""))


def image_grid(images: np.ndarray, columns: int | None = None, scale: int = 4, border: int = 1) -> np.ndarray:
    """Lay out (N, H, W) binary images as one greyscale picture: ink (1) black on white, grey borders."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[0] < 1:
        raise ValueError(f"expected images of shape (N, H, W), got {images.shape}")
    count, height, width = images.shape
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = -(-count // columns)
    cell_h, cell_w = height * scale + border, width * scale + border
    out = np.full((rows * cell_h + border, columns * cell_w + border), 160, dtype=np.uint8)
    tiles = np.where(images > 0, 0, 255).astype(np.uint8)
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    for k in range(count):
        r, c = divmod(k, columns)
        top, left = border + r * cell_h, border + c * cell_w
        out[top:top + height * scale, left:left + width * scale] = tiles[k]
    return out


def write_png(path, pixels: np.ndarray):
    """Write ``pixels`` as a PNG file atomically (nothing is left behind on failure)."""
    from .fileio import atomic_write
    data = encode_png(pixels)
    with atomic_write(path) as f:
        f.write(data)
