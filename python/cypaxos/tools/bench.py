"""`cypaxos bench`: load a cluster through the real client and measure it.

    cypaxos bench                                # its own local 3-replica cluster (fsync on)
    cypaxos bench --cluster 127.0.0.1:7001,...   # an existing cluster
    cypaxos bench --read-ratio 1.0 --json        # linearizable reads, one JSON object
    cypaxos bench --tls                          # its own cluster under mutual TLS

How it measures (docs/performance.md says why it is built this way):

* Load comes from client *worker processes* (``--processes``, default 2), each running
  one Trio event loop with its share of ``--clients`` `cypaxos.client.Client` objects
  (one connection and one session each).  Every client has ``--outstanding``
  concurrent tasks; each task issues an operation, waits for its answer and issues the
  next (closed loop).  A Python client process costs more CPU per operation than a
  replica does, so one client process alone would measure the client, not the cluster.
* Every operation is a `put` of a ``--value-size`` value, or, with probability
  ``--read-ratio``, a linearizable `get`, on a key drawn uniformly from ``--keys``
  16-byte keys (all written once before the run when reads are asked for).
* ``--rate R`` runs open loop instead: operations are *scheduled* at R per second in
  all (evenly spaced per client) and their latency counts from the scheduled time, so
  a stalled cluster shows up in the percentiles (no coordinated omission);
  ``--outstanding`` then caps how many run at once per client.
* Every worker starts at the same instant; the first ``--warmup`` seconds are not
  counted; operations that *complete* within the next ``--duration`` seconds are.
  Latencies go into log-linear histograms (HDR style: 128 buckets per power of two,
  under 0.8% error), exact maxima beside them.
* With no ``--cluster`` it starts a `cypaxos.tools.local.LocalCluster` (3 replicas,
  ``--fsync always``) in a temporary directory and removes it afterwards; ``--tls``
  runs it under mutual TLS, every client (preload and workers) on TLS with the
  client certificate.  With ``--cluster``, ``--tls-ca``/``--tls-cert``/``--tls-key``
  and ``--token-file`` (or their CYPAXOS_* variables) are the clients'.

`add_arguments(parser)` and `run(args) -> int` are the subcommand's parts;
``python -m cypaxos.tools.bench`` runs it standalone.

Over the ~600 lines the package's modules aim for (about 850): the parent and its
worker processes are one program (the worker is this module re-executed with
``--worker``) and share the settings, the histogram and the JSON-lines protocol
between them; they are kept in one file rather than split along that protocol.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import sys
import time

from .argtypes import PORT_MAX, check_port_range, int_in, non_negative_float, positive_float
from ..errors import ConfigError, Error
from .exits import (EXIT_INTERRUPTED, EXIT_NO, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, PROG,
                    error, say)
from .local import child_env

__all__ = ["add_arguments", "run", "main", "Histogram", "DEFAULTS"]

DEFAULTS = dict(
    clients=4, processes=2, duration=10.0, warmup=2.0, value_size=64, keys=100_000,
    read_ratio=0.0, outstanding=256, open_loop_outstanding=4096, timeout=10.0, batch=1,
)
KEY_BYTES = 16
_REPORT_INTERVAL = 0.5        # seconds between a worker's progress lines
_READY_TIMEOUT = 60.0         # workers must be connected by then
_DRAIN_GRACE = 5.0            # after the window, in-flight calls get this long
_PRELOAD_CONCURRENCY = 2048

LOCAL_REPLICAS = 3


class BenchError(Exception):
    """An expected failure: printed as one line, exit code attached."""

    def __init__(self, message: str, code: int = EXIT_NO) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------
# Histogram

class Histogram:
    """Log-linear latency histogram in integer nanoseconds (HDR style).

    Values below 256 ns have a bucket each; above, each power of two is split into 128
    buckets, so a bucket is at most 1/128 (0.8%) wide relative to its values.  Cheap
    enough to record inline: the index is a bit_length and a shift.
    """

    SUB_BITS = 7
    _SIZE = (64 - 8 + 2) << 7

    __slots__ = ("counts", "total", "max_ns", "min_ns", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * self._SIZE
        self.total = 0
        self.max_ns = 0
        self.min_ns = 0
        self.sum_ns = 0

    @staticmethod
    def index(ns: int) -> int:
        b = ns.bit_length()
        if b <= 8:
            return ns
        s = b - 8
        return (s << 7) + (ns >> s)

    @staticmethod
    def bucket_bounds(index: int) -> tuple[int, int]:
        """The [low, high) nanoseconds of a bucket."""
        if index < 256:
            return index, index + 1
        s = (index >> 7) - 1
        m = index - (s << 7)
        return m << s, (m + 1) << s

    def record(self, ns: int) -> None:
        if ns < 0:
            ns = 0
        self.counts[self.index(ns)] += 1
        self.total += 1
        self.sum_ns += ns
        if ns > self.max_ns:
            self.max_ns = ns
        if self.total == 1 or ns < self.min_ns:
            self.min_ns = ns

    def merge(self, other: "Histogram") -> None:
        counts = self.counts
        for i, c in enumerate(other.counts):
            if c:
                counts[i] += c
        if other.total:
            self.min_ns = other.min_ns if not self.total else min(self.min_ns, other.min_ns)
        self.total += other.total
        self.sum_ns += other.sum_ns
        self.max_ns = max(self.max_ns, other.max_ns)

    def percentile_ns(self, q: float) -> int:
        """The value at quantile q (0..1): the middle of its bucket, capped by the max."""
        if not self.total:
            return 0
        rank = max(1, math.ceil(q * self.total))
        seen = 0
        for i, c in enumerate(self.counts):
            if c:
                seen += c
                if seen >= rank:
                    low, high = self.bucket_bounds(i)
                    return min(self.max_ns, max(self.min_ns, (low + high - 1) // 2))
        return self.max_ns

    def summary_ms(self) -> dict:
        """{"p50", "p90", "p99", "p999", "max", "mean", "min", "count"}; ms, None if empty."""
        if not self.total:
            return {k: None for k in ("p50", "p90", "p99", "p999", "max", "mean", "min")} | {
                "count": 0}
        out = {name: round(self.percentile_ns(q) / 1e6, 4)
               for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999))}
        out["max"] = round(self.max_ns / 1e6, 4)
        out["mean"] = round(self.sum_ns / self.total / 1e6, 4)
        out["min"] = round(self.min_ns / 1e6, 4)
        out["count"] = self.total
        return out

    def to_json(self) -> dict:
        return {"counts": {str(i): c for i, c in enumerate(self.counts) if c},
                "total": self.total, "max_ns": self.max_ns, "min_ns": self.min_ns,
                "sum_ns": self.sum_ns}

    @classmethod
    def from_json(cls, data: dict) -> "Histogram":
        h = cls()
        for i, c in data["counts"].items():
            h.counts[int(i)] = c
        h.total = data["total"]
        h.max_ns = data["max_ns"]
        h.min_ns = data["min_ns"]
        h.sum_ns = data["sum_ns"]
        return h


# ---------------------------------------------------------------------------
# Arguments



def _ratio(text: str) -> float:
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in 0..1")
    return value



def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `cypaxos bench`'s flags to `parser` (a subparser)."""
    d = DEFAULTS
    parser.add_argument("--cluster", metavar="ADDRS", default=None,
                        help="comma-separated HOST:PORT of any replicas (default: start a "
                             "local 3-replica cluster with fsync on, in a temporary dir)")
    parser.add_argument("--port", type=int_in(1, PORT_MAX), default=None, metavar="PORT",
                        help="without --cluster: the local cluster's replica N listens on "
                             "127.0.0.1 port PORT+N-1 (default: free ports)")
    parser.add_argument("--clients", type=int_in(1, 10_000), default=d["clients"],
                        metavar="N", help="client connections (sessions), spread over the "
                                          f"worker processes (default: {d['clients']})")
    parser.add_argument("--processes", type=int_in(1, 256), default=None, metavar="P",
                        help="client worker processes (default: "
                             f"min({d['processes']}, --clients))")
    parser.add_argument("--outstanding", type=int_in(1, 1_000_000), default=None,
                        metavar="N",
                        help="concurrent calls per client, each of --batch operations "
                             "(default: "
                             f"{d['outstanding']}; with --rate, the cap on them, default "
                             f"{d['open_loop_outstanding']})")
    parser.add_argument("--batch", type=int_in(1, 65_536), default=d["batch"], metavar="N",
                        help="operations per call: N > 1 uses the bulk calls (put_many, "
                             "get_many), so each of the --outstanding tasks has N "
                             f"operations in flight (default: {d['batch']})")
    parser.add_argument("--duration", type=positive_float, default=d["duration"],
                        metavar="S", help=f"measured seconds (default: {d['duration']:g})")
    parser.add_argument("--warmup", type=non_negative_float, default=d["warmup"],
                        metavar="S", help="seconds of load before measuring "
                                          f"(default: {d['warmup']:g})")
    parser.add_argument("--value-size", type=int_in(0, 8 << 20), default=d["value_size"],
                        metavar="B", help=f"bytes per value (default: {d['value_size']})")
    parser.add_argument("--keys", type=int_in(1, 100_000_000), default=d["keys"],
                        metavar="K", help=f"distinct {KEY_BYTES}-byte keys, chosen uniformly "
                                          f"(default: {d['keys']})")
    parser.add_argument("--read-ratio", type=_ratio, default=d["read_ratio"], metavar="R",
                        help="fraction of operations that are linearizable gets "
                             f"(default: {d['read_ratio']:g})")
    parser.add_argument("--rate", type=positive_float, default=None, metavar="R",
                        help="open loop: R operations per second in all, latency from "
                             "each operation's scheduled time (default: closed loop)")
    parser.add_argument("--timeout", type=positive_float, default=d["timeout"],
                        metavar="S", help="client call timeout; a call past it counts "
                                          f"as an error (default: {d['timeout']:g})")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object with the results and settings")
    parser.add_argument("--tls", action="store_true",
                        help="without --cluster: run the local cluster under mutual TLS "
                             "(certificates made for the run) and every client on TLS")
    from .client_commands import add_security_arguments
    # The environment's CYPAXOS_TLS_* apply with --cluster only: bench's own cluster
    # has its own certificates (or none).
    add_security_arguments(parser, env_defaults=False)


