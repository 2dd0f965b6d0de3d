"""The simulator's clients: the real client over the simulated network.

A `SimClient` is what `cypaxos.client.api.Client` is, with the simulation for its
event loop: the same calls (`ClientCalls`: put, get, cas, delete, with their
deadlines, waits for room and `maybe_applied`) over the same `ClientSession`.  Only
the wiring is the simulator's:

* **Calls are coroutines** run by a small deterministic runner: a parked call (the
  client's `_park`) is resumed when the session finishes or expires its op.  The
  simulation's clock (in seconds) is the client's clock.
* **The connection is a simulated TCP connection** (`SimConnection`) to one replica:
  each way, messages arrive in order after the network's random delays.  A message
  the network loses either breaks the connection (nothing after it gets through, as
  a connection breaks when its peer stops answering; the client hears of it a while
  later) or, half the time, vanishes alone while the connection stays up: a request
  a replica dropped without a word (as one does when a resend of the same batch
  takes over the first copy's place) or its reply.  A crashed replica resets its
  connections; a dial to a down replica is refused, and one whose packets are lost
  times out.  Requests sent before the client closed a connection still reach the
  replica (so an old connection's request may arrive after its resend on the new
  one), but replies to a closed connection are dropped.
* Every `drive()` (after each event) runs the resumed calls, tells the session the
  time, sends what it says on the connection, and dials where it says when none is
  open and one is wanted.

What the calls are is the simulation's workload (`cypaxos.testing.workloads`): its
`next_ops` are started as `submit` calls (a group of them at once, so that they share
a batch) or a `query`, and their outcomes reported back.  Most calls never give up;
some have a short timeout, and a call that failed is reported as the client says:
`maybe_applied` or not (the key-value workload records "unknown" or "fail", and the
linearizability checker then proves that a "fail" had no effect).
"""
from __future__ import annotations

import collections
import functools
import random
from typing import TYPE_CHECKING, Optional

from cypaxos import wire
from cypaxos.client.calls import ClientCalls
from cypaxos.client.session import SessionSettings
from cypaxos.errors import ClientError, CommandError
from cypaxos.protocol import RESULT_ERROR, RESULT_OK

if TYPE_CHECKING:  # pragma: no cover
    from cypaxos.testing.sim import Simulation

__all__ = ["SimClient", "SimConnection"]

# The session's timings at the simulation's scale (its network delays are up to a
# few milliseconds, with some messages held for up to 60 ms).
_SETTINGS = dict(backoff_min_s=0.005, backoff_max_s=0.1, retry_pause_s=0.005,
                 retry_pause_max_s=0.05, connect_timeout_s=0.05, stall_timeout_s=0.2)
_NEVER_S = 1e9               # the default timeout: such calls never give up
_SHORT_TIMEOUTS_S = (0.05, 0.2, 0.6)
_SHORT_TIMEOUT_SHARE = 0.15  # of calls


class _Suspend:
    """Awaited by a parked call: hands control back to the runner."""

    __slots__ = ()

    def __await__(self):
        yield self


_SUSPEND = _Suspend()


class SimConnection:
    """A simulated TCP connection from a client to one replica (see the module doc).

    It is also the handle the replica answers on: `reply(body)`.
    """

    def __init__(self, client: "SimClient", rid: int, incarnation: int) -> None:
        self.client = client
        self.rid = rid
        self.incarnation = incarnation   # of the replica process it reached
        self.broken = False   # a message was lost, or the replica went away
        self.closed = False   # the client closed it: replies are dropped
        self._up_at = 0       # arrival time of the latest message to the replica
        self._down_at = 0     # ... and to the client (in order, each way)

    def send(self, body: list) -> None:
        """A request from the client."""
        if self.broken or self.closed:
            return
        sim = self.client.sim
        deliver, _ = sim.lossy(self.client.cid, self.rid)
        if not deliver:
            self._lose(sim)
            return
        self._up_at = max(sim.now + sim.delay(), self._up_at)
        sim.schedule(self._up_at, "client_event", self._arrive, body)

    def _arrive(self, body: list) -> None:
        sim = self.client.sim
        if sim.live(self.rid, self.incarnation) is None:
            self.break_()   # the process it connected to is gone: a reset
            return
        sim.client_request(self.rid, self, wire.parse_client_request(body))

    def reply(self, body: list) -> None:
        """A reply from the replica."""
        if self.broken:
            return
        sim = self.client.sim
        deliver, _ = sim.lossy(self.rid, self.client.cid)
        if not deliver:
            self._lose(sim)
            return
        self._down_at = max(sim.now + sim.delay(), self._down_at)
        sim.schedule(self._down_at, "client_event", self._deliver, body)

    def _deliver(self, body: list) -> None:
        if not self.closed:
            self.client.on_reply(self, body)

    def _lose(self, sim) -> None:
        if sim.rng.random() < 0.5:
            self.break_()
        # else the message vanishes alone

    def break_(self) -> None:
        """Nothing gets through any more; the client hears of it a while later."""
        if not self.broken:
            self.broken = True
            sim = self.client.sim
            sim.schedule(sim.now + sim.delay(), "client_event", self.client.on_broken, self)


