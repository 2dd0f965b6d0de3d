"""Sweeps with `cypaxos bench` and the plots of docs/performance.md.

    # throughput vs outstanding operations (closed loop), one fresh local cluster per point
    python perf/plot.py sweep outstanding --values 1,4,16,64,256,1024 --repeat 3
    # latency percentiles vs offered load (open loop, --rate)
    python perf/plot.py sweep rate --values 2000,5000,10000,20000,40000,60000 --repeat 3
    # the PNGs, from the JSON files in perf/results/
    python perf/plot.py plot

A sweep appends every run's `cypaxos bench --json` object to
``perf/results/sweep_<kind>.json`` (a list; ``--fresh`` starts the file anew); extra
flags after ``--`` go to every `cypaxos bench` run (``-- --read-ratio 1``).  ``plot``
writes ``throughput_vs_outstanding.png`` and ``latency_vs_load.png`` beside them,
taking for every point the median over its repeated runs (the machine is shared and
noisy), and drawing every run's value faintly behind it.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


def _env():
    env = dict(os.environ)
    try:
        import cypaxos  # noqa: F401
    except ImportError:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (os.path.join(REPO, "python"), env.get("PYTHONPATH", "")) if p)
    return env


def _load(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def _save(path, runs):
    with open(path, "w") as f:
        json.dump(runs, f, indent=None, separators=(",", ":"))
        f.write("\n")


def _slim(result):
    """A bench result without what the plots never need (keeps the files small)."""
    return {k: v for k, v in result.items() if k not in ("client_statistics",)}


def sweep(args):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"sweep_{args.kind}.json")
    runs = [] if args.fresh else _load(path)
    values = [float(v) if args.kind == "rate" else int(v) for v in args.values.split(",")]
    extra = args.bench_args
    for r in range(args.repeat):
        for value in values:
            flag = "--outstanding" if args.kind == "outstanding" else "--rate"
            cmd = [sys.executable, "-m", "cypaxos.tools.bench", "--json", "--duration",
                   str(args.duration), "--warmup", str(args.warmup), flag, str(value)] + extra
            started = time.monotonic()
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, env=_env(), text=True)
            if proc.returncode != 0:
                print(f"{flag} {value}: bench failed (exit {proc.returncode})", file=sys.stderr)
                continue
            result = json.loads(proc.stdout)
            result["sweep"] = {"kind": args.kind, "value": value, "repeat": r}
            runs.append(_slim(result))
            _save(path, runs)
            kind = "read" if result["reads"] > result["writes"] else "write"
            w = result[f"{kind}_latency_ms"]
            print(f"{flag} {value:g} (run {r + 1}/{args.repeat}): "
                  f"{result['writes_per_s']:,.0f} writes/s {result['reads_per_s']:,.0f} reads/s, "
                  f"{kind} p50 {w['p50']} p99 {w['p99']} ms, machine CPU "
                  f"{result['cpu_percent'].get('machine', '?')}% "
                  f"({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    return 0


def _group(runs, key):
    groups = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return dict(sorted(groups.items()))


def plot(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    runs = _load(os.path.join(RESULTS, "sweep_outstanding.json"))
    if runs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series = _group(runs, lambda r: (r["settings"]["read_ratio"], r["settings"]["clients"],
                                         r["settings"]["processes"],
                                         r["settings"].get("batch", 1)))
        for (ratio, clients, processes, batch), group in series.items():
            points = _group(group, lambda r: r["settings"]["outstanding"] * clients * batch)
            metric = "reads_per_s" if ratio == 1 else "ops_per_s"
            label = (f"{'reads' if ratio == 1 else 'writes' if ratio == 0 else f'ops (read ratio {ratio:g})'}"
                     f", {clients} clients / {processes} processes"
                     + (f", bulk calls of {batch}" if batch > 1 else ""))
            xs = list(points)
            for x in xs:
                ax.scatter([x] * len(points[x]), [r[metric] for r in points[x]], s=8,
                           alpha=0.3, color="gray")
            ax.plot(xs, [statistics.median(r[metric] for r in points[x]) for x in xs],
                    marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("operations outstanding in all (clients x --outstanding x --batch)")
        ax.set_ylabel("operations / s")
        ax.set_title("cypaxos bench: throughput vs outstanding operations\n"
                     "3 replicas on loopback, fsync always, 64-byte values")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = os.path.join(RESULTS, "throughput_vs_outstanding.png")
        fig.savefig(out, dpi=110)
        written.append(out)

    runs = _load(os.path.join(RESULTS, "sweep_rate.json"))
    if runs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        points = _group(runs, lambda r: r["settings"]["rate"])
        xs = list(points)
        for name, q in (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p99.9", "p999")):
            ys = [statistics.median(r["write_latency_ms"][q] for r in points[x]
                                    if r["write_latency_ms"][q] is not None) for x in xs]
            ax.plot(xs, ys, marker="o", label=f"write {name}")
        achieved = [statistics.median(r["ops_per_s"] for r in points[x]) for x in xs]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (writes / s, open loop)")
        ax.set_ylabel("latency (ms)")
        ax.set_title("cypaxos bench: write latency vs offered load\n"
                     "3 replicas on loopback, fsync always, 64-byte values")
        ax.grid(True, which="both", alpha=0.3)
        for x, a in zip(xs, achieved):
            if a < 0.95 * x:
                ax.axvline(x, color="red", alpha=0.15)
        ax.legend(fontsize=8, title="red: achieved < 95% of offered", title_fontsize=7)
        fig.tight_layout()
        out = os.path.join(RESULTS, "latency_vs_load.png")
        fig.savefig(out, dpi=110)
        written.append(out)
    for out in written:
        print(out)
    if not written:
        print("no sweep results in perf/results/ (run `perf/plot.py sweep` first)",
              file=sys.stderr)
        return 1
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sweep", help="run cypaxos bench over a range of one setting "
                                     "(flags after -- go to every run)")
    p.add_argument("kind", choices=("outstanding", "rate"))
    p.add_argument("--values", required=True, help="comma-separated values of the setting")
    p.add_argument("--repeat", type=int, default=1, help="runs per value (default: 1)")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--fresh", action="store_true", help="replace the results file")
    p.set_defaults(handler=sweep)
    p = sub.add_parser("plot", help="draw the PNGs from perf/results/*.json")
    p.set_defaults(handler=plot)
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:   # what follows goes to every cypaxos bench run
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    args = parser.parse_args(argv)
    args.bench_args = extra
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