def _settings(args) -> dict:
    if args.port is not None:
        if args.cluster is not None:
            raise BenchError("--port is for the local cluster bench starts; with --cluster "
                             "the cluster is already running", EXIT_USAGE)
        try:
            check_port_range(args.port, LOCAL_REPLICAS)
        except Error as exc:
            raise BenchError(str(exc), EXIT_USAGE) from None
    from .client_commands import security_from_env, security_given

    if args.tls and args.cluster is not None:
        raise BenchError("--tls is for the local cluster bench starts; with --cluster give "
                         "the clients' --tls-ca (and --tls-cert, --tls-key)", EXIT_USAGE)
    if args.cluster is None and security_given(args):
        raise BenchError("--tls-ca, --tls-cert, --tls-key and --token-file are for "
                         "--cluster; bench's own cluster takes --tls", EXIT_USAGE)
    if args.cluster is not None:
        security_from_env(args)
    processes = args.processes or min(DEFAULTS["processes"], args.clients)
    if processes > args.clients:
        raise BenchError(f"--processes {processes} is more than --clients {args.clients}",
                         EXIT_USAGE)
    outstanding = args.outstanding or (DEFAULTS["open_loop_outstanding"]
                                       if args.rate else DEFAULTS["outstanding"])
    return {
        "cluster": args.cluster,
        "local_cluster": args.cluster is None,
        "replicas": LOCAL_REPLICAS if args.cluster is None else None,
        "fsync": "always" if args.cluster is None else None,
        "tls": args.tls or args.cluster is not None and args.tls_ca is not None,
        "clients": args.clients,
        "processes": processes,
        "outstanding": outstanding,
        "batch": args.batch,
        "mode": "open" if args.rate else "closed",
        "rate": args.rate,
        "duration": args.duration,
        "warmup": args.warmup,
        "value_size": args.value_size,
        "key_size": KEY_BYTES,
        "keys": args.keys,
        "read_ratio": args.read_ratio,
        "timeout": args.timeout,
    }


