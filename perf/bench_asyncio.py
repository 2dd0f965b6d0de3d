"""The async client under asyncio against the same client under Trio, alternating.

One local 3-replica cluster (`LocalCluster`, fsync as given) serves every run; each
round runs both event loops (the order swaps every round, so a drift of the machine's
speed falls on both), each in a fresh event loop with a fresh `open_client`:

* `pipelined`: `--callers` tasks, each calling `put` in a loop (one call per write,
  many outstanding), for `--duration` seconds after `--warmup`: writes/s;
* `latency`: one task, one `put` at a time: p50 and p99 of a call, in ms.

    python perf/bench_asyncio.py --rounds 3 --duration 5
    python perf/bench_asyncio.py --rounds 3 --duration 5 --fsync off --json
    python perf/bench_asyncio.py --rounds 3 --duration 5 --tls --json

The report gives every run's figures and the median of each loop.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import anyio

import cypaxos
from cypaxos.tools.local import LocalCluster, free_ports

VALUE = b"v" * 64


async def pipelined(addresses: str, callers: int, warmup: float, duration: float,
                    tls=None) -> float:
    """Writes per second from `callers` tasks each putting one key at a time."""
    async with cypaxos.open_client(addresses, timeout=30, tls=tls) as kv:
        counts = [0] * callers
        start = end = 0.0

        async def caller(c: int) -> None:
            key = b"p%015d" % c
            n = 0
            while time.perf_counter() < end:
                await kv.put(key, VALUE)
                if time.perf_counter() >= start:
                    n += 1
            counts[c] = n
        start = time.perf_counter() + warmup
        end = start + duration
        async with anyio.create_task_group() as tg:
            for c in range(callers):
                tg.start_soon(caller, c)
        return sum(counts) / duration


async def latency(addresses: str, warmup: float, duration: float,
                  tls=None) -> tuple[float, float]:
    """p50 and p99 of one put at a time, in ms."""
    async with cypaxos.open_client(addresses, timeout=30, tls=tls) as kv:
        samples = []
        start = time.perf_counter() + warmup
        end = start + duration
        i = 0
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                break
            await kv.put(b"l%015d" % (i % 1000), VALUE)
            i += 1
            if t0 >= start:
                samples.append(time.perf_counter() - t0)
        samples.sort()
        return (samples[len(samples) // 2] * 1e3, samples[int(len(samples) * 0.99)] * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--callers", type=int, default=256)
    parser.add_argument("--fsync", choices=("always", "off"), default="always")
    parser.add_argument("--tls", action="store_true",
                        help="mutual TLS on every connection (LocalCluster(tls=True))")
    parser.add_argument("--json", action="store_true", help="print the runs as JSON")
    args = parser.parse_args()
    runs: dict[str, dict[str, list]] = {b: {"writes_per_s": [], "p50_ms": [], "p99_ms": []}
                                        for b in ("trio", "asyncio")}
    with tempfile.TemporaryDirectory() as data_dir:
        cluster = LocalCluster(3, ports=free_ports(3), data_dir=data_dir,
                               fsync=args.fsync == "always", tls=args.tls)
        tls = cluster.client_tls if args.tls else None
        try:
            cluster.start_all()
            cluster.wait_ready(timeout=60)
            for r in range(args.rounds):
                order = ("trio", "asyncio") if r % 2 == 0 else ("asyncio", "trio")
                for backend in order:
                    rate = anyio.run(pipelined, cluster.cluster_arg, args.callers,
                                     args.warmup, args.duration, tls, backend=backend)
                    p50, p99 = anyio.run(latency, cluster.cluster_arg, args.warmup,
                                         args.duration, tls, backend=backend)
                    runs[backend]["writes_per_s"].append(round(rate))
                    runs[backend]["p50_ms"].append(round(p50, 3))
                    runs[backend]["p99_ms"].append(round(p99, 3))
                    print(f"round {r + 1} {backend:8s} {rate:10,.0f} writes/s   "
                          f"p50 {p50:.3f} ms  p99 {p99:.3f} ms", flush=True)
        finally:
            cluster.close()
    for backend, figures in runs.items():
        print(f"median {backend:8s} {statistics.median(figures['writes_per_s']):10,.0f} "
              f"writes/s   p50 {statistics.median(figures['p50_ms']):.3f} ms  "
              f"p99 {statistics.median(figures['p99_ms']):.3f} ms")
    if args.json:
        print(json.dumps({"args": vars(args), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
