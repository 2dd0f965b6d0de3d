"""Nemeses: the faults, and a seeded schedule of them.

Every fault kind has an *apply* step and a *heal* step; an event applies one or two
kinds at once (from different families, e.g. a partition while messages are being
duplicated), holds them for a few seconds, then heals them in reverse order.  Which
replica is hit is decided at run time (the leader is only known then) but from the
same seeded generator, so a seed names a schedule.

Kinds (see docs/testing.md for what each one exercises):

========================  =================================================================
process
``kill_leader``           kill -9 the leader; restart it after the hold
``kill_follower``         kill -9 a follower; restart it after the hold
``kill_minority``         kill -9 f replicas at once (5+ replicas); restart them
``torn_tail``             kill -9 a replica, write a torn, never-synced record after the
                          records of its last WAL segment, restart: it must zero the tail
                          and rejoin (zeros alone are unused space: nothing to report)
``power_loss``            kill -9 one replica and undo the WAL writes its syncs had not
                          made durable (what a power cut may lose), restart it
``power_outage``          the same on every replica at once (the whole cluster loses
                          power); only acknowledged = fsynced-by-a-majority data survives
``pause_leader``          SIGSTOP the leader, SIGCONT after the hold
``pause_follower``        SIGSTOP a follower, SIGCONT after the hold
partition (nftables/iptables in the namespaces; proxy blocking on loopback)
``partition_leader``      the leader cannot exchange packets with anyone
``partition_halves``      a random majority / minority split
``partition_one_way``     one replica's packets are dropped by all others, or it drops
                          all of theirs (one direction only)
``partition_ring``        overlapping majorities: each replica reaches only its
                          neighbours on a random ring (3 replicas: a bridge)
message (the frame-aware proxy on every peer link)
``delay``                 every peer message delayed 5-150 ms plus jitter (reorders)
``loss``                  5-30 % of peer messages dropped (whole frames)
``duplicate``             10-50 % of peer messages delivered twice
``cut``                   connections closed mid-frame (a partial frame is forwarded)
disk (the replica shim)
``slow_disk``             every WAL fsync of 1..all replicas takes 5-60 ms longer
clock (libfaketime)
``clock_forward``         one replica's clock (wall and monotonic) jumps 2-60 s ahead
``clock_backward``        one replica's clock jumps 1-4 s back (its timers stall)
========================  =================================================================
"""
from __future__ import annotations

import collections
import random
import time
from dataclasses import dataclass

from .cluster import ClusterError, JepsenCluster

FAMILIES = {
    "process": ["kill_leader", "kill_follower", "kill_minority", "torn_tail",
                "power_loss", "power_outage", "pause_leader", "pause_follower"],
    "partition": ["partition_leader", "partition_halves", "partition_one_way",
                  "partition_ring"],
    "message": ["delay", "loss", "duplicate", "cut"],
    "clock": ["clock_forward", "clock_backward"],
    "disk": ["slow_disk"],
}
FAMILY_OF = {kind: fam for fam, kinds in FAMILIES.items() for kind in kinds}
ALL_KINDS = [k for kinds in FAMILIES.values() for k in kinds]


def available_kinds(replicas: int, *, proxy: bool, faketime: bool) -> tuple[list[str], dict]:
    """The kinds this setup can run, and why the others cannot."""
    kinds, missing = [], {}
    for kind in ALL_KINDS:
        fam = FAMILY_OF[kind]
        if fam == "message" and not proxy:
            missing[kind] = "no proxy on the peer links"
        elif fam == "clock" and not faketime:
            missing[kind] = "libfaketime not installed (apt-get install faketime)"
        elif kind == "kill_minority" and replicas < 5:
            missing[kind] = "needs 5+ replicas (f >= 2)"
        else:
            kinds.append(kind)
    return kinds, missing


@dataclass
class Event:
    kinds: tuple
    hold: float     # seconds the faults stay
    quiet: float    # seconds of calm after healing
    seed: int


def schedule(rng: random.Random, kinds: list[str], count: int, *,
             proxy_partitions: bool = False, combine: float = 0.3) -> list[Event]:
    """`count` events that cover every kind at least once (if count allows).

    With `proxy_partitions` (no packet filter: partitions are made by the proxy) a
    partition is never combined with a message fault, which the proxy also makes."""
    events = []
    order = list(kinds)
    rng.shuffle(order)
    while len(events) < count:
        if order:
            first = order.pop()
        else:
            first = rng.choice(kinds)
        chosen = [first]
        if rng.random() < combine:
            clash = {FAMILY_OF[first]}
            if proxy_partitions and clash & {"partition", "message"}:
                clash |= {"partition", "message"}
            others = [k for k in kinds if FAMILY_OF[k] not in clash]
            if others:
                chosen.append(rng.choice(others))
        events.append(Event(tuple(chosen), hold=round(rng.uniform(1.0, 4.5), 2),
                            quiet=round(rng.uniform(0.5, 2.0), 2), seed=rng.getrandbits(32)))
    return events


