"""Linearizability checker for key-value histories.

The model is a key-value store whose values are ``bytes`` (an absent key reads
as ``None``) with four operations:

* ``put(key, value)``           -> ``None``
* ``get(key)``                  -> the value, or ``None`` if absent
* ``delete(key)``               -> ``True`` if the key existed
* ``cas(key, expected, new)``   -> ``True`` if the value was ``expected``
  (``expected=None`` means "only if absent"), in which case it becomes ``new``

Every operation touches exactly one key, so the store is a product of
independent registers.  Linearizability is *local* (Herlihy & Wing, 1990): a
history is linearizable iff every per-object sub-history is.  :func:`check`
therefore splits the history by key and checks each key on its own, which
keeps every search small.

Each key is checked with the Wing & Gong search as refined by Lowe and
implemented by Porcupine's ``checkSingle``: the call/return events sit in a
doubly linked list; an operation may be linearized next iff its call precedes
every pending return; linearized operations are "lifted" out of the list and
restored on backtracking; and the pair (set of linearized ops as an int
bitmask, value) is memoized so that no configuration is explored twice.
One partial-order reduction is added: an op whose result shows it left the
value unchanged (a read, a failed cas, a delete of an absent key) and that is
legal now is linearized at once, without trying alternatives; it could be
moved to this point of any linearization.

Operations whose outcome is ``"unknown"`` (timeouts, crashed clients) may take
effect at any time after their start, or never.  They have no return event,
so they never constrain other operations, and the search succeeds as soon as
every *completed* op is linearized.  To keep many pending unknown writes from
multiplying the search, a config is pruned if one with the same completed
set and value was seen with a *subset* of the unknown ops used, and an
unknown op is never tried where it would be a no-op, where it would just be
overwritten unobserved, or while an identical earlier one is still unused.
Proving a violation is where unknown ops still cost most, so a relaxed pass
that may reuse each unknown op runs first: it accepts a superset of
histories, so its failures are real, and only histories it accepts go on to
the exact search.  A read of a value nobody wrote is reported without search.

The search is exponential in the worst case (checking linearizability is
NP-complete).  Accepting a linearizable history is usually quick, even with
thousands of ops and tens of clients per key.  Refuting one means exhausting
every alternative up to the violation, which grows with the number of
clients overlapping on one key: seconds for thousands of ops per key with ~10
concurrent clients, or for hundreds with ~20.  A per-key step budget turns
anything slower into :class:`CheckTimeout` rather than a silent pass.

Timestamps may be ints (a simulator's clock) or floats (``time.monotonic``).
Two intervals that merely touch (one ends exactly when the other starts) are
treated as concurrent, as in Porcupine; with a coarse clock that is the only
safe reading.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_MAX_STEPS",
    "CheckResult",
    "CheckTimeout",
    "History",
    "Op",
    "check",
]

#: Default per-key search budget (candidate linearization attempts).
DEFAULT_MAX_STEPS = 5_000_000

_KINDS = ("put", "get", "delete", "cas")
_OUTCOMES = ("ok", "fail", "unknown")
_PUT, _GET, _DELETE, _CAS = range(4)
_KIND_CODE = {kind: code for code, kind in enumerate(_KINDS)}

# How many ops a failure message lists before it elides the rest.
_MESSAGE_MAX_OPS = 40


@dataclass(frozen=True)
class Op:
    """One client operation on one key.

    ``arg`` is the value for ``put``, ``(expected, new)`` for ``cas`` and
    ``None`` otherwise.  ``outcome`` is ``"ok"`` (completed with ``result``),
    ``"fail"`` (definitely not applied; ignored by the checker) or
    ``"unknown"`` (may have been applied at any time after ``start``; ``end``
    and ``result`` are ignored, ``end`` is ``None`` if it never returned).
    """

    client: Any
    kind: str
    key: Hashable
    arg: Any
    start: float
    end: float | None
    outcome: str
    result: Any


@dataclass(frozen=True)
class CheckResult:
    """Outcome of :func:`check`.

    ``ok`` is True iff the history is linearizable; ``key`` is the first key
    found not to be (else ``None``); ``message`` explains the verdict and, on
    failure, lists the failing key's ops; ``ops_checked`` counts the ops that
    took part (failed ops and unknown reads are dropped), up to and including
    the failing key's.
    """

    ok: bool
    key: Hashable | None
    message: str
    ops_checked: int


class CheckTimeout(Exception):
    """The search for one key exceeded its step budget.

    Raised rather than returned so that an inconclusive check can never be
    mistaken for a pass.  ``key`` is the key being checked, ``steps`` the
    budget that ran out, ``n_ops`` how many ops that key had.
    """

    def __init__(self, key: Hashable, steps: int, n_ops: int) -> None:
        super().__init__(
            f"linearizability search for key {key!r} ({n_ops} ops) "
            f"exceeded {steps} steps"
        )
        self.key = key
        self.steps = steps
        self.n_ops = n_ops


def check(
    ops: Iterable[Op],
    initial: Mapping[Hashable, Any] | None = None,
    *,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> CheckResult:
    """Check that ``ops`` is a linearizable key-value history.

    ``ops`` may come in any order.  ``initial`` maps keys to their values
    before the history (missing keys are absent).  Each key is checked on its
    own, which is exact because linearizability is local and every op touches
    one key; keys are checked in order of first appearance, stopping at the
    first non-linearizable one.  Raises :class:`CheckTimeout` if
    one key needs more than ``max_steps`` search steps, and ``ValueError`` on
    malformed ops.
    """
    initial = initial or {}
    by_key: dict[Hashable, list[Op]] = {}
    for op in ops:
        _validate(op)
        if op.outcome == "fail":
            continue  # definitely not applied: irrelevant
        if op.outcome == "unknown" and op.kind == "get":
            continue  # a read with no result constrains nothing
        by_key.setdefault(op.key, []).append(op)

    checked = 0
    for key, key_ops in by_key.items():
        checked += len(key_ops)
        failure = _check_key(key, key_ops, initial.get(key), max_steps)
        if failure is not None:
            return CheckResult(False, key, failure, checked)
    return CheckResult(
        True, None, f"linearizable: {checked} ops over {len(by_key)} keys", checked
    )


def _validate(op: Op) -> None:
    """Reject ops the checker would otherwise misread."""
    if op.kind not in _KIND_CODE:
        raise ValueError(f"unknown op kind {op.kind!r} in {op!r}")
    if op.outcome not in _OUTCOMES:
        raise ValueError(f"unknown outcome {op.outcome!r} in {op!r}")
    if op.kind == "cas" and (not isinstance(op.arg, (tuple, list)) or len(op.arg) != 2):
        raise ValueError(f"cas arg must be (expected, new): {op!r}")
    if op.outcome == "ok":
        if op.end is None:
            raise ValueError(f"completed op has no end time: {op!r}")
        if op.end < op.start:
            raise ValueError(f"op ends before it starts: {op!r}")


def _step_ok(kind: int, arg: Any, result: Any, state: Any) -> tuple[bool, Any]:
    """Apply a completed op to ``state``: (is the result legal, new state)."""
    if kind == _GET:
        return result == state, state
    if kind == _PUT:
        return True, arg
    if kind == _DELETE:
        return result is (state is not None), None
    expected, new = arg
    if state == expected:
        return result is True, new
    return result is False, state  # results must be real bools, not truthy values


def _step_unknown(kind: int, arg: Any, state: Any) -> Any:
    """Apply an op of unknown result to ``state``; it is legal in any state."""
    if kind == _PUT:
        return arg
    if kind == _DELETE:
        return None
    expected, new = arg
    return new if state == expected else state


# Kinds of search-stack frames.
_CHOSEN, _FORCED, _UNKNOWN = range(3)


def _is_observer(op: Op) -> bool:
    """True if the op's result proves it left the value unchanged."""
    if op.kind == "get":
        return True
    if op.kind == "delete":
        return op.result is False
    if op.kind == "cas":
        return op.result is False or op.arg[0] == op.arg[1]
    return False


