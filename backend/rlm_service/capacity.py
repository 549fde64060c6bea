"""How many runs (or sessions) an instance holds at once, counted over all of its server processes.

With one process (`WEB_CONCURRENCY=1`) a plain counter does. With several, each process's count lives in
shared memory that the supervising process made before forking them (`supervisor`), so that
RLM_MAX_CONCURRENT_RUNS and RLM_MAX_SESSIONS hold for the instance as a whole, and the supervisor zeroes
the counts of a process that died (its runs and sessions died with it).
"""

from __future__ import annotations

from multiprocessing.sharedctypes import SynchronizedArray
from typing import Protocol


class Capacity(Protocol):
    limit: int

    @property
    def used(self) -> int:
        """Taken over the whole instance."""

    def try_take(self) -> bool:
        """Take one if the instance has room; False if not."""

    def give(self) -> None:
        """Give back one this process took."""


class LocalCapacity:
    """The count of one server process (the instance is this process)."""

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

    def __init__(self, limit: int, counts: SynchronizedArray[int], index: int) -> None:
        self.limit = limit
        self._counts = counts
        self._index = index

    @property
    def used(self) -> int:
        with self._counts.get_lock():
            return _total(self._counts)

    def try_take(self) -> bool:
        with self._counts.get_lock():
            if _total(self._counts) >= self.limit:
                return False
            self._counts[self._index] += 1
            return True

    def give(self) -> None:
        with self._counts.get_lock():
            self._counts[self._index] = max(self._counts[self._index] - 1, 0)


def _total(counts: SynchronizedArray[int]) -> int:
    return sum(int(counts[index]) for index in range(len(counts)))


def zero(counts: SynchronizedArray[int], index: int) -> None:
    """Forget what a dead process held."""
    with counts.get_lock():
        counts[index] = 0


__all__ = ["Capacity", "LocalCapacity", "SharedCapacity", "zero"]
