# cython: language_level=3
"""The pure Multi-Paxos replica.

Theory of operation
-------------------
A `Replica` is one member of a cluster of 2f+1.  It never touches a clock, a socket,
a file or a global random generator: inputs are `step(message)`, `propose(batch)`,
`read(read_id)`, `tick()` and `persisted(persist_id)`; every output is gathered into
a `Ready` that the caller takes with `ready()`.

Every replica plays all three Paxos roles over one slot-indexed log:

* acceptor: keeps `promised` and, per slot, the accepted (ballot, value).  It promises
  (PREPARE -> PROMISE) and accepts (ACCEPT -> ACCEPTED) only through records handed to
  the caller, and its answers go in `messages_after_persist`, so they leave only once
  what they vouch for is durable.
* proposer: a follower that hears nothing from a leader for a randomized election
  timeout picks a ballot `(round, replica_id)` higher than any it has seen, persists
  it, and runs phase 1 once for the whole suffix of the log after its commit index.
  With promises from a quorum it adopts, for every slot past the highest commit index
  reported, the value accepted with the highest ballot, fills holes with no-ops, and
  from then on runs only phase 2: client batches are cut into slots (by bytes, by a
  window of slots in flight, optionally by ticks) and pipelined.
* learner: the leader counts ACCEPTED votes per slot (its own vote counts only once
  its own record is durable); followers learn the commit index piggybacked on
  ACCEPT and HEARTBEAT and mark chosen the slots they accepted in the leader's ballot.
  A replica missing chosen values pulls them (CATCHUP_REQ -> CHOSEN) from a peer.

Chosen slots are applied strictly in order to the state machine, through the session
table that makes client commands exactly-once.  Linearizable reads use a read index:
the leader confirms with a quorum of heartbeat acknowledgements sent after the read
arrived that it still leads, then serves once applied up to the commit index it saw
(or at once under an enabled lease).

Ballots are int64 `round << 16 | replica_id`; `CHOSEN_BALLOT` marks a slot known to
be chosen.  See docs/internals.md for the message and record formats.

What peers send is checked before any of it is recorded or adopted, even though the
shell only hands over messages from authenticated members: a ballot outside the
ballot space or far ahead of every round seen, a slot value whose client batches
disagree with their bytes, slot numbers no honest peer could send, a CHOSEN that was
not asked for or that contradicts a value known chosen.  `step()` then raises
MessageError (or ignores a message that may be honest but late) and the replica's
state is as if the message had never arrived.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

from collections import OrderedDict

from cypaxos.protocol cimport (
    ACCEPT, ACCEPTED, BALLOT_ID_BITS, BALLOT_ID_MASK, BALLOT_ROUND_MAX_C, CATCHUP_REQ,
    CHOSEN, CHOSEN_BALLOT_C, CLIENT_BATCH_HEADER_BYTES, HEARTBEAT, HEARTBEAT_ACK, NACK,
    PREPARE, PREVOTE, PREVOTE_ACK, PROMISE, REC_ACCEPT, REC_COMMIT, REC_PROMISE,
    RESULT_ERROR, RESULT_OK, RESULT_RETRY, RESULT_SESSION_EXPIRED, SEQ_LIMIT_C, ballot_fits,
)
from cypaxos.statemachine cimport ResultWriter, StateMachine

from cypaxos.errors import WalCorruptError
from cypaxos.protocol import (  # noqa: F401 - re-exported, as before
    CHOSEN_BALLOT, MESSAGE_NAMES, ballot_owner, ballot_round, make_ballot,
)

DEBUG_BUILD = bool(DEBUG)
"""True in a build made with CYPAXOS_DEBUG=1 (its debug-only asserts are compiled in)."""

# Actions that wait for the caller's persisted().
cdef enum:
    SELF_VOTE = 1
    SELF_PROMISE = 2

# Test-only faults that deliberately break the protocol, to prove that the simulator
# notices (tests/test_simulator.py, test_simulator_catches_broken_protocols) and that
# a debug build's asserts fire (tests/test_core_debug.py).  Never set in production.
FAULT_REPLY_BEFORE_PERSIST = 1
FAULT_SKIP_ADOPTION = 2
FAULT_COMMIT_WITHOUT_QUORUM = 4
FAULT_UNCHECKED_VALUES = 8   # ACCEPT values from peers are not checked

PROPOSED = 0
NOT_LEADER = 1
BUSY = 2

# The session id of registrations: a batch for it asks for a new session (its first_seq
# is the client's nonce, its one command empty) and is answered with the new id.
cdef uint64_t REGISTER_SESSION = 0
REGISTER_SESSION_ID = REGISTER_SESSION

# A peer's ballot may be at most this many rounds above every round this replica has
# seen.  Honest rounds grow by one per election (2**32 of them is over a century of
# one a second), so only a forged or corrupted ballot jumps that far; refusing it
# keeps one message from using up the ballot space and leaving no next ballot.
cdef int64_t ROUND_JUMP_MAX_C = <int64_t>1 << 32
ROUND_JUMP_MAX = ROUND_JUMP_MAX_C

ROLE_NAMES = ("follower", "candidate", "leader")


class MessageError(ValueError):
    """A peer message that is malformed or inconsistent; the sender should be dropped."""


class BatchError(ValueError):
    """A client batch that does not follow the documented layout."""


cdef inline int owner_of(int64_t ballot) noexcept:
    return <int>(ballot & BALLOT_ID_MASK)


cdef inline uint64_t load_u64(const char* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


cdef inline uint32_t load_u32(const char* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline int popcount(uint64_t x) noexcept:
    cdef int n = 0
    while x:
        x &= x - 1
        n += 1
    return n


# What is wrong with a client batch (0: nothing), as found by batch_length().
cdef enum:
    BATCH_OK = 0
    BATCH_SHORT = 1
    BATCH_NO_COMMANDS = 2
    BATCH_SEQ_RANGE = 3
    BATCH_PAYLOAD_OVERRUN = 4
    BATCH_COMMAND_OVERRUN = 5
    BATCH_TRAILING = 6
    BATCH_NOT_BYTES = 7

BATCH_FAULTS = (
    "", "shorter than its header", "with no commands or sequence number 0",
    "with sequence numbers out of range", "whose payload overruns it",
    "with a command that overruns its payload", "with trailing bytes in its payload",
    "that is not bytes",
)


cdef Py_ssize_t batch_length(const char* p, Py_ssize_t n, int* fault) noexcept nogil:
    """The length of the client batch at `p` (`n` bytes there), or -1 with `*fault` set.

    One pass over the commands' u32 lengths and no objects; a batch that passes can be
    handed to the state machine, which then reads no byte outside it.
    """
    cdef uint64_t first
    cdef uint32_t count, k
    cdef Py_ssize_t end, q
    if n < CLIENT_BATCH_HEADER_BYTES:
        fault[0] = BATCH_SHORT
        return -1
    first = load_u64(p + 8)
    count = load_u32(p + 24)
    if count == 0 or first == 0:
        fault[0] = BATCH_NO_COMMANDS
        return -1
    if first > SEQ_LIMIT_C - count:
        fault[0] = BATCH_SEQ_RANGE
        return -1
    end = CLIENT_BATCH_HEADER_BYTES + <Py_ssize_t>load_u32(p + 28)
    if end > n:
        fault[0] = BATCH_PAYLOAD_OVERRUN
        return -1
    q = CLIENT_BATCH_HEADER_BYTES
    for k in range(count):
        # Each command takes at least 4 bytes, so a huge count stops at the payload's end.
        if q + 4 > end:
            fault[0] = BATCH_COMMAND_OVERRUN
            return -1
        q += 4 + <Py_ssize_t>load_u32(p + q)
        if q > end:
            fault[0] = BATCH_COMMAND_OVERRUN
            return -1
    if q != end:
        fault[0] = BATCH_TRAILING
        return -1
    return end


cdef int value_fault(object value) noexcept:
    """BATCH_OK if `value` is a slot value (b"" or client batches back to back)."""
    cdef const char* p
    cdef Py_ssize_t n, pos = 0, k
    cdef int fault = BATCH_OK
    if type(value) is not bytes:
        return BATCH_NOT_BYTES
    p = PyBytes_AS_STRING(value)
    n = PyBytes_GET_SIZE(value)
    while pos < n:
        k = batch_length(p + pos, n - pos, &fault)
        if k < 0:
            return fault
        pos += k
    return BATCH_OK


cdef int check_values(list values, str what) except -1:
    """Raise MessageError unless every item of `values` is a slot value."""
    cdef Py_ssize_t k
    cdef int fault
    for k in range(len(values)):
        fault = value_fault(values[k])
        if fault:
            raise MessageError(f"{what} value {k} holds a client batch {BATCH_FAULTS[fault]}"
                               if fault != BATCH_NOT_BYTES else f"{what} value {k} is not bytes")
    return 0


def validate_client_batch(bytes batch):
    """Check a client batch's layout; return (session_id, first_seq, count) or raise BatchError."""
    cdef const char* p = PyBytes_AS_STRING(batch)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(batch)
    cdef int fault = BATCH_OK
    cdef Py_ssize_t k = batch_length(p, n, &fault)
    if k < 0:
        raise BatchError(f"client batch {BATCH_FAULTS[fault]}")
    if k != n:
        raise BatchError("client batch has bytes after its payload")
    return load_u64(p), load_u64(p + 8), load_u32(p + 24)