def _check_key(key: Hashable, ops: list[Op], init: Any, max_steps: int) -> str | None:
    """Check one key's history; return None if linearizable, else a message."""
    done = sorted((op for op in ops if op.outcome == "ok"), key=_sort_key)
    unknown = sorted((op for op in ops if op.outcome == "unknown"), key=_sort_key)
    if not done:
        return None  # unknown writes alone can always be left unapplied
    bad = _unwritten_read(done, unknown, init)
    if bad is not None:
        # Cheap and common (corrupt or misrouted values), and clearer than
        # letting the search exhaust everything before that read.
        return _unwritten_message(key, done, unknown, init, bad)
    steps = 0
    if unknown:
        # Proving a violation means exhausting every config, and the sets of
        # unknown ops used multiply them.  A relaxed pass that lets each
        # unknown op take effect any number of times has no such sets and
        # accepts a superset of histories, so its failures are real; only
        # a history it accepts needs the exact (usually quick) search.
        failure, steps = _search(key, done, unknown, init, 0, max_steps, reuse=True)
        if failure is not None:
            return failure
    return _search(key, done, unknown, init, steps, max_steps, reuse=False)[0]


def _search(key: Hashable, done: list[Op], unknown: list[Op], init: Any,
            steps: int, max_steps: int, reuse: bool) -> tuple[str | None, int]:
    """Wing & Gong search over ``done`` (completed) and ``unknown`` ops.

    Returns (None if linearizable else a failure message, steps used so
    far).  With ``reuse`` an unknown op may be linearized repeatedly.
    """
    m, k = len(done), len(unknown)

    # Main list: nodes 0 (head), 1..2m (call/return events), 2m+1 (tail).
    # Calls sort before returns at equal times: touching intervals overlap.
    events = sorted([(op.start, 0, i) for i, op in enumerate(done)]
                    + [(op.end, 1, i) for i, op in enumerate(done)])
    size = 2 * m + 2
    nxt = list(range(1, size + 1))
    prv = list(range(-1, size - 1))
    node_op = [-1] * size
    node_time = [math.inf] * size
    is_call = [False] * size
    match = [0] * size  # call node -> its return node
    call_node = [0] * m
    for pos, (t, is_return, i) in enumerate(events, 1):
        node_op[pos] = i
        node_time[pos] = t
        if is_return:
            match[call_node[i]] = pos
        else:
            is_call[pos] = True
            call_node[i] = pos
    d_kind = [_KIND_CODE[op.kind] for op in done]
    d_arg = [op.arg for op in done]
    d_res = [op.result for op in done]
    d_obs = [_is_observer(op) for op in done]

    # Unknown ops with the same effect are interchangeable once available
    # (availability only grows along a path), so they are grouped and only
    # the earliest unused one of a group is ever tried: the used ones always
    # form a prefix of their group.
    groups: dict[tuple[int, Any], list[int]] = {}
    for u, op in enumerate(unknown):  # by start, so groups are too
        arg = tuple(op.arg) if op.kind == "cas" else op.arg
        groups.setdefault((_KIND_CODE[op.kind], arg), []).append(u)
    g_kind = [kind for kind, _ in groups]
    g_arg = [arg for _, arg in groups]
    g_members = list(groups.values())
    g_used = [0] * len(g_members)
    group_of = [0] * k
    for g, members in enumerate(g_members):
        for u in members:
            group_of[u] = g
    ustart = [op.start for op in unknown]

    state = init
    cmask = 0  # bit i: done[i] linearized
    umask = 0  # bit u: unknown[u] linearized
    remaining = m
    # Frames: (frame kind, node, state before it, candidates at that point,
    # index of the one taken).
    stack: list[tuple[int, int, Any, list, int]] = []
    seen: dict[tuple[int, Any], list[int]] = {(0, init): [0]}
    best_depth, best_stack, best_state = 0, [], init

    def fresh(cm: int, um: int, st: Any) -> bool:
        """Record (cm, um, st) unless it or a config with fewer unknowns was seen."""
        nonlocal steps
        prior = seen.get((cm, st))
        if prior is None:
            seen[(cm, st)] = [um]
            return True
        steps += len(prior) - 1  # so the budget also bounds this scan
        for pu in prior:
            if pu | um == um:  # pu is a subset of um: dominated
                return False
        prior.append(um)
        return True

    # The search is a loop over three modes rather than recursion, so deep
    # histories cannot hit Python's recursion limit.  NEW: arrived at a
    # config, list its candidates; SCAN: take the next candidate; BACK: undo
    # the latest step.
    NEW, SCAN, BACK = range(3)
    mode = NEW
    ci = 0
    # Candidates at a config: (frame kind, call node or, for _UNKNOWN, index
    # into unknown, index into done or -1, value after it).
    cands: list[tuple[int, int, int, Any]] = []
    while True:
        if mode == NEW:
            if steps > max_steps:
                raise CheckTimeout(key, max_steps, m + k)
            after_unknown = bool(stack) and stack[-1][0] == _UNKNOWN
            # Completed ops whose call precedes the first pending return.
            # Partial-order reduction: one that leaves the value unchanged
            # and is legal now (e.g. a read of the current value) can be
            # moved to this point of any linearization, so it is linearized
            # here with no alternatives tried.
            node = nxt[0]
            cands = []
            while is_call[node]:
                i = node_op[node]
                steps += 1
                legal, new = _step_ok(d_kind[i], d_arg[i], d_res[i], state)
                if d_obs[i]:
                    if legal:
                        break
                # An unknown op blindly overwritten before anyone observed it
                # is pointless; the config without it is explored too.
                elif legal and not (after_unknown and d_kind[i] == _PUT):
                    cands.append((_CHOSEN, node, i, new))
                node = nxt[node]
            if is_call[node]:
                if not fresh(cmask | (1 << i), umask, state):
                    mode = BACK  # that config was already explored
                    continue
                frame, new, cands = _FORCED, state, []
            else:
                # Unknown ops called no later than that first pending return.
                limit = node_time[node]
                n_done = len(cands)
                for g, members in enumerate(g_members):
                    if g_used[g] == len(members) or ustart[members[g_used[g]]] > limit:
                        continue
                    steps += 1
                    new = _step_unknown(g_kind[g], g_arg[g], state)
                    # Skip no-ops (same as never applying the op) and blind
                    # writes right after another unknown op (pointless, as
                    # above).
                    if new != state and not (after_unknown and g_kind[g] != _CAS):
                        cands.append((_UNKNOWN, members[g_used[g]], -1, new))
                # Oldest first, which tends to find a linearization sooner.
                cands[n_done:] = sorted(cands[n_done:], key=lambda c: ustart[c[1]])
                ci, mode = 0, SCAN
                continue
        elif mode == SCAN:
            while ci < len(cands):
                frame, node, i, new = cands[ci]
                if fresh(cmask | (1 << i) if i >= 0 else cmask,
                         umask | (1 << node) if frame == _UNKNOWN and not reuse else umask,
                         new):
                    break
                ci += 1
            else:
                mode = BACK
                continue
            if frame == _UNKNOWN:
                stack.append((_UNKNOWN, node, state, cands, ci))
                state = new
                if not reuse:  # use it up
                    umask |= 1 << node
                    g_used[group_of[node]] += 1
                mode = NEW
                continue
        else:  # BACK: undo the latest choice and try the next alternative
            if not stack:
                return _failure_message(
                    key, done, unknown, best_stack, best_state, node_op, init
                ), steps
            frame, node, state, cands, ci = stack.pop()
            if frame == _UNKNOWN:
                if not reuse:
                    umask &= ~(1 << node)
                    g_used[group_of[node]] -= 1
            else:
                cmask &= ~(1 << node_op[node])
                remaining += 1
                r = match[node]
                nxt[prv[r]] = r
                prv[nxt[r]] = r
                nxt[prv[node]] = node
                prv[nxt[node]] = node
            # A forced op had no alternatives: keep backtracking.
            if frame != _FORCED:
                ci, mode = ci + 1, SCAN
            continue

        # Linearize completed op i (call node `node`), moving to state `new`.
        stack.append((frame, node, state, cands, ci))
        state = new
        cmask |= 1 << i
        remaining -= 1
        if remaining == 0:
            return None, steps
        r = match[node]  # lift the call and its return out of the list
        nxt[prv[node]] = nxt[node]
        prv[nxt[node]] = prv[node]
        nxt[prv[r]] = nxt[r]
        prv[nxt[r]] = prv[r]
        if m - remaining > best_depth:
            best_depth, best_stack, best_state = m - remaining, list(stack), state
        mode = NEW


