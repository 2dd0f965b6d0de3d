# cython: language_level=3
"""Declarations of the pure Multi-Paxos replica (see core.pyx for the theory of operation)."""
from libc.stdint cimport int64_t, uint64_t

from cypaxos.statemachine cimport ResultWriter, StateMachine


cdef extern from *:
    """
    #ifndef CYPAXOS_DEBUG
    #define CYPAXOS_DEBUG 0
    #endif
    """
    # 1 in a CYPAXOS_DEBUG=1 build: `if DEBUG: assert ...` is compiled out otherwise.
    const bint DEBUG "CYPAXOS_DEBUG"


cdef enum Role:
    FOLLOWER = 0
    CANDIDATE = 1
    LEADER = 2


cdef class Config:
    cdef public int heartbeat_ticks
    cdef public int election_ticks
    cdef public int window_slots
    cdef public Py_ssize_t batch_bytes_max
    cdef public int batch_delay_ticks
    cdef public Py_ssize_t message_bytes_max
    cdef public int resend_ticks
    cdef public Py_ssize_t pending_bytes_max
    cdef public int max_sessions
    cdef public int64_t accept_ahead_max
    cdef public int lease_ticks
    cdef public int clock_drift_ticks
    cdef public bint check_quorum
    cdef public bint pre_vote
    cdef public bint check_invariants
    cdef public int fault


cdef class Ready:
    cdef readonly list records
    cdef readonly list messages
    cdef readonly list messages_after_persist
    cdef readonly list results
    cdef readonly list reads
    cdef readonly list reads_failed
    cdef readonly int64_t persist_id
    cdef readonly bint lost_leadership
    cdef readonly list snapshot_to


cdef class Session:
    # Invariant: every entry of cache is (first_seq, count, packed_results) with
    # first_seq + count <= next_seq, in increasing first_seq order.
    cdef int64_t next_seq
    cdef list cache


