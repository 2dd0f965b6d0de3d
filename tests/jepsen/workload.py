"""The client workload and the checks on its history.

`Workload.run()` (Trio, run in a thread that lives in the clients' namespace) drives
`workers` concurrent logical clients, each with its own `cypaxos.open_client` (its own
session and connection), doing put/get/cas/delete on a few *hot* keys (contended,
where linearizability bugs show) and many *cold* ones (where lost writes show).  A
hot key is retired after `ops_per_hot_key` operations and replaced by a fresh one, so
each key's history stays small enough for an exhaustive linearizability search.

Every call is recorded in a `History` with its start, end and outcome:

* ``ok``: the call returned (its result recorded);
* ``fail``: it raised a `ClientError` with ``maybe_applied=False`` (definitely not
  applied);
* ``unknown``: it raised with ``maybe_applied=True`` (a timeout after the command left
  the client, a lost connection): it may take effect at any time after its start.

Values are unique (``w<worker>.<n>``), so a read names the write it saw.

Checks (`check_history`): linearizability of every key's sub-history (exact:
linearizability is local, and every op touches one key); lost acknowledged writes
(for each key whose last acknowledged write W follows every other acknowledged
write in real time and has no possibly-applied write beside it, the final read after
healing must return W's value).
"""
from __future__ import annotations

import collections
import random
import threading
import time
from dataclasses import dataclass, field

import trio

import cypaxos
from cypaxos.errors import ClientError
from cypaxos.testing.linearizability import CheckTimeout, History, check

WRITE_KINDS = ("put", "delete", "cas")


@dataclass
class WorkloadConfig:
    workers: int = 12
    hot_keys: int = 3            # hot keys in use at any time
    ops_per_hot_key: int = 250   # a hot key is replaced after this many ops
    cold_keys: int = 3000
    hot_fraction: float = 0.5
    mix: dict = field(default_factory=lambda: {"get": 0.35, "put": 0.3, "cas": 0.25,
                                               "delete": 0.1})
    op_timeout: float = 4.0      # the clients' default (and the longest) call timeout
    # Per call, one of these is used: short ones turn faults into failed and unknown
    # outcomes (which the checks must handle), long ones let calls ride out a fault.
    timeouts: tuple = (0.3, 1.0, 4.0)
    think_s: tuple = (0.0, 0.02)  # pause between a worker's ops (uniform)
    seed: int = 0


class Workload:
    def __init__(self, addresses: list[str], config: WorkloadConfig):
        self.addresses = list(addresses)
        self.cfg = config
        self.history = History()
        self.stop = threading.Event()
        self.rng = random.Random(config.seed)
        self.errors = collections.Counter()      # ClientError subclasses seen
        self.unexpected: list[str] = []           # non-ClientError exceptions
        self.done_ops = 0
        self._hot = [self._new_hot(i) for i in range(config.hot_keys)]
        self._hot_gen = config.hot_keys
        self._hot_count = [0] * config.hot_keys
        self.keys_touched: set = set()
        self.final_reads_failed: list = []

    def _new_hot(self, n: int) -> bytes:
        return f"hot{n}".encode()

    def _pick_key(self, rng: random.Random) -> bytes:
        cfg = self.cfg
        if rng.random() < cfg.hot_fraction:
            slot = rng.randrange(cfg.hot_keys)
            self._hot_count[slot] += 1
            if self._hot_count[slot] > cfg.ops_per_hot_key:
                self._hot[slot] = self._new_hot(self._hot_gen)
                self._hot_gen += 1
                self._hot_count[slot] = 1
            key = self._hot[slot]
        else:
            key = f"cold{rng.randrange(cfg.cold_keys)}".encode()
        self.keys_touched.add(key)
        return key

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for w in range(self.cfg.workers):
                nursery.start_soon(self._worker, w)

    async def _worker(self, w: int) -> None:
        cfg = self.cfg
        rng = random.Random(cfg.seed * 1000 + w)
        kinds = list(cfg.mix)
        weights = [cfg.mix[k] for k in kinds]
        seen: dict[bytes, bytes | None] = {}
        n = 0
        async with cypaxos.open_client(self.addresses, timeout=cfg.op_timeout) as kv:
            while not self.stop.is_set():
                key = self._pick_key(rng)
                kind = rng.choices(kinds, weights)[0]
                n += 1
                t = rng.choice(cfg.timeouts)
                value = f"w{w}.{n}".encode()
                if kind == "put":
                    arg, call = value, kv.put(key, value, timeout=t)
                elif kind == "get":
                    arg, call = None, kv.get(key, timeout=t)
                elif kind == "delete":
                    arg, call = None, kv.delete(key, timeout=t)
                else:
                    expected = seen.get(key)
                    arg, call = (expected, value), kv.cas(key, expected, value, timeout=t)
                token = self.history.invoke(f"w{w}", kind, key, arg)
                try:
                    result = await call
                except ClientError as exc:
                    self.errors[type(exc).__name__] += 1
                    self.history.complete(token, "unknown" if exc.maybe_applied else "fail")
                except Exception as exc:  # a client bug: record it, the op may have applied
                    self.unexpected.append(f"{kind} {key!r}: {exc!r}")
                    self.history.complete(token, "unknown")
                else:
                    self.history.complete(token, "ok", result)
                    if kind == "get":
                        seen[key] = result
                    elif kind == "put":
                        seen[key] = value
                    elif kind == "delete":
                        seen[key] = None
                    elif result:
                        seen[key] = value
                self.done_ops += 1
                lo, hi = cfg.think_s
                if hi > 0:
                    await trio.sleep(rng.uniform(lo, hi))

    async def final_reads(self, timeout: float = 60.0) -> None:
        """Read every key touched, linearizably, once the cluster is healed; the reads
        join the history (client "final")."""
        keys = sorted(self.keys_touched)
        deadline = time.monotonic() + timeout
        async with cypaxos.open_client(self.addresses, timeout=10.0) as kv:
            async def read(key):
                while True:
                    token = self.history.invoke("final", "get", key)
                    try:
                        value = await kv.get(key)
                    except ClientError as exc:
                        self.history.complete(token, "unknown" if exc.maybe_applied else "fail")
                        if time.monotonic() > deadline:
                            self.final_reads_failed.append(key)
                            return
                        continue
                    self.history.complete(token, "ok", value)
                    return

            async with trio.open_nursery() as nursery:
                limit = trio.CapacityLimiter(256)

                async def limited(key):
                    async with limit:
                        await read(key)
                for key in keys:
                    nursery.start_soon(limited, key)