class SimClient(ClientCalls):
    """One simulated client process: the client's calls and session, running the
    simulation's workload.

    `depth`: client batches in flight at most (the session's window); about three
    times that many calls are kept going.
    """

    def __init__(self, sim: "Simulation", cid: int, depth: int) -> None:
        settings = SessionSettings(inflight_batches_max=depth, **_SETTINGS)
        super().__init__([sim.addresses[rid] for rid in sim.ids], timeout=_NEVER_S,
                         settings=settings, rng=random.Random(sim.rng.getrandbits(64)))
        self.sim = sim
        self.cid = cid
        self.depth = depth
        self.stopped = False     # no new calls (the liveness phase)
        self.conn: Optional[SimConnection] = None
        self._dialing = False
        self._started = False    # the first dial is made without waiting for work
        self._idle = False       # no connection was wanted when the last one ended
        self._calls: set = set()     # the coroutines of calls not yet returned
        self._ready = collections.deque()   # ... to be resumed
        self._current = None     # the coroutine running now
        self._room_waiters: list = []   # (coroutine, deadline)
        self._reading = False    # a read is in progress (one at a time)
        # Most clients mostly write; one in four mostly reads (a stale read shows up
        # only if someone keeps reading while others write elsewhere).
        self.read_ratio = 0.9 if cid % 4 == 3 else 0.3

    # -- what ClientCalls needs ------------------------------------------------

    def _now(self) -> float:
        return self.sim.now / 1e6

    async def _park(self, op) -> None:
        op.task = functools.partial(self._ready.append, self._current)
        await _SUSPEND

    async def _park_for_room(self, deadline: float) -> None:
        self._room_waiters.append((self._current, deadline))
        await _SUSPEND

    def _kick(self) -> None:
        pass   # every event ends in drive(), which sends what was queued

    def _wake_timer(self) -> None:
        pass   # drive() tells the session the time at every event and tick

    def _room_freed(self) -> None:
        self._ready.extend(coro for coro, _ in self._room_waiters)
        self._room_waiters = []

    async def _ask_all(self, make_request, make_entry, timeout) -> list[dict]:
        raise NotImplementedError("no status requests in the simulation")

    def _close(self) -> None:
        self._session.close()

    # -- the workload ------------------------------------------------------------

    def busy(self) -> bool:
        """Whether a call has not returned yet."""
        return bool(self._calls)

    @property
    def session(self):
        """The client's `ClientSession`."""
        return self._session

    def _start(self, coro) -> None:
        self._calls.add(coro)
        self._ready.append(coro)

    def maybe_start(self) -> None:
        """Start the workload's next calls while there is room (only during the run)."""
        sim = self.sim
        while not self.stopped and len(self._calls) < 3 * self.depth:
            kind, *rest = sim.workload.next_ops(sim, self, not self._reading)
            if kind == "read":
                token, query = rest
                self._reading = True
                self._start(self._read(token, query, self._timeout_of_next_call()))
                continue
            for token, op_kind, command in rest[0]:
                self._start(self._write(token, op_kind, command, self._timeout_of_next_call()))

    def _timeout_of_next_call(self) -> Optional[float]:
        if self.sim.rng.random() < _SHORT_TIMEOUT_SHARE:
            return self.sim.rng.choice(_SHORT_TIMEOUTS_S)
        return None

    async def _write(self, token, kind: str, command: bytes, timeout) -> None:
        sim = self.sim
        try:
            result = await self.submit(command, timeout=timeout)
        except CommandError as exc:   # the state machine raised: a result too
            sim.workload.on_result(sim, token, kind, RESULT_ERROR, str(exc).encode())
        except ClientError as exc:
            sim.workload.on_failure(sim, token, kind, exc.maybe_applied)
        else:
            sim.workload.on_result(sim, token, kind, RESULT_OK, result)

    async def _read(self, token, query: bytes, timeout) -> None:
        sim = self.sim
        try:
            result = await self.query(query, timeout=timeout)
        except ClientError as exc:
            sim.workload.on_failure(sim, token, "read", exc.maybe_applied)
        else:
            sim.workload.on_read(sim, token, result)
        finally:
            self._reading = False

    # -- the wiring --------------------------------------------------------------

    def _run_ready(self) -> None:
        while self._ready:
            coro = self._ready.popleft()
            if coro not in self._calls:
                continue   # woken twice (finished, then the deadline), already done
            self._current = coro
            try:
                coro.send(None)
            except StopIteration:
                self._calls.discard(coro)
            finally:
                self._current = None

    def drive(self) -> None:
        """Run what is due: resumed calls, deadlines, sends and dials."""
        session = self._session
        while True:
            self._run_ready()
            now = self._now()
            session.expire(now)
            waiters = [w for w in self._room_waiters if w[1] <= now]
            if waiters:
                self._room_waiters = [w for w in self._room_waiters if w[1] > now]
                self._ready.extend(coro for coro, _ in waiters)
            if self._ready:
                continue
            conn = self.conn
            if conn is not None:
                bodies = session.requests_to_send(now)
                if session.disconnect is not None:
                    self._close_connection("")
                    continue
                for body in bodies:
                    conn.send(body)
                if bodies and self._room_waiters:
                    self._room_freed()
                    continue
            elif not self._dialing:
                wanted = session.wants_connection()
                if wanted or not self._started:
                    address, at = session.next_dial(now, after_idle=self._idle and wanted)
                    self._started = True
                    self._idle = False
                    self._dialing = True
                    when = max(self.sim.now, int(at * 1e6) + 1)
                    self.sim.schedule(when, "client_event", self._dial, address)
                else:
                    self._idle = True
            session.check_invariants()
            return

    def _close_connection(self, reason: str) -> None:
        conn, self.conn = self.conn, None
        conn.closed = True
        self._session.connection_lost(self._now(), reason)

    def _dial(self, address: str) -> None:
        sim = self.sim
        rid = sim.address_ids[address]
        deliver, _ = sim.lossy(self.cid, rid)
        if not deliver:
            at = sim.now + int(self._session.settings.connect_timeout_s * 1e6)
            sim.schedule(at, "client_event", self._dial_ended, address, None, 0)
            return
        replica = sim.replicas[rid]
        # SYN, SYN-ACK with the hello, and the welcome: two trips.
        at = sim.now + sim.delay() + sim.delay()
        sim.schedule(at, "client_event", self._dial_ended, address, rid,
                     replica.incarnation if replica.up else -1)

    def _dial_ended(self, address: str, rid: Optional[int], incarnation: int) -> None:
        self._dialing = False
        session = self._session
        now = self._now()
        if rid is None:
            session.connection_failed(address, "timed out", now)
        elif self.sim.live(rid, incarnation) is None:
            session.connection_failed(address, "connection refused", now, definitive=True)
        elif session.connection_made(address, self.sim.cluster_id, rid, now) is None:
            self.conn = SimConnection(self, rid, incarnation)
        self._room_freed()
        self.drive()

    def on_reply(self, conn: SimConnection, body: list) -> None:
        """A reply arrived on `conn`."""
        if conn is not self.conn:
            return
        self._session.reply_received(wire.parse_reply(body), self._now())
        self.drive()

    def on_broken(self, conn: SimConnection) -> None:
        """The client notices that `conn` broke."""
        if conn is self.conn:
            self._close_connection("connection reset by the replica")
            self.drive()

    def on_timer(self) -> None:
        """The periodic tick: new calls (during the run) and whatever is due."""
        self.maybe_start()
        self.drive()

    def replica_crashed(self, rid: int) -> None:
        """The replica `rid` was killed: its connections are reset."""
        if self.conn is not None and self.conn.rid == rid:
            self.conn.break_()

    def shutdown(self) -> None:
        """End every call still running (the simulation is over)."""
        self._session.close()
        for coro in list(self._calls):
            coro.close()
        self._calls.clear()
        self._ready.clear()
        self._room_waiters = []
