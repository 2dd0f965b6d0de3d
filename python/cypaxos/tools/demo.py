"""`cypaxos demo`: a local cluster under load survives its leader's crash, checked.

What it does, in under a minute and with nothing left behind:

1. starts 3 replicas (fsync always) on 127.0.0.1, on free ports (or from a given
   one), in a temporary directory;
2. runs a workload: CLIENT_TASKS concurrent tasks over one Trio client, half
   writes (64-byte values over 1000 keys) and half linearizable reads;
3. a third of the way in, SIGKILLs the leader and measures the failover time:
   from the kill to the first acknowledgement of a write *sent after* the kill
   (a reply already in flight from the dead leader does not count);
4. two thirds of the way in, restarts the killed replica and measures its
   catch-up time: until its applied index reaches what the others had applied
   when it came back;
5. after the workload: reads every key back, waits for all replicas to reach the
   same applied index and compares their state digests.

Every read is checked.  Each key is written by one task only, in order, with a
version number inside the value; a read must return a version at least as new as
the newest write acknowledged before the read started, and no newer than the
newest write sent before the read ended.  Anything else is a stale or invented
value: a linearizability violation.

With ``tls=True`` (``cypaxos demo --tls``) the cluster runs under mutual TLS
(`LocalCluster(tls=True)`: certificates made for the run), and the workload's client
and the status probes dial with the client certificate.

The exit status is 0 only if every check passed.  A live `rich` display shows
progress on a terminal; otherwise (CI logs) a plain line every two seconds.
"""
from __future__ import annotations

import math
import random
import signal
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import trio

from ..errors import ClientError
from .exits import EXIT_TERMINATED
from .local import LocalCluster, LocalClusterError, leader_of, free_ports

__all__ = ["run_demo", "DemoResult", "percentile"]

REPLICAS = 3
CLIENT_TASKS = 16
KEYS = 1000
VALUE_SIZE = 64
WRITE_RATIO = 0.5
CLIENT_TIMEOUT = 5.0
READY_TIMEOUT = 30.0  # for the cluster to elect its first leader
FAILOVER_TIMEOUT = 15.0  # kill -> a write acknowledged by a new leader
CATCHUP_TIMEOUT = 20.0  # restart -> the replica has applied what the others had
CONVERGE_TIMEOUT = 15.0  # after the workload: every replica at one applied index
STATUS_INTERVAL = 0.25