def run_in_thread(fn, thread_init, name: str):
    """Run `trio.run(fn)` in a new thread after `thread_init()` (e.g. setns); returns
    (thread, box) where box["error"] holds an exception it raised."""
    box: dict = {}

    def target():
        try:
            thread_init()
            trio.run(fn)
        except BaseException as exc:  # reported by the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread, box


# ------------------------------------------------------------------ checks


def _effect(op):
    """What a write does to its key when applied: ("set", value) or None (no effect)."""
    if op.kind == "put":
        return op.arg
    if op.kind == "delete":
        return None
    return op.arg[1]  # cas that swapped


def check_history(ops, *, max_steps: int = 2_000_000) -> dict:
    """Linearizability per key and lost acknowledged writes; a dict of findings."""
    by_key: dict = collections.defaultdict(list)
    for op in ops:
        by_key[op.key].append(op)
    anomalies = []
    timeouts = []
    t0 = time.monotonic()
    for key, key_ops in by_key.items():
        try:
            result = check(key_ops, max_steps=max_steps)
        except CheckTimeout as exc:
            timeouts.append({"key": repr(key), "ops": len(key_ops), "error": str(exc)})
            continue
        if not result.ok:
            anomalies.append({"key": repr(key), "ops": len(key_ops), "message": result.message})
    check_seconds = time.monotonic() - t0

    lost = []
    verified = 0
    for key, key_ops in by_key.items():
        finals = [op for op in key_ops if op.client == "final" and op.outcome == "ok"]
        if not finals:
            continue
        final = finals[-1]
        writes = [op for op in key_ops if op.client != "final" and op.kind in WRITE_KINDS]
        acked = [op for op in writes if op.outcome == "ok"
                 and not (op.kind == "cas" and op.result is False)]
        maybe = [op for op in writes if op.outcome == "unknown"]
        if not acked or maybe:
            continue
        last = max(acked, key=lambda op: op.end)
        if any(op is not last and op.end >= last.start for op in acked):
            continue  # concurrent acknowledged writes: the order is the checker's business
        verified += 1
        expected = _effect(last)
        if final.result != expected:
            lost.append({"key": repr(key), "expected": repr(expected), "final_read": repr(final.result),
                         "last_write": f"{last.client} {last.kind} {last.arg!r} "
                                       f"[{last.start:.3f}, {last.end:.3f}]"})
    return {"keys": len(by_key), "anomalies": anomalies, "check_timeouts": timeouts,
            "lost_writes": lost, "writes_verified": verified,
            "check_seconds": round(check_seconds, 1)}


def count_ops(ops) -> dict:
    outcome = collections.Counter()
    kinds = collections.Counter()
    for op in ops:
        if op.client == "final":
            continue
        outcome[op.outcome] += 1
        kinds[op.kind] += 1
    return {"total": sum(outcome.values()), "by_outcome": dict(outcome), "by_kind": dict(kinds)}
