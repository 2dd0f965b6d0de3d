"""Exception groups: flatten them, and find the one expected error inside one.

Trio wraps what leaves a nursery in a `BaseExceptionGroup`; a user should see the one
expected error ("cannot listen on ...: address in use"), not a group traceback.
Python 3.11+ has the group types built in; on 3.10 they come from the
``exceptiongroup`` backport (a dependency of cypaxos, and of Trio, there).
"""
from __future__ import annotations

import sys
from typing import Optional, Union

if sys.version_info >= (3, 11):
    BaseExceptionGroup = BaseExceptionGroup  # noqa: PLW0127 - re-exported for 3.10's sake
else:  # pragma: no cover - Python 3.10
    from exceptiongroup import BaseExceptionGroup

__all__ = ["BaseExceptionGroup", "leaves", "first_leaf", "expected_error"]

_Kinds = Union[type, tuple]


def leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside `exc`, depth first (``[exc]`` if it is no group)."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    out: list[BaseException] = []
    for inner in exc.exceptions:
        out.extend(leaves(inner))
    return out


def first_leaf(exc: BaseException, kind: _Kinds) -> Optional[BaseException]:
    """The first exception of `kind` in `exc` or its nested groups, or None."""
    for leaf in leaves(exc):
        if isinstance(leaf, kind):
            return leaf
    return None


def expected_error(exc: BaseException, kinds: _Kinds) -> BaseException:
    """The error to report for `exc`: if it is a group all of whose leaves are `kinds`,
    the first of them; otherwise `exc` itself (a group holding anything unexpected
    stays whole, with its traceback)."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    found = leaves(exc)
    if found and all(isinstance(leaf, kinds) for leaf in found):
        return found[0]
    return exc
