"""Reading frames from a Trio stream into a `cypaxos.wire.FrameDecoder` (hellos and
peers; a client's connection has its own loop in `replica.clients`, which counts
what its watchdog needs)."""
from __future__ import annotations

import trio

from .. import wire

__all__ = ["read_frames", "receive_into", "RECEIVE_BYTES", "HELLO_TIMEOUT_S"]

RECEIVE_BYTES = 1 << 18
HELLO_TIMEOUT_S = 5.0


async def read_frames(stream: trio.SocketStream, decoder: wire.FrameDecoder):
    """Yield decoded frame bodies until EOF (ProtocolError on a bad frame)."""
    while True:
        # Frames that arrived with an earlier read (a hello and the first request in
        # one packet, say) come out before we wait for more bytes.
        while (frame := decoder.next_frame()) is not None:
            yield frame
        if not await receive_into(stream, decoder):
            return


async def receive_into(stream: trio.SocketStream, decoder: wire.FrameDecoder) -> bool:
    """Wait for bytes and feed them to `decoder`; False at EOF between frames
    (ProtocolError at EOF in the middle of one)."""
    data = await stream.receive_some(RECEIVE_BYTES)
    if not data:
        if decoder.buffered:
            raise wire.ProtocolError("connection closed in the middle of a frame")
        return False
    decoder.feed(data)
    return True
