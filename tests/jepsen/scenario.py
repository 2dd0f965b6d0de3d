"""One scenario: cluster setup + workload + nemesis schedule + checks.

    result = run_scenario(ScenarioConfig(name="ci", events=40, seed=1))
    assert result.ok, result.report()

Steps: build the test bed (namespaces, or loopback), start the replicas (behind the
proxies, under libfaketime), wait for a leader; start the workload in a thread living
in the clients' namespace; run the nemesis schedule in this thread (after every event
heal it and check for replicas that died on their own); heal everything; wait for a
healthy cluster; stop the workload; wait for the replicas to converge; read every key;
wait for convergence again and compare state digests; check the history.

Every run writes ``summary.json`` to ``RESULTS/jepsen-<timestamp>-<name>/`` (RESULTS is
``$CYPAXOS_RESULTS_DIR`` or ``results/`` at the repository root); a failing run also
saves the history (``history.json``, `History.save` format), the replicas' and proxies'
logs, the harness's event timeline and the packet-filter rules there, and the
report names the directory.  Teardown (processes, rules, namespaces) always runs.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field

from . import netns
from .cluster import ClusterError, JepsenCluster
from .nemesis import Nemesis, available_kinds, schedule
from .workload import Workload, WorkloadConfig, check_history, count_ops, run_in_thread

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def results_root() -> str:
    return os.environ.get("CYPAXOS_RESULTS_DIR") or os.path.join(REPO_ROOT, "results")


@dataclass
class ScenarioConfig:
    name: str = "ci"
    replicas: int = 3
    seed: int | None = None
    events: int = 40                 # nemesis events (ignored if duration_s is set)
    duration_s: float | None = None  # soak: keep scheduling events this long
    kinds: list | None = None        # None: every kind this machine can run
    proxy: bool = True               # route peer links through the proxy
    bed: str = "netns"               # "netns" (falls back to loopback) or "loopback"
    faketime: bool = True
    tick_ms: int = 10
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    recover_timeout: float = 60.0    # healthy again after healing (liveness)
    converge_timeout: float = 90.0
    check_max_steps: int = 2_000_000
    combine: float = 0.3             # chance that an event adds a second fault family


@dataclass
class ScenarioResult:
    ok: bool
    summary: dict
    failures: list
    results_dir: str

    def line(self) -> str:
        s = self.summary
        ops = s.get("ops", {})
        faults = s.get("faults", {})
        return (f"jepsen[{s.get('name')}] seed={s.get('seed')} bed={s.get('bed')} "
                f"replicas={s.get('replicas')} ops={ops.get('total', 0)} "
                f"{ops.get('by_outcome', {})} faults={sum(faults.values())} {dict(sorted(faults.items()))} "
                f"anomalies={len(s.get('anomalies', []))} lost_writes={len(s.get('lost_writes', []))} "
                f"digests_equal={s.get('digests_equal')} runtime={s.get('runtime_s')}s")

    def report(self) -> str:
        text = self.line()
        if self.failures:
            text += "\nFAILURES:\n  " + "\n  ".join(str(f)[:2000] for f in self.failures)
        text += f"\nresults: {self.results_dir}"
        return text


def run_scenario(cfg: ScenarioConfig) -> ScenarioResult:
    t_start = time.monotonic()
    seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(1, 2**31)
    cfg.workload.seed = seed
    rng = random.Random(seed)
    caps = netns.capabilities()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = os.path.join(results_root(), f"jepsen-{stamp}-{cfg.name}-{seed}")
    os.makedirs(out_dir, exist_ok=True)
    print(f"jepsen[{cfg.name}]: seed {seed}; results in {out_dir}", flush=True)
    work = tempfile.mkdtemp(prefix=f"cypaxos-jepsen-{cfg.name}-")
    summary: dict = {"name": cfg.name, "seed": seed, "replicas": cfg.replicas,
                     "notes": []}
    failures: list = []
    workload = None
    bed = cluster = nemesis = None
    thread = None
    try:
        netns.cleanup_stale()
        bed = netns.make_bed(cfg.replicas, prefer=cfg.bed)
        summary["bed"] = bed.kind
        if bed.kind != "netns" and cfg.bed == "netns":
            summary["notes"].append(f"loopback instead of namespaces: {caps['netns_reason']}")
        if bed.kind == "netns" and not bed.firewall:
            summary["notes"].append(f"partitions by proxy (no packet filter: {caps['firewall_reason']})")
        use_proxy = cfg.proxy or bed.firewall is None
        faketime = caps["faketime"] if cfg.faketime else None
        if cfg.faketime and not faketime:
            summary["notes"].append(caps["faketime_reason"])
        kinds, missing = available_kinds(cfg.replicas, proxy=use_proxy, faketime=bool(faketime))
        if cfg.kinds is not None:
            kinds = [k for k in kinds if k in cfg.kinds]
            missing = {k: v for k, v in missing.items() if k in cfg.kinds}
        summary["kinds_skipped"] = missing
        cluster = JepsenCluster(bed, cfg.replicas, work, proxy=use_proxy, faketime=faketime,
                                tick_ms=cfg.tick_ms, seed=seed)
        cluster.start_all()
        cluster.wait_healthy(60)
        nemesis = Nemesis(cluster, rng)

        workload = Workload(cluster.addresses, cfg.workload)
        thread, box = run_in_thread(workload.run, bed.thread_init("c"), "jepsen-workload")

        # -- the nemesis schedule
        proxy_partitions = nemesis.partitions_by == "proxy"
        if cfg.duration_s is None:
            events = schedule(rng, kinds, cfg.events, proxy_partitions=proxy_partitions,
                              combine=cfg.combine)
        else:
            events = schedule(rng, kinds, max(len(kinds), 1), proxy_partitions=proxy_partitions,
                              combine=cfg.combine)
        deadline = None if cfg.duration_s is None else time.monotonic() + cfg.duration_s
        k = 0
        stalls = 0
        while True:
            if deadline is None:
                if k >= len(events):
                    break
                event = events[k]
            else:
                if time.monotonic() >= deadline:
                    break
                event = events[k] if k < len(events) else schedule(
                    rng, kinds, 1, proxy_partitions=proxy_partitions,
                              combine=cfg.combine)[0]
            k += 1
            if not thread.is_alive():
                failures.append(f"workload thread died: {box.get('error')!r}")
                break
            nemesis.run_event(event)
            crashed = cluster.unexpected_exits()
            if crashed:
                for i, code in crashed.items():
                    tail = cluster.log_text(i).strip().splitlines()[-3:]
                    failures.append(f"replica {i} exited by itself with status {code}: {tail}")
                    cluster.note(f"replica {i} exited by itself ({code}); restarting")
                    cluster.replicas[i].process = None
                    cluster.start(i)
            try:
                cluster.wait_healthy(cfg.recover_timeout)
            except ClusterError as exc:
                stalls += 1
                cluster.note(f"not healthy after event {k}: {exc}")
                failures.append(f"liveness: no healthy cluster {cfg.recover_timeout:g}s after "
                                f"healing event {k} ({event.kinds}): {exc}")
                nemesis.heal_all()
            if stalls >= 3:
                failures.append("giving up the schedule after 3 liveness failures")
                break
        summary["events"] = k
        nemesis.heal_all()
        try:
            cluster.wait_healthy(cfg.recover_timeout, ids=cluster.ids)
        except ClusterError as exc:
            failures.append(f"liveness: cluster not healthy after the final heal: {exc}")
        workload.stop.set()
        thread.join(cfg.workload.op_timeout * 3 + 30)
        if thread.is_alive():
            failures.append("workload did not stop")
        if box.get("error") is not None:
            failures.append(f"workload failed: {''.join(traceback.format_exception(box['error']))[-3000:]}")
        if workload.unexpected:
            failures.append(f"{len(workload.unexpected)} unexpected client exceptions, e.g. "
                            f"{workload.unexpected[:3]}")

        # -- convergence, final reads, digests
        try:
            cluster.wait_converged(cfg.converge_timeout)
        except ClusterError as exc:
            failures.append(f"before final reads: {exc}")
        t_reads, rbox = run_in_thread(workload.final_reads, bed.thread_init("c"), "jepsen-final")
        t_reads.join(120)
        if rbox.get("error") is not None or t_reads.is_alive():
            failures.append(f"final reads failed: {rbox.get('error')!r}")
        if workload.final_reads_failed:
            failures.append(f"{len(workload.final_reads_failed)} keys could not be read at the end")
        try:
            statuses = cluster.wait_converged(cfg.converge_timeout)
            digests = {i: (st["applied_index"], st["state_digest"]) for i, st in statuses.items()}
            summary["final_state"] = {str(i): list(v) for i, v in digests.items()}
            summary["digests_equal"] = len(set(digests.values())) == 1
            if not summary["digests_equal"]:
                failures.append(f"state digests differ at equal applied index: {digests}")
        except ClusterError as exc:
            summary["digests_equal"] = None
            failures.append(f"after final reads: {exc}")
        summary["proxy"] = cluster.proxy_stats() if cluster.proxies else None

        # -- the history
        ops = workload.history.ops()
        summary["ops"] = count_ops(ops)
        summary["client_errors"] = dict(workload.errors)
        summary["faults"] = dict(nemesis.counts)
        findings = check_history(ops, max_steps=cfg.check_max_steps)
        summary.update(findings)
        failures += nemesis.problems
        if findings["anomalies"]:
            failures.append(f"{len(findings['anomalies'])} key(s) not linearizable; first: "
                            f"{findings['anomalies'][0]['message'][:1500]}")
        if findings["lost_writes"]:
            failures.append(f"{len(findings['lost_writes'])} acknowledged write(s) lost: "
                            f"{findings['lost_writes'][:5]}")
        if findings["check_timeouts"]:
            failures.append(f"linearizability check inconclusive for "
                            f"{len(findings['check_timeouts'])} key(s): {findings['check_timeouts'][:3]}")
    except Exception:
        failures.append("harness error: " + traceback.format_exc()[-4000:])
    finally:
        if workload is not None:
            workload.stop.set()
        if thread is not None:
            thread.join(30)
        summary["runtime_s"] = round(time.monotonic() - t_start, 1)
        summary["nemesis_log"] = nemesis.log if nemesis else []
        if cluster is not None:
            summary["timeline"] = cluster.events
            cluster.close()
        summary["failures"] = failures
        ok = not failures
        summary["ok"] = ok
        try:
            if not ok:
                _save_evidence(out_dir, workload, cluster, bed, work)
        finally:
            if bed is not None:
                bed.close()
            _write_json(os.path.join(out_dir, "summary.json"), summary)
            shutil.rmtree(work, ignore_errors=True)
    result = ScenarioResult(ok, summary, failures, out_dir)
    print(result.line(), flush=True)
    return result


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=repr)
        f.write("\n")


def _save_evidence(out_dir, workload, cluster, bed, work) -> None:
    if workload is not None:
        workload.history.save(os.path.join(out_dir, "history.json"))
    for name in os.listdir(work):
        src = os.path.join(work, name)
        if name.endswith(".log") or name.endswith(".faketime"):
            shutil.copy(src, out_dir)
        elif os.path.isdir(src):
            # The data dirs (WAL, snapshots): small in these runs, and what a
            # post-mortem of a lost write needs.
            shutil.copytree(src, os.path.join(out_dir, name), dirs_exist_ok=True)
    if cluster is not None:
        with open(os.path.join(out_dir, "timeline.txt"), "w") as f:
            f.write("\n".join(cluster.events) + "\n")
    if bed is not None:
        with open(os.path.join(out_dir, "bed.txt"), "w") as f:
            f.write(f"kind: {bed.kind}\n")
            if hasattr(bed, "rules"):
                try:
                    f.write(bed.rules())
                except Exception as exc:  # noqa: BLE001 - evidence is best effort
                    f.write(f"rules unavailable: {exc}\n")
            f.write("\n# commands\n" + "\n".join(bed.commands) + "\n")
