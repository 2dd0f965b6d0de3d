"""Test-support tools for cypaxos (history recording and linearizability checking)."""
