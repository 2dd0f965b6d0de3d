"""cypaxos vs PySyncObj: write throughput of 3 replicas on loopback, same machine, same run.

    python perf/compare_pysyncobj.py                      # ~1 minute; prints both and the ratio
    python perf/compare_pysyncobj.py --rounds 3 -o perf/results/compare_pysyncobj.json

The workload on both sides: closed-loop writes of 16-byte keys (100,000 distinct) and
64-byte values, no reads, measured for ``--duration`` seconds after ``--warmup``.

* cypaxos: a local 3-replica cluster with ``--fsync always`` (every write is fdatasync'ed
  on a majority before it is acknowledged), driven through the real client by
  ``cypaxos bench`` (``python -m cypaxos.tools.bench --json``) at its best settings on this
  machine, ``--outstanding 32 --batch 128`` (4 clients in 2 processes, each with 32
  concurrent ``put_many`` calls of 128 puts; change with ``--cypaxos-args``).
* PySyncObj 0.3.17 (``pip install pysyncobj==0.3.17``): 3 processes, each a ``SyncObj``
  node holding a replicated ``pysyncobj.batteries.ReplDict``, on 127.0.0.1.  PySyncObj
  has no client protocol: the application calls the replicated method inside a node's
  process (a follower forwards it to the leader), so the load runs in the node
  processes themselves: ``ReplDict.set(key, value, callback=...)`` with up to
  ``--pso-outstanding`` calls in flight per submitting node, and ``doTick()`` driven by
  hand (``autoTick=False``, no tick thread).  Best settings found on this machine (see
  docs/performance.md): batched append entries, 1 MiB socket buffers and batches, poll(),
  log compaction pushed out of the run (it forks to serialize the whole dict every
  5,000 entries by default), load submitted from ``--pso-submit`` nodes.

  Durability: PySyncObj never fsyncs.  With no ``journalFile`` (the default) the log
  is in memory only; with ``journalFile`` it is appended to an mmap'ed file that is
  msync'ed only when the node shuts down, so it survives a process crash but not a
  power loss or kernel crash.  ``--pso-journal file`` (the default here) uses a journal
  file per node in the temporary directory, ``--pso-journal memory`` none.  Either way
  PySyncObj does strictly less work per write than cypaxos with fsync.

The JSON written with ``-o`` has both systems' runs, their medians and the ratio; the
internal ``--node`` mode is one PySyncObj node (used by this script itself).
"""
import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
KEY_BYTES = 16
VALUE_BYTES = 64
KEYS = 100_000

try:
    import cypaxos  # noqa: F401 - an installed cypaxos is used as it is
    _EXTRA_PATH = None
except ImportError:   # a checkout with the extensions built in place
    _EXTRA_PATH = os.path.join(REPO, "python")
    sys.path.insert(0, _EXTRA_PATH)


def _env():
    env = dict(os.environ)
    if _EXTRA_PATH:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_EXTRA_PATH, env.get("PYTHONPATH", ""))
                                            if p)
    return env


# ---------------------------------------------------------------------------
# One PySyncObj node (--node)

def node_main(args):
    import functools

    from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf
    from pysyncobj.batteries import ReplDict

    from cypaxos.tools.bench import Histogram

    ports = [int(p) for p in args.ports.split(",")]
    me = f"127.0.0.1:{ports[args.node]}"
    others = [f"127.0.0.1:{p}" for i, p in enumerate(ports) if i != args.node]
    conf = SyncObjConf(
        autoTick=False,
        appendEntriesUseBatch=True,
        appendEntriesBatchSizeBytes=1 << 20,
        sendBufferSize=1 << 20,
        recvBufferSize=1 << 20,
        pollerType="poll",
        commandsQueueSize=1 << 20,
        logCompactionMinEntries=1 << 40,
        logCompactionMinTime=1 << 30,
        journalFile=(os.path.join(args.dir, f"journal{args.node}")
                     if args.journal == "file" else None),
        dynamicMembershipChange=False,
    )
    store = ReplDict()
    node = SyncObj(me, others, conf=conf, consumers=[store])
    mono = time.monotonic
    start_at = args.start_at
    measure_at = start_at + args.warmup
    end_at = measure_at + args.duration
    hist = Histogram()
    state = {"inflight": 0, "done": 0, "errors": 0}
    keys = [b"k%015d" % i for i in range(KEYS)]
    value = os.urandom(VALUE_BYTES)
    ok = FAIL_REASON.SUCCESS

    def on_done(t0, result, error):
        state["inflight"] -= 1
        if error != ok:
            state["errors"] += 1
            return
        t1 = mono()
        if measure_at <= t1 < end_at:
            state["done"] += 1
            hist.record(int((t1 - t0) * 1e9))

    submitting = None
    i = args.node * 7919
    outstanding = args.outstanding
    setter = store.set
    while True:
        now = mono()
        if now >= end_at + 1.0 or (now >= end_at and not state["inflight"]):
            break
        if now >= start_at and now < end_at:
            if submitting is None:
                if node._getLeader() is None:
                    node.doTick(0.001)
                    continue
                submitting = args.submit == "all" or node._isLeader()
            if submitting:
                while state["inflight"] < outstanding:
                    i = (i + 1) % KEYS
                    state["inflight"] += 1
                    setter(keys[i], value, callback=functools.partial(on_done, mono()))
        node.doTick(0.0 if state["inflight"] else 0.001)
    result = {"node": args.node, "submitting": bool(submitting), "leader": node._isLeader(),
              "writes": state["done"], "errors": state["errors"], "hist": hist.to_json()}
    # Let the others finish their own windows before this node disappears.
    linger = mono() + 1.0
    while mono() < linger:
        node.doTick(0.01)
    print(json.dumps(result), flush=True)
    node.destroy()
    return 0