def percentile(sorted_values: list[float], p: float) -> float:
    """The nearest-rank `p`-th percentile (0 < p <= 100) of an ascending list; nan if empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _key(k: int) -> bytes:
    return b"demo:%04d" % k


def _value(k: int, version: int) -> bytes:
    head = b"%04d:%010d:" % (k, version)
    return head + b"." * (VALUE_SIZE - len(head))


@dataclass
class DemoResult:
    """Everything `cypaxos demo` measured and checked."""

    duration_s: float = 0.0
    tls: bool = False
    writes: int = 0
    reads: int = 0
    failed: int = 0
    failures: Counter = field(default_factory=Counter)
    write_ms: list = field(default_factory=list)
    read_ms: list = field(default_factory=list)
    violations: list = field(default_factory=list)
    killed: int | None = None
    kill_at_s: float | None = None
    new_leader: int | None = None
    new_leader_after_s: float | None = None
    failover_s: float | None = None
    restart_at_s: float | None = None
    catchup_s: float | None = None
    catchup_index: int | None = None
    readback_keys: int = 0
    converged_index: int | None = None
    digests: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)

    @property
    def ops(self) -> int:
        """Operations that completed (writes + reads)."""
        return self.writes + self.reads

    @property
    def digests_equal(self) -> bool:
        """True if every replica reported one digest at one applied index."""
        return len(self.digests) == REPLICAS and len(set(self.digests.values())) == 1

    @property
    def passed(self) -> bool:
        """True if every check passed."""
        return not self.problems and not self.violations


class _Output:
    """Where the demo talks: a rich Live display on a terminal, plain lines elsewhere."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True)
        self.live = None
        self.tty = self.console.is_terminal

    def event(self, text: str, elapsed: float | None = None) -> None:
        stamp = "" if elapsed is None else f"[{elapsed:6.2f}s] "
        # rich prints above the live display while it is running.
        self.console.print(stamp + text, markup=False)

    def start_live(self, render) -> None:
        if self.tty:
            from rich.live import Live

            self.live = Live(render(), console=self.console, auto_refresh=False,
                             transient=True)
            self.live.start()

    def refresh(self, render) -> None:
        if self.live is not None:
            self.live.update(render(), refresh=True)

    def stop_live(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


class _Demo:
    def __init__(self, cluster: LocalCluster, out: _Output, duration: float) -> None:
        self.cluster = cluster
        self.out = out
        self.duration = duration
        self.result = DemoResult(tls=cluster.tls)
        self.issued = [0] * KEYS  # newest version sent, per key
        self.acked = [0] * KEYS  # newest version acknowledged, per key
        self.phase = "starting"
        self.start = 0.0  # trio.current_time() when the workload started
        self.stop_workload = False
        self.kill_time: float | None = None
        self.failover_done = trio.Event()
        self.statuses: dict[int, dict | None] = {}
        self.leader: int | None = None
        self.rate_samples: deque = deque()  # (time, ops) for ops/s over the last second
        self.last_line = 0.0
        self.down: set[int] = set()
        self.current_rate = 0.0  # ops/s over the last second, for the display

    # ------------------------------------------------------------------ display

    def elapsed(self) -> float:
        return trio.current_time() - self.start

    def ops_per_s(self) -> float:
        now = trio.current_time()
        samples = self.rate_samples
        samples.append((now, self.result.ops))
        while len(samples) > 2 and now - samples[1][0] >= 1.0:
            samples.popleft()
        t0, n0 = samples[0]
        return (self.result.ops - n0) / (now - t0) if now - t0 > 0.05 else 0.0

    def render(self):
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        r = self.result
        elapsed = max(0.0, min(self.elapsed(), self.duration)) if self.start else 0.0
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("phase", self.phase)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=self.duration, completed=elapsed, width=40),
                    f"{elapsed:5.1f} s / {self.duration:g} s")
        grid.add_row("workload", bar)
        grid.add_row("ops", f"{r.ops:,}  ({r.writes:,} writes, {r.reads:,} reads, "
                            f"{r.failed:,} failed)   {self.current_rate:,.0f} ops/s")
        grid.add_row("leader", f"replica {self.leader}" if self.leader else "(none)")
        for replica_id in self.cluster.ids:
            grid.add_row(f"replica {replica_id}", self._describe(replica_id))
        if r.violations:
            grid.add_row("[red]violations", f"[red]{len(r.violations)}")
        return grid

    def _describe(self, replica_id: int) -> str:
        if replica_id in self.down:
            return "down (SIGKILLed)"
        st = self.statuses.get(replica_id)
        if not st:
            return "not answering"
        return (f"{st.get('role', '?'):<9} applied {st.get('applied_index', 0):>8,}  "
                f"digest {str(st.get('state_digest', ''))[:16]}")

    def plain_line(self) -> str:
        r = self.result
        applied = " ".join(
            f"{i}:{'down' if i in self.down else (self.statuses.get(i) or {}).get('applied_index', '?')}"
            for i in self.cluster.ids)
        return (f"[{self.elapsed():6.2f}s] {self.phase:<34} ops {r.ops:>7,}  "
                f"{self.current_rate:>7,.0f} ops/s  failed {r.failed}  "
                f"leader {self.leader or '-'}  applied {applied}")

    async def display(self) -> None:
        while True:
            self.current_rate = self.ops_per_s()
            if self.out.tty:
                self.out.refresh(self.render)
            elif trio.current_time() - self.last_line >= 2.0:
                self.last_line = trio.current_time()
                self.out.event(self.plain_line())
            await trio.sleep(0.25)

    def event(self, text: str) -> None:
        self.out.event(text, self.elapsed() if self.start else None)

    # ----------------------------------------------------------- cluster watch

    async def watch(self) -> None:
        """Poll every replica's status for the display; announce leader changes."""
        while True:
            statuses = await trio.to_thread.run_sync(self.cluster.statuses, 0.5)
            self.statuses = statuses
            self.note_leader(leader_of({i: s for i, s in statuses.items()
                                         if i not in self.down}))
            await trio.sleep(STATUS_INTERVAL)

    def note_leader(self, leader: int | None) -> None:
        if leader is None or leader == self.leader:
            return
        r = self.result
        if self.kill_time is not None and r.new_leader is None and leader != r.killed:
            r.new_leader = leader
            r.new_leader_after_s = trio.current_time() - self.kill_time
            self.event(f"replica {leader} leads now (seen {r.new_leader_after_s:.2f} s "
                       "after the kill)")
        elif self.leader is not None:
            self.event(f"leader changed: replica {leader} leads now (was {self.leader})")
        self.leader = leader

    async def watch_failover(self, victim: int) -> None:
        """Right after the kill: poll fast, so the takeover is timed to ~50 ms."""
        while self.result.new_leader is None:
            statuses = await trio.to_thread.run_sync(self.cluster.statuses, 0.5)
            self.note_leader(leader_of({i: s for i, s in statuses.items() if i != victim}))
            await trio.sleep(0.05)

    # ---------------------------------------------------------------- workload

    async def worker(self, kv, task: int) -> None:
        rng = random.Random(task)
        own = list(range(task, KEYS, CLIENT_TASKS))
        while not self.stop_workload:
            if rng.random() < WRITE_RATIO:
                ok = await self.put(kv, rng.choice(own))
            else:
                ok = await self.get(kv, rng.randrange(KEYS))
            if not ok:
                await trio.sleep(0.05)  # do not spin on a cluster that refuses

    async def put(self, kv, k: int) -> bool:
        version = self.issued[k] + 1
        self.issued[k] = version
        t0 = trio.current_time()
        try:
            await kv.put(_key(k), _value(k, version))
        except ClientError as exc:
            self.failed(exc, "put")
            return False
        t1 = trio.current_time()
        r = self.result
        r.writes += 1
        r.write_ms.append((t1 - t0) * 1000)
        self.acked[k] = max(self.acked[k], version)
        if self.kill_time is not None and t0 >= self.kill_time \
                and not self.failover_done.is_set():
            r.failover_s = t1 - self.kill_time
            self.failover_done.set()
        return True

    async def get(self, kv, k: int, *, count: bool = True) -> bool:
        low = self.acked[k]
        t0 = trio.current_time()
        try:
            value = await kv.get(_key(k))
        except ClientError as exc:
            self.failed(exc, "get")
            return False
        t1 = trio.current_time()
        high = self.issued[k]
        if count:
            self.result.reads += 1
            self.result.read_ms.append((t1 - t0) * 1000)
        self.check_read(k, value, low, high)
        return True

    def check_read(self, k: int, value: bytes | None, low: int, high: int) -> None:
        if value is None:
            version = 0
        else:
            head = b"%04d:" % k
            try:
                if len(value) != VALUE_SIZE or not value.startswith(head):
                    raise ValueError
                version = int(value[5:15])
            except ValueError:
                self.violation(f"get {_key(k).decode()} returned {value[:24]!r}..., "
                               "which no one wrote")
                return
        if not low <= version <= high:
            what = "absent" if value is None else f"version {version}"
            self.violation(f"get {_key(k).decode()} returned {what}, but versions "
                           f"{low}..{high} were the only possible answers")

    def violation(self, text: str) -> None:
        self.result.violations.append(text)
        if len(self.result.violations) <= 5:
            self.event("VIOLATION: " + text)

    def failed(self, exc: ClientError, op: str) -> None:
        r = self.result
        r.failed += 1
        kind = f"{op}: {type(exc).__name__}"
        r.failures[kind] += 1
        if r.failures[kind] == 1:
            self.event(f"{op} failed: {type(exc).__name__}: {exc} (further ones counted)")

    # --------------------------------------------------------------- scenario

    async def sleep_until(self, t: float) -> None:
        await trio.sleep_until(self.start + t)

    async def scenario(self) -> None:
        r = self.result
        await self.sleep_until(self.duration / 3)
        # Kill whoever leads right now (asked afresh, not the display's last poll).
        victim = await trio.to_thread.run_sync(self.cluster.leader_id, 1.0) or self.leader
        if victim is None:
            r.problems.append("no leader to kill a third of the way in")
            return
        self.phase = "leader killed: failover"
        self.kill_time = trio.current_time()
        self.cluster.kill(victim)
        self.down.add(victim)
        r.killed = victim
        r.kill_at_s = self.kill_time - self.start
        self.event(f"SIGKILL leader replica {victim}")
        with trio.move_on_after(FAILOVER_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.watch_failover, victim)
                await self.failover_done.wait()
                with trio.move_on_after(1.0):  # the leader poll is likely just behind
                    while r.new_leader is None:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        if not self.failover_done.is_set():
            r.problems.append(f"no write was acknowledged within {FAILOVER_TIMEOUT:g} s "
                              "of killing the leader")
            return
        self.event(f"first write acknowledged {r.failover_s:.2f} s after the kill")
        self.phase = "serving on 2 of 3 replicas"

        await trio.sleep_until(max(self.start + 2 * self.duration / 3,
                                   trio.current_time() + 0.5))
        others = [i for i in self.cluster.ids if i != victim]
        statuses = await trio.to_thread.run_sync(self.cluster.statuses, 1.0)
        target = max((statuses[i] or {}).get("applied_index", 0) for i in others)
        # start() runs here on the main thread on purpose: see LocalCluster.start.
        self.cluster.start(victim)
        restart_time = trio.current_time()
        self.down.discard(victim)
        r.restart_at_s = restart_time - self.start
        self.phase = f"replica {victim} restarted: catching up"
        self.event(f"restarted replica {victim}; the others were at applied index {target:,}")
        with trio.move_on_after(CATCHUP_TIMEOUT):
            while True:
                st = await trio.to_thread.run_sync(self.cluster.status, victim, 0.5)
                if st and st.get("applied_index", 0) >= target:
                    r.catchup_s = trio.current_time() - restart_time
                    r.catchup_index = st["applied_index"]
                    break
                exited = self.cluster.unexpected_exits()
                if victim in exited:
                    r.problems.append(f"restarted replica {victim} exited with status "
                                      f"{exited[victim]}: {self.cluster.log_tail(victim, 1)}")
                    return
                await trio.sleep(0.05)
        if r.catchup_s is None:
            r.problems.append(f"replica {victim} did not catch up within "
                              f"{CATCHUP_TIMEOUT:g} s of its restart")
            return
        self.event(f"replica {victim} caught up to applied index {r.catchup_index:,} in "
                   f"{r.catchup_s:.2f} s")
        self.phase = "all replicas serving"

    async def verify(self, kv) -> None:
        """After the workload: read every key back, then compare the replicas' digests."""
        r = self.result
        self.phase = "reading every key back"
        send, receive = trio.open_memory_channel(KEYS)
        for k in range(KEYS):
            send.send_nowait(k)
        send.close()

        async def reader():
            async for k in receive:
                if await self.get(kv, k, count=False):
                    r.readback_keys += 1

        async with trio.open_nursery() as nursery:
            for _ in range(CLIENT_TASKS):
                nursery.start_soon(reader)
        if r.readback_keys != KEYS:
            r.problems.append(f"read back only {r.readback_keys} of {KEYS} keys")
        else:
            self.event(f"read back all {KEYS:,} keys: every value is the last one written")

        self.phase = "comparing replicas"
        last = None
        with trio.move_on_after(CONVERGE_TIMEOUT):
            while True:
                statuses = await trio.to_thread.run_sync(self.cluster.statuses, 1.0)
                last = statuses
                indexes = {i: (s or {}).get("applied_index") for i, s in statuses.items()}
                if None not in indexes.values() and len(set(indexes.values())) == 1:
                    r.converged_index = next(iter(indexes.values()))
                    r.digests = {i: s["state_digest"] for i, s in statuses.items()}
                    break
                await trio.sleep(0.1)
        if r.converged_index is None:
            where = ", ".join(f"replica {i}: {(s or {}).get('applied_index', 'no answer')}"
                              for i, s in (last or {}).items())
            r.problems.append(f"replicas did not reach one applied index within "
                              f"{CONVERGE_TIMEOUT:g} s ({where})")
        elif not r.digests_equal:
            r.problems.append("state digests differ at applied index "
                              f"{r.converged_index:,}: {r.digests}")
        else:
            digest = next(iter(r.digests.values()))
            self.event(f"all {REPLICAS} replicas at applied index {r.converged_index:,} "
                       f"with state digest {digest}")

    async def main(self) -> DemoResult:
        from ..client import open_client

        r = self.result
        async with trio.open_nursery() as background:
            background.start_soon(self.watch)
            async with open_client(self.cluster.addresses, timeout=CLIENT_TIMEOUT,
                                   tls=self.cluster.client_tls) as kv:
                self.start = self.last_line = trio.current_time()
                background.start_soon(self.display)
                self.phase = "steady load"
                self.event(f"workload: {CLIENT_TASKS} tasks, {KEYS:,} keys, "
                           f"{VALUE_SIZE}-byte values, {WRITE_RATIO:.0%} writes, "
                           f"{self.duration:g} s")
                async with trio.open_nursery() as nursery:
                    for task in range(CLIENT_TASKS):
                        nursery.start_soon(self.worker, kv, task)
                    async with trio.open_nursery() as story:
                        story.start_soon(self.scenario)
                        await self.sleep_until(self.duration)
                        self.stop_workload = True
                        r.duration_s = self.elapsed()
                        # The workers finish their current operation and return;
                        # the scenario may still be waiting for the catch-up.
                        if self.result.catchup_s is None and self.result.problems == []:
                            self.phase = "workload done; waiting for catch-up"
                self.event(f"workload stopped: {r.ops:,} operations in {r.duration_s:.1f} s")
                await self.verify(kv)
            background.cancel_scope.cancel()
        return r


