"""What the attack tests run on: clusters in each trust mode, an honest client for
each, an attacker's raw connections, and readings of a replica's memory, log and
counters.

Modes (docs/security.md, "The three modes"):

* ``tls``: ``cypaxos certs DIR --replicas 3``, every replica with ``--tls-ca
  --tls-cert --tls-key``; honest clients present ``client.pem``;
* ``secret``: ``--cluster-secret-file`` (a secret written here) and ``--token-file``;
  honest clients prove the token;
* ``local``: what `LocalCluster` (``cypaxos local``) starts by default: a cluster
  secret it generates in its data dir and anonymous clients.

Everything speaks the wire protocol over blocking sockets (`ssl` for TLS): the
tests need neither Trio nor the client library, work the same in every mode, and
see every byte a replica sends.
"""
from __future__ import annotations

import itertools
import os
import re
import secrets
import select
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Optional

from cypaxos import commands, wire
from cypaxos.addresses import split_address
from cypaxos.security import tls as tls_files
from cypaxos.security.handshake import (HANDSHAKE_FRAME_BYTES_MAX, Authenticated, Dialer,
                                        Refused, _mac)
from cypaxos.security.secrets import load_keys
from cypaxos.tools.local import LocalCluster, child_env, free_ports, leader_of

__all__ = [
    "MODES", "MAX_SESSIONS", "READY_TIMEOUT_S", "CALL_TIMEOUT_S", "ModeCluster", "Client",
    "HonestConnection", "AuthRefused", "RawConnection", "attacker_tls_context",
    "tls_client_hello", "source_address", "frame", "peer_proof", "rss_kib", "peak_rss_kib",
    "reset_peak_rss", "PeakGrowth", "mib", "auth_failures", "wait_converged", "assert_intact",
]

MODES = ("tls", "secret", "local")
MAX_SESSIONS = 64
"""`serve --max-sessions` of every attacked cluster: small, so that a session flood
evicts in a few dozen registrations."""
READY_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 30.0
"""How long an honest call may take, elections included (generous: 2 shared cores)."""


def frame(body) -> bytes:
    """One wire frame of `body`."""
    return wire.encode_frame(body)


# ---------------------------------------------------------------- the clusters


class AuthRefused(Exception):
    """An honest client's handshake was refused: `reason` is the replica's."""