# ---------------------------------------------------------------------------
# The worker process (python -m cypaxos.tools.bench --worker): JSON lines on stdin/stdout

def _key(i: int) -> bytes:
    return b"k%015d" % i


_KEYS_CACHE: dict = {}


def _keys(n: int):
    """The list of the n keys (None above a million: then made per operation)."""
    if n > 1_000_000:
        return None
    if n not in _KEYS_CACHE:
        _KEYS_CACHE[n] = [_key(i) for i in range(n)]
    return _KEYS_CACHE[n]


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _machine_busy() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    return (sum(fields) - idle) / tick, sum(fields) / tick


class _Counters:
    __slots__ = ("writes", "reads", "errors", "whist", "rhist", "error_kinds")

    def __init__(self) -> None:
        self.writes = 0          # completed inside the window
        self.reads = 0
        self.errors = 0          # failed calls (any time)
        self.whist = Histogram()
        self.rhist = Histogram()
        self.error_kinds: dict[str, int] = {}


async def _client_load(client, cfg, window, counters, seed):
    """Run one client's tasks until the window ends."""
    import trio

    mono = time.monotonic
    keys = _keys(cfg["keys"])
    nkeys = cfg["keys"]
    value = random.Random(seed).randbytes(cfg["value_size"])
    ratio = cfg["read_ratio"]
    start_at, measure_at, end_at = window
    rate = cfg["rate_per_client"]
    put = client.put
    get = client.get
    wcounts = counters.whist.counts
    rcounts = counters.rhist.counts
    whist = counters.whist
    rhist = counters.rhist
    schedule = [0]   # open loop: the next slot number
    interval = 1.0 / rate if rate else 0.0

    batch = cfg.get("batch", 1)
    put_many = client.put_many
    get_many = client.get_many
    if rate:
        interval *= batch    # one call carries `batch` of the R operations a second

    async def task(task_seed):
        rnd = random.Random(task_seed).random
        if batch > 1:
            # Each call takes a slice at a random offset of a pool of random keys:
            # the keys stay uniform, and choosing them costs the load generator next
            # to nothing (per key it costs as much as a client's whole put).
            size = max(batch * 16, 1 << 14)
            pool = [keys[int(rnd() * nkeys)] if keys is not None
                    else _key(int(rnd() * nkeys)) for _ in range(size)]
            pool_items = [(key, value) for key in pool]
            span = size - batch + 1
        while True:
            if rate:
                k = schedule[0]
                schedule[0] = k + 1
                t0 = start_at + k * interval
                if t0 >= end_at:
                    return
                now = mono()
                if t0 > now:
                    await trio.sleep(t0 - now)
            else:
                t0 = mono()
                if t0 >= end_at:
                    return
            reading = ratio and rnd() < ratio
            try:
                if batch == 1:
                    i = int(rnd() * nkeys)
                    key = keys[i] if keys is not None else _key(i)
                    if reading:
                        await get(key)
                    else:
                        await put(key, value)
                else:
                    at = int(rnd() * span)
                    if reading:
                        await get_many(pool[at:at + batch])
                    else:
                        await put_many(pool_items[at:at + batch])
            except trio.Cancelled:
                raise
            except Exception as exc:  # a ClientError: count it and go on
                counters.errors += batch
                kind = type(exc).__name__
                counters.error_kinds[kind] = counters.error_kinds.get(kind, 0) + batch
                await trio.sleep(0.01)   # no hot loop against a cluster that is down
                continue
            t1 = mono()
            if measure_at <= t1 < end_at:
                # Every operation of a bulk call took the call's time.
                ns = int((t1 - t0) * 1e9)
                b = ns.bit_length()
                idx = ns if b <= 8 else ((b - 8) << 7) + (ns >> (b - 8))
                if reading:
                    counters.reads += batch
                    rcounts[idx] += batch
                    h = rhist
                else:
                    counters.writes += batch
                    wcounts[idx] += batch
                    h = whist
                h.total += batch
                h.sum_ns += ns * batch
                if ns > h.max_ns:
                    h.max_ns = ns
                if ns < h.min_ns or h.total == batch:
                    h.min_ns = ns

    async with trio.open_nursery() as nursery:
        for t in range(cfg["outstanding"]):
            nursery.start_soon(task, seed * 1_000_003 + t)