def _free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_pysyncobj(args):
    from cypaxos.tools.bench import Histogram

    tmp = tempfile.mkdtemp(prefix="pysyncobj-bench-")
    ports = _free_ports(3)
    start_at = time.monotonic() + 3.0   # connect and elect first
    procs = []
    try:
        for n in range(3):
            cmd = [sys.executable, os.path.abspath(__file__), "--node", str(n),
                   "--ports", ",".join(map(str, ports)), "--dir", tmp,
                   "--start-at", repr(start_at), "--warmup", str(args.warmup),
                   "--duration", str(args.duration), "--outstanding",
                   str(args.pso_outstanding), "--submit", args.pso_submit,
                   "--journal", args.pso_journal]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, env=_env(), text=True))
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=args.warmup + args.duration + 60)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            if p.returncode != 0 or not lines:
                raise RuntimeError(f"a PySyncObj node failed (exit {p.returncode})")
            results.append(json.loads(lines[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    hist = Histogram()
    for r in results:
        hist.merge(Histogram.from_json(r["hist"]))
    writes = sum(r["writes"] for r in results)
    return {"writes_per_s": round(writes / args.duration, 1),
            "write_latency_ms": hist.summary_ms(),
            "errors": sum(r["errors"] for r in results),
            "nodes": [{k: r[k] for k in ("node", "submitting", "leader", "writes", "errors")}
                      for r in results]}


def run_cypaxos(args):
    cmd = [sys.executable, "-m", "cypaxos.tools.bench", "--json", "--duration", str(args.duration),
           "--warmup", str(args.warmup), "--value-size", str(VALUE_BYTES), "--keys", str(KEYS),
           "--read-ratio", "0"] + args.cypaxos_args.split()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, env=_env(), text=True, check=True).stdout
    r = json.loads(out)
    return {"writes_per_s": r["writes_per_s"], "write_latency_ms": r["write_latency_ms"],
            "errors": r["errors"], "settings": r["settings"], "cpu_percent": r["cpu_percent"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate the two systems this many times; medians reported")
    parser.add_argument("--cypaxos-args", default="--outstanding 32 --batch 128",
                        help="extra `cypaxos bench` flags, e.g. '--processes 2 --clients 4'")
    parser.add_argument("--pso-outstanding", type=int, default=10000,
                        help="PySyncObj calls in flight per submitting node (default: 10000)")
    parser.add_argument("--pso-submit", choices=("all", "leader"), default="leader",
                        help="which PySyncObj nodes submit writes (default: leader)")
    parser.add_argument("--pso-journal", choices=("file", "memory"), default="file")
    parser.add_argument("-o", "--output", help="write the JSON results here")
    # --node: internal, one PySyncObj node
    parser.add_argument("--node", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--outstanding", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--submit", help=argparse.SUPPRESS)
    parser.add_argument("--journal", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.node is not None:
        return node_main(args)

    import pysyncobj
    cy_runs, pso_runs = [], []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}: cypaxos ...", file=sys.stderr, flush=True)
        cy_runs.append(run_cypaxos(args))
        print(f"  cypaxos: {cy_runs[-1]['writes_per_s']:,.0f} writes/s", file=sys.stderr)
        print(f"round {r + 1}/{args.rounds}: PySyncObj ...", file=sys.stderr, flush=True)
        pso_runs.append(run_pysyncobj(args))
        print(f"  PySyncObj: {pso_runs[-1]['writes_per_s']:,.0f} writes/s", file=sys.stderr)
    cy = statistics.median(r["writes_per_s"] for r in cy_runs)
    pso = statistics.median(r["writes_per_s"] for r in pso_runs)
    ratio = cy / pso if pso else None
    result = {
        "cypaxos_writes_per_s": cy,
        "pysyncobj_writes_per_s": pso,
        "ratio": round(ratio, 2) if ratio else None,
        "workload": {"key_bytes": KEY_BYTES, "value_bytes": VALUE_BYTES, "keys": KEYS,
                     "duration": args.duration, "warmup": args.warmup,
                     "replicas": 3, "network": "loopback"},
        "cypaxos": {"durability": "fsync always (fdatasync on a majority before the ack)",
                    "runs": cy_runs},
        "pysyncobj": {"version": getattr(pysyncobj, "__version__", None) or "0.3.17",
                      "durability": ("journal file (mmap, never fsynced while running)"
                                     if args.pso_journal == "file" else "memory only"),
                      "submit_from": args.pso_submit, "outstanding_per_node": args.pso_outstanding,
                      "runs": pso_runs},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"cypaxos   (fsync always):  {cy:12,.0f} writes/s")
    print(f"PySyncObj ({result['pysyncobj']['durability']}): {pso:12,.0f} writes/s")
    print(f"ratio: {ratio:.1f}x" if ratio else "ratio: n/a (PySyncObj completed nothing)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
