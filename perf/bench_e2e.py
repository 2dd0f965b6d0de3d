"""End to end: puts and linearizable gets through the Trio client against a local cluster.

The pyperf master starts one local 3-replica cluster (`cypaxos.tools.local.LocalCluster`,
``--fsync always``, in a temporary directory) and hands its addresses to every pyperf
worker process (``--cluster ADDRS`` to use a running cluster instead).  Each worker
runs the operations from ONE client process with one `Client`, many concurrent tasks
(the number after ``_c``); pyperf's loop count counts operations, so each value is the
wall time per completed operation (1 / throughput; with ``_c1``, the latency).
Keys are 16 bytes, values 64 bytes.  `cypaxos bench` is the tool for throughput with
several client processes and latency percentiles; this suite is for comparing two
versions of the code (``pyperf compare_to``).

    python perf/bench_e2e.py -o e2e.json           # add --fast for a quick look
    python -m pyperf compare_to old.json e2e.json
"""
import time

import pyperf
import trio

from cypaxos.client import open_client

VALUE = bytes(range(64))
KEYS = [b"k%015d" % i for i in range(10_000)]
CONCURRENCY = (1, 1024)


_loaded = set()


async def _drive(addresses, op, loops, concurrency):
    async with open_client(addresses, timeout=30) as client:
        await client.put(KEYS[0], VALUE)            # connected to the leader
        if op == "get" and tuple(addresses) not in _loaded:
            await _run_ops(client, "put", len(KEYS), 1024)   # every key exists
            _loaded.add(tuple(addresses))
        await _run_ops(client, op, min(loops, 2 * concurrency), concurrency)  # warm
        started = time.perf_counter()
        await _run_ops(client, op, loops, concurrency)
        return time.perf_counter() - started


async def _run_ops(client, op, count, concurrency):
    remaining = [count]
    put, get = client.put, client.get
    nkeys = len(KEYS)

    async def task(t):
        i = t
        while remaining[0] > 0:
            remaining[0] -= 1
            i = (i + 7919) % nkeys
            if op == "put":
                await put(KEYS[i], VALUE)
            else:
                await get(KEYS[i])

    async with trio.open_nursery() as nursery:
        for t in range(min(concurrency, count)):
            nursery.start_soon(task, t)


def bench(runner, op, concurrency):
    def run(loops):
        return trio.run(_drive, runner.args.cluster.split(","), op, loops, concurrency)
    runner.bench_time_func(f"e2e_{op}_c{concurrency}", run)


def add_cmdline_args(cmd, args):
    cmd.extend(["--cluster", args.cluster])


def main():
    runner = pyperf.Runner(add_cmdline_args=add_cmdline_args)
    runner.metadata["description"] = __doc__.splitlines()[0]
    runner.argparser.add_argument("--cluster", default=None,
                                  help="HOST:PORT,... of a running cluster (default: start "
                                       "a local 3-replica cluster, fsync always)")
    args = runner.parse_args()
    cluster = None
    if args.cluster is None:
        from cypaxos.tools.local import LocalCluster, free_ports
        cluster = LocalCluster(replicas=3, base_port=free_ports(3)[0], fsync=True)
        cluster.start_all()
        cluster.wait_ready(timeout=60)
        args.cluster = cluster.cluster_arg
    try:
        for concurrency in CONCURRENCY:
            bench(runner, "put", concurrency)
        bench(runner, "get", CONCURRENCY[-1])
    finally:
        if cluster is not None:
            cluster.close()


if __name__ == "__main__":
    main()
