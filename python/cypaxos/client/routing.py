"""Which replica a client talks to, when it dials, and what went wrong (sans-I/O).

The replica side of the client's session (`cypaxos.client.session`): it picks the
address to dial and the time to dial it, and keeps the facts that error messages are
made of.  It does no I/O and reads no clock: every method is told the time.

The rules
---------
* One connection at a time, to the leader when it is known.  Addresses are dialed
  round robin from a random start.  A redirect that names the leader makes it the
  next address, dialed at once, unless redirects keep bouncing without an answer
  (stale hints during an election): then the client pauses between them.
* A *round* is one failed dial of each address.  Within a round the next address is
  dialed at once; after a whole round without a connection the client pauses
  (`backoff_min_s`, doubling to `backoff_max_s`, reset once a leader answers).  A
  connection that worked and then died (a leader crash) is replaced at once; a
  fruitless one (no leader known, stalled) is followed by a pause.
* **Fail fast.**  A dial fails *definitively* when the address certainly has no
  replica of this cluster for us: the connection was refused, the host name does not
  exist, something else answered (not a cypaxos replica, a replica of another
  cluster), or the replica refused the handshake.  Once every known address has
  failed definitively since a replica last welcomed the client, waiting cannot help:
  `dial_failed` says so, and the session fails the pending calls at once with
  `UnavailableError` instead of at their deadlines.
* **What the errors say.**  A call past its deadline is "unavailable" when no replica
  answered at all since it began (`last_contact`), or when there was no leader: a
  replica said it knows none, or named a leader that cannot be reached (the replica
  is up but the leader it last heard of is gone: no quorum, or an election under
  way), and no leader answered since (`last_leader_ok`, `last_no_leader` and
  `no_leader_detail`).  Otherwise it is a plain timeout, with `last_error`.
"""
from __future__ import annotations

import math
import random
from typing import Optional

__all__ = ["Router"]