async def _worker_async(cfg: dict) -> None:
    import trio

    from ..client import open_client

    out = sys.stdout

    def emit(obj) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    counters = _Counters()
    tls, token = _security(cfg["security"])
    async with contextlib.AsyncExitStack() as stack:
        clients = [(index, await stack.enter_async_context(
                       open_client(cfg["addresses"], timeout=cfg["timeout"], tls=tls,
                                   token=token)))
                   for index in cfg["client_ids"]]
        # Connect every client to the leader now (a linearizable read follows
        # redirects), so the first measured second is not spent dialling.
        with trio.fail_after(_READY_TIMEOUT):
            for _, client in clients:
                await client.get(b"\x00bench-hello")
        emit({"type": "ready", "pid": os.getpid()})
        line = b""
        while not line.endswith(b"\n"):
            chunk = await stdin.receive_some(4096)
            if not chunk:
                return
            line += chunk
        start_at = json.loads(line)["start_at"]
        measure_at = start_at + cfg["warmup"]
        end_at = measure_at + cfg["duration"]

        async def reporter():
            while True:
                emit({"type": "progress", "t": time.monotonic(), "writes": counters.writes,
                      "reads": counters.reads, "errors": counters.errors})
                await trio.sleep(_REPORT_INTERVAL)

        async with trio.open_nursery() as outer:
            outer.start_soon(reporter)
            await trio.sleep(max(0.0, start_at - time.monotonic()))
            with trio.move_on_after(end_at - time.monotonic() + _DRAIN_GRACE):
                async with trio.open_nursery() as nursery:
                    for index, client in clients:
                        nursery.start_soon(_client_load, client, cfg,
                                           (start_at, measure_at, end_at), counters,
                                           cfg["seed"] + index)
            outer.cancel_scope.cancel()
        stats = [client.statistics() for _, client in clients]
    emit({"type": "result", "writes": counters.writes, "reads": counters.reads,
          "errors": counters.errors, "error_kinds": counters.error_kinds,
          "write_hist": counters.whist.to_json(), "read_hist": counters.rhist.to_json(),
          "client_stats": stats})


