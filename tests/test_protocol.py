"""cypaxos.protocol: the one table of protocol numbers, as Python sees it."""
import re
from pathlib import Path

import pytest

from cypaxos import commands, core, protocol, wire
from cypaxos.statemachine import KVStore


DOCS = Path(__file__).resolve().parent.parent / "docs" / "internals.md"


def documented(section):
    """The `| number | NAME |` rows of the first table under a docs/internals.md heading."""
    text = DOCS.read_text().split(f"## {section}\n", 1)[1]
    rows = re.findall(r"^\| (\d+) \| (\w+) \|", text.split("\n## ", 1)[0], re.M)
    return {int(number): name for number, name in rows}


def test_the_documented_tables_are_the_protocols():
    assert documented("Peer messages") == protocol.MESSAGE_NAMES
    assert documented("WAL records") == protocol.RECORD_NAMES
    assert sorted(protocol.MESSAGE_NAMES) == list(range(1, 14))


def test_the_python_modules_use_the_protocols_numbers():
    for kind, name in protocol.MESSAGE_NAMES.items():
        assert getattr(wire, name) == kind, name
    for status, name in protocol.RESULT_NAMES.items():
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
