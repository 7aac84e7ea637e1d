"""Thread count for LAPACK calls (eigh, svdvals, qr, lstsq) on the CPU.

Measured on the 2-core machine this project is developed on, with other processes
busy: ``torch.linalg.eigh`` of a 512 x 512 Gram matrix took 0.025 s on one thread and
1-2.4 s on two; ``svdvals`` of a 512 x 4608 matrix 0.41 s against 10 s; a 4096 x 4096
eigh 8.8 s against 39 s.  LAPACK's threaded reductions synchronize after every panel,
and with the cores shared each synchronization waits for a descheduled thread.  On
an idle machine two threads gain little on these sizes, so the decompositions run
their factorizations on one thread; the large matrix products around them keep all
threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

LAPACK_THREADS = 1


@contextlib.contextmanager
def lapack_threads(n: int = LAPACK_THREADS) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count.

    ``set_num_threads`` is process-wide: do not use this while other Python threads
    run torch work that should keep its threads.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    previous = torch.get_num_threads()
    if previous == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