def _tls_json(tls) -> dict:
    """A `cypaxos.TLS` as the JSON-able dict `_security` takes."""
    return {"ca": os.fspath(tls.ca), "cert": None if tls.cert is None else os.fspath(tls.cert),
            "key": None if tls.key is None else os.fspath(tls.key)}


def _security(security: dict):
    """(tls, token) for open_client from the JSON the parent passes: the SSLContext
    built once for all of a process's clients."""
    from ..client.connection import credentials
    from ..security.tls import TLS

    files = security.get("tls")
    tls = TLS(**files) if files else None
    checked = credentials(tls=tls, token=security.get("token"))
    return checked.ssl_context, checked.token


def _worker_main() -> int:
    import trio

    cfg = json.loads(sys.stdin.readline())
    try:
        trio.run(_worker_async, cfg)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        from ..groups import first_leaf
        exc = first_leaf(exc, Error) or exc
        sys.stdout.write(json.dumps({"type": "failed", "error": f"{type(exc).__name__}: {exc}"})
                         + "\n")
        sys.stdout.flush()
        return 1
    return 0


# ---------------------------------------------------------------------------
# The parent: cluster, preload, workers, display, report

class _Worker:
    def __init__(self, process, index):
        self.process = process
        self.index = index
        self.buffer = b""
        self.progress = {"writes": 0, "reads": 0, "errors": 0}
        self.result = None
        self.failure = None
        self.ready = False
        self.pid = None


