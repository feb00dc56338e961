"""Input files read with errors that name the problem; output files that are either complete or absent."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import tokenize
import zipfile
import zlib

import numpy as np

__all__ = ["atomic_write", "save_npy", "read_input", "open_npz", "npz_arrays", "read_npy"]


def read_input(path, error: type[Exception]) -> bytes:
    """The whole content of an input file; raises ``error`` saying it is missing, a directory or unreadable."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory") from None
    except PermissionError:
        raise error(f"{path}: permission denied") from None


#: What reading a damaged .npz or .npy file can raise: numpy's and zipfile's errors, zipfile's
#: NotImplementedError for a header that names a compression method or zip version it does not know, zlib's
#: for a damaged compressed member, and the tokenizer's and parser's for a damaged array header.
_NUMPY_FILE_ERRORS = (ValueError, OSError, zipfile.BadZipFile, EOFError, NotImplementedError, zlib.error,
                      tokenize.TokenError, SyntaxError)


def open_npz(path, error: type[Exception], what: str) -> np.lib.npyio.NpzFile:
    """An ``.npz`` archive read whole (pickles refused); raises ``error`` naming the problem and ``what`` it is."""
    path = os.fspath(path)
    raw = read_input(path, error)
    if raw[:6] == b"\x93NUMPY":
        raise error(f"{path}: a single .npy array, not an .npz archive")
    if raw[:4] != b"PK\x03\x04" and raw[:4] != b"PK\x05\x06":     # a zip's first entry, or an empty zip
        raise error(f"{path}: not an .npz {what} (it does not start with a zip header)")
    try:
        archive = np.load(io.BytesIO(raw), allow_pickle=False)
    except _NUMPY_FILE_ERRORS as exc:
        raise error(f"{path}: not a readable .npz {what} ({exc})") from None
    return archive


def read_npy(path, error: type[Exception], what: str) -> np.ndarray:
    """One array from an ``.npy`` file (pickles refused); raises ``error`` naming the problem and ``what`` it is."""
    path = os.fspath(path)
    raw = read_input(path, error)
    if raw[:6] != b"\x93NUMPY":
        raise error(f"{path}: not an .npy {what} (it does not start with the .npy magic string)")
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except _NUMPY_FILE_ERRORS as exc:
        raise error(f"{path}: not a readable .npy {what} ({exc})") from None


def npz_arrays(archive: np.lib.npyio.NpzFile, keys, error: type[Exception], path) -> dict:
    """The arrays ``keys`` of an archive from ``open_npz``; raises ``error`` naming ``path`` if one is damaged."""
    try:
        return {key: archive[key] for key in keys}
    except _NUMPY_FILE_ERRORS as exc:
        raise error(f"{os.fspath(path)}: corrupt array in archive ({exc})") from None


@contextlib.contextmanager
def atomic_write(path):
    """Yield a binary file object; on success it replaces ``path``, on any error nothing is left behind."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".opentsu-", suffix=".part", dir=directory)
    try:
        # mkstemp makes the file private (0600); give it the permissions an ordinary open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_npy(path, array):
    """Save one array as ``.npy`` atomically (``np.save`` would append ``.npy`` to other names; this does not)."""
    with atomic_write(path) as f:
        np.save(f, array)
