"""TLS over memory buffers, for replicas and clients alike: the one Trio stream in
this package (everything else in `cypaxos.security` is without I/O).

A replica's outboxes use it so that a round's frames are encrypted and written in the
round; a client uses it for the same stream with less machinery per send.

`trio.SSLStream` would do the TLS, but only through its own `send_all`, which means
a task switch to the connection's writer task for every flush: on a leader that is
one switch per follower per round, and under load it made bulk writes some 30%
slower than plaintext.  `TlsStream` keeps the `ssl.SSLObject` and its two
`ssl.MemoryBIO`s itself: `encrypt(data)` turns plaintext into the bytes for the wire
without I/O, so an outbox's `flush` (`cypaxos.replica.outbox`: the node's
end-of-round flush) encrypts what the round queued and writes it with the same non-blocking `os.write` as a plaintext
outbox; only what the kernel does not take goes through the writer task.

Order on the wire is the order the SSLObject produced its records: everything it
writes to the outgoing buffer (records of data, and whatever reading made it answer,
such as a TLS 1.3 key update) is taken by the next `encrypt`, in order, and from the
moment the writer task holds a remainder, later records queue behind it.
"""
from __future__ import annotations

import os
import ssl
from typing import Optional

import trio

__all__ = ["TlsStream", "TLS_RECEIVE_BYTES", "TLS_RECORD_BYTES"]

TLS_RECEIVE_BYTES = 1 << 18
"""Bytes asked of the socket per read (ciphertext), at most."""
TLS_RECORD_BYTES = 17 << 10
"""A TLS record's most bytes on the wire (16 KiB of data and its overhead), rounded up:
a read for `max_bytes` asks the socket for at least this, so one record always fits,
and for no more than `max_bytes` otherwise (a caller reading the handshake in small
pieces buffers no more than that)."""


class TlsStream(trio.abc.Stream):
    """A TLS connection over a `trio.SocketStream`; the TLS handshake is
    `do_handshake()` (trio.BrokenResourceError, with the `ssl.SSLError` as its
    cause, when it fails)."""

    def __init__(self, transport: trio.SocketStream, context: ssl.SSLContext, *,
                 server_side: bool, server_hostname: Optional[str] = None) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing,
                                     server_side=server_side, server_hostname=server_hostname)

    @property
    def socket(self):
        """The underlying socket (for its address; never write to it directly)."""
        return self.transport.socket

    def getpeercert(self):
        """The other side's verified certificate, as `ssl.SSLObject.getpeercert()`."""
        return self._ssl.getpeercert()

    def version(self) -> Optional[str]:
        """The TLS version agreed ("TLSv1.3"), as `ssl.SSLObject.version()`."""
        return self._ssl.version()

    def encrypt(self, data: bytes) -> bytes:
        """The wire bytes for `data` (and for anything else TLS has to send now)."""
        if data:
            self._ssl.write(data)   # a memory buffer never pushes back: all of it
        return self._outgoing.read()

    async def do_handshake(self) -> None:
        """Run the TLS handshake to its end."""
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._send_pending()
                data = await self.transport.receive_some(TLS_RECORD_BYTES)
                if not data:
                    raise trio.BrokenResourceError("connection closed during the TLS "
                                                   "handshake") from None
                self._incoming.write(data)
            except ssl.SSLError as exc:
                try:   # the alert, so the other side learns why
                    await self._send_pending()
                except (trio.BrokenResourceError, OSError):
                    pass
                raise trio.BrokenResourceError(str(exc)) from exc
        await self._send_pending()

    async def _send_pending(self) -> None:
        data = self._outgoing.read()
        if data:
            await self.transport.send_all(data)

    async def send_all(self, data) -> None:
        """Encrypt and send (only while no writer task sends on this stream)."""
        await self.transport.send_all(self.encrypt(bytes(data)))

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: Optional[int] = None) -> bytes:
        """Decrypted bytes, at most `max_bytes`; b"" at the end of the connection."""
        limit = max_bytes or TLS_RECEIVE_BYTES
        socket_bytes = min(TLS_RECEIVE_BYTES, max(limit, TLS_RECORD_BYTES))
        chunks = []
        count = 0
        while count < limit:
            try:
                chunk = self._ssl.read(limit - count)
            except ssl.SSLWantReadError:
                if chunks:
                    break
                data = await self.transport.receive_some(socket_bytes)
                if not data:
                    # No close_notify: a frame cut off by it is caught by the framing.
                    return b""
                self._incoming.write(data)
                continue
            except ssl.SSLZeroReturnError:
                break
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS: {exc}") from exc
            if not chunk:
                break
            chunks.append(chunk)
            count += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def aclose(self) -> None:
        """Close the connection (without a close_notify: frames end it)."""
        await self.transport.aclose()