class Router:
    """The choice of replica and the facts about reaching one (see the module doc).

    `addresses` grows with replicas learned from redirects.  Times are the session's
    clock (seconds).
    """

    def __init__(self, addresses: list[str], *, backoff_min_s: float, backoff_max_s: float,
                 rng: random.Random) -> None:
        if not addresses:
            raise ValueError("no replica address")
        self.addresses = list(addresses)
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = backoff_max_s
        self._rr = rng.randrange(len(self.addresses)) - 1  # round robin, random start
        self._backoff_s = 0.0
        self._dial_at = -math.inf          # the next dial not before this
        self._failed_in_round = 0          # dials failed since a connection or a pause
        self._redirect_streak = 0          # redirects followed since a leader answered
        self._hint: Optional[str] = None   # the leader a redirect named: dialed next
        self._hint_named_by: Optional[str] = None
        self._dialing_named_by: Optional[str] = None  # the dial in progress follows a hint
        # Invariant: holds only addresses that failed definitively since a replica last
        # welcomed the client (or since it went idle); all of them -> fail fast.
        self._refusals: dict[str, str] = {}
        self.cluster_id: Optional[str] = None  # from the first welcome; others must match
        self.last_contact = -math.inf      # a welcome or a reply from any replica
        self.last_leader_ok = -math.inf    # an answer from a leader
        self.last_no_leader = -math.inf    # told (or shown) that there is no leader
        self.no_leader_detail = ""
        self.last_error = "not connected yet"

    # -- choosing ------------------------------------------------------------

    def next_dial(self, now: float, *, after_idle: bool = False) -> tuple[str, float]:
        """The address to dial next and when (`now`, or later after a failed round).

        `after_idle`: nobody needed a connection for a while, so what was learned
        about failures then is stale; a new round starts at once.
        """
        if after_idle:
            self._refusals.clear()
            self._failed_in_round = 0
            self._dial_at = now
        hint, self._hint = self._hint, None
        if hint is not None:
            if hint not in self.addresses:
                self.addresses.append(hint)   # a replica the caller did not list
            self._rr = self.addresses.index(hint)
            self._dialing_named_by = self._hint_named_by
            address = hint
        else:
            # Always move on: the last address failed, redirected without a hint, or died.
            self._rr = (self._rr + 1) % len(self.addresses)
            self._dialing_named_by = None
            address = self.addresses[self._rr]
        if self.last_error == "not connected yet":
            self.last_error = f"{address}: still connecting"   # e.g. slow DNS
        return address, max(now, self._dial_at)

    def _pause(self, now: float) -> None:
        self._backoff_s = min(max(self._backoff_s * 2, self._backoff_min_s),
                              self._backoff_max_s)
        self._dial_at = now + self._backoff_s

    # -- outcomes ------------------------------------------------------------

    def dial_failed(self, address: str, reason: str, now: float, *,
                    definitive: bool = False, reachable: bool = False) -> Optional[str]:
        """A dial of `address` failed; returns why every replica is unreachable when
        that is now certain (fail fast), else None.

        `definitive`: the address certainly has no replica of ours (see the module
        doc); `reachable`: something answered there (a foreign server, a replica of
        another cluster, a refused handshake), so it is no sign that a leader named
        there is gone.
        """
        self.last_error = f"{address}: {reason}"
        named_by, self._dialing_named_by = self._dialing_named_by, None
        if named_by is not None and not reachable:
            # A replica is up and names a leader that cannot be reached.
            self.last_no_leader = now
            self.no_leader_detail = (f"{named_by} names {address} as the leader, which is "
                                     f"unreachable ({reason})")
        if definitive:
            self._refusals[address] = reason
        else:
            self._refusals.pop(address, None)
        self._failed_in_round += 1
        if self._failed_in_round >= len(self.addresses):
            self._failed_in_round = 0
            self._pause(now)
        else:
            self._dial_at = now
        if definitive and len(self._refusals) >= len(self.addresses) and all(
                a in self._refusals for a in self.addresses):
            why = "; ".join(f"{a}: {self._refusals[a]}" for a in self.addresses)
            self._refusals.clear()
            return why
        return None

    def welcomed(self, address: str, cluster_id: str, now: float) -> Optional[str]:
        """A replica answered the hello: None, or why it is refused (another cluster's)."""
        if self.cluster_id is None:
            self.cluster_id = cluster_id
        elif cluster_id != self.cluster_id:
            # Addresses of two clusters mixed up must not send writes to both.
            return f"replica of cluster {cluster_id!r}, not {self.cluster_id!r}"
        self.last_contact = now
        self._refusals.clear()
        self._failed_in_round = 0
        self._dialing_named_by = None
        return None

    def no_leader(self, address: str, now: float) -> None:
        """The replica at `address` said it knows no leader."""
        self.last_no_leader = now
        self.no_leader_detail = f"{address} knows no leader"

    def leader_answered(self, now: float) -> None:
        """A leader answered a request: the cluster works; pauses start small again."""
        self.last_leader_ok = now
        self._backoff_s = 0.0
        self._redirect_streak = 0

    def connection_ended(self, address: str, now: float, *, reason: str, answered: bool,
                         redirected: bool, hint: Optional[str]) -> None:
        """The connection to `address` ended (`hint`: the leader its redirect named)."""
        if hint is not None:
            # Straight to the leader, unless redirects keep bouncing without an answer.
            self._hint = hint
            self._hint_named_by = address
            self._redirect_streak += 1
            if self._redirect_streak <= 2 * len(self.addresses):
                self._dial_at = now
            else:
                self._pause(now)
            return
        if reason:
            self.last_error = f"{address}: {reason}"
        # A connection that worked and then died (a leader crash) is replaced at once;
        # a fruitless one (no leader known, stalled) is followed by a pause.
        if answered and not redirected:
            self._dial_at = now
        else:
            self._pause(now)
