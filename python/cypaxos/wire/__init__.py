"""The wire protocol, sans-I/O: frames (`cypaxos.wire.frames`) and the messages they
carry (`cypaxos.wire.messages`).  See docs/internals.md, "Peer messages" and "Wire".

Every public name of both modules is re-exported here: ``from cypaxos import wire``
then ``wire.encode_frame(wire.status_request(1))``.
"""
from . import frames, messages
from .frames import *  # noqa: F401,F403 - re-exported: the names in frames.__all__
from .messages import *  # noqa: F401,F403 - and in messages.__all__

__all__ = [*frames.__all__, *messages.__all__]
