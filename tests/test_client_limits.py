"""The bounds on what one client may cost a replica (docs/security.md, "Limits").

Real processes: a 3-replica cluster started with small bounds (`serve` flags), raw
TCP connections that misbehave, and the real client, which must keep working: a
half-sent frame is dropped after --frame-timeout-s, an idle connection is closed
after --client-idle-timeout-s (and the client reconnects by itself), a read whose
reply would pass --reply-bytes-max or that carries more than --queries-per-read-max
queries is refused with ``too_large`` (the client splits it), a client that does not
read its replies gets ``busy`` past --client-buffer-bytes-max, and snapshot requests
past --snapshot-requests-per-minute are refused.  After each, the replica serves.

The watchdog that closes idle and torn connections is also run alone, on Trio's
mock clock; the outbox's byte accounting on a real socket pair.
"""
from __future__ import annotations

import socket
import struct
import time

import pytest
import trio

import cypaxos
from cypaxos import commands, wire
from cypaxos.addresses import split_address
from cypaxos.client.connection import REPLY_FRAME_BYTES_MAX
from cypaxos.errors import ConfigError, RequestError
from cypaxos.replica import backup, clients, limits
from cypaxos.replica.options import ServerOptions
from cypaxos.replica.outbox import Conn, Outbox
from cypaxos.tools.cli import build_parser
from cypaxos.tools.local import LocalCluster, free_ports
from cypaxos.tools.server_commands import serve_options

pytestmark = pytest.mark.timeout(240)

FRAME_TIMEOUT_S = 1.0
IDLE_TIMEOUT_S = 3.0
QUERIES_MAX = 100
REPLY_MAX = 1 << 20
BUFFER_MAX = 1 << 16
SNAPSHOTS_PER_MINUTE = 2
WAIT_S = 60.0   # "eventually": generous, never a timing assertion

