"""cypaxos: a replicated state machine engine."""