class Nemesis:
    def __init__(self, cluster: JepsenCluster, rng: random.Random):
        self.c = cluster
        self.rng = rng
        self.counts = collections.Counter()
        self.problems: list[str] = []     # harness-detected failures (e.g. tail not cut)
        self.log: list[str] = []
        self.partitions_by = "firewall" if cluster.bed.firewall else "proxy"

    # -- helpers

    def _leader(self) -> int | None:
        return self.c.leader(timeout=0.5)

    def _pick(self, want_leader: bool | None) -> int:
        live = self.c.running_ids()
        leader = self._leader()
        if want_leader and leader is not None:
            return leader
        pool = [i for i in live if i != leader] if want_leader is False else live
        return self.rng.choice(pool or live or self.c.ids)

    def _block(self, pairs) -> None:
        """Drop traffic i -> j for every (i, j) in pairs."""
        pairs = [(i, j) for i, j in pairs if i != j]
        if self.partitions_by == "firewall":
            for i, j in pairs:
                self.c.bed.block(f"r{j}", [f"r{i}"])
        else:
            self.c.proxy_set(pairs, block=True)
        self.c.note(f"partition: drop {sorted(pairs)} via {self.partitions_by}")

    def _unblock(self) -> None:
        if self.partitions_by == "firewall":
            self.c.bed.heal()
        else:
            self.c.proxy_clear()
        self.c.note("partition healed")

    def _split(self, groups) -> list:
        """Pairs that cut every group off from every other (both directions)."""
        pairs = []
        for a in groups:
            for b in groups:
                if a is not b:
                    pairs += [(i, j) for i in a for j in b]
        return pairs

    # -- apply: each returns (description, heal function)

    def apply(self, kind: str):
        c, rng = self.c, self.rng
        ids = c.ids
        if kind in ("kill_leader", "kill_follower", "torn_tail"):
            target = self._pick(kind == "kill_leader" if kind != "torn_tail" else None)
            c.kill(target)
            desc = f"kill -9 replica {target}"
            expect_cut = False
            if kind == "torn_tail":
                tear, expect_cut = c.tear_wal_tail(target, rng)
                desc += f", torn tail ({tear})"

            def heal():
                if not c.replicas[target].running():
                    c.start(target)
                if expect_cut:
                    self._expect_tail_cut(target)
            return desc, heal
        if kind in ("power_loss", "power_outage"):
            targets = ids[:] if kind == "power_outage" else [self._pick(None)]
            for t in targets:
                c.kill(t)
            descs = [f"{t}: {c.drop_unsynced(t)}" for t in targets]

            def heal():
                for t in targets:
                    if not c.replicas[t].running():
                        c.start(t)
            return "power cut on " + "; ".join(descs), heal
        if kind == "kill_minority":
            f = (len(ids) - 1) // 2
            targets = rng.sample(c.running_ids() or ids, min(f, len(c.running_ids() or ids)))
            for t in targets:
                c.kill(t)

            def heal():
                for t in targets:
                    if not c.replicas[t].running():
                        c.start(t)
            return f"kill -9 replicas {targets}", heal
        if kind in ("pause_leader", "pause_follower"):
            target = self._pick(kind == "pause_leader")
            c.pause(target)
            return f"SIGSTOP replica {target}", lambda: c.resume(target)
        if kind == "partition_leader":
            leader = self._pick(True)
            others = [i for i in ids if i != leader]
            self._block(self._split([[leader], others]))
            return f"isolate replica {leader}", self._unblock
        if kind == "partition_halves":
            shuffled = ids[:]
            rng.shuffle(shuffled)
            cut = rng.randint(1, (len(ids) - 1) // 2)
            minority, majority = shuffled[:cut], shuffled[cut:]
            self._block(self._split([minority, majority]))
            return f"partition {sorted(minority)} | {sorted(majority)}", self._unblock
        if kind == "partition_one_way":
            x = self._pick(rng.random() < 0.5)
            others = [i for i in ids if i != x]
            if rng.random() < 0.5:
                self._block([(x, j) for j in others])
                desc = f"one-way: nobody hears replica {x}"
            else:
                self._block([(j, x) for j in others])
                desc = f"one-way: replica {x} hears nobody"
            return desc, self._unblock
        if kind == "partition_ring":
            ring = ids[:]
            rng.shuffle(ring)
            n = len(ring)
            if n == 3:
                pairs = [(ring[0], ring[2]), (ring[2], ring[0])]
                desc = f"bridge: {ring[0]} - {ring[1]} - {ring[2]}"
            else:
                near = {(ring[k], ring[(k + d) % n]) for k in range(n) for d in (-1, 0, 1)}
                pairs = [(i, j) for i in ids for j in ids if (i, j) not in near]
                desc = f"ring {ring} (each sees its neighbours)"
            self._block(pairs)
            return desc, self._unblock
        if kind == "delay":
            delay = rng.randint(5, 150)
            jitter = rng.randint(0, 100)
            c.proxy_set("*", delay_ms=delay, jitter_ms=jitter)
            return f"delay {delay}+U(0,{jitter}) ms", c.proxy_clear
        if kind == "loss":
            p = round(rng.uniform(0.05, 0.3), 2)
            c.proxy_set("*", drop=p)
            return f"drop {p:.0%} of frames", c.proxy_clear
        if kind == "duplicate":
            p = round(rng.uniform(0.1, 0.5), 2)
            c.proxy_set("*", dup=p, jitter_ms=rng.choice([0, 20]))
            return f"duplicate {p:.0%} of frames", c.proxy_clear
        if kind == "cut":
            p = round(rng.uniform(0.002, 0.02), 3)
            c.proxy_set("*", cut=p)
            return f"cut connections mid-frame, p={p} per frame", c.proxy_clear
        if kind == "slow_disk":
            targets = rng.sample(ids, rng.randint(1, len(ids)))
            secs = rng.uniform(0.005, 0.06)
            for t in targets:
                c.slow_disk(t, secs)

            def heal():
                for t in targets:
                    c.slow_disk(t, 0)
            return f"slow disk (+{secs * 1000:.0f} ms per fsync) on {sorted(targets)}", heal
        if kind == "clock_forward":
            target = self._pick(rng.random() < 0.5)
            secs = rng.uniform(2, 60)
            c.jump_clock(target, secs)
            return f"clock of replica {target} +{secs:.1f}s", lambda: None
        if kind == "clock_backward":
            target = self._pick(rng.random() < 0.5)
            secs = rng.uniform(1, 4)
            c.jump_clock(target, -secs)
            return f"clock of replica {target} -{secs:.1f}s", lambda: None
        raise ValueError(f"unknown fault kind {kind!r}")

    def _expect_tail_cut(self, target: int) -> None:
        """After restarting a replica with a torn tail, its log must say it zeroed it."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.c.log_text(target)
            start = text.rfind("=== harness: start")
            tail = text[start:]
            if "torn tail" in tail or "torn header" in tail:
                return
            if not self.c.replicas[target].running():
                self.problems.append(f"replica {target} did not restart after a torn tail: "
                                     + tail.strip().splitlines()[-1][:300])
                return
            time.sleep(0.1)
        self.problems.append(f"replica {target} restarted without reporting the torn tail cut")

    # -- the event loop

    def run_event(self, event: Event, stop=None) -> None:
        self.rng.seed(event.seed)
        heals = []
        # Process faults go last, half-way through the hold: a crash then strikes a
        # cluster already partitioned, delayed or on a slow disk.
        kinds = sorted(event.kinds, key=lambda k: FAMILY_OF[k] == "process")
        try:
            for n, kind in enumerate(kinds):
                if n:
                    self._hold(event.hold / 2, stop)
                try:
                    desc, heal = self.apply(kind)
                except ClusterError as exc:
                    self.log.append(f"{kind}: could not apply: {exc}")
                    continue
                self.counts[kind] += 1
                heals.append(heal)
                self.log.append(f"{kind}: {desc}")
            self._hold(event.hold / 2 if len(kinds) > 1 else event.hold, stop)
        finally:
            for heal in reversed(heals):
                heal()
        self._hold(event.quiet, stop)

    def _hold(self, seconds: float, stop=None) -> None:
        # The schedule's own clock: a fault is held this long (not a wait for a state).
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if stop is not None and stop():
                return
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))

    def heal_all(self) -> None:
        """Undo everything that may be in force: partitions, proxy faults, paused and
        stopped replicas."""
        c = self.c
        if c.bed.firewall:
            c.bed.heal()
        if c.proxies:
            c.proxy_clear()
        for i, r in c.replicas.items():
            if r.paused:
                c.resume(i)
            if not r.running():
                c.start(i)