def _sort_key(op: Op) -> tuple[float, float]:
    """Order ops by start, then end (unknown ends last)."""
    end = op.end if op.outcome == "ok" and op.end is not None else math.inf
    return (op.start, end)


def _failure_message(
    key: Hashable,
    done: list[Op],
    unknown: list[Op],
    best_stack: list[tuple],
    best_state: Any,
    node_op: list[int],
    init: Any,
) -> str:
    """Explain why ``key`` is not linearizable, around where the search got stuck."""
    prefix = [unknown[node] if frame == _UNKNOWN else done[node_op[node]]
              for frame, node, *_ in best_stack]
    linearized = {id(op) for op in prefix}
    pending = [op for op in done if id(op) not in linearized]
    # The op the search could not get past, and the ops it could have tried.
    first_end = min(op.end for op in pending)
    blocked = [op for op in pending if op.start <= first_end]

    lines = [
        f"key {key!r} is not linearizable: {len(done)} completed and "
        f"{len(unknown)} unknown-outcome ops, initial value {_fmt_val(init)}.",
        f"Longest linearizable prefix covers {len(done) - len(pending)} of "
        f"{len(done)} completed ops, leaving the value {_fmt_val(best_state)}; "
        f"its last steps:",
    ]
    lines += [f"  {_fmt_op(op)}" for op in prefix[-5:]] or ["  (none)"]
    lines.append("None of these completed ops can come next:")
    lines += [f"  {_fmt_op(op)}" for op in blocked]

    lo = min([op.start for op in blocked] + [op.start for op in prefix[-1:]])
    lines += _listing(done + unknown, lo, first_end)
    return "\n".join(lines)


