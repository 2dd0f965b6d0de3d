"""The replica's links to its peers: dialing each one (our messages go out on the
connection we dialed) and serving the connection each one dialed to us (its messages
come in there), both over the node."""
from __future__ import annotations

import trio

from .. import wire
from ..addresses import split_address
from .framing import HELLO_TIMEOUT_S, receive_into
from .trust import HandshakeRefused, dial_peer

__all__ = ["peer_link", "serve_peer", "PEER_BACKOFF_MAX_S"]

PEER_BACKOFF_MAX_S = 0.05


async def peer_link(server, peer_id: int) -> None:
    """Dial one peer forever (with backoff), authenticate both ways
    (`trust.dial_peer`) and send it our messages."""
    host, port = split_address(server.cluster[peer_id])
    outbox = server.peer_links[peer_id]
    backoff = 0.02
    while True:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            # Keep retries well under the election timeout: a restarted peer that
            # hears no leader soon enough campaigns and deposes a healthy one.
            await trio.sleep(backoff)
            backoff = min(backoff * 2, PEER_BACKOFF_MAX_S)
            continue
        try:
            with trio.fail_after(HELLO_TIMEOUT_S):
                stream = await dial_peer(server.trust, stream, peer_id)
            backoff = 0.02
            # Once, then once a minute: a peer that accepts and drops us (another
            # cluster's, a replica not yet configured) must not flood the log.
            server.limited_log.info(("peer_connected", peer_id), "connected to replica %d at %s",
                                    peer_id, server.cluster[peer_id])
            server.peer_connected[peer_id] = True
            await outbox.run_writer(stream)   # returns only by raising
        except HandshakeRefused as exc:
            # A misconfigured pair (another secret, another CA) refuses on every try:
            # one line a minute says so.
            server.limited_log.warning(("peer_refused", peer_id),
                                       "replica %d at %s: %s", peer_id,
                                       server.cluster[peer_id],
                                       exc.reason if not exc.remote
                                       else f"it refused us: {exc.reason}")
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, wire.ProtocolError) as exc:
            server.limited_log.info(("peer_lost", peer_id), "link to replica %d lost: %s",
                                    peer_id, exc or type(exc).__name__)
        finally:
            if server.peer_connected.get(peer_id):
                server.peer_connected[peer_id] = False
                server.peer_links_lost[peer_id] = server.peer_links_lost.get(peer_id, 0) + 1
            # What is left may start mid-frame: it must never reach a new connection.
            outbox.frames = []
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()
        await trio.sleep(backoff)
        backoff = min(backoff * 2, PEER_BACKOFF_MAX_S)


async def serve_peer(server, stream: trio.abc.Stream, decoder: wire.FrameDecoder,
                     peer_id: int) -> None:
    """Feed a peer's messages to the node until the connection ends.

    Every frame at hand goes into the core, then the core's output is handled right
    here: a peer's message is usually one round of the protocol (an accept, a vote),
    and waking the driver for it would cost a task switch on the critical path.
    Clients' requests do wake the driver, so that requests from many connections
    share slots.
    """
    node = server.node
    on_peer_message = node.on_peer_message
    parse = wire.parse_peer_message
    cluster_ids = server.member_ids
    me = server.replica_id
    while True:
        stepped = False
        while (frame := decoder.next_frame()) is not None:
            if on_peer_message(peer_id, parse(frame, cluster_ids, me, peer_id)):
                stepped = True
        if stepped:
            node.drive()
        else:
            node.transport.flush()
        if not await receive_into(stream, decoder):
            return
