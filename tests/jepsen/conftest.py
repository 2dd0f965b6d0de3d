"""Fixtures of the fault-injection tier (see docs/testing.md)."""
import os

import pytest

from . import netns


@pytest.fixture(scope="session")
def caps():
    """What this machine allows (namespaces, packet filter, libfaketime), probed once."""
    return netns.capabilities()


def soak_enabled() -> bool:
    return os.environ.get("CYPAXOS_SOAK", "") not in ("", "0")


def soak_seconds() -> float:
    return float(os.environ.get("CYPAXOS_SOAK_SECONDS", "600"))


def seed_from_env(default=None):
    """CYPAXOS_JEPSEN_SEED replays a schedule (the seed is printed and saved)."""
    value = os.environ.get("CYPAXOS_JEPSEN_SEED")
    return int(value) if value else default