cdef inline bint registration_layout(const char* p, Py_ssize_t n) noexcept nogil:
    """Whether the checked client batch at `p` is a registration: session 0, one empty
    command (its first_seq is the client's nonce)."""
    return (n == CLIENT_BATCH_HEADER_BYTES + 4 and load_u64(p) == REGISTER_SESSION
            and load_u32(p + 24) == 1 and load_u32(p + CLIENT_BATCH_HEADER_BYTES) == 0)


cdef bint is_registration(bytes batch) noexcept:
    return registration_layout(PyBytes_AS_STRING(batch), PyBytes_GET_SIZE(batch))


cdef int64_t recovered_ballot(object ballot, str where) except -1:
    """A ballot read back from the WAL or a snapshot, or WalCorruptError if outside the space."""
    if type(ballot) is not int or not 0 <= ballot < CHOSEN_BALLOT_C or not ballot_fits(ballot):
        raise WalCorruptError(
            f"{where} holds ballot {ballot!r}, outside the ballot space (rounds up to "
            f"{BALLOT_ROUND_MAX_C}): this replica could never campaign again; replace it "
            f"(docs/internals.md, \"Ballots\")")
    return ballot


cdef int fail(str what) except -1:
    """Report a broken invariant or an illegal transition (a bug, never bad input)."""
    raise AssertionError(what)


@cython.final
cdef class Config:
    """Tunables of one replica, in ticks, slots and bytes.

    heartbeat_ticks: how often a leader sends heartbeats (and retransmits).
    election_ticks: the minimum election timeout; each timeout is drawn uniformly
        from [election_ticks, 2 * election_ticks).
    window_slots: how many proposed slots may be unchosen at once (pipelining).
    batch_bytes_max: a slot is cut once its client batches reach this many bytes.
    batch_delay_ticks: with a free window, wait up to this many ticks for a fuller slot.
    message_bytes_max: ACCEPT / CHOSEN messages are split to stay under this.
    resend_ticks: an unchosen slot is sent again to silent acceptors after this.
    pending_bytes_max: propose() answers BUSY past this many queued bytes.
    max_sessions: the session table keeps this many clients; a registration past it
        evicts the least recently used one, whose later commands get SESSION_EXPIRED.
    accept_ahead_max: slots further than this past this replica's commit index are
        ignored, and a candidate does not count a promise whose commit index is
        further ahead than this (a far-behind replica catches up first instead of
        allocating a huge log); it also bounds the no-op holes a new leader fills.
    lease_ticks: 0 disables leases; otherwise a leader serves reads without a quorum
        round for this long after a quorum acknowledged a heartbeat, and followers
        refuse to promise another proposer for election_ticks after hearing the
        leader.  Requires lease_ticks + clock_drift_ticks <= election_ticks.
    clock_drift_ticks: the bound on how far replicas' tick rates may disagree over
        one lease.
    check_quorum: a leader that hears from no quorum for an election timeout steps down.
    pre_vote: before campaigning, ask the peers whether they would promise; they say
        yes only if they have not heard from a leader for election_ticks, so a replica
        that restarts or was cut off cannot depose a healthy leader.
    check_invariants: check the documented invariants after every input (slow); a
        broken one raises AssertionError, in any build.
    """

    def __init__(self, *, heartbeat_ticks=2, election_ticks=10, window_slots=64,
                 batch_bytes_max=1 << 20, batch_delay_ticks=0,
                 message_bytes_max=4 << 20, resend_ticks=4,
                 pending_bytes_max=64 << 20, max_sessions=100000,
                 accept_ahead_max=1 << 16, lease_ticks=0, clock_drift_ticks=0,
                 check_quorum=True, pre_vote=False, check_invariants=False, fault=0):
        self.heartbeat_ticks = heartbeat_ticks
        self.election_ticks = election_ticks
        self.window_slots = window_slots
        self.batch_bytes_max = batch_bytes_max
        self.batch_delay_ticks = batch_delay_ticks
        self.message_bytes_max = message_bytes_max
        self.resend_ticks = resend_ticks
        self.pending_bytes_max = pending_bytes_max
        self.max_sessions = max_sessions
        self.accept_ahead_max = accept_ahead_max
        self.lease_ticks = lease_ticks
        self.clock_drift_ticks = clock_drift_ticks
        self.check_quorum = check_quorum
        self.pre_vote = pre_vote
        self.check_invariants = check_invariants
        self.fault = fault
        self.validate()

    def validate(self):
        """Raise ValueError if the settings cannot work together."""
        if self.heartbeat_ticks < 1 or self.election_ticks <= self.heartbeat_ticks:
            raise ValueError("need 1 <= heartbeat_ticks < election_ticks")
        if self.window_slots < 1 or self.batch_bytes_max < 1 or self.message_bytes_max < 1:
            raise ValueError("window_slots, batch_bytes_max and message_bytes_max must be positive")
        if self.resend_ticks < 1 or self.max_sessions < 1:
            raise ValueError("resend_ticks and max_sessions must be positive")
        if self.accept_ahead_max <= self.window_slots:
            raise ValueError("accept_ahead_max must exceed window_slots")
        if self.lease_ticks < 0 or self.clock_drift_ticks < 0:
            raise ValueError("lease_ticks and clock_drift_ticks must be >= 0")
        if self.lease_ticks and self.lease_ticks + self.clock_drift_ticks > self.election_ticks:
            raise ValueError("a lease needs lease_ticks + clock_drift_ticks <= election_ticks")

    def as_dict(self):
        """The settings as a plain dict."""
        return {name: getattr(self, name) for name in (
            "heartbeat_ticks", "election_ticks", "window_slots", "batch_bytes_max",
            "batch_delay_ticks", "message_bytes_max", "resend_ticks", "pending_bytes_max",
            "max_sessions", "accept_ahead_max", "lease_ticks", "clock_drift_ticks",
            "check_quorum", "pre_vote", "check_invariants", "fault")}


@cython.final
cdef class Ready:
    """What one batch of inputs asks the caller to do; see docs/internals.md.

    Order: append `records` to the WAL; send `messages` at once; once every record
    handed out so far is durable, send `messages_after_persist` and call
    `persisted(persist_id)`.  `results` answer client batches, `reads` name reads
    that may now be served from the state machine, `reads_failed` name reads that
    must be retried elsewhere; `lost_leadership` says pending client batches should
    be retried at the new leader; `snapshot_to` names peers that need slots this
    replica has compacted away: send them the latest durable snapshot.
    """

    def __repr__(self):
        return (f"Ready(records={len(self.records)}, messages={len(self.messages)}, "
                f"after={len(self.messages_after_persist)}, results={len(self.results)}, "
                f"reads={len(self.reads)}, persist_id={self.persist_id})")


@cython.final
cdef class Session:
    """One client's exactly-once state: the next sequence number and unacknowledged results."""

    def __init__(self, int64_t next_seq):
        self.next_seq = next_seq
        self.cache = []


