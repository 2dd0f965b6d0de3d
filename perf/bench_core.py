"""Core throughput: commands committed and applied through three in-process cores.

No sockets, no disk: messages are handed from core to core and every record counts
as durable at once, so this measures the Cython core and the key-value apply loop.
One benchmark per batch size (commands per slot); pyperf's loop count counts commands,
so each value is the time per command for all three replicas together.

    python perf/bench_core.py -o core.json        # add --fast for a quick look
    python -m pyperf compare_to old.json core.json
"""
import struct
import time

import pyperf

from cypaxos.core import Config, Replica
from cypaxos.statemachine import KVStore

VALUE_SIZE = 64
KEYS = 10_000
BATCH_SIZES = (1, 64, 1024)


def make_payload(batch_size, offset):
    """The payload of a client batch of `batch_size` puts with 64-byte values."""
    parts = []
    for i in range(batch_size):
        key = b"key-%08d" % ((offset + i) % KEYS)
        cmd = b"P" + struct.pack("<I", len(key)) + key + bytes(VALUE_SIZE)
        parts.append(struct.pack("<I", len(cmd)) + cmd)
    return b"".join(parts)


class InProcessCluster:
    """Three cores wired together with instant delivery and instant durability."""

    def __init__(self, batch_size):
        ids = (1, 2, 3)
        # A slot per client batch: cut by bytes at the batch size.
        config = Config(window_slots=64, batch_bytes_max=1)
        self.cores = {i: Replica(i, ids, KVStore(), config, seed=i) for i in ids}
        self.batch_size = batch_size
        self.payloads = [make_payload(batch_size, k * batch_size) for k in range(16)]
        self.seq = 1
        self.leader = self.elect()
        self.session = self.register()

    def pump(self, on_result=None):
        """Deliver everything until no core has anything left to do."""
        cores = self.cores
        busy = True
        while busy:
            busy = False
            for core in cores.values():
                rd = core.ready()
                if rd is None:
                    continue
                busy = True
                core.persisted(rd.persist_id)
                if on_result is not None:
                    for result in rd.results:
                        on_result(*result)
                for to, msg in rd.messages:
                    cores[to].step(msg)
                for to, msg in rd.messages_after_persist:
                    cores[to].step(msg)

    def register(self):
        """Register the benchmark's client session at the leader; its id."""
        self.leader.propose(struct.pack("<QQQIII", 0, 1, 0, 1, 4, 0))   # session 0, nonce 1
        registered = []
        while not registered:
            self.pump(on_result=lambda sid, first, packed: registered.append(packed)
                      if (sid, first) == (0, 1) else None)
            self.leader.tick()
        return int.from_bytes(registered[0][5:13], "little")

    def elect(self):
        while True:
            for core in self.cores.values():
                core.tick()
            self.pump()
            for core in self.cores.values():
                if core.role == "leader":
                    return core

    def run(self, commands):
        """Commit and apply `commands` puts on all three replicas; return seconds taken."""
        leader = self.leader
        batches = max(1, commands // self.batch_size)
        header = struct.Struct("<QQQII")
        started = time.perf_counter()
        for k in range(batches):
            payload = self.payloads[k % len(self.payloads)]
            leader.propose(header.pack(self.session, self.seq, self.seq - 1, self.batch_size, len(payload))
                           + payload)
            self.seq += self.batch_size
            if k % 64 == 63:
                self.pump()
        self.pump()
        # Followers learn the last commit index from the next heartbeat.
        for _ in range(2):
            leader.tick()
            self.pump()
        elapsed = time.perf_counter() - started
        target = leader.commit_index
        for core in self.cores.values():
            assert core.applied_index == target, "a replica did not apply everything"
            core.compact(core.applied_index)
        return elapsed * commands / (batches * self.batch_size)


def main():
    runner = pyperf.Runner()
    runner.metadata["description"] = __doc__.splitlines()[0]
    for batch_size in BATCH_SIZES:
        cluster = InProcessCluster(batch_size)
        runner.bench_time_func(f"core_batch{batch_size}", cluster.run, inner_loops=1)


if __name__ == "__main__":
    main()
