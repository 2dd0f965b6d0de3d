"""A data-driven transcript driver for replica nodes (the core and the rules around it).

(One module of about 1,000 lines: a script interpreter, its fakes and its formatting
of every message and record, which read best side by side with the command list
below.)

In the style of etcd-io/raft's interaction tests: a small interpreter runs a cluster
of N production `cypaxos.replica.node.ReplicaNode`s (cores with
`Config(check_invariants=True)` and a `KVStore`) over a fake disk and network, where
*nothing happens unless a command says so*.  The node decides what to do with each
output of its core; the driver only shows it:

* `ready()` is only called by `process` (or `stabilize`), and the Ready is handed to
  the node (`handle_ready`).  Its records go to the replica's *unsynced* disk, its
  `messages` into the network, its `messages_after_persist` are *held* by the node
  until the disk is synced; client results go to the clients that asked here;
* `persist` ends the sync the node started: the unsynced records become durable, the
  node releases the held messages into the network and tells the core
  `persisted(persist_id)`;
* messages sit in one in-flight queue (in send order) until `deliver` (or
  `stabilize`) hands them to their receiver node, or drops them;
* snapshot file operations (writing a snapshot, reading one to send, the chunks of
  an incoming transfer) wait until `complete` (or `stabilize`) ends them.

Script format (see tests/testdata/*.txt): one command per line, then a line `----`,
then the output the command is expected to print, ended by a blank line.  Lines
starting with `#` (and blank lines) between commands are comments.  A command with
no `----` section gets one when the script is rewritten (`run_script`, or
`python tests/transcript.py SCRIPT` to print the transcript).  A command that
prints nothing prints `ok`; a mistake in a script prints `script error: ...`.

Clients (`client=c1`, the default, up to `c20`) have registered sessions from the
start: every replica first boots from a snapshot of slot 0 whose session table holds
them, so scripts need no registration round.

Only `process` (and `stabilize`) call ready(), so `tick`, `deliver`, `propose` and
`read` show nothing but the role and commit changes they cause; their messages
appear at the next `process`.  A Ready whose `messages_after_persist` come with
nothing left to persist releases them at once ("send (nothing to persist)").
Client results are printed at the replica the batch was proposed to (a batch resent
there is answered once: the node keeps one waiter per batch); other replicas just
list what they applied.

Commands (replica ids are 1..N; `IDS` is an id, a comma list `1,2` or `all`):

  cluster N [seed=7] [lease=0] [drift=0] [election=10] [heartbeat=2] [window=64]
            [resend=4] [check_quorum=true] [pre_vote=false] [accept_ahead=65536]
            [batch_bytes=1048576] [message_bytes=4194304]
            [retain=64] [chunk=1048576] [chunk_ticks=200] [chunk_tries=10]
                              start N fresh replicas (ids 1..N); options set the
                              Config fields (batch_bytes=1: one batch per slot) and
                              the node's (retain_slots, chunk_bytes, chunk_ack_ticks,
                              chunk_tries)
  tick IDS [n]                tick each replica n times (default 1)
  campaign ID                 tick ID until it becomes a candidate
  tick-heartbeat ID           tick leader ID until it sends heartbeats; each tick's
                              Ready is processed (as `process` would)
  process IDS                 call ready() and route its outputs (printed)
  persist IDS                 sync the disk, release held messages, persisted()
  deliver [from=I] [to=I] [type=T[,T]] [n=K] [drop] [dup] [keep]
                              step every matching in-flight message (at most K) in
                              send order; `drop` discards them instead, `dup` steps
                              each twice, `keep` leaves a copy in flight (a late
                              duplicate)
  drop ...                    the same as `deliver ... drop`
  stabilize                   repeat {process+persist every live replica; deliver
                              everything in flight} until nothing moves
  propose ID OP [; OP ...] [client=c1] [seq=N] [acked=N]
                              one client batch, OP one of `put K V`, `delete K`,
                              `cas K OLD NEW` (OLD `nil` = only if absent); seq
                              defaults to the client's next one, acked to the highest
                              seq the client has every result up to
  resend ID [client=c1]       propose the client's last batch again, byte for byte
  read ID RID [KEY]           register linearizable read RID (a get of KEY) at ID
  snapshot ID                 the node takes a snapshot (restating the log; its file
                              is written at `complete`); once the file and the
                              restatement are durable the node compacts (printed)
  install ID FROM             FROM's newest snapshot file reaches ID as one whole
                              chunk (as if transferred: its file operations follow)
  complete IDS [n=K]          end the replica's pending file operations (at most K),
                              in the order they were started (operations they start
                              wait for the next `complete`)
  corrupt [from=I] [to=I] [n=K]
                              flip a byte in matching in-flight SNAPSHOT_CHUNKs
  crash ID                    the replica dies: unsynced records, held messages and
                              pending file operations are lost (messages already in
                              flight stay in flight)
  restart ID                  a fresh node recovers from its snapshot file and the
                              durable records
  partition A.. | B.. [| ..]  only replicas in the same group can talk (messages
                              across groups are dropped at delivery)
  heal                        remove the partition
  status                      role, ballot, commit, applied, digest per replica
  log ID [FROM [TO]]          the replica's log entries
  stats ID [name ...]         selected statistics() counters

Notation: ballots print as `round.id` (`chosen` for CHOSEN_BALLOT); a slot value is
`noop` or client batches `c1#3{put k=v; del k}` joined by `+`; `1->2 ACCEPT ...` is a
message from 1 to 2.  After every command the driver prints role changes and commit
advances it observes (`  -> 2 is leader at b=2.2`), and checks that no slot is ever
chosen with two different values (a violation prints `SAFETY VIOLATION`).
"""
from __future__ import annotations

