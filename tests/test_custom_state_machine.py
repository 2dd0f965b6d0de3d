"""A custom state machine (docs/examples/ledger.py) on a real 3-replica cluster.

First the ledger alone (determinism, snapshot/restore, a refused command changes
nothing, the core's wrapper turns a raise into status 1), then a cluster of real
`cypaxos serve --state-machine ledger:Ledger` processes (TCP on loopback, fsync
always): deposits and transfers via `submit`, a refused transfer raising CommandError
without changing any balance, linearizable queries, the leader SIGKILLed in the middle
of concurrent transfers, the killed replica restarted and catching up, equal
`state_digest` everywhere, a snapshot followed by a SIGKILL of every replica and a
restart that keeps every balance, and a replica whose data dir was deleted getting the
ledger back by snapshot transfer.

Nothing sleeps to wait for a condition: waits poll with a deadline.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import sys

import pytest
import trio

from cypaxos.client import open_client
from cypaxos.errors import CommandError, RequestError
from cypaxos.statemachine import PyStateMachine
from clusterwait import wait_converged, wait_ready

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "docs", "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import ledger  # noqa: E402  (docs/examples/ledger.py)

SPEC = "ledger:Ledger"


# ------------------------------------------------------------- the ledger alone


def random_commands(seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    names = ["a", "b", "c", "d"]
    out = [ledger.open_account(x) for x in names]
    for _ in range(n):
        kind = rng.random()
        x, y = rng.sample(names + ["nobody"], 2)
        if kind < 0.3:
            out.append(ledger.deposit(x, rng.randint(1, 100)))
        elif kind < 0.5:
            out.append(ledger.withdraw(x, rng.randint(1, 100)))
        elif kind < 0.95:
            out.append(ledger.transfer(x, y, rng.randint(1, 150)))
        else:
            out.append(rng.choice([b"garbage", b"[]", ledger.open_account(x),
                                   ledger.deposit(x, 0), ledger.deposit(x, 1.5)]))
    return out


def test_ledger_is_deterministic_and_snapshots_round_trip():
    cmds = random_commands(7, 2000)
    one, two = PyStateMachine(ledger.Ledger()), PyStateMachine(ledger.Ledger())
    results_one = [one.apply(c) for c in cmds]
    # The second replica restarts from a snapshot half-way.
    results_two = [two.apply(c) for c in cmds[:1000]]
    restored = PyStateMachine(ledger.Ledger())
    restored.restore(two.snapshot())
    assert restored.state_digest() == two.state_digest()
    results_two += [restored.apply(c) for c in cmds[1000:]]
    assert results_one == results_two
    assert one.snapshot() == restored.snapshot()
    assert one.state_digest() == restored.state_digest()
    assert {status for status, _ in results_one} == {0, 1}  # both kinds happened
    # Money is only created by deposits and destroyed by withdrawals.
    state = ledger.decode(one.query(ledger.total()))
    assert state["total"] == sum(ledger.decode(one.query(ledger.balances())).values())
    assert state["transactions"] == sum(1 for status, _ in results_one if status == 0)


def test_refused_command_changes_nothing_and_is_status_1():
    sm = PyStateMachine(ledger.Ledger())
    for cmd in (ledger.open_account("alice"), ledger.deposit("alice", 50),
                ledger.open_account("bob")):
        assert sm.apply(cmd)[0] == 0
    before = sm.snapshot()
    for cmd, error in [
        (ledger.transfer("alice", "bob", 51), b"InsufficientFunds: alice has 50, needs 51"),
        (ledger.transfer("alice", "carol", 1), b"UnknownAccount: no account 'carol'"),
        (ledger.transfer("alice", "alice", 1), b"BadCommand: a transfer needs two different accounts"),
        (ledger.withdraw("bob", 1), b"InsufficientFunds: bob has 0, needs 1"),
        (ledger.deposit("bob", -5), b"BadCommand: bad amount -5 (an integer in 1..1000000000000000)"),
        (ledger.deposit("bob", True), b"BadCommand: bad amount True (an integer in 1..1000000000000000)"),
        (ledger.open_account("alice"), b"AccountExists: account 'alice' already exists"),
        (b"\xff\xfe", b"BadCommand: not a JSON ledger command"),
        (b'["launch"]', b"BadCommand: unknown command 'launch'"),
    ]:
        assert sm.apply(cmd) == (1, error)
        assert sm.snapshot() == before
    assert ledger.decode(sm.apply(ledger.transfer("alice", "bob", 50))[1]) == {"alice": 0, "bob": 50}
    with pytest.raises(ledger.UnknownAccount):
        sm.query(ledger.balance("carol"))
    with pytest.raises(ValueError):
        ledger.Ledger().restore(b'{"format": 2, "accounts": {}, "transactions": 0}')


# ------------------------------------------------------------- a real cluster


@pytest.fixture
def ledger_cluster(new_cluster, monkeypatch):
    # The replicas import the example from docs/examples (LocalCluster puts the
    # cypaxos package in front of whatever PYTHONPATH says).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (EXAMPLES, os.environ.get("PYTHONPATH")) if p))
    cluster = new_cluster(extra_args=("--state-machine", SPEC))
    cluster.start_all()
    return cluster


class Pair:
    """One task's two accounts and its prediction of every outcome.

    A task moves money back and forth between its own two accounts only, one
    transfer at a time, so it knows exactly which transfers must succeed (and the
    balances they return) and which must be refused -- whatever happens to the
    replicas meanwhile.  A transfer applied twice, lost, or reordered shows up as a
    wrong result or balance.
    """

    def __init__(self, index: int, start: int) -> None:
        self.a, self.b = f"p{index}a", f"p{index}b"
        self.balance = {self.a: start, self.b: 0}
        self.rng = random.Random(index)
        self.done = 0
        self.refused = 0

    async def run(self, kv, count: int, progress) -> None:
        for i in range(count):
            source, target = (self.a, self.b) if i % 2 == 0 else (self.b, self.a)
            amount = self.rng.randint(1, 150)
            command = ledger.transfer(source, target, amount)
            if self.balance[source] >= amount:
                result = ledger.decode(await kv.submit(command))
                self.balance[source] -= amount
                self.balance[target] += amount
                assert result == {source: self.balance[source], target: self.balance[target]}
            else:
                with pytest.raises(CommandError) as info:
                    await kv.submit(command)
                assert str(info.value) == (f"InsufficientFunds: {source} has "
                                           f"{self.balance[source]}, needs {amount}")
                self.refused += 1
            self.done += 1
            progress()


@pytest.mark.slow
async def test_ledger_on_a_three_replica_cluster(ledger_cluster):
    cluster = ledger_cluster
    leader = await wait_ready(cluster)
    pairs = [Pair(i, start=100) for i in range(16)]
    async with open_client(cluster.cluster_arg, timeout=30) as kv:
        # Accounts and deposits.
        assert ledger.decode(await kv.submit(ledger.open_account("bank"))) == {"bank": 0}
        assert ledger.decode(await kv.submit(ledger.deposit("bank", 1000))) == {"bank": 1000}
        for p in pairs:
            await kv.submit(ledger.open_account(p.a))
            await kv.submit(ledger.open_account(p.b))
            assert ledger.decode(await kv.submit(ledger.deposit(p.a, 100))) == {p.a: 100}
        await kv.submit(ledger.open_account("alice"))
        assert ledger.decode(await kv.submit(ledger.transfer("bank", "alice", 250))) == \
            {"bank": 750, "alice": 250}
        # A linearizable query sees every acknowledged command.
        assert ledger.decode(await kv.query(ledger.balance("alice"))) == 250

        # A refused transfer: CommandError, on every replica alike, nothing changes.
        before = await kv.query(ledger.balances())
        totals = ledger.decode(await kv.query(ledger.total()))
        with pytest.raises(CommandError) as info:
            await kv.submit(ledger.transfer("alice", "bank", 251))
        assert str(info.value) == "InsufficientFunds: alice has 250, needs 251"
        assert info.value.maybe_applied  # applied, as a failed command
        with pytest.raises(CommandError, match="UnknownAccount"):
            await kv.submit(ledger.deposit("mallory", 5))
        assert await kv.query(ledger.balances()) == before
        assert ledger.decode(await kv.query(ledger.total())) == totals
        # A query that raises fails alone, as a refused request (nothing to apply).
        with pytest.raises(RequestError, match="no account 'mallory'") as info:
            await kv.query(ledger.balance("mallory"))
        assert not info.value.maybe_applied
        st = await wait_converged(cluster)
        assert len({s["state_digest"] for s in st.values()}) == 1

        # Concurrent transfers; the leader is SIGKILLed once a third of them are done.
        per_pair = 60
        total = per_pair * len(pairs)
        third = trio.Event()

        def progress():
            if sum(p.done for p in pairs) >= total // 3:
                third.set()

        async def killer():
            await third.wait()
            cluster.kill(leader)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer)
            for p in pairs:
                nursery.start_soon(p.run, kv, per_pair, progress)
        assert sum(p.done for p in pairs) == total
        assert sum(p.refused for p in pairs) > 0  # the schedule does refuse some
        survivors = [i for i in cluster.ids if i != leader]
        new_leader = await trio.to_thread.run_sync(
            lambda: cluster.wait_ready(timeout=30, replicas=survivors))
        assert new_leader != leader

        expected = {"bank": 750, "alice": 250}
        for p in pairs:
            expected.update(p.balance)
        assert ledger.decode(await kv.query(ledger.balances())) == expected
        assert ledger.decode(await kv.query(ledger.total()))["total"] == 1000 + 100 * len(pairs)

        # The killed replica restarts from its disk and catches up.
        cluster.start(leader)
        st = await wait_converged(cluster)
        assert st[leader]["applied_index"] == st[new_leader]["applied_index"]

        # A snapshot everywhere, a few more commands (a log tail after it), then a
        # SIGKILL of every replica: the restart must keep every balance.
        answers = await kv.snapshot()
        assert all(a["reachable"] and "error" not in a for a in answers), answers
        snapshot_index = {a["id"]: a["applied_index"] for a in answers}
        assert ledger.decode(await kv.submit(ledger.transfer("alice", "bank", 50))) == \
            {"alice": 200, "bank": 800}
        with pytest.raises(CommandError, match="InsufficientFunds"):
            await kv.submit(ledger.withdraw("alice", 201))
        expected.update(alice=200, bank=800)
        st = await wait_converged(cluster)
        digest = st[1]["state_digest"]
        assert all(st[i]["snapshot_index"] == snapshot_index[i] for i in cluster.ids)

    for i in cluster.ids:
        os.kill(cluster.process(i).pid, signal.SIGKILL)
    for i in cluster.ids:
        cluster.kill(i)  # reap
    cluster.start_all()
    await wait_ready(cluster)
    st = await wait_converged(cluster)
    assert {s["state_digest"] for s in st.values()} == {digest}
    for i in cluster.ids:
        assert st[i]["snapshot_index"] >= snapshot_index[i]  # recovered from it
    async with open_client(cluster.cluster_arg, timeout=30) as kv:
        assert ledger.decode(await kv.query(ledger.balances())) == expected
        # Still a working ledger.
        assert ledger.decode(await kv.submit(ledger.deposit("alice", 1))) == {"alice": 201}
    expected["alice"] = 201

    # A replica that lost its data dir gets the ledger back by snapshot transfer
    # (every replica's log now starts after its snapshot: there is no log to send).
    leader = await wait_ready(cluster)
    victim = next(i for i in cluster.ids if i != leader)
    st = await trio.to_thread.run_sync(lambda: cluster.statuses(timeout=5.0))
    assert all(st[i]["log_start"] > 1 for i in cluster.ids if i != victim), st
    cluster.kill(victim)
    shutil.rmtree(cluster.replica_data_dir(victim))
    cluster.start(victim)
    st = await wait_converged(cluster)
    assert st[victim]["statistics"]["snapshots_installed"] == 1
    with open(cluster.log_path(victim), "rb") as f:
        assert b"installed snapshot at slot" in f.read()
    async with open_client([cluster.address(victim)], timeout=30) as kv:
        assert ledger.decode(await kv.query(ledger.balances(), stale=True)) == expected
    assert not cluster.unexpected_exits()
