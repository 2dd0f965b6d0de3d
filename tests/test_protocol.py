"""cypaxos.protocol: the one table of protocol numbers, as Python sees it."""
import pytest

from cypaxos import commands, core, protocol, wire
from cypaxos.statemachine import KVStore


def test_message_types_are_the_wire_modules():
    for kind, name in protocol.MESSAGE_NAMES.items():
        assert getattr(protocol, name) == kind
        assert getattr(wire, name) == kind, name
    assert protocol.MESSAGE_NAMES == wire.MESSAGE_NAMES
    assert sorted(protocol.MESSAGE_NAMES) == list(range(1, 14))


def test_result_statuses_are_the_commands_modules():
    for status, name in protocol.RESULT_NAMES.items():
        assert getattr(protocol, "RESULT_" + name) == status
        assert getattr(commands, "RESULT_" + name) == status, name


def test_names_are_plain_ints():
    for name in protocol.__all__:
        value = getattr(protocol, name)
        if name.isupper() and not name.endswith("_NAMES"):
            assert type(value) is int, name


def test_record_types_are_what_the_core_hands_out():
    r = core.Replica(1, [1], KVStore())
    for _ in range(40):
        r.tick()
    kinds = set()
    for batch in (None, commands.pack_client_batch(9, 1, 0, [commands.encode_put(b"k", b"v")])):
        if batch is not None:
            assert r.propose(batch) == core.PROPOSED
        while (rd := r.ready()) is not None:  # campaign, win, propose, choose, commit
            kinds |= {rec[0] for rec in rd.records}
            r.persisted(rd.persist_id)
    assert kinds <= set(protocol.RECORD_NAMES)
    assert kinds == set(protocol.RECORD_NAMES)


def test_ballot_layout():
    b = protocol.make_ballot(5, 3)
    assert b == 5 << protocol.BALLOT_ID_BITS | 3
    assert protocol.ballot_round(b) == 5 and protocol.ballot_owner(b) == 3
    top = protocol.make_ballot(protocol.BALLOT_ROUND_MAX, protocol.BALLOT_ID_MASK)
    # The round after the highest one still fits below CHOSEN_BALLOT with any id.
    assert top + (1 << protocol.BALLOT_ID_BITS) < protocol.CHOSEN_BALLOT == 2**63 - 1
    with pytest.raises(ValueError):
        protocol.make_ballot(protocol.BALLOT_ROUND_MAX + 1, 1)
    with pytest.raises(ValueError):
        protocol.make_ballot(1, protocol.BALLOT_ID_MASK + 1)
    assert core.make_ballot is protocol.make_ballot and core.CHOSEN_BALLOT == protocol.CHOSEN_BALLOT