import struct

from cypaxos import wire
from cypaxos.ballots import format_ballot
from cypaxos.core import Config, Replica
from cypaxos.protocol import MESSAGE_NAMES, RECORD_NAMES, RESULT_ERROR, RESULT_NAMES, RESULT_OK
from cypaxos.replica.node import NodeOptions, ReplicaNode
from cypaxos.statemachine import KVStore
from cypaxos.storage import snapshots

MESSAGE_TYPES = {name: kind for kind, name in MESSAGE_NAMES.items()}
RESULT_STATUS = {status: name.lower().replace("_", "-") for status, name in RESULT_NAMES.items()}
MAX_VALUES_SHOWN = 8
CLIENTS_MAX = 20
FIRST_SESSION = 101  # client k (c1, c2, ...) has session FIRST_SESSION + k - 1


def genesis() -> tuple:
    """The snapshot every replica boots from before its first records: slot 0, with the
    clients' sessions registered (session 0's entry holds the next id to hand out)."""
    sessions = [[0, FIRST_SESSION + CLIENTS_MAX, []]]
    sessions += [[FIRST_SESSION + k, 1, []] for k in range(CLIENTS_MAX)]
    return (0, 0, sessions, KVStore().snapshot())


class ScriptError(Exception):
    """A command the driver cannot carry out (a mistake in the script)."""


# --------------------------------------------------------------------- encoding

def encode_command(op: str, args: list[str]) -> bytes:
    """One key-value command (docs/internals.md, "Key-value commands")."""
    def need(n):
        if len(args) != n:
            raise ScriptError(f"{op} takes {n} arguments, got {args}")
    if op == "put":
        need(2)
        k, v = args[0].encode(), args[1].encode()
        return b"P" + struct.pack("<I", len(k)) + k + v
    if op in ("delete", "del"):
        need(1)
        return b"D" + args[0].encode()
    if op == "cas":
        need(3)
        k, old, new = args[0].encode(), args[1], args[2].encode()
        if old == "nil":
            expected = b"\x00" + struct.pack("<I", 0)
        else:
            expected = b"\x01" + struct.pack("<I", len(old)) + old.encode()
        return b"C" + struct.pack("<I", len(k)) + k + expected + new
    raise ScriptError(f"unknown operation {op!r}")


def encode_batch(session: int, first: int, acked: int, commands: list[bytes]) -> bytes:
    """A client batch (docs/internals.md, "Slot values and client batches")."""
    payload = b"".join(struct.pack("<I", len(c)) + c for c in commands)
    return struct.pack("<QQQII", session, first, acked, len(commands), len(payload)) + payload


def decode_batches(value: bytes):
    """Yield (session, first_seq, acked, [command bytes]) for each batch of a slot value."""
    pos = 0
    while pos + 32 <= len(value):
        sid, first, acked, count, plen = struct.unpack_from("<QQQII", value, pos)
        q, end, cmds = pos + 32, pos + 32 + plen, []
        for _ in range(count):
            (clen,) = struct.unpack_from("<I", value, q)
            cmds.append(value[q + 4:q + 4 + clen])
            q += 4 + clen
        yield sid, first, acked, cmds
        pos = end
    if pos != len(value):
        raise ValueError("trailing bytes")


def describe_command(cmd: bytes) -> str:
    op = cmd[:1]
    if op == b"P":
        (klen,) = struct.unpack_from("<I", cmd, 1)
        return f"put {cmd[5:5 + klen].decode()}={cmd[5 + klen:].decode()}"
    if op == b"D":
        return f"del {cmd[1:].decode()}"
    if op == b"C":
        (klen,) = struct.unpack_from("<I", cmd, 1)
        pos = 5 + klen
        (elen,) = struct.unpack_from("<I", cmd, pos + 1)
        old = cmd[pos + 5:pos + 5 + elen].decode() if cmd[pos] else "nil"
        return f"cas {cmd[5:5 + klen].decode()} {old}->{cmd[pos + 5 + elen:].decode()}"
    return f"?{cmd!r}"


