"""Atomic file writes: a temporary file in the target folder, fsynced, renamed over the target.

An interrupted run (Ctrl-C, a full disk, a crash) leaves either the old file or the
complete new one, never half of one.  Model files, ONNX exports and JSON reports all
go through :func:`atomic_open`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``.

    The file gets the permissions of an ordinary new file (``0o666`` minus the umask;
    ``mkstemp`` would leave ``0o600``).  On any exception the temporary file is removed
    and ``path`` is untouched.  The target folder must exist.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
