"""Instructions per operation in the client process (callgrind), against a running cluster.

Instruction counts, unlike CPU times, hardly depend on what else the machine is doing,
so two versions of the client can be compared on a busy machine.  The client process
runs under `valgrind --tool=callgrind` at N and 2N operations; the difference divided
by N is the client's cost of one operation, without the interpreter's start-up and the
connection set-up:

* `one`: one task, one `put` at a time (the 1-outstanding latency path: a batch, a
  frame and a task wake-up per operation);
* `bulk`: `--tasks` tasks, each calling `put_many` with `--batch` puts at a time (the
  bulk-write path of `cypaxos bench --outstanding 32 --batch 128`);
* `blocking`: one thread, one `put` at a time through `cypaxos.connect` (the blocking
  client: the call handed to its event-loop thread and the answer back).

The cluster is not under valgrind (start one with `cypaxos local --fsync off`); what
it does only changes how the client's requests happen to be batched.  `--python`
runs another installation's client against the same cluster (A/B):

    python perf/callgrind_client.py --cluster 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003
    python perf/callgrind_client.py --cluster ... --python /path/to/other/venv/bin/python
"""
import argparse
import os
import re
import subprocess
import sys

VALUE = bytes(64)


async def workload(cluster: str, mode: str, ops: int, tasks: int, batch: int) -> None:
    import trio

    from cypaxos.client import open_client

    async with open_client(cluster, timeout=120) as kv:
        await kv.put(b"warm", b"up")   # connected to the leader, session registered
        if mode == "one":
            for i in range(ops):
                await kv.put(b"k%08d" % (i % 10_000), VALUE)
            return
        calls = ops // batch

        async def worker(w: int) -> None:
            for c in range(w, calls, tasks):
                base = c * batch
                await kv.put_many([(b"k%08d" % ((base + i) % 10_000), VALUE)
                                   for i in range(batch)])
        async with trio.open_nursery() as nursery:
            for w in range(tasks):
                nursery.start_soon(worker, w)


def blocking(cluster: str, ops: int) -> None:
    from cypaxos.client import connect

    with connect(cluster, timeout=120) as kv:
        kv.put(b"warm", b"up")
        for i in range(ops):
            kv.put(b"k%08d" % (i % 10_000), VALUE)


def instructions(python: str, args, ops: int) -> int:
    """Total instructions callgrind counts for the client process doing `ops` puts."""
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         python, os.path.abspath(__file__), "--cluster", args.cluster, "--mode", args.mode,
         "--tasks", str(args.tasks), "--batch", str(args.batch), "--run", str(ops)],
        capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONHASHSEED="0"))
    match = re.search(r"Collected\s*:\s*(\d+)", out.stderr)
    if not match:
        raise SystemExit(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
    return int(match.group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", required=True, metavar="ADDRS")
    parser.add_argument("--mode", choices=("one", "bulk", "blocking"), default="one")
    parser.add_argument("--ops", type=int, default=None,
                        help="N (default: 65536 for bulk, 2000 otherwise)")
    parser.add_argument("--tasks", type=int, default=32, help="bulk: tasks (default 32)")
    parser.add_argument("--batch", type=int, default=128, help="bulk: puts per call (128)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter (and so the installed client) to measure")
    parser.add_argument("--run", type=int, metavar="OPS",
                        help="do OPS puts without valgrind (what each measurement runs)")
    args = parser.parse_args(argv)
    if args.run is not None:
        if args.mode == "blocking":
            blocking(args.cluster, args.run)
            return 0
        import trio
        trio.run(workload, args.cluster, args.mode, args.run, args.tasks, args.batch)
        return 0
    n = args.ops or (65536 if args.mode == "bulk" else 2000)
    first = instructions(args.python, args, n)
    second = instructions(args.python, args, 2 * n)
    print(f"{args.mode}: {(second - first) / n:,.0f} instructions per put "
          f"(N={n}: {first:,}; 2N: {second:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
