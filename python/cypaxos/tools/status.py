"""What `cypaxos status` prints: a table that fits 80 columns, every field with
``--wide``, or JSON.

The default table has one short column per fact an operator looks at first (role,
ballot, commit and applied indexes, the first 8 hex digits of the state digest).
``--wide`` prints every top-level field every replica reported, under its JSON name,
at full length and never squeezed.  Why a replica could not be asked follows the
table, one line per replica (``ADDRESS: connection refused``), wrapped like text.
"""
from __future__ import annotations

import sys

from ..ballots import format_ballot

__all__ = ["STATUS_FIELDS", "WIDE_ORDER", "DEFAULT_WIDTH", "json_rows", "print_table"]

STATUS_FIELDS = ("id", "address", "reachable", "role", "ballot", "commit_index",
                 "applied_index", "state_digest", "leader", "error")
"""The keys of every entry of ``status --json`` (None when unknown; `error` is None
unless the replica could not be asked)."""

WIDE_ORDER = ("id", "address", "role", "leader_id", "leader", "ballot", "commit_index",
              "applied_index", "snapshot_index", "log_start", "wal_first_seq",
              "wal_last_seq", "wal_durable_seq", "fsync", "cluster_id", "state_digest")
"""The first columns of ``status --wide``; any other field a replica reports follows,
by name."""

DEFAULT_WIDTH = 80
"""The default table's width off a terminal (on one: the terminal's width)."""

DIGEST_DIGITS = 8  # of the state digest in the default table
_HIDDEN_IN_WIDE = ("reachable", "error", "statistics")  # shown otherwise, or nested


def _json_safe(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    return value


def json_rows(answers: list[dict], *, wide: bool = False) -> list[dict]:
    """The ``replicas`` list of ``status --json``: one entry per answer, in order.

    Every entry has exactly `STATUS_FIELDS`; with `wide`, every field the replica
    reported too (its counters under ``statistics``).
    """
    rows = []
    for answer in answers:
        row = {name: _json_safe(answer.get(name)) for name in STATUS_FIELDS}
        if wide:
            row.update({k: _json_safe(v) for k, v in answer.items() if k not in row})
        row["reachable"] = bool(answer.get("reachable"))
        row["address"] = answer.get("address")
        rows.append(row)
    return rows


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "-"


def _cell(name: str, value) -> str:
    if value is None:
        return "-"
    if name == "ballot":
        return format_ballot(value) if value else "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and name.endswith(("_index", "_seq", "_start")):
        return f"{value:,}"
    return str(_json_safe(value))


def _problem(answer: dict) -> str | None:
    """Why a replica has no status to show, or None."""
    if not answer.get("reachable"):
        return "unreachable" + (f": {answer['error']}" if answer.get("error") else "")
    if answer.get("role") is None:
        return f"error: {answer.get('error') or 'no status'}"
    return None


def print_table(answers: list[dict], *, wide: bool = False, file=None) -> None:
    """Print the status table of `answers` (what the client's status() returned)."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    out = file if file is not None else sys.stdout
    tty = out.isatty()
    # --wide: nothing squeezed or cut, whatever the terminal (lines may wrap there).
    width = 1 << 16 if wide else (None if tty else DEFAULT_WIDTH)
    console = Console(file=out, highlight=False, width=width, soft_wrap=wide)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  collapse_padding=True)
    problems = [_problem(a) for a in answers]
    if wide:
        names = [n for n in WIDE_ORDER
                 if n in ("id", "address", "role") or any(n in a for a in answers)]
        names += sorted({k for a in answers for k, v in a.items()
                         if k not in names and k not in _HIDDEN_IN_WIDE
                         and not isinstance(v, (dict, list))})
        headers = [(n, "right" if n in ("id", "leader_id") or n.endswith(
            ("_index", "_seq", "_start")) else "left") for n in names]
    else:
        names = ["id", "address", "role", "ballot", "commit_index", "applied_index",
                 "state_digest"]
        headers = [("id", "right"), ("address", "left"), ("role", "left"),
                   ("ballot", "right"), ("commit", "right"), ("applied", "right"),
                   ("digest", "left")]
    for header, justify in headers:
        table.add_column(header, justify=justify, no_wrap=True)
    for answer, problem in zip(answers, problems):
        cells = []
        for name in names:
            value = answer.get(name)
            if problem is not None and name not in ("id", "address", "role"):
                cells.append("")
            elif name == "role":
                cells.append(_role(value, problem))
            elif name == "state_digest" and not wide and value is not None:
                cells.append(escape(str(_json_safe(value))[:DIGEST_DIGITS]))
            elif name in ("commit_index", "applied_index") and not wide:
                cells.append(_count(value))
            else:
                cells.append(escape(_cell(name, value)))
        table.add_row(*cells)
    console.print(table)
    for answer, problem in zip(answers, problems):
        reason = problem.partition(": ")[2] if problem else ""
        if reason:
            console.print(f"{answer.get('address')}: {reason}", markup=False,
                          soft_wrap=False)


def _role(role, problem: str | None) -> str:
    if problem is not None:
        return "[red]" + ("unreachable" if problem.startswith("unreachable")
                          else "error") + "[/]"
    style = {"leader": "bold green", "candidate": "yellow"}.get(role, "")
    return f"[{style}]{role}[/]" if style else str(role)
