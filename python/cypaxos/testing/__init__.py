"""Test-support tools for cypaxos.

* `simulate` (`cypaxos.testing.statemachines`): run your own state machine inside the
  production replica node under seeded faults (docs/state-machines.md).
* `cypaxos.testing.sim`: the seeded simulator itself (`Simulation`, `Faults`).
* `cypaxos.testing.linearizability`: history recording and linearizability checking.

The names below are loaded on first use, so that `python -m cypaxos.testing.sim`
(or `.statemachines`) runs its module only once.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # what type checkers see; at run time the names load on first use
    from .sim import Faults, SimulationFailure
    from .statemachines import SimulateReport, simulate

__all__ = ["simulate", "SimulateReport", "SimulationFailure", "Faults"]

_HOMES = {"simulate": "statemachines", "SimulateReport": "statemachines",
          "SimulationFailure": "sim", "Faults": "sim"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