async def _preload(addresses, settings, security) -> None:
    """Check the cluster answers; write every key once when reads are asked for."""
    import trio

    from ..client import open_client
    from ..errors import ClientError
    from ..groups import first_leaf

    value = bytes(settings["value_size"])
    tls, token = _security(security)
    try:
        async with open_client(addresses, timeout=settings["timeout"], tls=tls,
                               token=token) as client:
            await client.put(_key(0), value)
            if settings["read_ratio"] > 0:
                next_key = [1]
                n = settings["keys"]

                async def writer():
                    while next_key[0] < n:
                        i = next_key[0]
                        next_key[0] = i + 1
                        await client.put(_key(i), value)

                async with trio.open_nursery() as nursery:
                    for _ in range(min(_PRELOAD_CONCURRENCY, n)):
                        nursery.start_soon(writer)
    except Exception as exc:
        error = first_leaf(exc, ClientError)
        if error is None:
            raise
        raise BenchError(f"the cluster does not answer: {error}", EXIT_UNAVAILABLE) from None


async def _read_lines(worker, on_line):
    while True:
        data = await worker.process.stdout.receive_some(65536)
        if not data:
            return
        worker.buffer += data
        *lines, worker.buffer = worker.buffer.split(b"\n")
        for line in lines:
            if line.strip():
                on_line(worker, json.loads(line))


class _Display:
    """Live progress (rich) on a terminal; nothing otherwise."""

    def __init__(self, enabled: bool, console) -> None:
        self.enabled = enabled
        self.console = console
        self.live = None
        self.last = None

    def __enter__(self):
        if self.enabled:
            from rich.live import Live
            self.live = Live(console=self.console, auto_refresh=False, transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, phase, elapsed, total, writes, reads, errors):
        if self.live is None:
            return
        from rich.table import Table
        now = time.monotonic()
        wr = rr = 0.0
        if self.last is not None and now > self.last[0]:
            dt = now - self.last[0]
            wr = (writes - self.last[1]) / dt
            rr = (reads - self.last[2]) / dt
        self.last = (now, writes, reads)
        table = Table(title=f"cypaxos bench: {phase} {elapsed:5.1f}/{total:.0f} s",
                      title_justify="left")
        for col in ("writes/s", "reads/s", "errors"):
            table.add_column(col, justify="right")
        table.add_row(f"{wr:,.0f}", f"{rr:,.0f}", f"{errors:,}")
        self.live.update(table, refresh=True)


