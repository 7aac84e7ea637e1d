"""Thread count for LAPACK calls (eigh, svdvals, qr, lstsq) on the CPU.

LAPACK's threaded reductions synchronize after every panel; on a machine whose cores are
shared with other processes each synchronization waits for a descheduled thread, and the
small factorizations of the decompositions (eigh of Gram matrices, svdvals) become many
times slower on two threads than on one (measured in benchmarks/RESULTS.md, "Threads").
On an idle machine two threads gain little on these sizes, so the decompositions run their
factorizations on one thread; the large matrix products around them keep all threads.
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