def _unwritten_read(done: list[Op], unknown: list[Op], init: Any) -> Op | None:
    """A completed op that saw a value no op on the key could have written."""
    written = {init}
    for op in done + unknown:
        if op.kind == "put":
            written.add(op.arg)
        elif op.kind == "cas":
            written.add(op.arg[1])
        elif op.kind == "delete":
            written.add(None)
    for op in done:
        if op.kind == "get" and op.result not in written:
            return op
        if op.kind == "cas" and op.result is True and op.arg[0] not in written:
            return op
    return None


def _unwritten_message(key: Hashable, done: list[Op], unknown: list[Op],
                       init: Any, bad: Op) -> str:
    """Explain a read of a value that was never written."""
    seen = bad.result if bad.kind == "get" else bad.arg[0]
    lines = [
        f"key {key!r} is not linearizable: no operation on this key wrote "
        f"{_fmt_val(seen)} (initial value {_fmt_val(init)}), yet this op saw it:",
        f"  {_fmt_op(bad)}",
    ]
    lines += _listing(done + unknown, bad.start, bad.end)
    return "\n".join(lines)


def _listing(ops: list[Op], lo: float, hi: float) -> list[str]:
    """Lines listing ``ops`` (sorted by start), or if there are many, those
    overlapping [lo, hi]: the ones needed to see the contradiction by hand."""
    ops = sorted(ops, key=_sort_key)
    if len(ops) <= _MESSAGE_MAX_OPS:
        note, shown = "All ops on this key", ops
    else:
        near = [op for op in ops if _sort_key(op)[1] >= lo and op.start <= hi]
        shown = near[-_MESSAGE_MAX_OPS:]  # the latest are nearest the problem
        note = f"{len(shown)} of {len(ops)} ops on this key, around the problem"
    return [f"{note} (sorted by start):"] + [f"  {_fmt_op(op)}" for op in shown]


