"""How many runs (or sessions) an instance holds at once, counted over all of its server processes.

With one process (`WEB_CONCURRENCY=1`) a plain counter does. With several, each process's count lives in
shared memory that the supervising process made before forking them (`supervisor`), so that
RLM_MAX_CONCURRENT_RUNS and RLM_MAX_SESSIONS hold for the instance as a whole, and the supervisor zeroes
the counts of a process that died (its runs and sessions died with it).

The shared counts take no lock that spans processes: a process killed while holding one would leave it held,
and every other process, and the supervisor, would wait on it forever. Each process writes only its own count
(under a lock of its own threads) and reads the others'. To take one, it counts itself in first and then
checks the total: two processes racing for the last place may both be refused, but the limit is never passed.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Protocol

Counts = ctypes.Array[Any]
"""One count per server process, in shared memory (`multiprocessing.RawArray("i", processes)`)."""


class Capacity(Protocol):
    limit: int
    shared: bool
    """Whether other processes of the instance count in it too (`SharedCapacity`)."""

    @property
    def used(self) -> int:
        """Taken over the whole instance."""

    def try_take(self) -> bool:
        """Take one if the instance has room; False if not."""

    def give(self) -> None:
        """Give back one this process took."""


class LocalCapacity:
    """The count of one server process (the instance is this process)."""

    shared = False

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    def try_take(self) -> bool:
        if self._used >= self.limit:
            return False
        self._used += 1
        return True

    def give(self) -> None:
        self._used -= 1


class SharedCapacity:
    """One process's share of counts kept in shared memory for every process of the instance."""

    shared = True

    def __init__(self, limit: int, counts: Counts, index: int) -> None:
        self.limit = limit
        self._counts = counts
        self._index = index
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return _total(self._counts)

    def try_take(self) -> bool:
        with self._lock:
            self._counts[self._index] += 1
            if _total(self._counts) <= self.limit:
                return True
            self._counts[self._index] -= 1
            return False

    def give(self) -> None:
        with self._lock:
            self._counts[self._index] = max(self._counts[self._index] - 1, 0)


def _total(counts: Counts) -> int:
    return sum(int(counts[index]) for index in range(len(counts)))


def zero(counts: Counts, index: int) -> None:
    """Forget what a dead process held (no process writes its count any more)."""
    counts[index] = 0


__all__ = ["Capacity", "Counts", "LocalCapacity", "SharedCapacity", "zero"]