class ModeCluster(LocalCluster):
    """A 3-replica LocalCluster in trust mode `mode` (one of MODES), data under
    `root`, fsync off, a metrics endpoint per replica; `extra_args` go to every
    replica.  Its status probes authenticate as the mode's honest client does."""

    def __init__(self, mode: str, root: Path, extra_args: Iterable[str] = (), *,
                 nofile: Optional[int] = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        ports = free_ports(6)
        # The local default is LocalCluster's own ("secret"); the other modes' flags
        # are all in command().
        super().__init__(3, data_dir=root / "data", fsync=False, extra_args=extra_args,
                         ports=ports[:3], metrics_ports=ports[3:],
                         auth="secret" if mode == "local" else "none")
        self.mode = mode
        self.root = root
        self.nofile = nofile
        self.certs = root / "certs"
        self.token: Optional[bytes] = None
        self._client_tls: Optional[ssl.SSLContext] = None
        self._secret_file = root / "cluster.secret"
        if mode == "tls":
            result = subprocess.run(
                [sys.executable, "-m", "cypaxos", "certs", str(self.certs), "--replicas", "3"],
                capture_output=True, env=child_env(), timeout=60)
            assert result.returncode == 0, result.stderr.decode()
        elif mode == "secret":
            self._secret_file.write_text(secrets.token_hex(32) + "\n")
            self._secret_file.chmod(0o600)
            self.token = secrets.token_hex(32).encode()
            tokens = root / "tokens"
            tokens.write_bytes(self.token + b"\n")
            tokens.chmod(0o600)

    def cluster_secret(self) -> bytes:
        """The cluster secret the replicas prove with (tests compute proofs with it);
        the local default generated it in its data dir."""
        path = self.secret_file if self.mode == "local" else self._secret_file
        assert self.mode != "local" or path == os.path.join(self.data_dir, "cluster.secret")
        return load_keys(path, "cluster secret")[0]

    def command(self, replica_id: int) -> list[str]:
        """`cypaxos serve` for replica `replica_id` in this cluster's mode (under a
        descriptor limit of `nofile`, soft and hard, if given: ``ulimit -n``)."""
        argv = self._serve_command(replica_id)
        if self.nofile is None:
            return argv
        # The limit set, then exec: the replica keeps this process id.
        return [argv[0], "-c", _UNDER_LIMIT, str(self.nofile)] + argv[1:]

    def _serve_command(self, replica_id: int) -> list[str]:
        if self.mode == "local":
            return super().command(replica_id)   # the local default, whatever it is
        argv = [self.python, "-m", "cypaxos", "serve", "--id", str(replica_id),
                "--cluster", self.cluster_spec, "--data-dir",
                self.replica_data_dir(replica_id), "--fsync", "off",
                "--metrics-address", self.metrics_address(replica_id)]
        if self.mode == "tls":
            argv += ["--tls-ca", str(self.certs / "ca.pem"),
                     "--tls-cert", str(self.certs / f"replica-{replica_id}.pem"),
                     "--tls-key", str(self.certs / f"replica-{replica_id}.key")]
        else:
            argv += ["--cluster-secret-file", str(self._secret_file),
                     "--token-file", str(self.root / "tokens")]
        return argv + list(self.extra_args)

    # -- honest connections

    def client_tls_context(self) -> Optional[ssl.SSLContext]:
        """What an honest client dials with under TLS (None in the other modes)."""
        if self.mode != "tls":
            return None
        if self._client_tls is None:
            self._client_tls = tls_files.client_context(tls_files.TLS(
                ca=self.certs / "ca.pem", cert=self.certs / "client.pem",
                key=self.certs / "client.key"))
        return self._client_tls

    def connect(self, address: str, timeout: float = 10.0) -> "HonestConnection":
        """A connection to `address` that authenticated as this mode's honest client."""
        return HonestConnection(address, self.client_tls_context(), self.token, timeout)

    def status(self, replica_id: int, timeout: float = 1.0) -> dict | None:
        """Replica `replica_id`'s status (None if it does not answer)."""
        if not self.is_running(replica_id):
            return None
        try:
            with self.connect(self.address(replica_id), timeout) as conn:
                reply = conn.call(wire.status_request(1), timeout)
        except (OSError, ValueError, AuthRefused):
            return None
        return reply[2] if reply[0] == "ok" and type(reply[2]) is dict else None

    def statuses(self, timeout: float = 1.0) -> dict[int, dict | None]:
        """Every replica's status (None for the silent ones)."""
        return {i: self.status(i, timeout) for i in self.ids}

    def leader_id(self, timeout: float = 1.0) -> int | None:
        """The replica that leads (the highest ballot among those that say so)."""
        return leader_of(self.statuses(timeout))

    def pid(self, replica_id: int) -> int:
        """Replica `replica_id`'s process id (`cypaxos serve` itself)."""
        process = self.process(replica_id)
        assert process is not None and process.poll() is None, f"replica {replica_id} is down"
        return process.pid

    def log_text(self, replica_id: int) -> str:
        """Replica `replica_id`'s log so far."""
        return Path(self.log_path(replica_id)).read_text("utf-8", "replace")


_UNDER_LIMIT = (
    "import os, resource, sys\n"
    "n = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n")


class HonestConnection:
    """One connection through the handshake as a mode's honest client: TLS with the
    client certificate, a token, or anonymous.  AuthRefused if the replica refuses."""

    def __init__(self, address: str, tls_context: Optional[ssl.SSLContext],
                 token: Optional[bytes], timeout: float) -> None:
        host, port = split_address(address)
        self.address = address
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        certificate = None
        try:
            if tls_context is not None:
                sock = tls_context.wrap_socket(sock, server_hostname=host)
                certificate = tls_files.peer_identity(sock)
            self.sock = sock
            dialer = Dialer.client(token=token, tls=tls_context is not None,
                                   peer_certificate=certificate)
            sock.sendall(dialer.start())
            while dialer.outcome is None:
                out = dialer.receive_data(sock.recv(4096))
                if out:
                    sock.sendall(out)
            if isinstance(dialer.outcome, Refused):
                raise AuthRefused(dialer.outcome.reason)
        except BaseException:
            sock.close()
            raise
        assert isinstance(dialer.outcome, Authenticated)
        self.replica_id = dialer.outcome.peer
        self.cluster_id = dialer.outcome.cluster_id
        self.decoder = wire.FrameDecoder(4 * wire.FRAME_BYTES_MAX)
        if dialer.trailing_data:
            self.decoder.feed(dialer.trailing_data)

    def send(self, body) -> None:
        """Send one request."""
        self.sock.sendall(frame(body))

    def receive(self, timeout: float):
        """The next frame; socket.timeout or ConnectionError if none comes."""
        deadline = time.monotonic() + timeout
        while (obj := self.decoder.next_frame()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("no reply in time")
            self.sock.settimeout(remaining)
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the replica closed the connection")
            self.decoder.feed(data)
        return obj

    def call(self, body, timeout: float = CALL_TIMEOUT_S) -> tuple:
        """Send a request and return its parsed reply (`wire.parse_reply`)."""
        self.send(body)
        while True:
            reply = wire.parse_reply(self.receive(timeout))
            if reply[1] == body[1]:
                return reply

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def __enter__(self) -> "HonestConnection":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Client:
    """A blocking key-value client with one session, over honest connections: it
    follows redirects to the leader and retries through elections, like the library.

    `submit` returns the batch's results [(status, bytes), ...]; `resubmit` sends an
    earlier batch again, byte for byte (what a client does when a reply was lost).
    """

    def __init__(self, cluster: ModeCluster, timeout: float = CALL_TIMEOUT_S) -> None:
        self.cluster = cluster
        self.timeout = timeout
        self.address = cluster.addresses[0]
        self.conn: Optional[HonestConnection] = None
        self.session_id: Optional[int] = None
        self.next_seq = 1
        self._request_ids = itertools.count(1)

    def close(self) -> None:
        """Close the connection (the session stays in the cluster)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _next_address(self) -> None:
        addresses = self.cluster.addresses
        self.address = addresses[(addresses.index(self.address) + 1) % len(addresses)] \
            if self.address in addresses else addresses[0]

    def call(self, make_body: Callable[[int], list], *, leader: bool = True) -> object:
        """The payload of an "ok" reply to `make_body(request_id)`, from the leader
        (or, `leader=False`, from whichever replica this client is on)."""
        deadline = time.monotonic() + self.timeout
        last = "nothing tried"
        while time.monotonic() < deadline:
            try:
                if self.conn is None:
                    self.conn = self.cluster.connect(self.address)
                reply = self.conn.call(make_body(next(self._request_ids)),
                                       max(0.1, deadline - time.monotonic()))
            except (OSError, ValueError) as exc:   # ProtocolError is a ValueError
                last = f"{self.address}: {exc!r}"
                self.close()
                self._next_address()
                time.sleep(0.05)   # a replica restarting or an election: retry soon
                continue
            if reply[0] == "ok":
                return reply[2]
            last = f"{self.address}: {reply}"
            if reply[0] == "redirect" and reply[2] and leader:
                self.close()
                self.address = reply[2]
                continue
            if reply[0] == "error" and reply[2] != "busy":
                raise AssertionError(f"request refused: {reply}")
            self.close()
            self._next_address()
            time.sleep(0.05)   # no leader known, or busy: retry soon
        raise AssertionError(f"no answer within {self.timeout:g} s (last: {last})")

    def register(self) -> int:
        """Register a new session (docs/internals.md, "Sessions"); its id."""
        nonce = int.from_bytes(os.urandom(7), "little") | 1
        batch = commands.pack_client_batch(0, nonce, 0, [b""])
        results = commands.unpack_results(self.call(lambda rid: wire.submit_request(rid, batch)))
        assert results[0][0] == commands.RESULT_OK, results
        self.session_id = int.from_bytes(results[0][1], "little")
        self.next_seq = 1
        return self.session_id

    def batch(self, cmds: list[bytes]) -> bytes:
        """The next batch of this session holding `cmds` (sequence numbers taken)."""
        if self.session_id is None:
            self.register()
        batch = commands.pack_client_batch(self.session_id, self.next_seq,
                                           self.next_seq - 1, cmds)
        self.next_seq += len(cmds)
        return batch

    def resubmit(self, batch: bytes) -> list[tuple[int, bytes]]:
        """Send `batch` (bytes from `batch()`) and return its results."""
        packed = self.call(lambda rid: wire.submit_request(rid, batch))
        return commands.unpack_results(packed)

    def submit(self, cmds: list[bytes]) -> list[tuple[int, bytes]]:
        """Submit `cmds` as the session's next batch; their results."""
        return self.resubmit(self.batch(cmds))

    def put(self, key: bytes, value: bytes) -> None:
        """Set `key` to `value` (acknowledged once chosen and applied)."""
        results = self.submit([commands.encode_put(key, value)])
        assert results == [(commands.RESULT_OK, b"")], results

    def read(self, queries: list[bytes], *, stale: bool = False) -> list[bytes]:
        """Query results: a linearizable read through the leader unless `stale`."""
        return self.call(lambda rid: wire.read_request(rid, queries, stale), leader=not stale)

    def get(self, key: bytes) -> Optional[bytes]:
        """`key`'s value (None if absent), by a linearizable read."""
        return commands.decode_get(self.read([commands.encode_get(key)])[0])

    def get_rev(self, key: bytes) -> commands.GetResult:
        """`key` with its revisions, by a linearizable read."""
        return commands.decode_get_rev(self.read([commands.encode_get_rev(key)])[0])

    def status(self) -> dict:
        """The status of the replica this client is connected to."""
        return self.call(wire.status_request, leader=False)


# ---------------------------------------------------------------- the attacker

_sources = itertools.count(int.from_bytes(os.urandom(2), "big") % 20000)


def source_address() -> str:
    """A loopback address of its own to connect from (127.x.y.z, never 127.0.0.1):
    a replica logs refusals once per source a minute, so connections that must not
    share that budget come from different sources."""
    n = next(_sources) % 60000
    return f"127.{100 + n // 250 // 250}.{n // 250 % 250}.{n % 250 + 2}"


def attacker_tls_context(cert: Optional[Path] = None,
                         key: Optional[Path] = None) -> ssl.SSLContext:
    """A TLS context for an attacker: TLS 1.3, trusts any server, presents `cert`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def tls_client_hello() -> bytes:
    """The first bytes a TLS client sends (its ClientHello record), made without a
    socket: what a half-open TLS connection holds back half of."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = attacker_tls_context().wrap_bio(incoming, outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class RawConnection:
    """An attacker's connection to a replica: raw bytes out, whatever comes back.

    `source`: the local address to connect from (default: one of its own).  With
    `tls_context`, the TLS handshake runs at once (ssl.SSLError or OSError if the
    replica refuses it).  Frames received are decoded with a small frame limit, as a
    handshake frame must be.
    """

    def __init__(self, address: str, *, source: Optional[str] = None,
                 tls_context: Optional[ssl.SSLContext] = None, timeout: float = 10.0) -> None:
        host, port = split_address(address)
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source or source_address(), 0))
        self.local_port = self.sock.getsockname()[1]
        if tls_context is not None:
            try:
                self.sock = tls_context.wrap_socket(self.sock)
            except BaseException:
                self.sock.close()
                raise
        self.decoder = wire.FrameDecoder(HANDSHAKE_FRAME_BYTES_MAX)
        self.closed = False   # set once the replica closed (EOF or reset)
        self.sent = 0

    def send(self, data: bytes) -> bool:
        """Send raw bytes; False if the replica had already closed (reset, broken pipe)."""
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True
            return False
        self.sent += len(data)
        return True

    def send_frames(self, *bodies) -> bool:
        """Send frames in one write."""
        return self.send(b"".join(frame(body) for body in bodies))

    def next_frame(self, timeout: float = 10.0):
        """The next frame the replica sends, or None once it closed."""
        deadline = time.monotonic() + timeout
        while True:
            obj = self.decoder.next_frame()
            if obj is not None:
                return obj
            if self.closed:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the replica sent nothing in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                raise
            except (OSError, ssl.SSLError):
                data = b""
            if not data:
                self.closed = True
            else:
                self.decoder.feed(data)

    def frames_until_closed(self, timeout: float = 10.0) -> list:
        """Every frame until the replica closes the connection or `timeout` passes
        (then `closed` is still False)."""
        frames = []
        deadline = time.monotonic() + timeout
        try:
            while (obj := self.next_frame(max(0.01, deadline - time.monotonic()))) is not None:
                frames.append(obj)
        except socket.timeout:
            pass
        return frames

    def wait_closed(self, timeout: float = 15.0) -> bytes:
        """Read (and return) raw bytes until the replica closes; socket.timeout if not."""
        received = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the replica kept the connection open")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                raise
            except (OSError, ssl.SSLError):
                data = b""
            if not data:
                self.closed = True
                return bytes(received)
            received += data

    def readable(self, timeout: float) -> bool:
        """Whether the replica sent something (or closed) within `timeout`."""
        return bool(select.select([self.sock], [], [], timeout)[0])

    def close(self) -> None:
        """Close our end."""
        self.sock.close()

    def __enter__(self) -> "RawConnection":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def peer_proof(secret: bytes, cluster_id: str, dialer_id: int, acceptor_id: int,
               dialer_nonce: bytes, acceptor_nonce: bytes) -> bytes:
    """The proof a dialing replica sends in the keyed handshake: what someone who
    holds the cluster secret computes (docs/security.md, "The handshake")."""
    return _mac(secret, b"dialer", b"peer", cluster_id, dialer_id, acceptor_id,
                dialer_nonce, acceptor_nonce)


