"""When calls give up: a client's deadlines, without a clock (part of its session).

Calls with the client's default timeout expire in the order they began, so they wait
in a FIFO whose head alone can be due: arming one is an append.  Calls with their own
timeout go in a heap.  `expire(now)` marks the due ops expired and wakes their
callers (who then raise); the wiring calls it again at the deadline it returns, and
sooner when `arm` says that a new deadline comes before that.
"""
from __future__ import annotations

import collections
import heapq
import math

from .. import clientops as _ops
from ..clientops import Op

__all__ = ["Deadlines"]

_DONE, _ABANDONED = _ops.DONE, _ops.ABANDONED


class Deadlines:
    """The deadlines of the ops callers wait on (see the module doc)."""

    def __init__(self) -> None:
        # Invariant: the FIFO's deadlines never decrease from head to tail.
        self._fifo = collections.deque()
        self._heap: list = []   # (deadline, order, op)
        self._order = 0
        self._next_at = math.inf   # the deadline `expire` last returned

    def arm(self, op: Op, default_timeout: bool) -> bool:
        """Watch `op`'s deadline; True if it comes before the timer's next wake-up."""
        if default_timeout:
            self._fifo.append(op)
        else:
            self._order += 1
            heapq.heappush(self._heap, (op.deadline, self._order, op))
        return op.deadline < self._next_at

    def arm_all(self, ops: list, default_timeout: bool) -> bool:
        """`arm` for ops that share one deadline (a bulk call's)."""
        if default_timeout:
            self._fifo.extend(ops)
            return ops[0].deadline < self._next_at
        wake = False
        for op in ops:
            wake = self.arm(op, False) or wake
        return wake

    def expire(self, now: float) -> float:
        """Expire the ops due at `now` (waking their callers) and drop finished ones
        at the heads; the next deadline (inf if none), at which the wiring is to call
        this again."""
        self._next_at = next_at = self.sweep(now)
        return next_at

    def sweep(self, now: float) -> float:
        """`expire`, without moving the wiring's next call (ops that just finished
        leave the heads early; the wiring still wakes at the deadline it was given,
        rather than once per call)."""
        next_at = _ops.sweep_fifo(self._fifo, now)
        heap = self._heap
        while heap:
            deadline, _, op = heap[0]
            if op.state == _DONE or op.state == _ABANDONED or op.expired:
                heapq.heappop(heap)
            elif deadline <= now:
                heapq.heappop(heap)
                op.expired = True
                op.wake()
            else:
                next_at = min(next_at, deadline)
                break
        return next_at
