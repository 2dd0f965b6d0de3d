"""A debug build (CYPAXOS_DEBUG=1, docs/testing.md) has asserts that fire.

Skipped against a release build, where the debug-only asserts are compiled out.
"""
import struct

import pytest

from cypaxos import core
from cypaxos.core import FAULT_UNCHECKED_VALUES, Config, Replica
from cypaxos.protocol import ACCEPT, HEARTBEAT, make_ballot
from cypaxos.statemachine import KVStore

pytestmark = pytest.mark.skipif(
    not core.DEBUG_BUILD,
    reason="a release build: rebuild with CYPAXOS_DEBUG=1 (docs/testing.md) to run these")


def test_an_unchecked_value_reaching_apply_fails_an_assert():
    """With peer values left unchecked (a test-only fault), the assert before apply fires
    instead of the store reading past the batch (which a release build would do)."""
    ballot = make_ballot(1, 1)
    # A batch that claims 1000 commands and carries one.
    command = b"P" + struct.pack("<I", 1) + b"k" + b"v"
    bad = struct.pack("<QQQII", 7, 1, 0, 1000, 4 + len(command)) + struct.pack("<I", len(command)) + command
    follower = Replica(2, [1, 2, 3], KVStore(), Config(fault=FAULT_UNCHECKED_VALUES))
    follower.step((ACCEPT, 1, ballot, 1, [bad], 0))
    with pytest.raises(AssertionError, match="unchecked slot value"):
        follower.step((HEARTBEAT, 1, ballot, 1, 1))