class _Terminated(BaseException):
    """SIGTERM outside Trio: unwind (cleaning up) like a Ctrl-C, exit 143."""


async def _run(cluster: LocalCluster, out: _Output, duration: float) -> DemoResult | int:
    demo = _Demo(cluster, out, duration)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def on_sigterm():
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(on_sigterm)
            out.start_live(demo.render)
            try:
                result = await demo.main()
            finally:
                out.stop_live()
            nursery.cancel_scope.cancel()
            return result
    return EXIT_TERMINATED  # cancelled by SIGTERM


def run_demo(duration: float = 15.0, port: int | None = None, tls: bool = False) -> int:
    """Run the demo (see the module docstring); returns the exit status.

    `port`: replica N listens on 127.0.0.1 port ``port + N - 1``; None picks free
    ports (and tries others if one is taken meanwhile).  `tls`: under mutual TLS.
    0 if every check passed, 1
    if one failed or the cluster could not start, 143 on SIGTERM.  A Ctrl-C raises
    KeyboardInterrupt after cleaning up.
    """
    out = _Output()
    out.event(f"cypaxos demo: {REPLICAS} replicas on this host, fsync always"
              + (", mutual TLS" if tls else "") + ", a leader crash a third of the way in")

    def on_sigterm(signum, frame):  # before and after Trio runs: unwind and clean up
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    cluster = None
    surprises: dict[int, int] = {}
    try:
        started = time.monotonic()
        attempts = 3 if port is None else 1
        for attempt in range(attempts):
            ports = free_ports(REPLICAS) if port is None else range(port, port + REPLICAS)
            cluster = LocalCluster(REPLICAS, ports=ports, fsync=True, tls=tls)
            cluster.start_all()
            try:
                leader = cluster.wait_ready(READY_TIMEOUT)
                break
            except LocalClusterError as exc:
                # free_ports() cannot reserve the ports: another process may take one
                # before a replica binds it.  Then try other ports.
                if attempt == attempts - 1 or not cluster.unexpected_exits():
                    raise
                out.event(f"{exc}; retrying on other ports")
                cluster.close()
        out.event(f"cluster up in {time.monotonic() - started:.2f} s: "
                  + ", ".join(f"replica {i} {cluster.address(i)}" for i in cluster.ids)
                  + f"; replica {leader} leads")
        out.event(f"data and replica logs in {cluster.data_dir} (removed at the end)")
        result = trio.run(_run, cluster, out, duration)
        if isinstance(result, int):
            out.event("cypaxos demo: stopped by SIGTERM")
            return result
    except _Terminated:
        out.event("cypaxos demo: stopped by SIGTERM")
        return EXIT_TERMINATED
    except LocalClusterError as exc:
        out.event(f"cypaxos demo: FAILED: {exc}")
        return 1
    except ClientError as exc:
        out.event(f"cypaxos demo: FAILED: the client gave up: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
        try:
            if cluster is not None:
                surprises = cluster.unexpected_exits()
                cluster.close()
        finally:
            signal.signal(signal.SIGTERM, previous)
    for replica_id, code in sorted(surprises.items()):
        result.problems.append(f"replica {replica_id} exited on its own with status {code}")
    if result.failed:
        # With 2 of 3 replicas up at every moment, every call should complete within
        # the client's timeout (failover included): a failed call is a liveness bug.
        result.problems.append(f"{result.failed:,} operations failed within the client's "
                               f"{CLIENT_TIMEOUT:g} s timeout")
    _print_summary(out, result)
    return 0 if result.passed else 1


def _ms(values: list[float]) -> str:
    s = sorted(values)
    return "  ".join(f"{name} {percentile(s, p):7.2f}" for name, p in
                     (("p50", 50), ("p90", 90), ("p99", 99))) + f"  max {s[-1] if s else math.nan:7.2f}"


def _print_summary(out: _Output, r: DemoResult) -> None:
    def seconds(value):
        return "-" if value is None else f"{value:.2f} s"

    rate = r.ops / r.duration_s if r.duration_s else 0.0
    lines = [
        "",
        "cypaxos demo summary",
        f"  cluster          {REPLICAS} replicas on 127.0.0.1, fsync always"
        + (", mutual TLS 1.3" if r.tls else ""),
        f"  workload         {CLIENT_TASKS} concurrent tasks, {KEYS:,} keys, {VALUE_SIZE}-byte "
        f"values, {WRITE_RATIO:.0%} writes / {1 - WRITE_RATIO:.0%} linearizable reads",
        f"  operations       {r.ops:,} in {r.duration_s:.1f} s = {rate:,.0f} ops/s "
        f"({r.writes:,} writes, {r.reads:,} reads, {r.failed:,} failed)",
        f"  write latency    {_ms(r.write_ms)} ms",
        f"  read latency     {_ms(r.read_ms)} ms",
    ]
    if r.failures:
        lines.append("  failed ops       " + ", ".join(
            f"{kind} x{n}" for kind, n in sorted(r.failures.items())))
    if r.killed is not None:
        lines.append(f"  failover         leader replica {r.killed} SIGKILLed at "
                     f"{r.kill_at_s:.1f} s; first write acknowledged after "
                     f"{seconds(r.failover_s)}; replica {r.new_leader or '?'} seen leading "
                     f"after {seconds(r.new_leader_after_s)}")
    if r.restart_at_s is not None:
        lines.append(f"  catch-up         replica {r.killed} restarted at {r.restart_at_s:.1f} s; "
                     f"caught up in {seconds(r.catchup_s)}"
                     + (f" (applied index {r.catchup_index:,})" if r.catchup_index else ""))
    lines.append(f"  reads checked    {r.reads + r.readback_keys:,} "
                 f"({r.readback_keys:,} in the final read-back): "
                 f"{len(r.violations)} stale or wrong")
    if r.converged_index is not None:
        digest = next(iter(r.digests.values()), "-")
        lines.append(f"  state digests    {'equal' if r.digests_equal else 'DIFFERENT'} at "
                     f"applied index {r.converged_index:,}"
                     + (f" ({digest})" if r.digests_equal else f": {r.digests}"))
    else:
        lines.append("  state digests    not compared (replicas did not converge)")
    for problem in r.problems:
        lines.append(f"  problem          {problem}")
    for violation in r.violations[:5]:
        lines.append(f"  violation        {violation}")
    lines.append(f"  result           {'PASS' if r.passed else 'FAIL'}")
    out.console.print("\n".join(lines), markup=False)
