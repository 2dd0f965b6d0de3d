"""Counters a replica keeps for its metrics, cheap enough to update where things happen.

A `Histogram` is what a Prometheus histogram exports (a count per bucket, their sum),
kept as plain integers: an observation is one bisect and two additions, no lock and
no label lookup, so the places that observe (once per fsync, once per proposed slot,
once per snapshot file) pay almost nothing.  The metrics endpoint
(`cypaxos.replica.metrics`) reads them when it is scraped.

Pure (no clock, no I/O): so the node (`cypaxos.replica.node`) may keep some too.
"""
from __future__ import annotations

import struct
from bisect import bisect_left
from typing import Iterable

from ..clientops import BATCH_HEADER_BYTES

__all__ = ["Histogram", "FSYNC_BUCKETS_S", "BATCH_COMMANDS_BUCKETS", "SNAPSHOT_BUCKETS_S",
           "slot_commands"]

FSYNC_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the fsync duration buckets: 100 us (a fast NVMe) to 10 s
(a disk that is failing)."""
BATCH_COMMANDS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
                          16384, 65536)
"""Upper bounds of the commands-per-slot buckets."""
SNAPSHOT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                      60.0, 300.0)
"""Upper bounds (seconds) of the snapshot file write buckets."""


class Histogram:
    """Observations counted in fixed buckets, and their sum.

    `counts[i]` counts observations `<= bounds[i]` and `> bounds[i - 1]`; the last
    entry counts those above every bound (Prometheus' ``+Inf`` bucket, cumulative at
    export: `cumulative()`).
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        if list(self.bounds) != sorted(set(self.bounds)) or not self.bounds:
            raise ValueError("bucket bounds must be increasing and not empty")
        # Invariant: len(counts) == len(bounds) + 1.
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum: float = 0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``[(upper bound, observations <= it), ...]``, ending with ``(inf, count)``."""
        out = []
        total = 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            total += n
            out.append((bound, total))
        return out


_BATCH_HEAD = struct.Struct("<II")   # count, payload_len of a client batch
_BATCH_HEAD_AT = 24                  # after session_id, first_seq, acked_seq (u64 each)


def slot_commands(value: bytes) -> int:
    """The number of commands in a slot's value (a concatenation of client batches,
    docs/internals.md "Slot values and client batches"; b"" is a no-op: 0).

    Reads one header per client batch, never the commands.  A value that does not
    parse (it is the core's, and checked there) counts what parsed before.
    """
    commands = 0
    offset = 0
    end = len(value)
    while offset + BATCH_HEADER_BYTES <= end:
        count, payload_len = _BATCH_HEAD.unpack_from(value, offset + _BATCH_HEAD_AT)
        commands += count
        offset += BATCH_HEADER_BYTES + payload_len
    return commands