# ---------------------------------------------------------------- readings

def _proc_status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def rss_kib(pid: int) -> int:
    """The resident set size of process `pid`, in KiB."""
    return _proc_status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    """The peak resident set size of process `pid` (since `reset_peak_rss`), in KiB."""
    return _proc_status_kib(pid, "VmHWM")


def reset_peak_rss(pid: int) -> None:
    """Reset the peak RSS of `pid` to its current RSS (Linux /proc/PID/clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


class PeakGrowth:
    """``with PeakGrowth(pid) as growth:`` an attack; afterwards `growth.kib` is how
    far the process's peak RSS rose above its RSS when the block began (the peak is
    reset on entry, so a spike that is over by the end still counts)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = 0
        self.kib = 0

    def __enter__(self) -> "PeakGrowth":
        reset_peak_rss(self.pid)
        self.start = peak_rss_kib(self.pid)
        return self

    def __exit__(self, *exc_info) -> None:
        self.kib = peak_rss_kib(self.pid) - self.start


_AUTH_LINE = re.compile(r'^cypaxos_auth_failures_total\{kind="([^"]*)"\} ([0-9.e+]+)$', re.M)


def auth_failures(cluster: ModeCluster, replica_id: int) -> dict[str, int]:
    """Replica `replica_id`'s `cypaxos_auth_failures_total`, by kind (its /metrics)."""
    url = f"http://{cluster.metrics_address(replica_id)}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {kind: int(float(value)) for kind, value in _AUTH_LINE.findall(text)}