async def _run_async(settings, addresses, replica_pids, display, security) -> dict:
    import trio

    await _preload(addresses, settings, security)
    processes = settings["processes"]
    client_ids = [[] for _ in range(processes)]
    for c in range(settings["clients"]):
        client_ids[c % processes].append(c)
    seed = random.randrange(1 << 30)
    rate_per_client = settings["rate"] / settings["clients"] if settings["rate"] else None
    workers: list[_Worker] = []
    ready = trio.Event()
    finished = trio.Event()

    def on_line(worker, msg):
        kind = msg.get("type")
        if kind == "ready":
            worker.ready = True
            worker.pid = msg["pid"]
            if all(w.ready for w in workers):
                ready.set()
        elif kind == "progress":
            worker.progress = msg
        elif kind == "result":
            worker.result = msg
        elif kind == "failed":
            worker.failure = msg["error"]

    async def watch(worker):
        await _read_lines(worker, on_line)
        await worker.process.wait()
        if worker.result is None and worker.failure is None:
            worker.failure = f"exited with status {worker.process.returncode}"
        if worker.failure is not None:
            ready.set()   # wake the parent so it notices
        if all(w.result is not None or w.failure is not None for w in workers):
            finished.set()

    cpu = {}
    async with trio.open_nursery() as nursery:
        try:
            for p in range(processes):
                cfg = dict(settings, addresses=addresses, client_ids=client_ids[p],
                           rate_per_client=rate_per_client, seed=seed + 7919 * p,
                           security=security)
                # Own session, like the replicas LocalCluster starts: with the kernel's
                # autogroup scheduling every process then weighs the same.  A worker
                # ends by itself (its run is bounded; EOF on stdin before the start).
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "cypaxos.tools.bench", "--worker"],
                    stdin=-1, stdout=-1, env=child_env(), start_new_session=True)
                w = _Worker(proc, p)
                workers.append(w)
                await proc.stdin.send_all((json.dumps(cfg) + "\n").encode())
            for w in workers:
                nursery.start_soon(watch, w)
            with trio.move_on_after(_READY_TIMEOUT):
                await ready.wait()
            failed = [w for w in workers if w.failure]
            if failed or not ready.is_set():
                raise BenchError("a client worker did not start: "
                                 + (failed[0].failure if failed else "no ready within "
                                    f"{_READY_TIMEOUT:g} s"), EXIT_UNAVAILABLE)
            start_at = time.monotonic() + 0.2
            for w in workers:
                await w.process.stdin.send_all((json.dumps({"start_at": start_at}) + "\n")
                                               .encode())
            measure_at = start_at + settings["warmup"]
            end_at = measure_at + settings["duration"]
            pids = {"clients": [w.pid for w in workers]} | {
                f"replica{i}": [pid] for i, pid in replica_pids.items()}

            def cpu_now():
                return {name: sum(_cpu_seconds(p) or 0.0 for p in ps) for name, ps in pids.items()}

            async def sample_cpu():
                await trio.sleep(max(0.0, measure_at - time.monotonic()))
                t0, c0, m0 = time.monotonic(), cpu_now(), _machine_busy()
                await trio.sleep(max(0.0, end_at - time.monotonic()))
                t1, c1, m1 = time.monotonic(), cpu_now(), _machine_busy()
                cpu.update({name: round(100 * (c1[name] - c0[name]) / (t1 - t0), 1)
                            for name in c0})
                if m0 and m1:
                    # The whole machine, in % of one core: what other processes (not
                    # ours) used shows how noisy the run was.
                    cpu["machine"] = round(100 * (m1[0] - m0[0]) / (t1 - t0), 1)
                    cpu["machine_capacity"] = round(100 * (m1[1] - m0[1]) / (t1 - t0), 1)

            nursery.start_soon(sample_cpu)
            while not finished.is_set():
                now = time.monotonic()
                phase = ("starting" if now < start_at else "warm-up" if now < measure_at
                         else "measuring" if now < end_at else "draining")
                elapsed = max(0.0, now - start_at)
                display.update(phase, elapsed, settings["warmup"] + settings["duration"],
                               sum(w.progress.get("writes", 0) for w in workers),
                               sum(w.progress.get("reads", 0) for w in workers),
                               sum(w.progress.get("errors", 0) for w in workers))
                with trio.move_on_after(0.5):
                    await finished.wait()
                if now > end_at + _DRAIN_GRACE + 30:
                    raise BenchError("client workers did not finish", EXIT_NO)
        finally:
            for w in workers:
                if w.process.returncode is None:
                    w.process.kill()
            nursery.cancel_scope.cancel()
    failed = [w for w in workers if w.result is None]
    if failed:
        raise BenchError(f"client worker {failed[0].index} failed: {failed[0].failure}")
    return {"workers": [w.result for w in workers], "cpu_percent": cpu}


