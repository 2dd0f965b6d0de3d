"""What the simulator's clients run: the key-value workload (checked for
linearizability) and a user state machine's commands (`cypaxos.testing.simulate`).

A workload gives each client its next operations (`next_ops`), hears their outcomes
(`on_result`, `on_read`, and `on_failure` for a call that failed or timed out, with
the client's word on whether it may have been applied), makes the replicas' state
machines and checks what it saw at the end (`check`).
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable

from cypaxos.commands import (
    decode_bool, decode_get, encode_cas, encode_delete, encode_get, encode_put,
)
from cypaxos.protocol import RESULT_OK
from cypaxos.statemachine import KVStore, PyStateMachine
from cypaxos.testing.linearizability import History, check

if TYPE_CHECKING:  # pragma: no cover
    from cypaxos.testing.sim import Client, Simulation

__all__ = ["KVWorkload", "CommandWorkload", "WorkloadError"]


class WorkloadError(AssertionError):
    """What the clients saw is wrong (the simulation reports it with its seed)."""


class KVWorkload:
    """Puts, gets, compare-and-sets and deletes on a few keys, checked for
    linearizability (the default workload)."""

    def __init__(self, keys: int = 4) -> None:
        self.keys = [b"k%d" % i for i in range(keys)]
        self.history = History()
        self.written: dict = {k: [] for k in self.keys}

    @staticmethod
    def new_state_machine():
        return KVStore()

    def next_ops(self, sim: "Simulation", client: "Client", may_read: bool):
        """("read", token, query) or ("batch", [(token, kind, command), ...])."""
        rng = sim.rng
        key = rng.choice(self.keys)
        if may_read and rng.random() < client.read_ratio:
            token = self.history.invoke(client.cid, "get", key, None, sim.now)
            return ("read", token, encode_get(key))
        ops = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            r = rng.random()
            value = b"v%d" % sim.new_id()
            if r < 0.55:
                token = self.history.invoke(client.cid, "put", key, value, sim.now)
                self.written[key].append(value)
                ops.append((token, "put", encode_put(key, value)))
            elif r < 0.85:
                expected = rng.choice([None] + self.written[key][-3:])
                token = self.history.invoke(client.cid, "cas", key, (expected, value), sim.now)
                self.written[key].append(value)
                ops.append((token, "cas", encode_cas(key, expected, value)))
            else:
                token = self.history.invoke(client.cid, "delete", key, None, sim.now)
                ops.append((token, "delete", encode_delete(key)))
            key = rng.choice(self.keys)
        return ("batch", ops)

    def on_result(self, sim: "Simulation", token, kind: str, status: int, data: bytes) -> None:
        if status != RESULT_OK:
            raise WorkloadError(f"a {kind} failed: {data!r}")
        self.history.complete(token, "ok", None if kind == "put" else decode_bool(data), sim.now)

    def on_read(self, sim: "Simulation", token, data: bytes) -> None:
        self.history.complete(token, "ok", decode_get(data), sim.now)

    def on_failure(self, sim: "Simulation", token, kind: str, maybe_applied: bool) -> None:
        # "fail" is a promise the checker holds the client to: no effect, ever.
        self.history.complete(token, "unknown" if maybe_applied else "fail", None, sim.now)

    def completed(self) -> tuple[int, int]:
        ops = self.history.ops()
        return (sum(1 for o in ops if o.outcome == "ok"),
                sum(1 for o in ops if o.outcome == "unknown"))

    def check(self, sim: "Simulation") -> None:
        result = check(self.history.ops())
        if not result.ok:
            raise WorkloadError(f"not linearizable: {result.message}")


class CommandWorkload:
    """Commands of a user's state machine (`command(rng) -> bytes`); their results are
    not checked against a model, only that every command completes exactly once."""

    def __init__(self, state_machine_class, command: Callable[[random.Random], bytes]) -> None:
        self.factory = lambda: PyStateMachine(state_machine_class())
        self.command = command
        self.done = 0
        self.pending = 0
        self.unknown = 0   # failed calls that may have been applied

    def new_state_machine(self):
        return self.factory()

    def next_ops(self, sim: "Simulation", client: "Client", may_read: bool):
        ops = []
        for _ in range(sim.rng.choice((1, 1, 2, 3))):
            self.pending += 1
            ops.append((None, "command", bytes(self.command(sim.rng))))
        return ("batch", ops)

    def on_result(self, sim, token, kind: str, status: int, data: bytes) -> None:
        # A command that raised is a result too (status 1), the same on every replica.
        self.done += 1
        self.pending -= 1

    def on_read(self, sim, token, data: bytes) -> None:  # pragma: no cover - no reads
        pass

    def on_failure(self, sim, token, kind: str, maybe_applied: bool) -> None:
        self.pending -= 1
        self.unknown += maybe_applied

    def completed(self) -> tuple[int, int]:
        return self.done, self.unknown

    def check(self, sim: "Simulation") -> None:
        pass