def unpack_results(packed: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(packed):
        status = packed[pos]
        (n,) = struct.unpack_from("<I", packed, pos + 1)
        out.append((status, packed[pos + 5:pos + 5 + n]))
        pos += 5 + n
    return out


def fmt_slots(first: int, count: int) -> str:
    return f"{first}" if count == 1 else f"{first}..{first + count - 1}"


def copy_tuple(t: tuple) -> tuple:
    """What a round trip through the wire or the WAL would give: no shared lists."""
    return tuple(list(x) if isinstance(x, list) else x for x in t)


# ----------------------------------------------------------------------- nodes

class Disk:
    """A replica's fake `Storage`: syncs end at `persist`, file operations at `complete`."""

    def __init__(self, rid: int) -> None:
        self.rid = rid
        self.node: ReplicaNode | None = None
        self.base = 0          # records deleted from the front by compaction
        self.durable: list[tuple] = []
        self.unsynced: list[tuple] = []
        self.syncing = False   # the node started a sync; `persist` ends it
        self.files: dict[int, bytes] = {}      # durable snapshot files
        self.incoming: dict[int, bytearray] = {}
        self.ops: list[tuple] = []             # (description, function, args) not yet ended

    @property
    def first_seq(self) -> int:
        return self.base + 1

    @property
    def last_seq(self) -> int:
        return self.base + len(self.durable) + len(self.unsynced)

    @property
    def durable_seq(self) -> int:
        return self.base + len(self.durable)

    @property
    def sync_in_flight(self) -> bool:
        return self.syncing

    def append(self, records: list) -> int:
        self.unsynced.extend(copy_tuple(r) for r in records)
        return 0

    def start_sync(self) -> bool:
        if self.syncing:
            return False
        self.syncing = True
        return True

    def sync(self) -> None:  # never: the driver's nodes do not sync inline
        raise AssertionError("inline sync")

    def truncate_before(self, seq: int) -> None:
        drop = min(seq - 1, self.durable_seq) - self.base
        if drop > 0:
            del self.durable[:drop]
            self.base += drop

    def write_snapshot(self, index: int, data: list) -> None:
        blob = b"".join(data)
        self.ops.append((f"wrote snapshot {index} ({len(blob)} bytes)",
                         self._snapshot_written, (index, blob)))

    def _snapshot_written(self, index: int, blob: bytes) -> None:
        self.files[index] = blob
        for old in sorted(self.files)[:-snapshots.KEEP]:
            del self.files[old]
        self.node.on_snapshot_written(index, None)

    def read_snapshot(self, index: int) -> None:
        self.ops.append((f"read snapshot {index}", self._snapshot_read, (index,)))

    def _snapshot_read(self, index: int) -> None:
        self.node.on_snapshot_read(index, self.files[index], None)

    def write_incoming(self, peer: int, offset: int, data: bytes) -> None:
        self.ops.append((f"wrote bytes {offset}..{offset + len(data)} of the snapshot from {peer}",
                         self._incoming_written, (peer, offset, data)))

    def _incoming_written(self, peer: int, offset: int, data: bytes) -> None:
        if offset == 0:
            self.incoming[peer] = bytearray()
        self.incoming[peer][offset:offset + len(data)] = data
        self.node.on_incoming_written(peer, None)

    def read_incoming(self, peer: int) -> None:
        self.ops.append((f"read back the snapshot from {peer}", self._incoming_read, (peer,)))

    def _incoming_read(self, peer: int) -> None:
        self.node.on_incoming_read(peer, bytes(self.incoming.get(peer, b"")), None)

    def discard_incoming(self, peer: int) -> None:
        self.incoming.pop(peer, None)

    def crash(self) -> None:
        self.unsynced = []
        self.syncing = False
        self.ops = []
        self.incoming = {}


class Net:
    """The fake `Transport`: messages join the in-flight queue, replies are kept for
    the driver to print."""

    def __init__(self, driver: "Transcript", rid: int) -> None:
        self.driver = driver
        self.rid = rid

    def send(self, peer: int, message: tuple) -> None:
        self.driver.net.append((self.rid, peer, copy_tuple(message)))

    def reply(self, conn, reply: list) -> None:
        self.driver.replies.append((self.rid, conn, reply))

    def backlog(self, conn) -> int:
        return 0

    def flush(self) -> None:
        pass


class Node:
    """One replica process: its node and core (None while down) over its fake disk."""

    def __init__(self, rid: int) -> None:
        self.rid = rid
        self.node: ReplicaNode | None = None
        self.disk = Disk(rid)
        self.incarnation = 0
        self.checked = 0  # slots up to here were checked against the chosen values
        self.snapshot: tuple | None = None  # the latest durable snapshot
        self.cut: int | None = None  # records before this one are redundant once the
        #                              restatement after it is durable

    @property
    def core(self) -> Replica | None:
        return self.node.core if self.node is not None else None

    @property
    def up(self) -> bool:
        return self.node is not None

    @property
    def held(self) -> int:
        """Messages the node holds until its records are durable."""
        return sum(len(msgs) for _, _, msgs in self.node.after) if self.node else 0


class Client:
    def __init__(self, name: str, session: int) -> None:
        self.name = name
        self.session = session
        self.next_seq = 1
        self.answered: set[int] = set()
        self.commands: dict[int, list[bytes]] = {}  # first seq -> commands of the batch
        self.last: bytes | None = None

    def acked(self) -> int:
        s = 0
        while s + 1 in self.answered:
            s += 1
        return s


# ---------------------------------------------------------------------- driver

class Transcript:
    """The interpreter; `run(line)` executes one command and returns its output."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {}
        self.config: Config | None = None
        self.seed = 0
        self.net: list[tuple[int, int, tuple]] = []  # (from, to, message) in flight
        self.groups: list[set[int]] | None = None
        self.clients: dict[str, Client] = {}
        self.chosen: dict[int, bytes] = {}  # every slot ever seen committed
        self.reported: set = set()  # state divergences already printed
        self.out: list[str] = []
        self.node_settings: dict = {}
        # Replies the nodes gave (replica, client connection, reply), and what each
        # request id stood for: ("submit", label, session, first) or ("read", rid).
        self.replies: list[tuple] = []
        self.requests: dict[int, tuple] = {}
        self.next_request = 1

    # -------------------------------------------------------------- plumbing

    def run(self, line: str) -> str:
        """Execute one command line and return what it printed (no trailing newline)."""
        words = line.split()
        name, args = words[0], words[1:]
        handler = getattr(self, "cmd_" + name.replace("-", "_"), None)
        if handler is None:
            raise ScriptError(f"unknown command {name!r}")
        if name != "cluster" and not self.nodes:
            raise ScriptError("start with `cluster N`")
        self.out = []
        handler(args)
        self.check_safety()
        return "\n".join(self.out) if self.out else "ok"

    def say(self, text: str) -> None:
        self.out.append(text)

    def node(self, word: str, *, live: bool = True) -> Node:
        try:
            n = self.nodes[int(word)]
        except (ValueError, KeyError):
            raise ScriptError(f"no replica {word!r}") from None
        if live and not n.up:
            raise ScriptError(f"replica {n.rid} is down")
        return n

    def ids(self, word: str) -> list[Node]:
        if word == "all":
            return [n for n in self.nodes.values() if n.up]
        return [self.node(w) for w in word.split(",")]

    def live(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.up]

    @staticmethod
    def options(args: list[str]) -> tuple[list[str], dict[str, str]]:
        """Split `key=value` words from positional ones."""
        pos, opts = [], {}
        for a in args:
            if "=" in a:
                k, v = a.split("=", 1)
                opts[k] = v
            else:
                pos.append(a)
        return pos, opts

    def snapshot(self) -> dict:
        return {n.rid: (n.core.role, n.core.ballot, n.core.commit_index)
                for n in self.live()}

    def observe(self, before: dict, indent: str = "  ") -> None:
        """Print the role changes and commit advances since `before`."""
        for n in self.live():
            role, ballot, commit = n.core.role, n.core.ballot, n.core.commit_index
            old = before.get(n.rid)
            if old is None:
                continue
            if role != old[0]:
                self.say(f"{indent}-> {n.rid} is {role} at b={format_ballot(ballot)}")
            if commit != old[2]:
                self.say(f"{indent}-> {n.rid} commit={commit} applied={n.core.applied_index}")

    def check_safety(self) -> None:
        """No slot may ever be chosen with two values, on any replica, across restarts."""
        for n in self.live():
            for s in range(n.checked + 1, n.core.commit_index + 1):
                v = n.core.chosen_value(s)
                if v is None:
                    continue
                seen = self.chosen.setdefault(s, v)
                if seen != v:
                    self.say(f"SAFETY VIOLATION: slot {s} chosen as {self.fmt_value(seen)} "
                             f"and as {self.fmt_value(v)} at {n.rid}")
            n.checked = max(n.checked, n.core.commit_index)
        digests: dict[int, tuple[int, str]] = {}
        for n in self.live():
            d = n.core.state_machine.state_digest()
            other = digests.setdefault(n.core.applied_index, (n.rid, d))
            key = (n.core.applied_index, other[0], n.rid)
            if other[1] != d and key not in self.reported:
                self.reported.add(key)
                self.say(f"SAFETY VIOLATION: {other[0]} and {n.rid} applied up to slot "
                         f"{n.core.applied_index} but their states differ")

    # ------------------------------------------------------------ formatting

    def client_name(self, session: int) -> str:
        for c in self.clients.values():
            if c.session == session:
                return c.name
        return f"s{session}"

    def fmt_value(self, value) -> str:
        if value is None:
            return "-"
        if value == b"":
            return "noop"
        try:
            parts = []
            for sid, first, _acked, cmds in decode_batches(value):
                body = "; ".join(describe_command(c) for c in cmds)
                parts.append(f"{self.client_name(sid)}#{first}{{{body}}}")
            return "+".join(parts)
        except (ValueError, struct.error, UnicodeDecodeError):
            return f"<{len(value)} bytes>"

    def fmt_values(self, values: list) -> str:
        shown = [self.fmt_value(v) for v in values]
        if len(shown) > MAX_VALUES_SHOWN:
            shown = shown[:4] + [f"...({len(shown) - 6} more)"] + shown[-2:]
        return "[" + ", ".join(shown) + "]"

    def fmt_message(self, src: int, dst: int, m: tuple) -> str:
        kind = MESSAGE_NAMES.get(m[0], str(m[0]))
        if kind == "SNAPSHOT_CHUNK":
            return (f"{src}->{dst} SNAPSHOT_CHUNK index={m[2]} bytes={m[3]}..{m[3] + len(m[5])} "
                    f"of {m[4]}")
        if kind == "SNAPSHOT_ACK":
            return f"{src}->{dst} SNAPSHOT_ACK index={m[2]} next={m[3]}"
        ballot = format_ballot(m[2])
        head = f"{src}->{dst} {kind} b={ballot}"
        if kind == "PREPARE":
            return f"{head} from={m[3]}"
        if kind == "PROMISE":
            e = m[4]
            entries = ", ".join(f"{e[i]}@{format_ballot(e[i + 1])}:{self.fmt_value(e[i + 2])}"
                                for i in range(0, len(e), 3))
            return f"{head} commit={m[3]} entries=[{entries}]"
        if kind == "NACK":
            return head
        if kind == "ACCEPT":
            slots = fmt_slots(m[3], len(m[4]))
            return f"{head} slots={slots} commit={m[5]} {self.fmt_values(m[4])}"
        if kind == "ACCEPTED":
            return f"{head} slots={fmt_slots(m[3], m[4])} commit={m[5]}"
        if kind == "HEARTBEAT":
            return f"{head} commit={m[3]} ctx={m[4]}"
        if kind == "HEARTBEAT_ACK":
            return f"{head} ctx={m[3]} commit={m[4]}"
        if kind == "CATCHUP_REQ":
            return f"{head} from={m[3]}"
        if kind == "CHOSEN":
            return f"{head} slots={fmt_slots(m[3], len(m[4]))} {self.fmt_values(m[4])}"
        if kind == "PREVOTE":
            return head
        if kind == "PREVOTE_ACK":
            return f"{head} {'granted' if m[3] else 'refused'}"
        return f"{head} {m[3:]!r}"

    def fmt_record(self, r: tuple) -> str:
        kind = RECORD_NAMES.get(r[0], str(r[0]))
        if kind == "PROMISE":
            return f"PROMISE b={format_ballot(r[1])}"
        if kind == "ACCEPT":
            slots = fmt_slots(r[1], len(r[3]))
            return f"ACCEPT b={format_ballot(r[2])} slots={slots} {self.fmt_values(r[3])}"
        if kind == "COMMIT":
            return f"COMMIT {r[1]}"
        return repr(r)

    def fmt_results(self, sid: int, first: int, packed: bytes) -> str:
        client = next((c for c in self.clients.values() if c.session == sid), None)
        cmds = client.commands.get(first, []) if client else []
        words = []
        for k, (status, data) in enumerate(unpack_results(packed)):
            word = RESULT_STATUS.get(status, f"status{status}")
            if status == RESULT_ERROR:
                word += f"({data.decode(errors='replace')})"
            elif status == RESULT_OK and k < len(cmds) and cmds[k][:1] in (b"D", b"C"):
                if cmds[k][:1] == b"D":
                    word += "(existed)" if data == b"\x01" else "(absent)"
                else:
                    word += "(swapped)" if data == b"\x01" else "(mismatch)"
            words.append(word)
        return f"{self.client_name(sid)}#{first}: {', '.join(words)}"

    # ------------------------------------------------------------- actions

    def process(self, n: Node, *, quiet_if_none: bool = False):
        """ready() once, hand the Ready to the node and show what it did; returns the
        Ready (or None)."""
        rd = n.core.ready()
        if rd is None:
            if not quiet_if_none:
                self.say(f"> {n.rid} nothing ready")
            return None
        self.say(f"> {n.rid} ready")
        node = n.node
        held_before = len(node.after)
        sent = len(self.net)
        replied = len(self.replies)
        node.handle_ready(rd)
        held = len(node.after) > held_before and bool(node.after[-1][2])
        for r in rd.records:
            self.say(f"  persist: {self.fmt_record(r)}")
        for to, m in rd.messages:
            self.say(f"  send: {self.fmt_message(n.rid, to, m)}")
        for to, m in rd.messages_after_persist:
            if held:
                self.say(f"  after persist: {self.fmt_message(n.rid, to, m)}")
            else:  # everything handed out so far is already durable
                self.say(f"  send (nothing to persist): {self.fmt_message(n.rid, to, m)}")
        extra = [e for e in self.net[sent:] if e[2][0] in (wire.SNAPSHOT_CHUNK, wire.SNAPSHOT_ACK)]
        for s, d, m in extra:   # what the node sent on its own (snapshot transfers)
            self.say(f"  send: {self.fmt_message(s, d, m)}")
        answered = {}
        for _, conn, reply in self.replies[replied:]:
            answered.setdefault(self.requests.get(reply[1], ("?",))[0], []).append(reply)
        waited = {(self.requests[r[1]][2], self.requests[r[1]][3]): r
                  for r in answered.get("submit", []) if r[0] == "ok"}
        elsewhere = []
        for sid, first, packed in rd.results:
            reply = waited.pop((sid, first), None)
            if reply is None:
                elsewhere.append(f"{self.client_name(sid)}#{first}")
                continue
            client = next((c for c in self.clients.values() if c.session == sid), None)
            statuses = [status for status, _ in unpack_results(packed)]
            if client is not None and all(st in (RESULT_OK, RESULT_ERROR) for st in statuses):
                client.answered.update(range(first, first + len(statuses)))
            self.say(f"  result: {self.fmt_results(sid, first, packed)}")
        if elsewhere:
            self.say(f"  applied (no client waiting here): {', '.join(elsewhere)}")
        for reply in answered.get("read", []):
            rid = self.requests[reply[1]][1]
            if reply[0] != "ok":
                self.say(f"  read failed: {rid}")
                continue
            answer = reply[2][0]
            key = self.requests[reply[1]][2]
            shown = f"{key}={answer[1:].decode()}" if answer[:1] == b"\x01" else f"{key} absent"
            self.say(f"  read {rid}: {shown}")
        for peer in rd.snapshot_to:
            self.say(f"  snapshot to: {peer}")
        redirected = [r for r in answered.get("submit", []) if r[0] == "redirect"]
        if rd.lost_leadership:
            lost = ", ".join(self.requests[r[1]][1] for r in redirected) or "none pending"
            self.say(f"  lost leadership: clients must retry ({lost})")
        return rd

    def persist(self, n: Node, *, quiet_if_none: bool = False) -> bool:
        disk = n.disk
        if not disk.unsynced and not n.held:
            if not quiet_if_none:
                self.say(f"> {n.rid} nothing to persist")
            return False
        count = len(disk.unsynced)
        disk.durable.extend(disk.unsynced)
        disk.unsynced = []
        disk.syncing = False
        self.say(f"> {n.rid} persisted {count} record{'s' if count != 1 else ''}")
        before = self.snapshot()
        self.show_effects(n, n.node.release_durable)
        self.observe(before)
        return True

    def show_effects(self, n: Node, action, *args) -> None:
        """Run `action` on node `n`; print the records it appended and what it sent."""
        sent = len(self.net)
        disk = n.disk
        appended = disk.last_seq
        base = disk.base
        action(*args)
        for r in disk.unsynced[len(disk.unsynced) - (disk.last_seq - appended):]:
            self.say(f"  persist: {self.fmt_record(r)}")
        for s, d, m in self.net[sent:]:
            self.say(f"  send: {self.fmt_message(s, d, m)}")
        if n.up and disk.base != base:
            self.say(f"  compacted: {disk.base - base} records deleted, {len(disk.durable)} "
                     f"left; log starts at slot {n.core.log_start}")

    def blocked(self, src: int, dst: int) -> str | None:
        node = self.nodes.get(dst)
        if node is None or not node.up:
            return f"{dst} is down"
        if self.groups is not None:
            for g in self.groups:
                if src in g:
                    return None if dst in g else "partitioned"
        return None

    def step(self, src: int, dst: int, m: tuple, times: int = 1) -> None:
        why = self.blocked(src, dst)
        if why:
            self.say(f"{self.fmt_message(src, dst, m)} DROPPED ({why})")
            return
        n = self.nodes[dst]
        for _ in range(times):
            self.say(self.fmt_message(src, dst, m))
            before = self.snapshot()
            sent = len(self.net)
            try:
                n.node.on_peer_message(src, copy_tuple(m))
            except Exception as exc:  # a ProtocolError or a failed invariant
                self.say(f"  error: {type(exc).__name__}: {exc}")
            for s, d, out in self.net[sent:]:  # the transfer answers at once
                self.say(f"  send: {self.fmt_message(s, d, out)}")
            self.observe(before)

    # ------------------------------------------------------------ commands

    def cmd_cluster(self, args):
        pos, opts = self.options(args)
        if len(pos) != 1:
            raise ScriptError("cluster N [options]")
        names = {"lease": "lease_ticks", "drift": "clock_drift_ticks",
                 "election": "election_ticks", "heartbeat": "heartbeat_ticks",
                 "window": "window_slots", "resend": "resend_ticks",
                 "check_quorum": "check_quorum", "pre_vote": "pre_vote",
                 "accept_ahead": "accept_ahead_max",
                 "message_bytes": "message_bytes_max", "batch_bytes": "batch_bytes_max"}
        node_names = {"retain": "retain_slots", "chunk": "chunk_bytes",
                      "chunk_ticks": "chunk_ack_ticks", "chunk_tries": "chunk_tries"}
        self.seed = int(opts.pop("seed", 7))
        self.node_settings = {node_names[k]: int(opts.pop(k)) for k in list(opts)
                              if k in node_names}
        kwargs = {}
        for k, v in opts.items():
            if k not in names:
                raise ScriptError(f"unknown cluster option {k!r}")
            flag = k in ("check_quorum", "pre_vote")
            kwargs[names[k]] = v.lower() in ("1", "true", "yes") if flag else int(v)
        self.config = Config(check_invariants=True, **kwargs)
        self.nodes = {i: Node(i) for i in range(1, int(pos[0]) + 1)}
        self.net, self.groups, self.clients, self.chosen = [], None, {}, {}
        self.reported, self.replies, self.requests = set(), [], {}
        for n in self.nodes.values():
            self.boot(n)
        self.say(f"{len(self.nodes)} replicas, quorum {len(self.nodes) // 2 + 1}")

    def boot(self, n: Node) -> None:
        n.incarnation += 1
        core = Replica(n.rid, list(self.nodes), KVStore(), self.config,
                       seed=self.seed * 1000 + n.incarnation)
        options = NodeOptions(
            replica_id=n.rid, cluster={i: f"r{i}" for i in self.nodes}, cluster_id="t",
            snapshot_bytes=1 << 60, snapshot_slots=1 << 60, follower_inline_sync=False,
            drive_lone_requests=False, check_invariants=True, **self.node_settings)
        n.node = ReplicaNode(options, core, n.disk, Net(self, n.rid), lambda: None,
                             validate_state=lambda state: KVStore().restore(state))
        n.disk.node = n.node
        files = n.disk.files
        latest = snapshots.decode(files[max(files)], "t") if files else None
        n.node.recover([copy_tuple(r) for r in n.disk.durable], latest or genesis())
        n.checked = 0

    def cmd_tick(self, args):
        if not 1 <= len(args) <= 2:
            raise ScriptError("tick IDS [n]")
        nodes = self.ids(args[0])
        before = self.snapshot()
        sent = len(self.net)
        for _ in range(int(args[1]) if len(args) > 1 else 1):
            for n in nodes:
                n.node.tick()
        for s, d, m in self.net[sent:]:  # a snapshot transfer's resent chunk
            self.say(f"send: {self.fmt_message(s, d, m)}")
        self.observe(before, indent="")

    def cmd_campaign(self, args):
        n = self.node(args[0])
        if n.core.role != "follower":
            raise ScriptError(f"{n.rid} is {n.core.role}, not a follower")
        before = self.snapshot()
        for k in range(1, 4 * self.config.election_ticks + 1):
            n.node.tick()
            if n.core.role != "follower":
                self.say(f"{n.rid} campaigns after {k} ticks")
                self.observe(before, indent="")
                return
        raise ScriptError(f"{n.rid} did not campaign")

    def cmd_tick_heartbeat(self, args):
        n = self.node(args[0])
        if n.core.role != "leader":
            raise ScriptError(f"{n.rid} is {n.core.role}, not the leader")
        for _ in range(2 * self.config.heartbeat_ticks + 1):
            before = self.snapshot()
            n.node.tick()
            self.observe(before, indent="")
            rd = self.process(n, quiet_if_none=True)
            if rd is not None and any(m[0] == MESSAGE_TYPES["HEARTBEAT"] for _, m in rd.messages):
                return
        raise ScriptError(f"{n.rid} sent no heartbeat")

    def cmd_process(self, args):
        for n in self.ids(args[0] if args else "all"):
            before = self.snapshot()
            self.process(n)
            self.observe(before)

    def cmd_persist(self, args):
        for n in self.ids(args[0] if args else "all"):
            self.persist(n)

    def cmd_deliver(self, args, drop=False):
        pos, opts = self.options(args)
        drop = drop or "drop" in pos
        times = 2 if "dup" in pos else 1
        keep = "keep" in pos
        src = int(opts["from"]) if "from" in opts else None
        dst = int(opts["to"]) if "to" in opts else None
        types = None
        if "type" in opts:
            try:
                types = {MESSAGE_TYPES[t] for t in opts["type"].upper().split(",")}
            except KeyError as exc:
                raise ScriptError(f"unknown message type {exc}") from None
        limit = int(opts.get("n", 1 << 30))
        picked, rest = [], []
        for env in self.net:
            s, d, m = env
            if (len(picked) < limit and (src is None or s == src) and (dst is None or d == dst)
                    and (types is None or m[0] in types)):
                picked.append(env)
            else:
                rest.append(env)
        self.net = rest + (picked if keep else [])
        if not picked:
            self.say("no matching messages")
        for s, d, m in picked:
            if drop:
                self.say(f"{self.fmt_message(s, d, m)} DROPPED")
            else:
                self.step(s, d, m, times)

    def cmd_drop(self, args):
        self.cmd_deliver(args, drop=True)

    def cmd_stabilize(self, args):
        for _ in range(1000):
            moved = False
            for n in self.live():
                before = self.snapshot()
                if self.process(n, quiet_if_none=True) is not None:
                    moved = True
                self.observe(before)
                if self.persist(n, quiet_if_none=True):
                    moved = True
                if self.complete(n, len(n.disk.ops)):
                    moved = True
            batch, self.net = self.net, []
            for s, d, m in batch:
                moved = True
                self.step(s, d, m)
            if not moved:
                return
        raise ScriptError("stabilize did not settle")

    def client(self, opts) -> Client:
        name = opts.get("client", "c1")
        if name not in self.clients:
            if len(self.clients) == CLIENTS_MAX:
                raise ScriptError(f"at most {CLIENTS_MAX} clients")
            self.clients[name] = Client(name, FIRST_SESSION + len(self.clients))
        return self.clients[name]

    def cmd_propose(self, args):
        pos, opts = self.options(args)
        n = self.node(pos[0])
        commands, word = [], []
        for w in pos[1:] + [";"]:
            if w == ";":
                if word:
                    commands.append(encode_command(word[0], word[1:]))
                word = []
            else:
                word.append(w)
        if not commands:
            raise ScriptError("propose ID OP [; OP ...]")
        c = self.client(opts)
        first = int(opts.get("seq", c.next_seq))
        c.next_seq = max(c.next_seq, first + len(commands))
        c.commands[first] = commands
        batch = encode_batch(c.session, first, int(opts.get("acked", c.acked())), commands)
        c.last = batch
        self.submit(n, batch)

    def cmd_resend(self, args):
        pos, opts = self.options(args)
        n, c = self.node(pos[0]), self.client(opts)
        if c.last is None:
            raise ScriptError(f"client {c.name} sent nothing yet")
        self.submit(n, c.last)

    def request(self, n: Node, conn: str, request: tuple, meaning: tuple) -> list:
        """Hand a client request to the node; return the replies it gave at once."""
        self.requests[request[1]] = meaning
        replied = len(self.replies)
        n.node.on_client_request(conn, request)
        return [r for _, _, r in self.replies[replied:]]

    def new_request_id(self) -> int:
        self.next_request += 1
        return self.next_request

    def submit(self, n: Node, batch: bytes) -> None:
        label = self.fmt_value(batch)
        sid, first = struct.unpack_from("<QQ", batch)
        name = f"{self.client_name(sid)}#{first}"
        answers = self.request(n, self.client_name(sid),
                               ("submit", self.new_request_id(), batch),
                               ("submit", name, sid, first))
        if not answers:
            self.say(f"{label} at {n.rid}: proposed")
        else:
            word = "not leader" if answers[0][0] == "redirect" else "busy"
            self.say(f"{label} at {n.rid}: {word} (leader_id={n.core.leader_id})")

    def cmd_read(self, args):
        if len(args) not in (2, 3):
            raise ScriptError("read ID RID [KEY]")
        n, rid = self.node(args[0]), args[1]
        key = args[2] if len(args) > 2 else "k"
        before = self.snapshot()
        answers = self.request(n, "reader", ("read", self.new_request_id(),
                                             [b"G" + key.encode()], False), ("read", rid, key))
        if not answers:
            self.say(f"read {rid} (get {key}) at {n.rid}: registered")
        else:
            self.say(f"read {rid} (get {key}) at {n.rid}: refused (leader_id={n.core.leader_id})")
        self.observe(before)

    def cmd_snapshot(self, args):
        n = self.node(args[0])
        before = self.snapshot()
        started = []
        self.show_effects(n, lambda: started.append(n.node.take_snapshot()))
        if started[0]:
            self.out.insert(len(self.out) - sum(1 for line in self.out if line.startswith("  ")),
                            f"{n.rid} snapshot at slot {n.node.snapshot_job.index}")
        else:
            self.say(f"{n.rid} no snapshot (one is running, or nothing applied since)")
        self.observe(before)

    def complete(self, n: Node, limit: int) -> bool:
        """End up to `limit` of the replica's file operations pending now (those they
        start wait for the next call); True if any ended."""
        done = 0
        limit = min(limit, len(n.disk.ops))
        while n.up and n.disk.ops and done < limit:
            what, action, op_args = n.disk.ops.pop(0)
            self.say(f"> {n.rid} {what}")
            before = self.snapshot()
            self.show_effects(n, action, *op_args)
            self.observe(before)
            done += 1
        return done > 0

    def cmd_complete(self, args):
        pos, opts = self.options(args)
        limit = int(opts.get("n", 1 << 30))
        any_done = False
        for n in self.ids(pos[0] if pos else "all"):
            any_done |= self.complete(n, limit)
        if not any_done:
            self.say("no file operations pending")

    def cmd_corrupt(self, args):
        pos, opts = self.options(args)
        src = int(opts["from"]) if "from" in opts else None
        dst = int(opts["to"]) if "to" in opts else None
        limit = int(opts.get("n", 1 << 30))
        done = 0
        for i, (s, d, m) in enumerate(self.net):
            if (m[0] == wire.SNAPSHOT_CHUNK and done < limit and (src is None or s == src)
                    and (dst is None or d == dst) and m[5]):
                data = bytearray(m[5])
                data[len(data) // 2] ^= 0x01
                self.net[i] = (s, d, m[:5] + (bytes(data),))
                self.say(f"{self.fmt_message(s, d, m)} CORRUPTED")
                done += 1
        if not done:
            self.say("no matching messages")

    def cmd_crash(self, args):
        n = self.node(args[0])
        lost, held = len(n.disk.unsynced), n.held
        n.node = None
        n.disk.crash()
        self.say(f"{n.rid} crashed: lost {lost} unsynced records and {held} held messages; "
                 f"{len(n.disk.durable)} records durable")

    def cmd_restart(self, args):
        n = self.node(args[0], live=False)
        if n.up:
            raise ScriptError(f"{n.rid} is running")
        self.boot(n)
        c = n.core
        snap = f"snapshot {n.node.snapshot_index} and " if n.node.snapshot_index else ""
        self.say(f"{n.rid} restarted from {snap}{len(n.disk.durable)} records: b={format_ballot(c.ballot)} "
                 f"commit={c.commit_index} applied={c.applied_index} last={c.last_slot}")

    def cmd_install(self, args):
        if len(args) != 2:
            raise ScriptError("install ID FROM")
        n, source = self.node(args[0]), self.node(args[1], live=False)
        files = source.disk.files
        if not files:
            raise ScriptError(f"{source.rid} has no snapshot file")
        index = max(files)
        data = files[index]
        self.say(f"{source.rid}'s snapshot file at slot {index} ({len(data)} bytes) reaches "
                 f"{n.rid}")
        before = self.snapshot()
        self.show_effects(n, n.node.on_snapshot_chunk, source.rid, index, 0, len(data), data)
        self.observe(before)

    def cmd_partition(self, args):
        groups, cur = [], set()
        for w in args + ["|"]:
            if w == "|":
                if cur:
                    groups.append(cur)
                cur = set()
            else:
                cur.add(self.node(w, live=False).rid)
        missing = set(self.nodes) - set().union(*groups)
        if missing:
            groups.append(missing)
        self.groups = groups
        self.say(" | ".join(" ".join(str(i) for i in sorted(g)) for g in groups))

    def cmd_heal(self, args):
        self.groups = None

    def cmd_status(self, args):
        for n in self.nodes.values():
            if not n.up:
                self.say(f"{n.rid} down ({len(n.disk.durable)} records durable)")
                continue
            c = n.core
            line = (f"{n.rid} {c.role:<9} b={format_ballot(c.ballot)} leader={c.leader_id} "
                    f"commit={c.commit_index} applied={c.applied_index} last={c.last_slot} "
                    f"digest={c.state_machine.state_digest()}")
            if n.disk.unsynced or n.held:
                line += f" unsynced={len(n.disk.unsynced)} held={n.held}"
            if n.node.snapshot_index:
                line += f" snapshot={n.node.snapshot_index} log_start={c.log_start}"
            if n.disk.ops:
                line += f" file_ops={len(n.disk.ops)}"
            self.say(line)
        if self.net:
            self.say(f"in flight: {len(self.net)} messages")

    def cmd_log(self, args):
        n = self.node(args[0])
        c = n.core
        lo = int(args[1]) if len(args) > 1 else c.log_start
        hi = int(args[2]) if len(args) > 2 else c.last_slot
        for s in range(lo, hi + 1):
            e = c.entry(s)
            if e is None:
                self.say(f"{s}: -")
            else:
                mark = "*" if s <= c.commit_index else " "
                self.say(f"{s}:{mark}{format_ballot(e[0])} {self.fmt_value(e[1])}")
        if hi < lo:
            self.say("(empty log)")

    def cmd_stats(self, args):
        n = self.node(args[0])
        st = n.core.statistics()
        for k in args[1:] or sorted(st):
            self.say(f"{k}={st[k]}")


# ------------------------------------------------------------------ scripts

def parse_script(text: str):
    """Yield (kind, line, expected, lineno): ("text", ...) for comments and blank lines,
    ("cmd", ...) for a command with its expected output (None when it has none yet)."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            yield ("text", line, None, i + 1)
            i += 1
            continue
        start = i
        expected = None
        if i + 1 < len(lines) and lines[i + 1] == "----":
            j = i + 2
            out = []
            while j < len(lines) and lines[j] != "":
                out.append(lines[j])
                j += 1
            expected = "\n".join(out)
            i = j + 1  # skip the blank line that ends the output
        else:  # a bare command: its output goes here when rewritten
            i += 2 if i + 1 < len(lines) and lines[i + 1] == "" else 1
        yield ("cmd", line, expected, start + 1)


def run_script(text: str):
    """Run a script; return (the script with actual outputs, [mismatches], [outputs]).

    A mismatch is (line number, command, expected output or None, actual output).
    """
    t = Transcript()
    out_lines: list[str] = []
    mismatches = []
    outputs = []
    for kind, line, expected, lineno in parse_script(text):
        if kind == "text":
            out_lines.append(line)
            continue
        try:
            actual = t.run(line)
        except ScriptError as exc:
            actual = f"script error: {exc}"
        outputs.append(actual)
        out_lines += [line, "----", actual, ""]
        if expected != actual:
            mismatches.append((lineno, line, expected, actual))
    rewritten = "\n".join(out_lines)
    # Keep exactly one final newline.
    return rewritten.rstrip("\n") + "\n", mismatches, outputs


if __name__ == "__main__":  # run a script and print the transcript
    import sys
    print(run_script(open(sys.argv[1]).read())[0], end="")
