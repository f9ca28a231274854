"""A budget of bytes in flight, shared by the connections of one server, with a first-come wait queue.

Synchronous and loop-agnostic (the server calls it from its event-loop callbacks only), so it needs no lock. A
request that does not fit waits in arrival order; one that could never fit is the caller's to refuse up front.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Waiter:
    nbytes: int
    grant: Callable[[], None]
    cancelled: bool = False


class ByteBudget:
    """``total`` bytes; :meth:`take` grants at once or queues, :meth:`give` returns bytes and grants waiters."""

    def __init__(self, total: int) -> None:
        if total <= 0:
            raise ValueError(f"a byte budget must be positive, got {total}")
        self.total = total
        self.used = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        return sum(not w.cancelled for w in self._waiters)

    def take(self, nbytes: int, grant: Callable[[], None]) -> _Waiter | None:
        """Take ``nbytes`` now (returns ``None``; ``grant`` is not called) or queue: ``grant()`` runs once they are
        taken for the caller, and the returned handle can :meth:`cancel` the wait. First come, first served: nobody
        overtakes a waiter, so a large request is not starved by a stream of small ones."""
        if nbytes > self.total:
            raise ValueError(f"{nbytes} bytes can never fit a budget of {self.total}")
        if not self._waiters and self.used + nbytes <= self.total:
            self.used += nbytes
            return None
        waiter = _Waiter(nbytes, grant)
        self._waiters.append(waiter)
        return waiter

    def give(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)
        while self._waiters:
            head = self._waiters[0]
            if head.cancelled:
                self._waiters.popleft()
                continue
            if self.used + head.nbytes > self.total:
                return
            self._waiters.popleft()
            self.used += head.nbytes
            head.grant()

    def cancel(self, waiter: _Waiter) -> None:
        """Stop waiting (the requester went away); bytes it was granted are the requester's to :meth:`give`."""
        waiter.cancelled = True
        self.give(0)  # a cancelled head no longer blocks the ones behind it
