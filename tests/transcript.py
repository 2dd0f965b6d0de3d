"""A data-driven transcript driver for the pure cypaxos core.

In the style of etcd-io/raft's interaction tests: a small interpreter runs a cluster
of N `cypaxos.core.Replica`s (with `Config(check_invariants=True)` and a `KVStore`)
where *nothing happens unless a command says so*.  Every output of a core is put
where a reader can see it:

* `ready()` is only called by `process` (or `stabilize`).  Its records go to the
  replica's *unsynced* disk, its `messages` into the network, its
  `messages_after_persist` are *held* until the disk is synced;
* `persist` syncs the disk: the unsynced records become durable, the held messages
  enter the network and the core is told `persisted(persist_id)`;
* messages sit in one in-flight queue (in send order) until `deliver` (or
  `stabilize`) hands them to their receiver's `step()`, or drops them.

Script format (see tests/testdata/*.txt): one command per line, then a line `----`,
then the output the command is expected to print, ended by a blank line.  Lines
starting with `#` (and blank lines) between commands are comments.  A command with
no `----` section gets one when the script is rewritten (`run_script`, or
`python tests/transcript.py SCRIPT` to print the transcript).  A command that
prints nothing prints `ok`; a mistake in a script prints `script error: ...`.

Only `process` (and `stabilize`) call ready(), so `tick`, `deliver`, `propose` and
`read` show nothing but the role and commit changes they cause; their messages
appear at the next `process`.  A Ready whose `messages_after_persist` come with
nothing left to persist releases them at once ("send (nothing to persist)").
Client results are printed at the replica the batch was proposed to; other replicas
just list what they applied.

Commands (replica ids are 1..N; `IDS` is an id, a comma list `1,2` or `all`):

  cluster N [seed=7] [lease=0] [drift=0] [election=10] [heartbeat=2] [window=64]
            [resend=4] [check_quorum=true] [accept_ahead=65536]
            [batch_bytes=1048576] [message_bytes=4194304]
                              start N fresh replicas (ids 1..N); options set the
                              Config fields (batch_bytes=1: one batch per slot)
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
  crash ID                    the replica dies: unsynced records and held messages
                              are lost (messages already in flight stay in flight)
  restart ID                  a fresh core recovers from the durable records
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

from cypaxos.ballots import format_ballot
from cypaxos.core import MESSAGE_NAMES, NOT_LEADER, PROPOSED, Config, Replica
from cypaxos.statemachine import KVStore

MESSAGE_TYPES = {name: kind for kind, name in MESSAGE_NAMES.items()}
RECORD_NAMES = {1: "PROMISE", 2: "ACCEPT", 3: "COMMIT"}
RESULT_STATUS = {0: "ok", 1: "error", 2: "session-expired", 3: "retry"}
MAX_VALUES_SHOWN = 8


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

class Node:
    """One replica process: its core (None while down), disk and held messages."""

    def __init__(self, rid: int) -> None:
        self.rid = rid
        self.core: Replica | None = None
        self.durable: list[tuple] = []
        self.unsynced: list[tuple] = []
        self.held: list[tuple[int, tuple]] = []  # messages_after_persist not yet sent
        self.persist_id = 0  # the highest persist_id handed out with records
        self.incarnation = 0
        self.proposed: dict[tuple[int, int], int] = {}  # (session, seq) -> copies awaited
        self.reads: dict = {}  # read id -> query
        self.checked = 0  # slots up to here were checked against the chosen values

    @property
    def up(self) -> bool:
        return self.core is not None


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
        kind, ballot = MESSAGE_NAMES.get(m[0], str(m[0])), format_ballot(m[2])
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
            if status == 1:
                word += f"({data.decode(errors='replace')})"
            elif status == 0 and k < len(cmds) and cmds[k][:1] in (b"D", b"C"):
                if cmds[k][:1] == b"D":
                    word += "(existed)" if data == b"\x01" else "(absent)"
                else:
                    word += "(swapped)" if data == b"\x01" else "(mismatch)"
            words.append(word)
        return f"{self.client_name(sid)}#{first}: {', '.join(words)}"

    # ------------------------------------------------------------- actions

    def process(self, n: Node, *, quiet_if_none: bool = False):
        """ready() once and route its outputs; returns the Ready (or None)."""
        rd = n.core.ready()
        if rd is None:
            if not quiet_if_none:
                self.say(f"> {n.rid} nothing ready")
            return None
        self.say(f"> {n.rid} ready")
        for r in rd.records:
            n.unsynced.append(copy_tuple(r))
            self.say(f"  persist: {self.fmt_record(r)}")
        if rd.records:
            n.persist_id = rd.persist_id
        for to, m in rd.messages:
            self.net.append((n.rid, to, copy_tuple(m)))
            self.say(f"  send: {self.fmt_message(n.rid, to, m)}")
        for to, m in rd.messages_after_persist:
            if n.unsynced:
                n.held.append((to, copy_tuple(m)))
                self.say(f"  after persist: {self.fmt_message(n.rid, to, m)}")
            else:  # everything handed out so far is already durable
                self.net.append((n.rid, to, copy_tuple(m)))
                self.say(f"  send (nothing to persist): {self.fmt_message(n.rid, to, m)}")
        elsewhere = []
        for sid, first, packed in rd.results:
            if not n.proposed.get((sid, first)):
                elsewhere.append(f"{self.client_name(sid)}#{first}")
                continue
            n.proposed[(sid, first)] -= 1
            if not n.proposed[(sid, first)]:
                del n.proposed[(sid, first)]
            client = next((c for c in self.clients.values() if c.session == sid), None)
            statuses = [status for status, _ in unpack_results(packed)]
            if client is not None and all(st in (0, 1) for st in statuses):
                client.answered.update(range(first, first + len(statuses)))
            self.say(f"  result: {self.fmt_results(sid, first, packed)}")
        if elsewhere:
            self.say(f"  applied (no client waiting here): {', '.join(elsewhere)}")
        for rid in rd.reads:
            query = n.reads.pop(rid, None)
            if query is None:
                self.say(f"  read {rid}: served")
                continue
            answer = n.core.state_machine.query(query)
            key = query[1:].decode()
            shown = f"{key}={answer[1:].decode()}" if answer[:1] == b"\x01" else f"{key} absent"
            self.say(f"  read {rid}: {shown}")
        for rid in rd.reads_failed:
            n.reads.pop(rid, None)
            self.say(f"  read failed: {rid}")
        if rd.lost_leadership:
            lost = ", ".join(f"{self.client_name(sid)}#{first}"
                             for (sid, first), k in n.proposed.items()
                             for _ in range(k)) or "none pending"
            self.say(f"  lost leadership: clients must retry ({lost})")
            n.proposed.clear()
        return rd

    def persist(self, n: Node, *, quiet_if_none: bool = False) -> bool:
        if not n.unsynced and not n.held:
            if not quiet_if_none:
                self.say(f"> {n.rid} nothing to persist")
            return False
        count = len(n.unsynced)
        n.durable.extend(n.unsynced)
        n.unsynced = []
        self.say(f"> {n.rid} persisted {count} record{'s' if count != 1 else ''}")
        for to, m in n.held:
            self.net.append((n.rid, to, m))
            self.say(f"  send: {self.fmt_message(n.rid, to, m)}")
        n.held = []
        before = self.snapshot()
        n.core.persisted(n.persist_id)
        self.observe(before)
        return True

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
        for _ in range(times):
            self.say(self.fmt_message(src, dst, m))
            before = self.snapshot()
            try:
                self.nodes[dst].core.step(copy_tuple(m))
            except Exception as exc:  # a MessageError or a failed invariant
                self.say(f"  error: {type(exc).__name__}: {exc}")
            self.observe(before)

    # ------------------------------------------------------------ commands

    def cmd_cluster(self, args):
        pos, opts = self.options(args)
        if len(pos) != 1:
            raise ScriptError("cluster N [options]")
        names = {"lease": "lease_ticks", "drift": "clock_drift_ticks",
                 "election": "election_ticks", "heartbeat": "heartbeat_ticks",
                 "window": "window_slots", "resend": "resend_ticks",
                 "check_quorum": "check_quorum", "accept_ahead": "accept_ahead_max",
                 "message_bytes": "message_bytes_max", "batch_bytes": "batch_bytes_max"}
        self.seed = int(opts.pop("seed", 7))
        kwargs = {}
        for k, v in opts.items():
            if k not in names:
                raise ScriptError(f"unknown cluster option {k!r}")
            kwargs[names[k]] = v.lower() in ("1", "true", "yes") if k == "check_quorum" else int(v)
        self.config = Config(check_invariants=True, **kwargs)
        self.nodes = {i: Node(i) for i in range(1, int(pos[0]) + 1)}
        self.net, self.groups, self.clients, self.chosen = [], None, {}, {}
        self.reported = set()
        for n in self.nodes.values():
            self.boot(n)
        self.say(f"{len(self.nodes)} replicas, quorum {len(self.nodes) // 2 + 1}")

    def boot(self, n: Node) -> None:
        n.incarnation += 1
        n.core = Replica(n.rid, list(self.nodes), KVStore(), self.config,
                         seed=self.seed * 1000 + n.incarnation)
        n.core.recover([copy_tuple(r) for r in n.durable])
        n.checked = 0

    def cmd_tick(self, args):
        if not 1 <= len(args) <= 2:
            raise ScriptError("tick IDS [n]")
        nodes = self.ids(args[0])
        before = self.snapshot()
        for _ in range(int(args[1]) if len(args) > 1 else 1):
            for n in nodes:
                n.core.tick()
        self.observe(before, indent="")

    def cmd_campaign(self, args):
        n = self.node(args[0])
        if n.core.role != "follower":
            raise ScriptError(f"{n.rid} is {n.core.role}, not a follower")
        before = self.snapshot()
        for k in range(1, 4 * self.config.election_ticks + 1):
            n.core.tick()
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
            n.core.tick()
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
            self.clients[name] = Client(name, 100 + len(self.clients) + 1)
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

    def submit(self, n: Node, batch: bytes) -> None:
        label = self.fmt_value(batch)
        sid, first = struct.unpack_from("<QQ", batch)
        status = n.core.propose(batch)
        if status == PROPOSED:
            n.proposed[(sid, first)] = n.proposed.get((sid, first), 0) + 1
            self.say(f"{label} at {n.rid}: proposed")
        else:
            word = "not leader" if status == NOT_LEADER else "busy"
            self.say(f"{label} at {n.rid}: {word} (leader_id={n.core.leader_id})")

    def cmd_read(self, args):
        if len(args) not in (2, 3):
            raise ScriptError("read ID RID [KEY]")
        n, rid = self.node(args[0]), args[1]
        key = args[2] if len(args) > 2 else "k"
        before = self.snapshot()
        if n.core.read(rid):
            n.reads[rid] = b"G" + key.encode()
            self.say(f"read {rid} (get {key}) at {n.rid}: registered")
        else:
            self.say(f"read {rid} (get {key}) at {n.rid}: refused (leader_id={n.core.leader_id})")
        self.observe(before)

    def cmd_crash(self, args):
        n = self.node(args[0])
        lost, held = len(n.unsynced), len(n.held)
        n.core, n.unsynced, n.held = None, [], []
        n.proposed.clear()
        n.reads.clear()
        self.say(f"{n.rid} crashed: lost {lost} unsynced records and {held} held messages; "
                 f"{len(n.durable)} records durable")

    def cmd_restart(self, args):
        n = self.node(args[0], live=False)
        if n.up:
            raise ScriptError(f"{n.rid} is running")
        self.boot(n)
        c = n.core
        self.say(f"{n.rid} restarted from {len(n.durable)} records: b={format_ballot(c.ballot)} "
                 f"commit={c.commit_index} applied={c.applied_index} last={c.last_slot}")

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
                self.say(f"{n.rid} down ({len(n.durable)} records durable)")
                continue
            c = n.core
            line = (f"{n.rid} {c.role:<9} b={format_ballot(c.ballot)} leader={c.leader_id} "
                    f"commit={c.commit_index} applied={c.applied_index} last={c.last_slot} "
                    f"digest={c.state_machine.state_digest()}")
            if n.unsynced or n.held:
                line += f" unsynced={len(n.unsynced)} held={len(n.held)}"
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
