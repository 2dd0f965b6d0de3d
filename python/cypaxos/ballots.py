"""Ballots: ``round << 16 | replica_id`` as one int64, and how they are shown.

The arithmetic lives in the core (`make_ballot`, `ballot_round`, `ballot_owner`,
`CHOSEN_BALLOT`); this module re-exports it beside the one way a ballot is written
for people (the status table, logs, traces): `format_ballot`.
"""
from __future__ import annotations

from .core import CHOSEN_BALLOT, ballot_owner, ballot_round, make_ballot

__all__ = ["REPLICA_ID_MAX", "CHOSEN_BALLOT", "make_ballot", "ballot_round", "ballot_owner",
           "format_ballot"]

REPLICA_ID_MAX = 0xFFFF
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
