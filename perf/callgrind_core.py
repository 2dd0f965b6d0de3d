"""Instructions per operation on a follower's ACCEPT path and apply path (callgrind).

Instruction counts, unlike times, do not depend on what else the machine is doing, so
two builds can be compared on a busy machine.  A follower core is fed what a leader
sends: the registration of a client session, then N ACCEPTs of one slot each (a client
batch of `--commands` puts with 64-byte values), each followed by ready() and
persisted() as the shell does; in the `apply`
workload a heartbeat then commits all N slots, which applies them.  Each workload runs
under `valgrind --tool=callgrind` at N and 2N slots, and so does `none`, which only
builds the same messages: `accept` minus `none` is the ACCEPT path, `apply` minus
`accept` the apply path, and the difference between N and 2N divided by N is the cost
of one slot without the interpreter's start-up.

    python perf/callgrind_core.py                  # both paths, 64 puts per slot
    python perf/callgrind_core.py --commands 1     # per-message overhead
    python perf/callgrind_core.py --run accept 1000   # one workload, no valgrind
"""
import argparse
import os
import re
import struct
import subprocess
import sys

from cypaxos.core import Config, Replica, make_ballot
from cypaxos.statemachine import KVStore

ACCEPT = 4
HEARTBEAT = 6
VALUE_SIZE = 64
KEYS = 10_000
_HEADER = struct.Struct("<QQQII")


def slot_values(session, slots, commands):
    """One client batch of `commands` puts per slot (consecutive seqs of `session`)."""
    values = []
    seq = 1
    for k in range(slots):
        parts = []
        for i in range(commands):
            key = b"key-%08d" % ((k * commands + i) % KEYS)
            cmd = b"P" + struct.pack("<I", len(key)) + key + bytes(VALUE_SIZE)
            parts.append(struct.pack("<I", len(cmd)) + cmd)
        payload = b"".join(parts)
        values.append(_HEADER.pack(session, seq, seq - 1, commands, len(payload)) + payload)
        seq += commands
    return values


def run(workload, slots, commands):
    """Feed a follower `slots` ACCEPTs (and, for `apply`, the commit of all of them)."""
    follower = Replica(2, (1, 2, 3), KVStore(), Config())
    ballot = make_ballot(1, 1)
    # Slot 1 registers the client's session (session 0, nonce 1, one empty command).
    follower.step((ACCEPT, 1, ballot, 1, [_HEADER.pack(0, 1, 0, 1, 4) + bytes(4)], 0))
    follower.persisted(follower.ready().persist_id)
    follower.step((HEARTBEAT, 1, ballot, 1, 1))
    (_, _, packed), = follower.ready().results
    session = int.from_bytes(packed[5:13], "little")
    messages = [(ACCEPT, 1, ballot, k + 2, [value], 1)
                for k, value in enumerate(slot_values(session, slots, commands))]
    if workload == "none":
        return
    for msg in messages:
        follower.step(msg)
        rd = follower.ready()
        follower.persisted(rd.persist_id)
    if workload == "apply":
        follower.step((HEARTBEAT, 1, ballot, slots + 1, 2))
        rd = follower.ready()
        assert follower.applied_index == slots + 1, follower.applied_index
        assert rd.results[-1][2][0] == 0, "not applied"   # (one check: not per slot)


def instructions(workload, slots, commands):
    """Total instructions callgrind counts for one run of the workload."""
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, os.path.abspath(__file__), "--run", workload, str(slots),
         "--commands", str(commands)],
        capture_output=True, text=True, check=True,
        # The store's hash seed comes from Python's: fix it, or probe counts vary.
        env=dict(os.environ, PYTHONHASHSEED="0"))
    match = re.search(r"Collected\s*:\s*(\d+)", out.stderr)
    if not match:
        raise SystemExit(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
    return int(match.group(1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs=2, metavar=("WORKLOAD", "SLOTS"),
                        help="run one workload (none, accept or apply) without valgrind")
    parser.add_argument("--slots", type=int, default=2000, help="N (default 2000)")
    parser.add_argument("--commands", type=int, default=64, help="puts per slot (default 64)")
    args = parser.parse_args(argv)
    if args.run:
        run(args.run[0], int(args.run[1]), args.commands)
        return 0
    n = args.slots
    counts = {(w, s): instructions(w, s, args.commands)
              for w in ("none", "accept", "apply") for s in (n, 2 * n)}

    def per_slot(workload, baseline):
        return ((counts[workload, 2 * n] - counts[baseline, 2 * n])
                - (counts[workload, n] - counts[baseline, n])) / n

    accept = per_slot("accept", "none")
    apply_ = per_slot("apply", "accept")
    print(f"{args.commands} puts per slot, N={n}")
    print(f"accept path: {accept:12,.0f} instructions per slot "
          f"({accept / args.commands:,.0f} per command)")
    print(f"apply path:  {apply_:12,.0f} instructions per slot "
          f"({apply_ / args.commands:,.0f} per command)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
