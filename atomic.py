"""Atomic file writes: a temporary file in the target folder, fsynced, renamed over the target.

An interrupted run (Ctrl-C, a full disk, a crash) leaves either the old file or the
complete new one, never half of one.  A process killed outright (``kill -9``) cannot
remove its temporary file; the next write of the same target does, and says so.  Model files, ONNX exports and JSON reports all
go through :func:`atomic_open`.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import signal
import tempfile
import threading
import warnings
from collections.abc import Iterator
from typing import IO

from errors import DiskFullError

#: The errors of a write that found no room: a full disk, a quota, a file size limit.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# Temporary files are named ".<target>.<pid>.<random>.tmp": the pid tells a file of a
# process that died (kill -9, power loss) from one still being written.
_TMP_PID = re.compile(r"\.(\d+)\.[^.]+\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


#: The target's name in its temporary's: the rest (".", ".<pid>.<8 random>.tmp") must still fit
#: the 255 bytes a file name may have on common file systems.
TMP_STEM_BYTES = 200


def _tmp_stem(name: str) -> str:
    """``name`` cut to :data:`TMP_STEM_BYTES` bytes (whole characters) for a temporary's name."""
    return name.encode()[:TMP_STEM_BYTES].decode(errors="ignore")


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Delete the temporary files that interrupted writes of ``path`` left behind, with a warning.

    Only files named as :func:`atomic_open` names them, whose writing process no longer
    exists, are removed (a model file's temporary can be hundreds of MB).
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    stem = _tmp_stem(name)
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(stem)}.*.tmp")):
        match = _TMP_PID.search(os.path.basename(tmp)[len(stem) + 1:])  # ".<pid>.<random>.tmp"
        if match and not _alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
                removed.append(tmp)
    if removed:
        warnings.warn(f"removed {len(removed)} temporary file(s) that an interrupted write of {path} left behind: "
                      f"{', '.join(os.path.basename(t) for t in removed[:3])}", stacklevel=3)
    return removed


@contextlib.contextmanager
def deferred_signals(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them.

    A KeyboardInterrupt raised inside ``torch.save``'s zip writer leaves it half-closed
    (its cleanup then fails with "unexpected pos"), so a write is finished, or abandoned
    whole, before the interruption is acted on.  Only the main thread can set handlers;
    elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)


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
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{_tmp_stem(os.path.basename(path))}.{os.getpid()}.",
                                   suffix=".tmp")
    except OSError as exc:
        if exc.errno in _NO_ROOM:  # no inode left for the temporary file
            raise DiskFullError(f"cannot write {path}: {os.strerror(exc.errno)} (nothing written)") from None
        raise
    with deferred_signals():
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            with os.fdopen(fd, mode) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            full = _no_room(exc)
            if full is not None:
                raise DiskFullError(f"cannot write {path}: {os.strerror(full.errno)} ("
                                    f"{'the previous file is unchanged' if os.path.exists(path) else 'nothing written'}"
                                    f")") from None
            raise


def _no_room(exc: BaseException) -> OSError | None:
    """The out-of-space OSError behind ``exc``, if any: raised directly by a write, or under the
    RuntimeError torch's zip writer raises once a write failed ("unexpected pos")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
