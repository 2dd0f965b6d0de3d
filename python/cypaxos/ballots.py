"""Ballots: ``round << 16 | replica_id`` as one int64, and how they are shown.

The layout and its arithmetic live in cypaxos.protocol (`make_ballot`,
`ballot_round`, `ballot_owner`, `CHOSEN_BALLOT`, the table the core compiles in); this
module re-exports them beside the one way a ballot is written for people (the status
table, logs, traces): `format_ballot`.
"""
from __future__ import annotations

from .protocol import BALLOT_ID_MASK, CHOSEN_BALLOT, ballot_owner, ballot_round, make_ballot

__all__ = ["REPLICA_ID_MAX", "CHOSEN_BALLOT", "make_ballot", "ballot_round", "ballot_owner",
           "format_ballot"]

REPLICA_ID_MAX = BALLOT_ID_MASK
"""Replica ids are 1..REPLICA_ID_MAX: a ballot keeps the id in its low 16 bits."""


def format_ballot(ballot) -> str:
    """A ballot as ``ROUND.REPLICA``; ``0`` for none yet, ``chosen`` for the marker of
    a chosen entry, ``-`` for no ballot at all (None, or not a ballot)."""
    if type(ballot) is not int or ballot < 0:
        return "-"
    if ballot == CHOSEN_BALLOT:
        return "chosen"
    if ballot == 0:
        return "0"
    return f"{ballot_round(ballot)}.{ballot_owner(ballot)}"