def _fmt_time(t: float | None) -> str:
    """Compact timestamp: ints as-is, floats to microseconds."""
    if t is None or t == math.inf:
        return "inf"
    if isinstance(t, int):
        return str(t)
    return f"{t:.6f}".rstrip("0").rstrip(".")


def _fmt_val(v: Any) -> str:
    """Short repr of a value, truncated so long payloads do not drown the message."""
    text = repr(v)
    return text if len(text) <= 24 else text[:21] + "..."


def _fmt_op(op: Op) -> str:
    """One line: interval, client, call, outcome and result."""
    if op.kind == "put":
        call = f"put({_fmt_val(op.arg)})"
    elif op.kind == "cas":
        call = f"cas({_fmt_val(op.arg[0])} -> {_fmt_val(op.arg[1])})"
    else:
        call = f"{op.kind}()"
    if op.outcome == "ok":
        end, res = _fmt_time(op.end), f"ok -> {_fmt_val(op.result)}"
    else:
        end, res = "inf", op.outcome
    return f"[{_fmt_time(op.start)}, {end}] client {op.client!r}: {call} {res}"


class History:
    """Thread-safe recorder of client operations.

    Call :meth:`invoke` before sending a request and :meth:`complete` with
    its outcome; :meth:`ops` returns the recorded :class:`Op` list, in which
    ops never completed count as ``"unknown"``.  ``now`` defaults to
    ``time.monotonic()``; a simulator passes its own clock.
    """

    def __init__(self, ops: Iterable[Op] = ()) -> None:
        self._lock = threading.Lock()
        self._ops: list[Op] = list(ops)
        self._open: set[int] = set()

    def invoke(self, client: Any, kind: str, key: Hashable, arg: Any = None,
               now: float | None = None) -> int:
        """Record the start of an op; returns a token for :meth:`complete`."""
        if kind not in _KIND_CODE:
            raise ValueError(f"unknown op kind {kind!r}")
        start = time.monotonic() if now is None else now
        op = Op(client, kind, key, arg, start, None, "unknown", None)
        with self._lock:
            token = len(self._ops)
            self._ops.append(op)
            self._open.add(token)
        return token

    def complete(self, token: int, outcome: str, result: Any = None,
                 now: float | None = None) -> None:
        """Record how the op behind ``token`` ended (``"ok"``, ``"fail"``, ``"unknown"``)."""
        if outcome not in _OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        end = time.monotonic() if now is None else now
        with self._lock:
            if token not in self._open:
                raise ValueError(f"token {token!r} is not an open operation")
            self._open.discard(token)
            op = self._ops[token]
            self._ops[token] = dataclasses.replace(
                op, end=end, outcome=outcome, result=result
            )

    def ops(self) -> list[Op]:
        """Snapshot of all recorded ops; still-open ones have outcome ``"unknown"``."""
        with self._lock:
            return list(self._ops)

    def __len__(self) -> int:
        """Number of recorded ops."""
        return len(self._ops)

    def check(self, initial: Mapping[Hashable, Any] | None = None,
              *, max_steps: int = DEFAULT_MAX_STEPS) -> CheckResult:
        """Shorthand for ``check(self.ops(), initial, max_steps=max_steps)``."""
        return check(self.ops(), initial, max_steps=max_steps)

    def save(self, path: str | os.PathLike) -> None:
        """Write the history as JSON (bytes hex-encoded) for later re-checking."""
        records = [
            json.dumps({f.name: _encode(getattr(op, f.name)) for f in dataclasses.fields(Op)},
                       separators=(",", ":"))
            for op in self.ops()
        ]
        # One op per line: still a single JSON document, but diffable and
        # greppable when a failing run's history is inspected by hand.
        with open(path, "w", encoding="utf-8") as fh:
            fh.write('{"format":"cypaxos-kv-history","version":1,"ops":[\n')
            fh.write(",\n".join(records))
            fh.write("\n]}\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> History:
        """Read a history written by :meth:`save`."""
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        if doc.get("format") != "cypaxos-kv-history" or doc.get("version") != 1:
            raise ValueError(f"{path}: not a cypaxos-kv-history v1 file")
        return cls(Op(**{name: _decode(v) for name, v in rec.items()})
                   for rec in doc["ops"])


def _encode(value: Any) -> Any:
    """JSON-encode a field: bytes and tuples are tagged so they round-trip."""
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, (tuple, list)):
        encoded = [_encode(v) for v in value]
        return {"tuple": encoded} if isinstance(value, tuple) else encoded
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot save {type(value).__name__} value {value!r} in a history")


def _decode(value: Any) -> Any:
    """Inverse of :func:`_encode`."""
    if isinstance(value, dict):
        if "hex" in value:
            return bytes.fromhex(value["hex"])
        return tuple(_decode(v) for v in value["tuple"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value
