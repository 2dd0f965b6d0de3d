"""A/B of `cypaxos bench` between two installations or two replica settings, alternating.

Each round runs side A then side B (the order swaps every round, so a drift of the
machine's speed over the run falls on both); each run starts a fresh 3-replica cluster
with fsync always in a temporary directory, from that side's Python, loads it with
that side's `cypaxos bench --json`, and stops it (without serve arguments the bench
starts the cluster itself and also reports the replicas' CPU per operation).  The report is the
median of each side and the ratio B/A of the medians, with every run's figure so the
spread is visible.

    # two builds (say a worktree of the previous main and this checkout):
    python perf/ab.py --a /old/.venv/bin/python --b .venv/bin/python --profile bulk
    python perf/ab.py --a /old/.venv/bin/python --b .venv/bin/python --profile one
    # one build, two replica settings (reads under a leader lease against a quorum round):
    python perf/ab.py --profile reads --b-serve "--read-lease"

Profiles (bench arguments): `bulk` (writes: 4 clients over 2 processes, 32 outstanding
calls of put_many x 128), `one` (one client, one put at a time: latency), `reads`
(linearizable gets from 2 processes, 256 outstanding each), `reads1` (one get at a
time).  `--a-serve`/`--b-serve` are appended to every `cypaxos serve` of that side and
`--a-client`/`--b-client` to its bench (e.g. TLS files); `--json` prints the runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time

PROFILES = {
    "bulk": ["--outstanding", "32", "--batch", "128"],
    "one": ["--processes", "1", "--clients", "1", "--outstanding", "1"],
    "reads": ["--read-ratio", "1", "--keys", "10000"],
    "reads1": ["--read-ratio", "1", "--keys", "10000", "--processes", "1", "--clients", "1",
               "--outstanding", "1"],
}
READY_TIMEOUT_S = 60.0


def free_ports(n: int) -> list[int]:
    """`n` ports that nothing listens on now (the kernel picks them; a race is unlikely)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def start_cluster(python: str, data_dir: str, serve_args: list[str]) -> tuple[str, list]:
    """Three `cypaxos serve` processes of `python`; returns (cluster argument, processes)
    once `status` reports a leader."""
    ports = free_ports(3)
    spec = ",".join(f"{i + 1}=127.0.0.1:{port}" for i, port in enumerate(ports))
    help_text = subprocess.run([python, "-m", "cypaxos", "serve", "--help"],
                               capture_output=True, text=True).stdout
    if "--cluster-secret-file" in help_text and "--insecure" not in serve_args:
        # A build with authentication: the peers prove a secret, as `cypaxos local`'s do.
        secret = os.path.join(data_dir, "cluster.secret")
        with open(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(os.urandom(32).hex() + "\n")
        serve_args = ["--cluster-secret-file", secret, "--allow-anonymous-clients", *serve_args]
    procs = []
    for i in range(3):
        log = open(os.path.join(data_dir, f"replica{i + 1}.log"), "wb")
        procs.append(subprocess.Popen(
            [python, "-m", "cypaxos", "serve", "--id", str(i + 1), "--cluster", spec,
             "--data-dir", os.path.join(data_dir, f"r{i + 1}"), "--fsync", "always",
             *serve_args], stdout=log, stderr=subprocess.STDOUT))
    cluster = ",".join(f"127.0.0.1:{port}" for port in ports)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            stop_cluster(procs)
            raise SystemExit(f"a replica exited at start; see {data_dir}/replica*.log")
        status = subprocess.run([python, "-m", "cypaxos", "status", "--cluster", cluster,
                                 "--json", "--timeout", "2"], capture_output=True)
        if status.returncode == 0 and '"leader"' in status.stdout.decode():
            return cluster, procs
        time.sleep(0.2)  # polling a separate process: there is nothing to await
    stop_cluster(procs)
    raise SystemExit("the cluster elected no leader within %.0f s" % READY_TIMEOUT_S)


def stop_cluster(procs: list) -> None:
    """Stop the replicas (SIGTERM, then SIGKILL after 10 s)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def one_run(python: str, serve_args: list[str], client_args: list[str],
            bench_args: list[str]) -> dict:
    """One fresh cluster, one bench; the bench's JSON result.  Without serve arguments
    the bench starts its own cluster, and then it also reports the replicas' CPU."""
    if not serve_args:
        out = subprocess.run([python, "-m", "cypaxos", "bench", "--json", *bench_args,
                              *client_args], capture_output=True, timeout=600)
        if out.returncode != 0:
            raise SystemExit("bench failed: " + out.stderr.decode().strip()[-400:])
        return json.loads(out.stdout)
    with tempfile.TemporaryDirectory(prefix="cypaxos-ab-") as data_dir:
        cluster, procs = start_cluster(python, data_dir, serve_args)
        try:
            out = subprocess.run([python, "-m", "cypaxos", "bench", "--cluster", cluster,
                                  "--json", *bench_args, *client_args],
                                 capture_output=True, timeout=600)
        finally:
            stop_cluster(procs)
    if out.returncode != 0:
        raise SystemExit("bench failed: " + out.stderr.decode().strip()[-400:])
    return json.loads(out.stdout)


def figures(result: dict) -> dict:
    """Throughput and latency percentiles of the operation kind the run measured."""
    kind = "read" if result["reads"] else "write"
    latency = result[f"{kind}_latency_ms"]
    fig = {"ops_per_s": result[f"{kind}s_per_s"], "p50_ms": latency["p50"],
           "p99_ms": latency["p99"]}
    cpu = result.get("cpu_percent", {})
    replicas = [v for k, v in cpu.items() if k.startswith("replica")]
    if replicas and fig["ops_per_s"]:
        # CPU microseconds per operation, all three replicas together: less sensitive
        # to what else the machine runs than the throughput is.
        fig["replica_cpu_us"] = 1e4 * sum(replicas) / fig["ops_per_s"]
    return fig


def main(argv: list[str] | None = None) -> int:
    """Run the A/B and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default=sys.executable, help="side A's Python (default: this one)")
    parser.add_argument("--b", default=sys.executable, help="side B's Python (default: this one)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="bulk")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", default="8")
    parser.add_argument("--warmup", default="2")
    for side in "ab":
        parser.add_argument(f"--{side}-serve", default="", help="extra serve arguments")
        parser.add_argument(f"--{side}-client", default="", help="extra bench arguments")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    bench_args = PROFILES[args.profile] + ["--duration", args.duration, "--warmup", args.warmup]
    sides = {"A": (args.a, shlex.split(args.a_serve), shlex.split(args.a_client)),
             "B": (args.b, shlex.split(args.b_serve), shlex.split(args.b_client))}
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for round_ in range(args.rounds):
        order = "AB" if round_ % 2 == 0 else "BA"
        for side in order:
            python, serve, client = sides[side]
            fig = figures(one_run(python, serve, client, bench_args))
            runs[side].append(fig)
            print(f"round {round_ + 1} {side}: {fig['ops_per_s']:,.0f} ops/s "
                  f"p50 {fig['p50_ms']:.3f} ms p99 {fig['p99_ms']:.3f} ms"
                  + (f" replicas {fig['replica_cpu_us']:.2f} us CPU/op"
                     if "replica_cpu_us" in fig else ""), file=sys.stderr, flush=True)
    table = {}
    for key in ("ops_per_s", "p50_ms", "p99_ms", "replica_cpu_us"):
        if not all(key in r for side in runs.values() for r in side):
            continue
        a = statistics.median(r[key] for r in runs["A"])
        b = statistics.median(r[key] for r in runs["B"])
        table[key] = {"A": a, "B": b, "B/A": b / a if a else None}
    if args.json:
        print(json.dumps({"profile": args.profile, "sides": {k: v[0] for k, v in sides.items()},
                          "runs": runs, "median": table}, indent=1))
    else:
        print(f"profile {args.profile}, {args.rounds} rounds, medians:")
        for key, row in table.items():
            print(f"  {key:10} A {row['A']:>12,.3f}  B {row['B']:>12,.3f}  B/A {row['B/A']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
