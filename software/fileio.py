"""Output files that are either complete or absent."""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np

__all__ = ["atomic_write", "save_npy"]


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