@cython.final
cdef class Replica:
    """One Multi-Paxos replica; pure and deterministic (see the module docstring)."""

    def __init__(self, int replica_id, replica_ids, StateMachine state_machine,
                 Config config=None, uint64_t seed=0):
        members = tuple(sorted(set(int(i) for i in replica_ids)))
        if replica_id not in members:
            raise ValueError(f"replica {replica_id} is not among {members}")
        if len(members) > 63 or min(members) < 1 or max(members) > BALLOT_ID_MASK:
            raise ValueError("replica ids must be 1..65535, at most 63 of them")
        self.replica_id = replica_id
        self.members = members
        self.peers = [i for i in members if i != replica_id]
        self.member_bit = {m: 1 << k for k, m in enumerate(members)}
        self.quorum = len(members) // 2 + 1
        self.config = config if config is not None else Config()
        self.config.validate()
        self.state_machine = state_machine
        # xorshift64* state; never zero.
        self.rng_state = (seed * 0x9e3779b97f4a7c15ULL) ^ (<uint64_t>replica_id * 0xbf58476d1ce4e5b9ULL) or 1
        self.now = 0
        self.promised = 0
        self.round_seen = 0
        self.log_base = 1
        self.values = []
        self.ballots = []
        self.commit_index = 0
        self.applied_index = 0
        self.role_ = FOLLOWER
        self.leader_id = 0
        self.promises = {}
        self.votes = {}
        self.sent_tick = {}
        self.pending = []
        self.pending_bytes_ = 0
        self.heard = set()
        self.peer_ctx = {}
        self.ctx_tick = {}
        self.reads_unsent = []
        self.reads_inflight = []
        self.reads_confirmed = []
        self.sessions = OrderedDict()
        self.next_session_id = 1
        self.writer = ResultWriter()
        self.out_records = []
        self.out_messages = []
        self.out_after = []
        self.out_results = []
        self.out_reads = []
        self.out_reads_failed = []
        self.out_snapshot_to = []
        self.pending_self = []
        self.awaiting = []
        # chosen_unasked: CHOSEN ignored (not the answer to our outstanding request);
        # chosen_conflicts: CHOSEN refused for contradicting a value known chosen;
        # promises_deferred: promises not counted (their commit index is too far
        # ahead: catching up first); promises_refused: promise sets that no honest
        # quorum could send; ballots_exhausted: elections skipped for want of a round;
        # sessions_registered / sessions_evicted: the session table's comings and
        # goings; sessions_expired: batches answered SESSION_EXPIRED (no such session).
        self.stats = {"elections": 0, "became_leader": 0, "slots_proposed": 0,
                      "slots_applied": 0, "catchup_requests": 0, "retransmits": 0,
                      "reads_served": 0, "duplicates": 0, "chosen_unasked": 0,
                      "chosen_conflicts": 0, "promises_deferred": 0,
                      "promises_refused": 0, "ballots_exhausted": 0,
                      "sessions_registered": 0, "sessions_evicted": 0,
                      "sessions_expired": 0}
        # A (re)started replica acts as if it just heard from a leader, so that a
        # lease granted before a crash is still respected.
        self.leader_heard_tick = 0
        self.reset_election_timer()

    # ------------------------------------------------------------------ public

    @property
    def role(self):
        """"leader", "follower" or "candidate"."""
        return ROLE_NAMES[self.role_]

    @property
    def ballot(self):
        """The highest ballot this replica has promised (its own when it leads)."""
        return self.promised

    @property
    def members(self):
        """Every replica id of the cluster."""
        return self.members

    @property
    def pending_bytes(self):
        """Bytes of client batches queued at this leader and not yet in a slot."""
        return self.pending_bytes_

    @property
    def log_start(self):
        """The first slot still held in memory."""
        return self.log_base

    @property
    def last_slot(self):
        """The highest slot this replica holds anything for."""
        return self.log_base + len(self.values) - 1

    def statistics(self):
        """Counters and positions, for status pages and tests."""
        d = dict(self.stats)
        d.update(replica_id=self.replica_id, role=self.role, ballot=self.promised,
                 leader_id=self.leader_id, commit_index=self.commit_index,
                 applied_index=self.applied_index, log_start=self.log_base,
                 last_slot=self.log_base + len(self.values) - 1,
                 pending_bytes=self.pending_bytes_, sessions=len(self.sessions),
                 tick=self.now, known_commit=self.known_commit, catchup_peer=self.catchup_peer,
                 leader_heard_tick=self.leader_heard_tick)
        return d

    def entry(self, int64_t slot):
        """(ballot, value) held for a slot, or None (tests and tools)."""
        if slot < self.log_base or slot >= self.log_base + len(self.values):
            return None
        i = slot - self.log_base
        if self.values[i] is None:
            return None
        return self.ballots[i], self.values[i]

    def chosen_value(self, int64_t slot):
        """The chosen value of a committed slot still in memory, else None."""
        if slot > self.commit_index or slot < self.log_base:
            return None
        return self.values[slot - self.log_base]

    def recover(self, records, snapshot=None):
        """Rebuild the replica from its latest snapshot and the WAL's records, in order.

        `snapshot` is None or `(index, promised, sessions, state)` as returned by
        `snapshot()`.  The promised ballot is the highest ballot in the snapshot or any
        record; a slot's value is the last one recorded (a chosen one always wins);
        COMMIT records say which prefix is chosen, and that prefix is applied.

        Raises cypaxos.errors.WalCorruptError for a record no version of this core
        writes: an unknown type, a value that is not client batches, a slot said
        chosen without a value, or a ballot outside the ballot space.  A WAL written
        by an older version after it promised a forged ballot near the top of the
        space is such a WAL: its replica could never campaign again (the next round
        would not fit), so it refuses to start rather than wedge its cluster.  The
        records stay on disk; the replica has to be replaced (docs/internals.md).
        """
        cdef int64_t ballot, first, commit = 0, i
        cdef int kind, fault
        if snapshot is not None:
            index, promised, sessions, state = snapshot
            recovered_ballot(promised, "the snapshot's promise")
            self.restore_state(index, sessions, state)
            if promised > self.promised:
                self.promised = promised
        for rec in records:
            kind = rec[0]
            if kind == REC_PROMISE:
                ballot = recovered_ballot(rec[1], "a PROMISE record")
                if ballot > self.promised:
                    self.promised = ballot
            elif kind == REC_ACCEPT:
                first = rec[1]
                ballot = rec[2]
                if first < 1:
                    raise WalCorruptError(f"WAL has an ACCEPT record for slot {first}")
                if ballot != CHOSEN_BALLOT_C:
                    recovered_ballot(ballot, "an ACCEPT record")
                    if ballot > self.promised:
                        self.promised = ballot
                for i, value in enumerate(rec[3]):
                    fault = value_fault(value)
                    if fault:
                        raise WalCorruptError(
                            f"WAL's value for slot {first + i} holds a client batch "
                            f"{BATCH_FAULTS[fault]}")
                    if first + i < self.log_base:
                        continue
                    if self.ballot_at(first + i) != CHOSEN_BALLOT_C:
                        self.set_entry(first + i, value, ballot)
            elif kind == REC_COMMIT:
                if rec[1] > commit:
                    commit = rec[1]
            else:
                raise WalCorruptError(f"unknown WAL record type {kind}")
        self.round_seen = self.promised >> BALLOT_ID_BITS
        self.promise_recorded = self.promised
        # Records are durable in order, so a durable COMMIT record implies that every
        # slot up to it holds its chosen value.
        commit = min(commit, self.log_base + len(self.values) - 1)
        for i in range(self.commit_index + 1, commit + 1):
            if self.values[i - self.log_base] is None:
                raise WalCorruptError(f"WAL says slot {i} is chosen but holds no value for it")
            self.ballots[i - self.log_base] = CHOSEN_BALLOT_C
        if commit > self.commit_index:
            self.commit_index = commit
        self.commit_recorded = self.commit_index
        self.apply_committed()
        self.out_results = []
        if self.config.check_invariants:
            self.check_invariants()

    def tick(self):
        """Advance logical time by one tick."""
        self.now += 1
        if self.role_ == LEADER:
            self.heartbeat_elapsed += 1
            if self.heartbeat_elapsed >= self.config.heartbeat_ticks:
                self.broadcast_heartbeat()
                self.retransmit()
            if self.config.check_quorum:
                self.quorum_check_elapsed += 1
                if self.quorum_check_elapsed >= 2 * self.config.election_ticks:
                    self.quorum_check_elapsed = 0
                    if len(self.heard) + 1 < self.quorum:
                        self.become_follower()
                    self.heard = set()
        else:
            self.election_elapsed += 1
            if self.election_elapsed >= self.election_timeout:
                if self.config.pre_vote:
                    self.pre_campaign()
                else:
                    self.campaign()
            elif self.role_ == CANDIDATE:
                self.heartbeat_elapsed += 1
                if self.heartbeat_elapsed >= self.config.heartbeat_ticks:
                    self.heartbeat_elapsed = 0
                    for p in self.peers:
                        if p not in self.promises:
                            self.send_after(p, (PREPARE, self.replica_id, self.promised,
                                                self.prepare_from))
        if self.catchup_inflight and self.now - self.catchup_sent_tick >= 2 * self.config.resend_ticks:
            # No answer: that peer may be down or may have lost its commit index in a
            # restart, so ask the next one.
            self.catchup_inflight = False
            k = self.peers.index(self.catchup_peer) if self.catchup_peer in self.peers else -1
            self.catchup_peer = self.peers[(k + 1) % len(self.peers)]
            self.want_catchup(self.catchup_peer, self.known_commit)
        if self.config.check_invariants:
            self.check_invariants()

    def step(self, msg):
        """Handle one message from a peer.

        Raises MessageError if it is malformed or could not come from an honest peer;
        nothing of such a message is recorded or adopted (the sender should be dropped).
        """
        cdef int kind, src
        cdef int64_t ballot, round_
        try:
            kind = msg[0]
            src = msg[1]
            ballot = msg[2]
        except (TypeError, IndexError, OverflowError) as exc:
            raise MessageError(f"malformed message header: {exc}") from None
        if src == self.replica_id or src not in self.member_bit:
            raise MessageError(f"message from unknown replica {src}")
        if not ballot_fits(ballot):
            raise MessageError(f"ballot {ballot:#x} is outside the ballot space")
        round_ = ballot >> BALLOT_ID_BITS
        if round_ - self.round_seen > ROUND_JUMP_MAX_C:
            raise MessageError(f"ballot {ballot:#x} is {round_ - self.round_seen} rounds "
                               f"ahead of any seen")
        try:
            if kind == ACCEPT:
                self.on_accept(src, ballot, msg[3], msg[4], msg[5])
            elif kind == ACCEPTED:
                self.on_accepted(src, ballot, msg[3], msg[4], msg[5])
            elif kind == HEARTBEAT:
                self.on_heartbeat(src, ballot, msg[3], msg[4])
            elif kind == HEARTBEAT_ACK:
                self.on_heartbeat_ack(src, ballot, msg[3], msg[4])
            elif kind == PREPARE:
                self.on_prepare(src, ballot, msg[3])
            elif kind == PROMISE:
                self.on_promise(src, ballot, msg[3], msg[4])
            elif kind == NACK:
                self.on_nack(src, ballot)
            elif kind == CATCHUP_REQ:
                self.on_catchup_req(src, msg[3])
            elif kind == CHOSEN:
                self.on_chosen(src, msg[3], msg[4])
            elif kind == PREVOTE:
                self.on_prevote(src, ballot)
            elif kind == PREVOTE_ACK:
                self.on_prevote_ack(src, ballot, msg[3])
            else:
                raise MessageError(f"unknown message type {kind}")
        except (TypeError, IndexError, OverflowError) as exc:
            raise MessageError(f"malformed {MESSAGE_NAMES.get(kind, kind)} message: {exc}") from None
        # Only now that the message passed every check: the next campaign outbids it.
        if round_ > self.round_seen:
            self.round_seen = round_
        if self.config.check_invariants:
            self.check_invariants()

    def propose(self, bytes batch):
        """Queue a client batch (docs/internals.md); PROPOSED, NOT_LEADER or BUSY.

        Raises BatchError if the batch is malformed.
        """
        if validate_client_batch(batch)[0] == REGISTER_SESSION and not is_registration(batch):
            raise BatchError("a registration (session 0) is one empty command")
        if self.role_ != LEADER:
            return NOT_LEADER
        if self.pending_bytes_ >= self.config.pending_bytes_max:
            return BUSY
        if not self.pending:
            self.pending_since = self.now
        self.pending.append(batch)
        self.pending_bytes_ += PyBytes_GET_SIZE(batch)
        return PROPOSED

    def read(self, read_id):
        """Register a linearizable read; True if this leader will confirm it, else False."""
        if self.role_ != LEADER:
            return False
        if (self.config.lease_ticks and self.now < self.lease_until
                and self.commit_index >= self.leader_barrier):
            self.reads_confirmed.append((self.commit_index, read_id))
            return True
        self.reads_unsent.append(read_id)
        if self.confirmed_ctx == self.read_ctx:
            self.broadcast_heartbeat()
        return True

    def persisted(self, int64_t persist_id):
        """Every record handed out up to `persist_id` is durable."""
        cdef int64_t b, first, count, s
        cdef uint64_t bit
        if persist_id > self.persist_seq:
            raise ValueError(f"persisted({persist_id}): the newest persist_id handed out "
                             f"is {self.persist_seq}")
        if persist_id <= self.persisted_seq:
            return
        self.persisted_seq = persist_id
        done = 0
        for entry in self.awaiting:
            if entry[0] > persist_id:
                break
            done += 1
            if entry[1] == SELF_VOTE:
                b = entry[2]
                if self.role_ != LEADER or self.promised != b:
                    continue
                first = entry[3]
                count = entry[4]
                bit = self.member_bit[self.replica_id]
                for s in range(max(first, self.commit_index + 1), first + count):
                    m = self.votes.get(s)
                    if m is not None:
                        self.votes[s] = m | bit
            elif entry[1] == SELF_PROMISE:
                if self.role_ == CANDIDATE and self.promised == entry[2]:
                    self.self_promised = True
                    self.maybe_win()
        del self.awaiting[:done]
        if self.role_ == LEADER:
            self.advance_commit()
        if self.config.check_invariants:
            self.check_invariants()

    def ready(self):
        """Take what the inputs so far ask of the caller, or None when there is nothing."""
        cdef Ready r
        self.cut_batches()
        self.release_reads()
        if self.out_records and self.commit_index > self.commit_recorded:
            self.out_records.append((REC_COMMIT, self.commit_index))
            self.commit_recorded = self.commit_index
        if not (self.out_records or self.out_messages or self.out_after or self.out_results
                or self.out_reads or self.out_reads_failed or self.out_lost_leadership
                or self.out_snapshot_to):
            return None
        if self.out_records:
            self.persist_seq += 1
            for action in self.pending_self:
                self.awaiting.append((self.persist_seq,) + action)
            self.pending_self = []
        r = Ready.__new__(Ready)
        r.records = self.out_records
        r.messages = self.out_messages
        r.messages_after_persist = self.out_after
        r.results = self.out_results
        r.reads = self.out_reads
        r.reads_failed = self.out_reads_failed
        r.persist_id = self.persist_seq
        r.lost_leadership = self.out_lost_leadership
        r.snapshot_to = self.out_snapshot_to
        self.out_snapshot_to = []
        self.out_records = []
        self.out_messages = []
        self.out_after = []
        self.out_results = []
        self.out_reads = []
        self.out_reads_failed = []
        self.out_lost_leadership = False
        if self.config.check_invariants:
            self.check_invariants()
        return r

    def snapshot(self):
        """Capture the replicated state at the applied index.

        Returns `(index, promised, sessions, state)`: the applied index, the promised
        ballot, the session table (a list) and the state machine's `snapshot()` bytes.
        It also hands out, in the next Ready, records that restate everything the WAL
        must still say (the promise, every held slot after the index, the commit
        index).  So once the snapshot is durable and that Ready's records are durable,
        every WAL record written before that Ready is redundant and may be deleted.
        """
        cdef int64_t index = self.applied_index
        state = self.state_machine.snapshot()
        sessions = self.export_sessions()
        self.restate_log()
        return (index, self.promised, sessions, state)

    def install_snapshot(self, int64_t index, sessions, bytes state):
        """Adopt a peer's snapshot taken at `index` (all slots up to it are chosen).

        The caller makes the snapshot durable first.  A snapshot no newer than the
        commit index is stale and ignored (returns False).  Like `snapshot()`, this
        hands out records restating the log after `index`.
        """
        if index <= self.commit_index:
            return False
        self.restore_state(index, sessions, state)
        for s in [s for s in self.votes if s <= index]:
            del self.votes[s]
            self.sent_tick.pop(s, None)
        self.restate_log()
        self.advance_commit()
        if self.commit_index < self.known_commit:
            self.catchup_inflight = False
            self.want_catchup(self.catchup_peer, self.known_commit)
        if self.config.check_invariants:
            self.check_invariants()
        return True

    cdef int restore_state(self, int64_t index, object sessions, bytes state) except -1:
        """Replace the state machine, sessions and log prefix with a snapshot's.

        The session table is read first: a malformed one raises before anything changed.
        """
        cdef Py_ssize_t drop
        cdef Session sess
        if index < self.log_base - 1:
            fail(f"restoring a snapshot at slot {index}, below the log ({self.log_base})")
        table = OrderedDict()
        next_id = 1
        for sid, next_seq, cache in sessions:
            if sid == REGISTER_SESSION:
                next_id = next_seq
                continue
            sess = Session(next_seq)
            sess.cache = [(first, count, results) for first, count, results in cache]
            table[sid] = sess
        self.state_machine.restore(state)
        self.sessions = table
        self.next_session_id = next_id
        drop = index - self.log_base + 1
        if drop >= len(self.values):
            self.values = []
            self.ballots = []
        elif drop > 0:
            del self.values[:drop]
            del self.ballots[:drop]
        self.log_base = index + 1
        self.commit_index = index
        self.applied_index = index
        if self.commit_recorded < index:
            self.commit_recorded = index
        return 0

    def export_sessions(self):
        """The session table as plain lists, in eviction order.

        The first entry is session 0's: the registrar, whose next number is the next
        session id to hand out.
        """
        cdef Session sess
        out = [[REGISTER_SESSION, self.next_session_id, []]]
        for sid, sess in self.sessions.items():
            out.append([sid, sess.next_seq, [list(e) for e in sess.cache]])
        return out

    cdef int restate_log(self) except -1:
        """Hand out records that say everything the WAL must about the log after the
        applied index, so that earlier records become redundant."""
        cdef Py_ssize_t i, n = len(self.values)
        cdef int64_t b, run_ballot = 0, run_first = 0
        cdef list run = []
        self.append_record((REC_PROMISE, self.promised), self.promised)
        for i in range(max(0, self.applied_index + 1 - self.log_base), n):
            v = self.values[i]
            b = self.ballots[i]
            if v is None or (run and b != run_ballot):
                if run:
                    self.append_record((REC_ACCEPT, run_first, run_ballot, run), 0)
                    run = []
                if v is None:
                    continue
            if not run:
                run_first = self.log_base + i
                run_ballot = b
            run.append(v)
        if run:
            self.append_record((REC_ACCEPT, run_first, run_ballot, run), 0)
        self.out_records.append((REC_COMMIT, self.commit_index))
        self.commit_recorded = self.commit_index
        return 0

    def compact(self, int64_t slot):
        """Forget in-memory log entries up to `slot` (never past the applied index)."""
        cdef int64_t upto = min(slot, self.applied_index)
        cdef Py_ssize_t drop = upto - self.log_base + 1
        if drop <= 0:
            return
        del self.values[:drop]
        del self.ballots[:drop]
        self.log_base = upto + 1

    # ------------------------------------------------------------ internals

    cdef uint64_t next_random(self):
        cdef uint64_t x = self.rng_state
        x ^= x >> 12
        x ^= x << 25
        x ^= x >> 27
        self.rng_state = x
        return x * 0x2545F4914F6CDD1DULL

    cdef void reset_election_timer(self):
        self.election_elapsed = 0
        self.election_timeout = self.config.election_ticks + <int64_t>(
            self.next_random() % <uint64_t>self.config.election_ticks)

    cdef int64_t ballot_at(self, int64_t slot):
        if slot < self.log_base or slot >= self.log_base + len(self.values):
            return 0
        return self.ballots[slot - self.log_base]

    cdef int set_entry(self, int64_t slot, object value, int64_t ballot) except -1:
        cdef Py_ssize_t i = slot - self.log_base
        cdef Py_ssize_t n = len(self.values)
        if i < 0:
            return 0
        if i == n:
            self.values.append(value)
            self.ballots.append(ballot)
        elif i < n:
            self.values[i] = value
            self.ballots[i] = ballot
        else:
            self.values.extend([None] * (i - n))
            self.ballots.extend([0] * (i - n))
            self.values.append(value)
            self.ballots.append(ballot)
        return 0

    cdef list entries_from(self, int64_t slot):
        """Flat [slot, ballot, value, ...] for every held slot >= slot."""
        cdef list out = []
        cdef Py_ssize_t i
        if slot < self.log_base:
            slot = self.log_base
        for i in range(slot - self.log_base, len(self.values)):
            v = self.values[i]
            if v is not None:
                out.append(self.log_base + i)
                out.append(self.ballots[i])
                out.append(v)
        return out

    cdef int send(self, int to, tuple msg) except -1:
        self.out_messages.append((to, msg))
        return 0

    cdef int send_after(self, int to, tuple msg) except -1:
        if self.config.fault & FAULT_REPLY_BEFORE_PERSIST:
            self.out_messages.append((to, msg))
        else:
            self.out_after.append((to, msg))
        return 0

    cdef int send_accepts(self, int to, int64_t first, list values) except -1:
        """Send ACCEPT for consecutive slots, split to stay under message_bytes_max."""
        cdef Py_ssize_t start = 0, i, size = 0, n = len(values)
        for i in range(n):
            size += PyBytes_GET_SIZE(values[i]) + 16
            if size >= self.config.message_bytes_max or i == n - 1:
                chunk = values[start:i + 1] if (start or i != n - 1) else values
                self.send(to, (ACCEPT, self.replica_id, self.promised, first + start,
                               chunk, self.commit_index))
                start = i + 1
                size = 0
        return 0

    # Records.  Invariant (the promise-recorded rule): a PROMISE or ACCEPTED for ballot
    # b leaves only after a record with a ballot >= b, so that a restart can never
    # promise or accept below what this replica already vouched for.

    cdef int append_record(self, tuple record, int64_t ballot) except -1:
        """Hand out a record that vouches for `ballot` (0: for none)."""
        self.out_records.append(record)
        if ballot > self.promise_recorded:
            self.promise_recorded = ballot
        return 0

    cdef int record_promise(self, int64_t ballot) except -1:
        """The one place that decides whether a PROMISE record is needed for `ballot`.

        `promised` may have been raised in memory only (by a NACK or a heartbeat): a
        PROMISE must never leave before a record of it is handed out.
        """
        if ballot > self.promise_recorded:
            self.append_record((REC_PROMISE, ballot), ballot)
        return 0

    # Role transitions: the only places `role_` changes.

    cdef int observe_ballot(self, int64_t ballot) except -1:
        """The one place a higher ballot raises `promised` and makes this replica step down.

        In memory only: record_promise() decides whether a record must say so.
        """
        if ballot > self.promised:
            self.promised = ballot
            if self.role_ != FOLLOWER:
                self.become_follower()
        return 0

    cdef int become_follower(self) except -1:
        if self.role_ == LEADER:
            self.out_lost_leadership = True
            self.votes = {}
            self.sent_tick = {}
            self.pending = []
            self.pending_bytes_ = 0
            self.fail_reads()
            self.lease_until = 0
            self.leader_id = 0
        self.role_ = FOLLOWER
        self.promises = {}
        self.self_promised = False
        self.reset_election_timer()
        return 0

    cdef int64_t next_round(self) except -1:
        """The round of the next ballot this replica would campaign with (may not fit)."""
        return max(self.round_seen, self.promised >> BALLOT_ID_BITS) + 1

    cdef int pre_campaign(self) except -1:
        """Ask whether a quorum would promise our next ballot; nothing is persisted."""
        cdef int64_t round_ = self.next_round()
        if self.role_ != FOLLOWER:
            self.become_follower()
        self.reset_election_timer()
        if round_ > BALLOT_ROUND_MAX_C:
            self.stats["ballots_exhausted"] += 1
            return 0
        self.prevote_ballot = (round_ << BALLOT_ID_BITS) | self.replica_id
        self.prevotes = {self.replica_id}
        if len(self.prevotes) >= self.quorum:
            return self.campaign()
        for p in self.peers:
            self.send(p, (PREVOTE, self.replica_id, self.prevote_ballot))
        return 0

    cdef int on_prevote(self, int src, int64_t ballot) except -1:
        cdef bint granted
        if owner_of(ballot) != src:
            raise MessageError(f"replica {src} asks a pre-vote for ballot {ballot:#x} it does not own")
        granted = (ballot > self.promised and self.role_ != LEADER
                   and self.now - self.leader_heard_tick >= self.config.election_ticks)
        self.send(src, (PREVOTE_ACK, self.replica_id, ballot, 1 if granted else 0))
        return 0

    cdef int on_prevote_ack(self, int src, int64_t ballot, int64_t granted) except -1:
        if self.role_ != FOLLOWER or ballot != self.prevote_ballot or not granted:
            return 0
        self.prevotes.add(src)
        if len(self.prevotes) >= self.quorum:
            self.prevote_ballot = 0
            self.campaign()
        return 0

    cdef int campaign(self) except -1:
        """Become a candidate with a new ballot (from follower or candidate)."""
        cdef int64_t round_ = self.next_round()
        if self.role_ == LEADER:
            fail("a leader campaigns")
        if round_ > BALLOT_ROUND_MAX_C:
            # Unreachable but by 2**47 elections: peers refuse ballots that would get here.
            self.stats["ballots_exhausted"] += 1
            self.reset_election_timer()
            return 0
        self.promised = (round_ << BALLOT_ID_BITS) | self.replica_id
        self.round_seen = round_
        self.role_ = CANDIDATE
        self.leader_id = 0
        self.promises = {}
        self.self_promised = False
        self.heartbeat_elapsed = 0
        self.prepare_from = self.commit_index + 1
        self.stats["elections"] += 1
        self.reset_election_timer()
        # The ballot is durable before any PREPARE carries it, so a restart never
        # reuses it with different values.
        self.record_promise(self.promised)
        self.pending_self.append((SELF_PROMISE, self.promised))
        for p in self.peers:
            self.out_after.append((p, (PREPARE, self.replica_id, self.promised, self.prepare_from)))
        return 0

    cdef int maybe_win(self) except -1:
        """Lead once a quorum promised; 1 if the promises could not all be honest."""
        if not (self.role_ == CANDIDATE and self.self_promised
                and len(self.promises) + 1 >= self.quorum):
            return 0
        if self.become_leader():
            return 0
        # Slots were reported too far past any slot reported below them: a quorum of
        # honest acceptors holds every slot but the last window's (each was chosen
        # before a later one could be proposed).  Collect the promises again.
        self.promises = {}
        self.stats["promises_refused"] += 1
        return 1

    cdef int become_leader(self) except -1:
        """Adopt the promised slots and lead (from candidate); 0 if they cannot be honest."""
        cdef int64_t start, end, slot, b, top_commit = self.commit_index
        cdef int top_peer = 0
        cdef dict best = {}
        cdef Py_ssize_t i
        if self.role_ != CANDIDATE:
            fail(f"become_leader as {ROLE_NAMES[self.role_]}")
        for src, (commit, entries) in self.promises.items():
            if commit > top_commit:
                top_commit = commit
                top_peer = src
        start = top_commit + 1
        own = self.entries_from(start)
        for entries in [own] + [e for _, e in self.promises.values()]:
            for i in range(0, len(entries), 3):
                slot = entries[i]
                b = entries[i + 1]
                if slot >= start and (slot not in best or b > best[slot][0]):
                    best[slot] = (b, entries[i + 2])
        end = max(best) if best else start - 1
        if end - start + 1 > len(best) + self.config.accept_ahead_max:
            return 0
        if self.config.fault & FAULT_SKIP_ADOPTION:
            best = {}
        self.role_ = LEADER
        self.leader_id = self.replica_id
        self.promises = {}
        self.votes = {}
        self.sent_tick = {}
        self.heard = set()
        self.peer_ctx = {}
        self.ctx_tick = {}
        self.read_ctx = 0
        self.confirmed_ctx = 0
        self.lease_until = 0
        self.heartbeat_elapsed = 0
        self.quorum_check_elapsed = 0
        self.stats["became_leader"] += 1
        self.next_slot = start
        self.leader_start = start
        if end < start:
            end = start
        self.leader_barrier = end
        self.propose_slots([best[s][1] if s in best else b"" for s in range(start, end + 1)])
        if top_commit > self.commit_index:
            self.want_catchup(top_peer, top_commit)
        return 1

    cdef int propose_slots(self, list values) except -1:
        cdef int64_t first = self.next_slot, s
        cdef Py_ssize_t k
        for k in range(len(values)):
            s = first + k
            self.set_entry(s, values[k], self.promised)
            self.votes[s] = 0
            self.sent_tick[s] = self.now
        self.next_slot = first + len(values)
        self.stats["slots_proposed"] += len(values)
        self.append_record((REC_ACCEPT, first, self.promised, values), self.promised)
        self.pending_self.append((SELF_VOTE, self.promised, first, len(values)))
        for p in self.peers:
            self.send_accepts(p, first, values)
        if self.config.fault & FAULT_COMMIT_WITHOUT_QUORUM:
            for k in range(len(values)):
                self.votes[first + k] = (1 << 62) - 1
            self.advance_commit()
        return 0

    cdef int cut_batches(self) except -1:
        cdef int64_t room
        cdef Py_ssize_t size, k, n, start
        cdef list slots
        if self.role_ != LEADER or not self.pending:
            return 0
        room = self.config.window_slots - (self.next_slot - 1 - self.commit_index)
        if room <= 0:
            return 0
        if (self.config.batch_delay_ticks and self.pending_bytes_ < self.config.batch_bytes_max
                and self.now - self.pending_since < self.config.batch_delay_ticks):
            return 0
        slots = []
        k = 0
        n = len(self.pending)
        while k < n and room > 0:
            start = k
            size = 0
            while k < n and (k == start or size + PyBytes_GET_SIZE(self.pending[k]) <= self.config.batch_bytes_max):
                size += PyBytes_GET_SIZE(self.pending[k])
                k += 1
            slots.append(self.pending[start] if k - start == 1 else b"".join(self.pending[start:k]))
            self.pending_bytes_ -= size
            room -= 1
        del self.pending[:k]
        self.pending_since = self.now
        self.propose_slots(slots)
        return 0

    cdef int note_leader(self, int src) except -1:
        """`src` leads the ballot this replica just accepted from it."""
        self.leader_id = src
        self.leader_heard_tick = self.now
        self.election_elapsed = 0
        self.prevote_ballot = 0
        return 0

    cdef int learn_commit(self, int src, int64_t ballot, int64_t commit) except -1:
        """A leader of `ballot` says slots up to `commit` are chosen."""
        cdef int64_t s
        cdef Py_ssize_t i, n = len(self.values)
        if commit <= self.commit_index:
            return 0
        s = self.commit_index + 1
        while s <= commit:
            i = s - self.log_base
            if i >= n or self.values[i] is None:
                break
            b = self.ballots[i]
            if b != ballot and b != CHOSEN_BALLOT_C:
                break
            self.ballots[i] = CHOSEN_BALLOT_C
            s += 1
        self.commit_index = s - 1
        self.apply_committed()
        if self.commit_index < commit:
            self.want_catchup(src, commit)
        return 0

    cdef int want_catchup(self, int src, int64_t commit) except -1:
        if commit > self.known_commit:
            self.known_commit = commit
            self.catchup_peer = src
        if self.commit_index >= self.known_commit or self.catchup_inflight:
            return 0
        self.catchup_inflight = True
        self.catchup_sent_tick = self.now
        self.catchup_from = self.commit_index + 1
        self.stats["catchup_requests"] += 1
        self.send(self.catchup_peer, (CATCHUP_REQ, self.replica_id, self.promised,
                                      self.catchup_from))
        return 0

    cdef int advance_commit(self) except -1:
        """Extend commit_index over slots known chosen or (as leader) voted by a quorum."""
        cdef int64_t s
        cdef Py_ssize_t i, n = len(self.values)
        cdef bint is_leader = self.role_ == LEADER
        s = self.commit_index + 1
        while True:
            i = s - self.log_base
            if i >= n or self.values[i] is None:
                break
            if self.ballots[i] != CHOSEN_BALLOT_C:
                if not is_leader:
                    break
                m = self.votes.get(s)
                if m is None or popcount(m) < self.quorum:
                    break
                self.ballots[i] = CHOSEN_BALLOT_C
            if is_leader and self.votes:
                self.votes.pop(s, None)
                self.sent_tick.pop(s, None)
            s += 1
        if s - 1 > self.commit_index:
            self.commit_index = s - 1
            self.apply_committed()
        return 0

    cdef int apply_committed(self) except -1:
        cdef int64_t start = self.applied_index
        while self.applied_index < self.commit_index:
            value = self.values[self.applied_index + 1 - self.log_base]
            if PyBytes_GET_SIZE(value):
                self.apply_value(value)
            self.applied_index += 1
        self.stats["slots_applied"] += self.applied_index - start
        return 0

    cdef int apply_value(self, bytes value) except -1:
        """Apply every client batch of a chosen slot through the session table."""
        cdef const char* p = PyBytes_AS_STRING(value)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(value)
        cdef Py_ssize_t pos = 0, end
        cdef uint64_t sid, first, acked
        cdef uint32_t count, plen
        cdef Session sess
        cdef StateMachine sm = self.state_machine
        cdef ResultWriter writer = self.writer
        if DEBUG:
            # Every value was checked before it entered the log (propose, step, recover).
            assert value_fault(value) == BATCH_OK, "an unchecked slot value reached apply"
        sessions = self.sessions
        while pos + CLIENT_BATCH_HEADER_BYTES <= n:
            sid = load_u64(p + pos)
            first = load_u64(p + pos + 8)
            acked = load_u64(p + pos + 16)
            count = load_u32(p + pos + 24)
            plen = load_u32(p + pos + 28)
            end = pos + CLIENT_BATCH_HEADER_BYTES + plen
            if end > n:
                break  # cannot happen: slot values are checked before they enter the log
            if sid == REGISTER_SESSION:
                self.register_session(first, p + pos, end - pos)
                pos = end
                continue
            sess = sessions.get(sid)
            if sess is None:
                # Never registered, or evicted: never created here, or an evicted
                # session's retry would apply its commands a second time.
                self.stats["sessions_expired"] += 1
                self.emit_status(sid, first, count, RESULT_SESSION_EXPIRED)
                pos = end
                continue
            sessions.move_to_end(sid)
            while sess.cache and sess.cache[0][0] + sess.cache[0][1] - 1 <= <int64_t>acked:
                del sess.cache[0]
            if <int64_t>first == sess.next_seq:
                sm.apply_commands(p + pos + CLIENT_BATCH_HEADER_BYTES, count, writer)
                results = writer.take()
                sess.cache.append((first, count, results))
                sess.next_seq = first + count
                self.out_results.append((sid, first, results))
            elif <int64_t>(first + count) <= sess.next_seq:
                self.stats["duplicates"] += 1
                for entry in sess.cache:
                    if entry[0] == first and entry[1] == count:
                        self.out_results.append((sid, first, entry[2]))
                        break
                else:
                    self.emit_status(sid, first, count, RESULT_SESSION_EXPIRED)
            else:
                self.emit_status(sid, first, count, RESULT_RETRY)
            pos = end
        return 0

    cdef int register_session(self, uint64_t nonce, const char* batch, Py_ssize_t n) except -1:
        """Apply a registration: a new session, its id (u64 LE) the command's result."""
        cdef uint64_t sid
        cdef char id_bytes[8]
        if not registration_layout(batch, n):
            # Only a forged slot value gets here (propose() refuses these).
            self.writer.write(RESULT_ERROR, "a registration is one empty command", 35)
            self.out_results.append((REGISTER_SESSION, nonce, self.writer.take()))
            return 0
        sid = self.next_session_id
        while sid in self.sessions or sid == REGISTER_SESSION:
            sid += 1  # ids in a snapshot of an older version were random
        self.next_session_id = sid + 1
        self.sessions[sid] = Session(1)
        self.stats["sessions_registered"] += 1
        if len(self.sessions) > self.config.max_sessions:
            self.sessions.popitem(last=False)
            self.stats["sessions_evicted"] += 1
        memcpy(id_bytes, &sid, 8)
        self.writer.write(RESULT_OK, id_bytes, 8)
        self.out_results.append((REGISTER_SESSION, nonce, self.writer.take()))
        return 0

    cdef int emit_status(self, uint64_t session_id, uint64_t first_seq, int count, int status) except -1:
        cdef int k
        for k in range(count):
            self.writer.write(<unsigned char>status, NULL, 0)
        self.out_results.append((session_id, first_seq, self.writer.take()))
        return 0

    # Reads.

    cdef int broadcast_heartbeat(self) except -1:
        self.heartbeat_elapsed = 0
        self.read_ctx += 1
        self.ctx_tick[self.read_ctx] = self.now
        if self.reads_unsent:
            for rid in self.reads_unsent:
                self.reads_inflight.append((self.read_ctx, max(self.commit_index, self.leader_barrier), rid))
            self.reads_unsent = []
        for p in self.peers:
            self.send(p, (HEARTBEAT, self.replica_id, self.promised, self.commit_index, self.read_ctx))
        self.update_confirmed()
        return 0

    cdef int update_confirmed(self) except -1:
        acked = sorted([self.peer_ctx.get(p, 0) for p in self.peers] + [self.read_ctx], reverse=True)
        cdef int64_t confirmed = acked[self.quorum - 1]
        cdef Py_ssize_t k = 0
        if confirmed <= self.confirmed_ctx:
            return 0
        self.confirmed_ctx = confirmed
        if self.config.lease_ticks:
            self.lease_until = self.ctx_tick[confirmed] + self.config.lease_ticks
        for c in [c for c in self.ctx_tick if c <= confirmed]:
            del self.ctx_tick[c]
        while k < len(self.reads_inflight) and self.reads_inflight[k][0] <= confirmed:
            entry = self.reads_inflight[k]
            self.reads_confirmed.append((entry[1], entry[2]))
            k += 1
        del self.reads_inflight[:k]
        if self.reads_unsent:
            self.broadcast_heartbeat()
        return 0

    cdef int release_reads(self) except -1:
        cdef Py_ssize_t k = 0, n = len(self.reads_confirmed)
        if not n:
            return 0
        # reads_confirmed is ordered by read index, which only grows.
        while k < n and self.reads_confirmed[k][0] <= self.applied_index:
            self.out_reads.append(self.reads_confirmed[k][1])
            k += 1
        if k:
            del self.reads_confirmed[:k]
            self.stats["reads_served"] += k
        return 0

    cdef int fail_reads(self) except -1:
        self.out_reads_failed.extend(self.reads_unsent)
        self.out_reads_failed.extend([e[2] for e in self.reads_inflight])
        self.out_reads_failed.extend([e[1] for e in self.reads_confirmed])
        self.reads_unsent = []
        self.reads_inflight = []
        self.reads_confirmed = []
        return 0

    cdef int retransmit(self) except -1:
        """Send unchosen slots again to acceptors that have not voted for them."""
        cdef int64_t s, run_start
        cdef uint64_t bit
        cdef list run
        if not self.votes:
            return 0
        for p in self.peers:
            bit = self.member_bit[p]
            run = []
            run_start = 0
            for s in range(self.commit_index + 1, self.next_slot):
                m = self.votes.get(s)
                if m is not None and not (m & bit) and self.now - self.sent_tick[s] >= self.config.resend_ticks:
                    if not run:
                        run_start = s
                    run.append(self.values[s - self.log_base])
                elif run:
                    self.send_accepts(p, run_start, run)
                    self.stats["retransmits"] += len(run)
                    run = []
            if run:
                self.send_accepts(p, run_start, run)
                self.stats["retransmits"] += len(run)
        for s in range(self.commit_index + 1, self.next_slot):
            if s in self.sent_tick and self.now - self.sent_tick[s] >= self.config.resend_ticks:
                self.sent_tick[s] = self.now
        return 0

    # Message handlers.  Each checks everything it can refuse before it changes
    # anything: a MessageError leaves the replica as if the message never arrived.

    cdef int on_prepare(self, int src, int64_t ballot, int64_t from_slot) except -1:
        if from_slot < 1:
            raise MessageError("PREPARE from slot 0")
        if owner_of(ballot) != src:
            raise MessageError(f"replica {src} prepares ballot {ballot:#x} it does not own")
        if ballot < self.promised:
            self.send(src, (NACK, self.replica_id, self.promised))
            return 0
        if (self.config.lease_ticks and self.leader_id != src
                and (self.role_ == LEADER
                     or self.now - self.leader_heard_tick < self.config.election_ticks)):
            return 0  # a lease may still be held: do not help depose its leader
        self.observe_ballot(ballot)
        self.record_promise(ballot)
        self.leader_id = 0
        self.reset_election_timer()
        self.send_after(src, (PROMISE, self.replica_id, ballot, self.commit_index,
                              self.entries_from(max(from_slot, self.commit_index + 1))))
        return 0

    cdef int on_promise(self, int src, int64_t ballot, int64_t commit, list entries) except -1:
        cdef Py_ssize_t i, n = len(entries)
        cdef int64_t slot, b, last = 0
        cdef int fault
        if self.role_ != CANDIDATE or ballot != self.promised:
            return 0  # a late answer to an earlier campaign
        if n % 3:
            raise MessageError("PROMISE entries are not (slot, ballot, value) triples")
        if commit < 0:
            raise MessageError("PROMISE with a negative commit index")
        for i in range(0, n, 3):
            slot = entries[i]
            b = entries[i + 1]
            # An acceptor answers with its slots from the one this campaign prepares,
            # in order, each accepted at a ballot it had promised (or known chosen).
            if slot < self.prepare_from or slot <= last:
                raise MessageError(f"PROMISE entry for slot {slot}: not in increasing order "
                                   f"from the prepared slot {self.prepare_from}")
            if b != CHOSEN_BALLOT_C and not 0 < b <= ballot:
                raise MessageError(f"PROMISE entry for slot {slot} accepted at ballot {b:#x}, "
                                   f"not one it promised")
            fault = value_fault(entries[i + 2])
            if fault:
                raise MessageError(f"PROMISE entry for slot {slot} holds a client batch "
                                   f"{BATCH_FAULTS[fault]}" if fault != BATCH_NOT_BYTES
                                   else f"PROMISE entry for slot {slot} is not bytes")
            last = slot
        if commit - self.commit_index > self.config.accept_ahead_max:
            # This candidate is far behind that acceptor: it catches up first (the
            # PREPARE is sent again and the promise counts once it is within reach).
            self.stats["promises_deferred"] += 1
            self.want_catchup(src, commit)
            return 0
        self.promises[src] = (commit, entries)
        if self.maybe_win():
            raise MessageError(f"PROMISE from {src} completes a quorum that reports slots "
                               f"no honest quorum could")
        return 0

    cdef int on_nack(self, int src, int64_t ballot) except -1:
        self.observe_ballot(ballot)
        return 0

    cdef int on_accept(self, int src, int64_t ballot, int64_t first, list values, int64_t commit) except -1:
        cdef Py_ssize_t k, n = len(values)
        cdef int64_t s
        if first < 1 or n == 0:
            raise MessageError("ACCEPT with no values or for slot 0")
        if owner_of(ballot) != src:
            raise MessageError(f"replica {src} speaks for ballot {ballot:#x} it does not own")
        if ballot < self.promised:
            self.send(src, (NACK, self.replica_id, self.promised))
            return 0
        if not self.config.fault & FAULT_UNCHECKED_VALUES:
            check_values(values, "ACCEPT")
        self.observe_ballot(ballot)
        self.note_leader(src)
        if first > self.commit_index + self.config.accept_ahead_max - n + 1:
            # Far past what this replica knows chosen: catch up first rather than
            # hold a huge log (and a far-off slot number costs nothing).
            self.learn_commit(src, ballot, commit)
            return 0
        for k in range(n):
            s = first + k
            if s >= self.log_base and self.ballot_at(s) != CHOSEN_BALLOT_C:
                self.set_entry(s, values[k], ballot)
        self.append_record((REC_ACCEPT, first, ballot, values), ballot)
        self.send_after(src, (ACCEPTED, self.replica_id, ballot, first, n, self.commit_index))
        self.learn_commit(src, ballot, commit)
        return 0

    cdef int on_accepted(self, int src, int64_t ballot, int64_t first, int64_t count, int64_t commit) except -1:
        cdef int64_t s
        cdef uint64_t bit
        if first < 1 or count < 1:
            raise MessageError("ACCEPTED for no slots or for slot 0")
        if self.role_ != LEADER or ballot != self.promised:
            if commit > self.commit_index:
                self.want_catchup(src, commit)
            return 0
        if count > self.next_slot - first:
            raise MessageError(f"ACCEPTED for slots up to {first + count - 1}, past the last "
                               f"one proposed ({self.next_slot - 1})")
        self.heard.add(src)
        bit = self.member_bit[src]
        votes = self.votes
        for s in range(max(first, self.commit_index + 1), first + count):
            m = votes.get(s)
            if m is not None:
                votes[s] = m | bit
        self.advance_commit()
        return 0

    cdef int on_heartbeat(self, int src, int64_t ballot, int64_t commit, int64_t ctx) except -1:
        if owner_of(ballot) != src:
            raise MessageError(f"replica {src} speaks for ballot {ballot:#x} it does not own")
        if ballot < self.promised:
            self.send(src, (NACK, self.replica_id, self.promised))
            return 0
        # Not persisted: an acknowledgement only says "I promised nothing higher",
        # and every promise that matters was persisted before it was given.
        self.observe_ballot(ballot)
        self.note_leader(src)
        self.send(src, (HEARTBEAT_ACK, self.replica_id, ballot, ctx, self.commit_index))
        self.learn_commit(src, ballot, commit)
        return 0

    cdef int on_heartbeat_ack(self, int src, int64_t ballot, int64_t ctx, int64_t commit) except -1:
        if self.role_ != LEADER or ballot != self.promised:
            return 0
        if ctx > self.read_ctx:
            raise MessageError("HEARTBEAT_ACK for a heartbeat never sent")
        self.heard.add(src)
        if ctx > self.peer_ctx.get(src, 0):
            self.peer_ctx[src] = ctx
            self.update_confirmed()
        return 0

    cdef int on_catchup_req(self, int src, int64_t from_slot) except -1:
        cdef list out = []
        cdef Py_ssize_t size = 0
        cdef int64_t s
        if from_slot < 1:
            raise MessageError("CATCHUP_REQ from slot 0")
        if from_slot < self.log_base:
            if src not in self.out_snapshot_to:
                self.out_snapshot_to.append(src)
            return 0
        if from_slot > self.commit_index:
            return 0
        s = from_slot
        while s <= self.commit_index and size < self.config.message_bytes_max:
            v = self.values[s - self.log_base]
            out.append(v)
            size += PyBytes_GET_SIZE(v) + 16
            s += 1
        self.send(src, (CHOSEN, self.replica_id, self.promised, from_slot, out))
        return 0

    cdef int on_chosen(self, int src, int64_t first, list values) except -1:
        cdef Py_ssize_t k, i, n = len(values), held = len(self.values)
        cdef int64_t s
        cdef list fresh = []
        cdef int64_t fresh_first = 0
        if first < 1 or n == 0:
            raise MessageError("CHOSEN with no values or for slot 0")
        if not (self.catchup_inflight and src == self.catchup_peer and first == self.catchup_from):
            # Not the answer to this replica's outstanding request (maybe a late or
            # duplicated one): what was not asked for is never written.
            self.stats["chosen_unasked"] += 1
            return 0
        check_values(values, "CHOSEN")
        for k in range(n):
            s = first + k
            i = s - self.log_base
            if i < 0:
                continue
            if i >= held:
                break
            if ((s <= self.commit_index or self.ballots[i] == CHOSEN_BALLOT_C)
                    and self.values[i] != values[k]):
                self.stats["chosen_conflicts"] += 1
                raise MessageError(f"CHOSEN for slot {s} contradicts the value known chosen")
        for k in range(n):
            s = first + k
            if s <= self.commit_index or s < self.log_base:
                continue
            if s > self.commit_index + self.config.accept_ahead_max:
                break
            if not fresh:
                fresh_first = s
            fresh.append(values[k])
            self.set_entry(s, values[k], CHOSEN_BALLOT_C)
        if fresh:
            self.append_record((REC_ACCEPT, fresh_first, CHOSEN_BALLOT_C, fresh), 0)
        self.catchup_inflight = False
        self.advance_commit()
        if self.commit_index < self.known_commit:
            self.want_catchup(src, self.known_commit)
        return 0

    # Invariants.

    cdef int check_invariants(self) except -1:
        """Check the invariants written next to the fields (Config.check_invariants)."""
        cdef Py_ssize_t i, n = len(self.values)
        cdef int64_t s, b
        cdef Session sess
        if not self.log_base <= self.applied_index + 1:
            fail("compacted past the applied index")
        if not self.applied_index <= self.commit_index:
            fail("applied past the commit index")
        if not (self.commit_index <= self.log_base + n - 1 or self.commit_index == self.log_base - 1):
            fail("commit index past the log")
        if len(self.ballots) != n:
            fail("values and ballots differ in length")
        for i in range(0, self.commit_index - self.log_base + 1):
            if self.values[i] is None or self.ballots[i] != CHOSEN_BALLOT_C:
                fail(f"slot {self.log_base + i} committed but not known chosen")
        for b in self.ballots:
            if b != CHOSEN_BALLOT_C and b > self.promised:
                fail("accepted above the promise")
        if self.promised < self.promised_checked:
            fail(f"promised went down from {self.promised_checked:#x} to {self.promised:#x}")
        self.promised_checked = self.promised
        if not self.promise_recorded <= self.promised:
            fail("recorded a promise above the promised ballot")
        for to, msg in self.out_after:
            if (msg[0] == PROMISE or msg[0] == ACCEPTED) and msg[2] > self.promise_recorded:
                fail(f"{MESSAGE_NAMES[msg[0]]} for ballot {msg[2]:#x} without a record of it")
        if not self.config.fault & FAULT_REPLY_BEFORE_PERSIST:
            for to, msg in self.out_messages:
                if msg[0] == PROMISE or msg[0] == ACCEPTED:
                    fail(f"{MESSAGE_NAMES[msg[0]]} sent before its record is durable")
        if self.role_ != FOLLOWER and owner_of(self.promised) != self.replica_id:
            fail("leading someone else's ballot")
        if self.role_ == LEADER:
            if not self.next_slot > self.commit_index:
                fail("leader's next slot is committed")
            if not self.confirmed_ctx <= self.read_ctx:
                fail("confirmed a heartbeat never sent")
            for s in range(max(self.leader_start, self.commit_index + 1), self.next_slot):
                if self.ballot_at(s) != CHOSEN_BALLOT_C and s not in self.votes:
                    fail(f"slot {s} proposed by this leader but not counted")
        for sess in self.sessions.values():
            s = 0
            for entry in sess.cache:
                if entry[0] < s or entry[0] + entry[1] > sess.next_seq:
                    fail("session cache out of order or past the next sequence number")
                s = entry[0] + entry[1]
        return 0