cdef class Replica:
    # Identity and configuration (fixed at construction).
    cdef readonly int replica_id
    cdef tuple members
    cdef list peers
    cdef dict member_bit
    cdef int quorum
    cdef Config config
    cdef readonly StateMachine state_machine
    cdef uint64_t rng_state
    cdef readonly int64_t now

    # Acceptor hard state.  Invariant: promised >= every ballot in `ballots` other
    # than CHOSEN_BALLOT; promised only grows (promised_checked is its value at the
    # last check_invariants()).
    cdef int64_t promised
    cdef int64_t promised_checked
    # The highest ballot in a record handed out (PROMISE or ACCEPT).  Invariant:
    # promise_recorded <= promised, and a PROMISE or ACCEPTED for ballot b is only
    # sent after a record with a ballot >= b (record_promise() decides).
    cdef int64_t promise_recorded
    # The highest round in any ballot seen (from a peer that passed every check, or
    # our own).  Invariant: round_seen >= the round of promised.
    cdef int64_t round_seen

    # The log.  values[i] / ballots[i] describe slot log_base + i.
    # Invariant: log_base <= applied_index + 1 <= commit_index + 1 <= log_base + len(values);
    # every slot <= commit_index (from log_base) holds its chosen value with CHOSEN_BALLOT.
    cdef int64_t log_base
    cdef list values
    cdef list ballots
    cdef readonly int64_t commit_index
    cdef readonly int64_t applied_index

    # Role.  Invariant: role == LEADER or CANDIDATE implies promised is our own ballot.
    cdef Role role_
    cdef readonly int leader_id
    cdef int64_t election_elapsed
    cdef int64_t election_timeout
    cdef int64_t heartbeat_elapsed
    cdef int64_t leader_heard_tick

    # Pre-vote (no persistent state).  prevote_ballot is 0 when none is running.
    cdef int64_t prevote_ballot
    cdef set prevotes

    # Candidate.  prepare_from is the first slot this campaign's PREPAREs ask about;
    # every PROMISE entry is for a slot >= it.
    cdef dict promises
    cdef bint self_promised
    cdef int64_t prepare_from

    # Leader.  Invariant: commit_index < next_slot; votes holds a bitmask for every
    # unchosen slot this leader proposed (leader_start .. next_slot - 1).
    cdef int64_t next_slot
    cdef int64_t leader_start
    cdef dict votes
    cdef dict sent_tick
    cdef int64_t leader_barrier
    cdef list pending
    cdef Py_ssize_t pending_bytes_
    cdef int64_t pending_since
    cdef set heard
    cdef int64_t quorum_check_elapsed

    # Linearizable reads.  Invariant: confirmed_ctx <= read_ctx.
    cdef int64_t read_ctx
    cdef int64_t confirmed_ctx
    cdef dict peer_ctx
    cdef dict ctx_tick
    cdef list reads_unsent
    cdef list reads_inflight
    cdef list reads_confirmed
    cdef int64_t lease_until

    # Catch-up of chosen slots this replica lacks.  While catchup_inflight, a
    # CATCHUP_REQ from slot catchup_from went to catchup_peer: only CHOSEN from that
    # peer for that slot is taken.
    cdef int64_t known_commit
    cdef int catchup_peer
    cdef int64_t catchup_sent_tick
    cdef int64_t catchup_from
    cdef bint catchup_inflight

    # Exactly-once sessions (replicated state, applied in slot order).  Sessions are
    # created only by registration, with ids from next_session_id (also replicated),
    # and evicted least recently used past max_sessions; a batch for a session not in
    # the table is answered SESSION_EXPIRED.
    cdef object sessions
    cdef uint64_t next_session_id
    cdef ResultWriter writer

    # Outputs gathered until the next ready().
    cdef list out_records
    cdef list out_messages
    cdef list out_after
    cdef list out_results
    cdef list out_reads
    cdef list out_reads_failed
    cdef list out_snapshot_to
    cdef bint out_lost_leadership
    cdef list pending_self
    cdef list awaiting
    cdef int64_t persist_seq
    cdef int64_t persisted_seq
    cdef int64_t commit_recorded

    cdef dict stats

    # Internals.
    cdef uint64_t next_random(self)
    cdef void reset_election_timer(self)
    cdef int64_t ballot_at(self, int64_t slot)
    cdef int set_entry(self, int64_t slot, object value, int64_t ballot) except -1
    cdef list entries_from(self, int64_t slot)
    cdef int send(self, int to, tuple msg) except -1
    cdef int send_after(self, int to, tuple msg) except -1
    cdef int send_accepts(self, int to, int64_t first, list values) except -1
    cdef int append_record(self, tuple record, int64_t ballot) except -1
    cdef int record_promise(self, int64_t ballot) except -1
    cdef int observe_ballot(self, int64_t ballot) except -1
    cdef int become_follower(self) except -1
    cdef int64_t next_round(self) except -1
    cdef int pre_campaign(self) except -1
    cdef int on_prevote(self, int src, int64_t ballot) except -1
    cdef int on_prevote_ack(self, int src, int64_t ballot, int64_t granted) except -1
    cdef int campaign(self) except -1
    cdef int maybe_win(self) except -1
    cdef int become_leader(self) except -1
    cdef int propose_slots(self, list values) except -1
    cdef int cut_batches(self) except -1
    cdef int note_leader(self, int src) except -1
    cdef int learn_commit(self, int src, int64_t ballot, int64_t commit) except -1
    cdef int want_catchup(self, int src, int64_t commit) except -1
    cdef int advance_commit(self) except -1
    cdef int apply_committed(self) except -1
    cdef int apply_value(self, bytes value) except -1
    cdef int register_session(self, uint64_t nonce, const char* batch, Py_ssize_t n) except -1
    cdef int emit_status(self, uint64_t session_id, uint64_t first_seq, int count, int status) except -1
    cdef int broadcast_heartbeat(self) except -1
    cdef int update_confirmed(self) except -1
    cdef int release_reads(self) except -1
    cdef int retransmit(self) except -1
    cdef int fail_reads(self) except -1
    cdef int on_prepare(self, int src, int64_t ballot, int64_t from_slot) except -1
    cdef int on_promise(self, int src, int64_t ballot, int64_t commit, list entries) except -1
    cdef int on_nack(self, int src, int64_t ballot) except -1
    cdef int on_accept(self, int src, int64_t ballot, int64_t first, list values, int64_t commit) except -1
    cdef int on_accepted(self, int src, int64_t ballot, int64_t first, int64_t count, int64_t commit) except -1
    cdef int on_heartbeat(self, int src, int64_t ballot, int64_t commit, int64_t ctx) except -1
    cdef int on_heartbeat_ack(self, int src, int64_t ballot, int64_t ctx, int64_t commit) except -1
    cdef int on_catchup_req(self, int src, int64_t from_slot) except -1
    cdef int on_chosen(self, int src, int64_t first, list values) except -1
    cdef int restore_state(self, int64_t index, object sessions, bytes state) except -1
    cdef int restate_log(self) except -1
    cdef int check_invariants(self) except -1
