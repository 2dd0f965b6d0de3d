"""The built-in store alone: bulk single-key writes and reads applied to one KVStore.

No core, no network: a batch of 1024 commands goes through `KVStore.apply_commands`
(`apply_packed`: as the core hands it a client batch, with no Python work per
command), so this measures what a write costs in the store itself (hash table,
ordered index, revisions, change history).  pyperf's loop
count counts commands, so each value is the time per command.

    python perf/bench_store.py -o store.json            # add --fast for a quick look
    python -m pyperf compare_to old.json store.json

Instruction counts (repeatable on a busy machine, unlike times) of one scenario, only
inside the store's batch apply:

    valgrind --tool=callgrind --toggle-collect='*KVStore_apply_commands*' \\
        python perf/bench_store.py --once create [COMMANDS]
    callgrind_annotate callgrind.out.<pid> | head

The count includes the pre-fill of KEYS puts: `--once create 0` measures that alone,
to subtract (COMMANDS defaults to 102400).

`apply_packed` came with the revisioned store: to compare with a build before it,
compare instruction counts (the toggle above measures the same function in both).

Scenarios: `create` (puts of keys the store does not hold yet, into a store of
KEYS keys), `update` (puts of keys it holds, in random order), `delete_create` (a
delete and a put of a new key, so the key count stays the same), `get` (queries).
"""
import random
import struct
import sys

KEYS = 100_000
BATCH = 1024
VALUE_SIZE = 64
_U32 = struct.Struct("<I")


def _key(i):
    return b"key-%08d" % i


def _put(key, value):
    return b"P" + _U32.pack(len(key)) + key + value


def _payload(commands):
    """A client batch's payload: u32 len | command, each."""
    return b"".join(_U32.pack(len(c)) + c for c in commands)


def _filled_store():
    from cypaxos.statemachine import KVStore
    store = KVStore()
    value = bytes(VALUE_SIZE)
    order = list(range(KEYS))
    random.Random(1).shuffle(order)
    for at in range(0, KEYS, BATCH):
        batch = [_put(_key(i), value) for i in order[at:at + BATCH]]
        store.apply_packed(_payload(batch), len(batch))
    return store


def _batch(commands):
    return _payload(commands), len(commands)


class Scenario:
    """One store, pre-filled with KEYS keys, and the batches a scenario applies."""

    def __init__(self, name):
        self.name = name
        self.store = _filled_store()
        self.next_key = KEYS
        rnd = random.Random(2)
        value = b"v" * VALUE_SIZE
        if name == "update":
            self.batches = [_batch([_put(_key(rnd.randrange(KEYS)), value)
                                    for _ in range(BATCH)]) for _ in range(32)]
        elif name == "get":
            self.queries = [b"G" + _key(rnd.randrange(KEYS)) for _ in range(BATCH)]
        elif name not in ("create", "delete_create"):
            raise SystemExit(f"unknown scenario {name!r}")

    def batch(self, k):
        """The k-th batch: (payload, count); new keys are made fresh every time."""
        if self.name == "update":
            return self.batches[k % len(self.batches)]
        value = b"n" * VALUE_SIZE
        first = self.next_key
        self.next_key += BATCH
        if self.name == "create":
            return _batch([_put(_key(i), value) for i in range(first, first + BATCH)])
        # Delete keys in the order they were created, and create as many.
        out = []
        for i in range(first, first + BATCH):
            out.append(b"D" + _key(i - KEYS))
            out.append(_put(_key(i), value))
        return _batch(out)

    def run(self, loops):
        """Apply about `loops` commands; return seconds taken (building batches excluded)."""
        import time
        elapsed = 0.0
        done = 0
        k = 0
        store = self.store
        while done < loops:
            if self.name == "get":
                started = time.perf_counter()
                for q in self.queries:
                    store.query(q)
                elapsed += time.perf_counter() - started
                done += BATCH
                continue
            payload, count = self.batch(k)
            k += 1
            started = time.perf_counter()
            store.apply_packed(payload, count)
            elapsed += time.perf_counter() - started
            done += count
        return elapsed * loops / done


def once(name, commands=100 * BATCH):
    """Run one scenario for `commands` commands (for valgrind)."""
    scenario = Scenario(name)
    scenario.run(commands)


def main():
    import pyperf
    runner = pyperf.Runner()
    runner.metadata["description"] = __doc__.splitlines()[0]
    for name in ("create", "update", "delete_create", "get"):
        scenario = Scenario(name)
        runner.bench_time_func(f"store_{name}", lambda loops, s=scenario: s.run(loops))


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "--once":
        # An optional count of commands: 0 measures the pre-fill alone, to subtract.
        once(sys.argv[2], *map(int, sys.argv[3:]))
    else:
        main()