def _report(settings, raw) -> dict:
    whist, rhist = Histogram(), Histogram()
    writes = reads = errors = 0
    kinds: dict[str, int] = {}
    stats: dict[str, int] = {}
    for r in raw["workers"]:
        writes += r["writes"]
        reads += r["reads"]
        errors += r["errors"]
        for k, v in r["error_kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
        whist.merge(Histogram.from_json(r["write_hist"]))
        rhist.merge(Histogram.from_json(r["read_hist"]))
        for s in r["client_stats"]:
            for k, v in s.items():
                if isinstance(v, int) and k not in ("session_id", "connected_replica_id"):
                    stats[k] = stats.get(k, 0) + v
    duration = settings["duration"]
    result = {
        "writes_per_s": round(writes / duration, 1),
        "reads_per_s": round(reads / duration, 1),
        "ops_per_s": round((writes + reads) / duration, 1),
        "write_latency_ms": whist.summary_ms(),
        "read_latency_ms": rhist.summary_ms(),
        "writes": writes,
        "reads": reads,
        "errors": errors,
        "error_kinds": kinds,
        "settings": settings,
        "client_statistics": stats,
        "cpu_percent": raw.get("cpu_percent", {}),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if stats.get("batches"):
        result["commands_per_batch"] = round(stats.get("commands", 0) / stats["batches"], 1)
    return result


def _print_table(result, console) -> None:
    from rich.table import Table

    s = result["settings"]
    mode = (f"open loop at {s['rate']:,.0f} ops/s" if s["mode"] == "open"
            else f"closed loop, {s['outstanding']} outstanding per client")
    if s.get("batch", 1) > 1:
        mode += f", {s['batch']} operations per call"
    target = "local 3-replica cluster (fsync always)" if s["local_cluster"] else s["cluster"]
    console.print(f"cypaxos bench: {target}")
    console.print(f"  {s['clients']} clients in {s['processes']} processes, {mode}; "
                  f"{s['value_size']}-byte values, {s['keys']:,} keys, read ratio "
                  f"{s['read_ratio']:g}; {s['duration']:g} s measured after "
                  f"{s['warmup']:g} s warm-up")
    table = Table()
    table.add_column("")
    table.add_column("ops", justify="right")
    table.add_column("ops/s", justify="right")
    for name in ("p50", "p90", "p99", "p99.9", "max"):
        table.add_column(f"{name} ms", justify="right")

    def row(name, count, rate, lat):
        cells = [name, f"{count:,}", f"{rate:,.0f}"]
        for key in ("p50", "p90", "p99", "p999", "max"):
            v = lat[key]
            cells.append("-" if v is None else f"{v:.3f}")
        table.add_row(*cells)

    row("writes", result["writes"], result["writes_per_s"], result["write_latency_ms"])
    row("reads", result["reads"], result["reads_per_s"], result["read_latency_ms"])
    console.print(table)
    if result["errors"]:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(result["error_kinds"].items()))
        console.print(f"errors: {result['errors']:,} ({kinds})")
    if result["cpu_percent"]:
        console.print("CPU while measuring (% of one core): " + ", ".join(
            f"{k} {v:g}" for k, v in result["cpu_percent"].items()))


def run(args) -> int:
    """Run `cypaxos bench` with parsed `args`; return the exit code."""
    import trio

    from rich.console import Console

    stdout_console = Console()
    try:
        settings = _settings(args)
        cluster = None
        if args.cluster is None:
            from .local import LocalCluster, free_ports
            port = args.port if args.port is not None else free_ports(LOCAL_REPLICAS)[0]
            cluster = LocalCluster(replicas=LOCAL_REPLICAS, base_port=port, fsync=True,
                                   tls=args.tls)
        try:
            if cluster is not None:
                cluster.start_all()
                cluster.wait_ready(timeout=60)
                addresses = cluster.addresses
                replica_pids = {i: cluster.process(i).pid for i in cluster.ids}
                settings["cluster"] = cluster.cluster_arg
                tls = cluster.client_tls
                security = {"tls": None if tls is None else _tls_json(tls)}
            else:
                from ..addresses import parse_addresses
                from .client_commands import client_security
                addresses = parse_addresses(args.cluster, source="--cluster")
                replica_pids = {}
                tls, token = client_security(args)
                security = {"tls": None if tls is None else _tls_json(tls),
                            "token": None if token is None else token.decode()}
                _security(security)   # bad files: exit 2 here, before any load
            live = (stdout_console.is_terminal and not args.json)
            console = stdout_console
            if args.json:
                console = Console(stderr=True)
                live = console.is_terminal
            with _Display(live, console) as display:
                raw = trio.run(_run_async, settings, addresses, replica_pids, display,
                               security)
        finally:
            if cluster is not None:
                cluster.close()
    except BenchError as exc:
        error(exc)
        return exc.code
    except ConfigError as exc:
        error(exc)
        return EXIT_USAGE
    except Error as exc:
        error(exc)
        return EXIT_NO
    except KeyboardInterrupt:
        say(f"{PROG}: interrupted")
        return EXIT_INTERRUPTED
    result = _report(settings, raw)
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result, stdout_console)
    if result["writes"] + result["reads"] == 0:
        error("no operation completed"
              + (f" ({result['errors']} errors)" if result["errors"] else ""))
        return EXIT_UNAVAILABLE
    return EXIT_OK


def main(argv=None) -> int:
    """`python -m cypaxos.tools.bench [flags]` (the same flags as `cypaxos bench`)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker_main()
    parser = argparse.ArgumentParser(prog="cypaxos bench",
                                     description="Load a cluster through the client and "
                                                 "measure throughput and latency.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