def wait_converged(cluster: ModeCluster, timeout: float = 60.0) -> dict:
    """Until every replica reports the same applied index and state digest; their
    statuses.  (Polled: convergence is the replicas' business, not an event here.)"""
    deadline = time.monotonic() + timeout
    while True:
        st = cluster.statuses(timeout=5.0)
        seen = {i: None if s is None else (s["applied_index"], s["state_digest"])
                for i, s in st.items()}
        if None not in seen.values() and len(set(seen.values())) == 1:
            return st
        assert time.monotonic() < deadline, f"replicas did not converge: {seen}"
        time.sleep(0.05)


def assert_intact(cluster: ModeCluster, canaries: dict[bytes, bytes], *,
                  forbidden: Iterable[bytes] = (), ballot_below: Optional[int] = None) -> None:
    """After an attack: every replica runs, a write and a linearizable read succeed,
    every value written before reads back identical, no `forbidden` key exists, no
    replica's ballot reached `ballot_below`, every replica's digest is equal, and no
    replica logged a traceback."""
    assert not cluster.unexpected_exits(), (cluster.unexpected_exits(),
                                            {i: cluster.log_tail(i) for i in cluster.ids})
    with Client(cluster) as client:
        key = b"after-" + os.urandom(6).hex().encode()
        client.put(key, b"still serving")
        assert client.get(key) == b"still serving"
        values = client.read([commands.encode_get(k) for k in canaries])
        assert [commands.decode_get(v) for v in values] == list(canaries.values())
        for k in forbidden:
            assert client.get(k) is None, f"forged key {k!r} exists"
    statuses = wait_converged(cluster)
    if ballot_below is not None:
        ballots = {i: s["ballot"] for i, s in statuses.items()}
        assert all(b < ballot_below for b in ballots.values()), (ballots, ballot_below)
    assert not cluster.unexpected_exits(), cluster.unexpected_exits()
    for i in cluster.ids:
        text = cluster.log_text(i)
        assert "Traceback" not in text and "unexpected error" not in text, (
            f"replica {i} logged an error: " + text[text.find("Traceback") - 300:][:3000])


def mib(kib: int) -> str:
    """KiB as a short MiB figure, for messages."""
    return f"{kib / 1024:.1f} MiB"