FLAGS = ["--frame-timeout-s", str(FRAME_TIMEOUT_S),
         "--client-idle-timeout-s", str(IDLE_TIMEOUT_S),
         "--queries-per-read-max", str(QUERIES_MAX),
         "--reply-bytes-max", str(REPLY_MAX),
         "--client-buffer-bytes-max", str(BUFFER_MAX),
         "--snapshot-requests-per-minute", str(SNAPSHOTS_PER_MINUTE)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalCluster(3, data_dir=tmp_path_factory.mktemp("limits"), fsync=False,
                           extra_args=FLAGS, ports=free_ports(3))
    try:
        cluster.start_all()
        cluster.wait_ready(timeout=60)
        yield cluster
    finally:
        cluster.close()


def _stats(cluster, replica_id: int) -> dict:
    st = cluster.statuses(timeout=5.0)[replica_id]
    assert st is not None, f"replica {replica_id} does not answer status"
    return st["statistics"]


def _wait_for(check, what: str):
    deadline = time.monotonic() + WAIT_S
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _follower(cluster) -> int:
    leader = cluster.wait_ready(timeout=60)
    return next(i for i in cluster.ids if i != leader)


class Raw:
    """A client connection by hand: hello, then whatever the test sends."""

    def __init__(self, address: str, *, rcvbuf: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            # Before connecting: the window is negotiated then.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(WAIT_S)
        self.sock.connect(split_address(address))
        self.decoder = wire.FrameDecoder(4 * wire.FRAME_BYTES_MAX)
        self.sock.sendall(wire.encode_frame(wire.client_hello()))
        wire.parse_welcome(self.frame())

    def frame(self):
        """The next frame, or None once the replica closed the connection."""
        while (obj := self.decoder.next_frame()) is None:
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.decoder.feed(data)
        return obj

    def ask(self, body: list) -> tuple:
        self.sock.sendall(wire.encode_frame(body))
        return wire.parse_reply(self.frame())

    def closed_by_replica(self) -> bool:
        """Wait (at most WAIT_S) for the replica to close; True if it did."""
        try:
            return self.frame() is None
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


def _log(cluster, replica_id: int) -> str:
    with open(cluster.log_path(replica_id), errors="replace") as f:
        return f.read()


# ---------------------------------------------------------------------- timeouts

def test_a_half_sent_frame_is_dropped_while_others_are_served(cluster):
    before = _stats(cluster, 1)["client_frame_timeouts"]
    raw = Raw(cluster.address(1))
    try:
        # A frame that announces 1000 bytes of body and sends 10 of them.
        raw.sock.sendall(struct.pack(">I", 1000) + b"\x85" * 10)
        with cypaxos.connect(cluster.cluster_arg, timeout=30) as kv:
            kv.put(b"frame-timeout", b"others are served")
            assert kv.get(b"frame-timeout") == b"others are served"
            assert kv.get(b"frame-timeout", stale=True) is not None
        assert raw.closed_by_replica(), "the half-sent frame's connection stayed open"
    finally:
        raw.close()
    stats = _stats(cluster, 1)
    assert stats["client_frame_timeouts"] == before + 1
    assert "a request frame was not complete within" in _log(cluster, 1)


def test_an_idle_connection_is_closed_and_the_client_reconnects(cluster):
    replica = _follower(cluster)
    before = _stats(cluster, replica)["client_idle_timeouts"]
    raw = Raw(cluster.address(replica))
    try:
        assert raw.ask(wire.status_request(1))[0] == "ok"
        assert raw.closed_by_replica(), "the idle connection stayed open"
    finally:
        raw.close()
    assert _stats(cluster, replica)["client_idle_timeouts"] > before
    assert "idle for" in _log(cluster, replica)

    # The client keeps its connection open while idle; once the replicas close it,
    # its next call reconnects by itself.
    leader = cluster.wait_ready(timeout=60)
    with cypaxos.connect(cluster.cluster_arg, timeout=30) as kv:
        kv.put(b"idle", b"1")
        closes = _stats(cluster, leader)["client_idle_timeouts"]
        _wait_for(lambda: kv.statistics()["connected_to"] is None,
                  "the leader to close the client's idle connection")
        assert _stats(cluster, leader)["client_idle_timeouts"] > closes
        kv.put(b"idle", b"2")
        assert kv.get(b"idle") == b"2"
        assert kv.statistics()["connections"] >= 2


# ---------------------------------------------------------------------- reads

def test_a_read_whose_reply_would_be_huge_is_refused(cluster):
    replica = _follower(cluster)
    value = b"v" * (REPLY_MAX // 2)
    with cypaxos.connect(cluster.cluster_arg, timeout=30) as kv:
        kv.put(b"big", value)
        kv.put(b"too-big", b"w" * (REPLY_MAX + 1))
        kv.put(b"big-done", b"1")
        # Gets of one big value, many to a frame, on a follower (stale: no round):
        # without the bound this reply would be QUERIES_MAX times half a MiB.
        raw = Raw(cluster.address(replica))
        try:
            _wait_for(lambda: commands.decode_get(raw.ask(wire.read_request(
                          1, [commands.encode_get(b"big-done")], stale=True))[2][0]),
                      "the follower to apply the puts")
            reply = raw.ask(wire.read_request(2, [commands.encode_get(b"big")] * QUERIES_MAX,
                                              stale=True))
            assert reply[0] == "error" and reply[2] == "too_large", reply[:3]
            assert "--reply-bytes-max" in reply[3]
            assert raw.ask(wire.status_request(3))[0] == "ok"
        finally:
            raw.close()
        # The client splits what the replica refuses, down to one query a request...
        keys = [b"big"] * 5
        assert kv.get_many(keys) == [value] * 5
        # ...and a value whose reply alone passes the bound fails clearly, alone.
        with pytest.raises(RequestError, match="too_large.*--reply-bytes-max"):
            kv.get(b"too-big")
        assert kv.get(b"big") == value
    assert _stats(cluster, replica)["reads_too_large"] >= 1


def test_too_many_queries_in_one_read_are_refused(cluster):
    raw = Raw(cluster.address(_follower(cluster)))
    try:
        queries = [commands.encode_get(b"q")] * (QUERIES_MAX + 1)
        reply = raw.ask(wire.read_request(1, queries, stale=True))
        assert reply[0] == "error" and reply[2] == "too_large", reply
        assert f"{QUERIES_MAX + 1} queries" in reply[3] and "--queries-per-read-max" in reply[3]
        ok = raw.ask(wire.read_request(2, queries[:QUERIES_MAX], stale=True))
        assert ok[0] == "ok" and len(ok[2]) == QUERIES_MAX
    finally:
        raw.close()
    # The client's bulk reads of more queries than that are split and answered.
    with cypaxos.connect(cluster.cluster_arg, timeout=30) as kv:
        kv.put_many([(b"q%d" % i, b"%d" % i) for i in range(3 * QUERIES_MAX)])
        keys = [b"q%d" % i for i in range(3 * QUERIES_MAX)]
        assert kv.get_many(keys) == [b"%d" % i for i in range(3 * QUERIES_MAX)]


def test_a_client_that_does_not_read_its_replies_gets_busy(cluster):
    replica = _follower(cluster)
    value = b"r" * (REPLY_MAX // 4)
    with cypaxos.connect(cluster.cluster_arg, timeout=30) as kv:
        kv.put(b"unread", value)
    raw = Raw(cluster.address(replica), rcvbuf=4096)
    try:
        query = [commands.encode_get(b"unread")]
        _wait_for(lambda: commands.decode_get(raw.ask(wire.read_request(
                      1, query, stale=True))[2][0]), "the follower to apply the put")
        count = 200   # 50 MiB of replies: far more than the sockets hold
        before = _stats(cluster, replica)["reads_busy"]
        raw.sock.sendall(b"".join(wire.encode_frame(wire.read_request(i, query, stale=True))
                                  for i in range(2, count + 2)))
        # Read nothing until the replica has refused some: its backlog is then past
        # the bound whatever the sockets hold.
        _wait_for(lambda: _stats(cluster, replica)["reads_busy"] > before,
                  "reads answered busy")
        codes = []
        for _ in range(count):
            reply = wire.parse_reply(raw.frame())
            codes.append(reply[0] if reply[0] == "ok" else reply[2])
            if reply[0] == "error":
                assert "waiting to be read" in reply[3]
        assert "busy" in codes, codes
        assert raw.ask(wire.status_request(count + 2))[0] == "ok"
    finally:
        raw.close()


def test_a_client_whose_unsent_replies_pass_the_hard_bound_is_cut_off(cluster):
    replica = _follower(cluster)
    before = _stats(cluster, replica)["client_drops"]
    raw = Raw(cluster.address(replica), rcvbuf=4096)
    try:
        # Status replies are not reads (never answered busy): about 1 KiB each, so
        # these pass the hard bound (here its floor, 10 MiB, which leaves a backup
        # its 8 MiB and a chunk) with room to spare for whatever the sockets hold.
        count = 40000
        raw.sock.sendall(b"".join(wire.encode_frame(wire.status_request(i))
                                  for i in range(1, count + 1)))
        _wait_for(lambda: _stats(cluster, replica)["client_drops"] > before,
                  "the replica to cut the client off")
        replies = 0
        while raw.frame() is not None:   # what was queued, then the end
            replies += 1
        assert replies < count
    finally:
        raw.close()
    assert "it did not read its replies" in _log(cluster, replica)
    with cypaxos.connect(cluster.cluster_arg, timeout=30) as kv:
        kv.put(b"after-cut-off", b"served")
        assert kv.get(b"after-cut-off") == b"served"


# ---------------------------------------------------------------------- snapshots

def test_snapshot_requests_past_the_rate_are_refused(cluster):
    with cypaxos.connect(cluster.cluster_arg, timeout=30) as kv:
        answers = []
        for i in range(SNAPSHOTS_PER_MINUTE + 1):
            kv.put(b"snap", b"%d" % i)   # something new to snapshot each time
            answers.append(kv.snapshot())
        refused = answers[-1]
        assert all("error" in entry for entry in refused), refused
        for entry in refused:
            assert entry["error"].startswith("busy: ") and \
                "--snapshot-requests-per-minute" in entry["error"], entry
        assert all("error" not in entry for entry in answers[0]), answers[0]
        kv.put(b"snap", b"after")
        assert kv.get(b"snap") == b"after"
    assert _stats(cluster, 1)["snapshot_requests_refused"] >= 1


# ---------------------------------------------------------------------- parts alone

def test_serve_flags_and_their_checks(tmp_path):
    parser = build_parser()
    base = ["serve", "--insecure", "--id", "1", "--cluster", "1=127.0.0.1:7001", "--data-dir",
            str(tmp_path)]
    options = serve_options(parser.parse_args(base))
    assert (options.client_idle_timeout_s, options.frame_timeout_s, options.reply_bytes_max,
            options.queries_per_read_max, options.client_buffer_bytes_max,
            options.snapshot_requests_per_minute) == (
        limits.IDLE_TIMEOUT_S, limits.FRAME_TIMEOUT_S, limits.REPLY_BYTES_MAX,
        limits.QUERIES_PER_READ_MAX, limits.CLIENT_BUFFER_BYTES_MAX,
        limits.SNAPSHOT_REQUESTS_PER_MINUTE)
    options = serve_options(parser.parse_args(base + FLAGS))
    node = options.client_limits()
    assert node == dict(queries_per_read_max=QUERIES_MAX, reply_bytes_max=REPLY_MAX,
                        backlog_bytes_max=BUFFER_MAX,
                        snapshot_requests_max=SNAPSHOTS_PER_MINUTE,
                        snapshot_window_ticks=6000)
    for bad in (["--reply-bytes-max", str(limits.REPLY_BYTES_LIMIT + 1)],
                ["--frame-timeout-s", "0"], ["--queries-per-read-max", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(base + bad)
    # A backup's reads stop at their own bound, below the cut-off, whatever the flags.
    assert limits.hard_buffer_bytes(1 << 16, 1) > (backup.BACKUP_QUEUED_BYTES_MAX
                                                   + backup.BACKUP_CHUNK_BYTES)
    # Every reply a replica may send must be readable by the client.
    assert 2 * limits.REPLY_BYTES_LIMIT <= REPLY_FRAME_BYTES_MAX
    with pytest.raises(ConfigError, match="--reply-bytes-max"):
        ServerOptions(1, {1: "127.0.0.1:7001"}, str(tmp_path),
                      reply_bytes_max=limits.REPLY_BYTES_LIMIT + 1).client_limits()


def test_the_outbox_counts_the_bytes_its_socket_has_not_taken():
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        box = Outbox(1000, bytes_max=1 << 20)
        box.fd = a.fileno()
        assert box.put(b"x" * 100) and box.queued_bytes == 100
        box.flush()
        assert box.queued_bytes == 0 and b.recv(200) == b"x" * 100
        while box.put(b"y" * 65536):   # nobody reads: the kernel takes only so much
            box.flush()
        assert box.writing and 1 << 20 <= box.queued_bytes < (1 << 20) + 65536
        assert not box.put(b"z"), "past bytes_max the outbox takes no more"
        assert box.queued_bytes == sum(map(len, box.frames))
    finally:
        a.close()
        b.close()


class _Scope:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


async def _watch_for(conn, decoder, reading, seconds: float) -> _Scope:
    scope = _Scope()
    with trio.move_on_after(seconds):
        await clients._watch(conn, decoder, reading, 10.0, 2.0, scope)
    return scope


async def test_the_watchdog_closes_an_idle_connection_and_only_that(autojump_clock):
    conn, decoder, reading = Conn("c", 10), wire.FrameDecoder(), clients._Reading()
    reading.waiting = True
    scope = await _watch_for(conn, decoder, reading, 60)
    assert scope.cancelled and reading.expired == "idle"
    assert trio.current_time() < 12   # at most half the shorter timeout late

    conn.requests = 1   # a request in flight: never idle
    reading = clients._Reading()
    scope = await _watch_for(conn, decoder, reading, 600)
    assert not scope.cancelled


async def test_the_watchdog_ends_a_connection_cut_off_under_it(autojump_clock):
    conn, decoder, reading = Conn("c", 10), wire.FrameDecoder(), clients._Reading()
    conn.cut_off = True
    conn.close()
    scope = await _watch_for(conn, decoder, reading, 5)
    assert scope.cancelled and reading.expired == "cut_off"


async def test_the_watchdog_drops_a_torn_frame_not_a_slow_stream(autojump_clock):
    conn, decoder, reading = Conn("c", 10), wire.FrameDecoder(), clients._Reading()
    decoder.feed(struct.pack(">I", 100) + b"\x00")
    reading.waiting = True
    scope = await _watch_for(conn, decoder, reading, 60)
    assert scope.cancelled and reading.expired == "frame"

    # Torn frames that keep completing (requests go up) are a busy client, not a
    # stalled one; nor is a complete frame waiting while the reader is elsewhere.
    reading = clients._Reading()
    reading.waiting = True

    async def progress():
        while True:
            await trio.sleep(0.3)
            conn.requests += 1
            conn.replies += 1
            reading.received += 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(progress)
        scope = await _watch_for(conn, decoder, reading, 120)
        nursery.cancel_scope.cancel()
    assert not scope.cancelled
    reading.waiting = False
    scope = await _watch_for(conn, decoder, reading, 5)
    assert not scope.cancelled


async def test_the_watchdog_lets_a_slow_reader_drain_and_closes_a_stopped_one(autojump_clock):
    conn, decoder, reading = Conn("c", 10), wire.FrameDecoder(), clients._Reading()
    conn.queued_bytes = 100 << 20   # replies queued, all requests answered

    async def drain():
        while conn.queued_bytes:
            await trio.sleep(5)   # slower than the idle timeout in all, but moving
            conn.queued_bytes -= 1 << 20
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        scope = await _watch_for(conn, decoder, reading, 300)
        nursery.cancel_scope.cancel()
    assert not scope.cancelled
    scope = await _watch_for(conn, decoder, reading, 60)   # it stopped reading
    assert scope.cancelled and reading.expired == "idle"


async def test_the_writer_sends_a_long_backlog_whole_in_counted_slices():
    a, b = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(a), trio.SocketStream(b)
    box = Outbox(1000)
    frames = [bytes([i]) * (700 << 10) for i in range(5)]   # 3.4 MiB, in 5 frames
    for frame in frames:
        assert box.put(frame)
    seen_queued = set()
    got = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run_writer, sender)
        while len(got) < len(b"".join(frames)):
            seen_queued.add(box.queued_bytes)
            got += await receiver.receive_some(1 << 16)
        box.close()
    assert bytes(got) == b"".join(frames) and box.queued_bytes == 0
    assert len(seen_queued) >= 3, "the backlog went down in one step"
    await sender.aclose()
    await receiver.aclose()
