"""Run a whole cypaxos cluster on this host, one subprocess per replica.

`LocalCluster` is what `cypaxos local` and `cypaxos demo` run on, and what the
multi-process tests use::

    from cypaxos.tools.local import LocalCluster, free_ports

    with LocalCluster(replicas=3, base_port=free_ports(3)[0]) as cluster:
        cluster.wait_ready(timeout=30)
        print(cluster.cluster_arg)      # "127.0.0.1:7001,127.0.0.1:7002,..."
        cluster.kill(cluster.leader_id())
        cluster.wait_ready(timeout=30)  # a new leader, every running replica answers

Replicas are numbered 1..replicas (their replica ids); every method that takes a
replica takes its id.  Replica N serves on ``base_port + N - 1`` and keeps its data
in ``DATA_DIR/replicaN`` and its stderr in ``DATA_DIR/replicaN.log`` (beside the data
dir, not in it: a fresh data dir must hold nothing but cypaxos' own files).

The status probes here speak the client wire protocol over plain blocking sockets
(no Trio, no client library), so the class works the same from a script, a sync
test, a Trio test or a worker thread.
"""
from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterable, Sequence

from .. import wire
from ..addresses import split_address
from ..errors import Error
from ..security.secrets import load_or_create_key_file

__all__ = [
    "LocalCluster", "OptionsCluster", "LocalClusterError", "free_ports", "leader_of", "probe",
    "probe_status", "child_env", "PARENT_PID_ENV", "PACKAGE_ROOT",
]

PARENT_PID_ENV = "CYPAXOS_PARENT_PID"
"""Set by LocalCluster in a replica's environment: `cypaxos serve` then asks the
kernel to SIGTERM it when that parent dies, so a SIGKILLed test or demo never leaves
replicas behind (see cli.py)."""

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The directory holding this cypaxos package (an in-tree build or site-packages)."""

_HOST = "127.0.0.1"
AUTH_MODES = ("secret", "insecure", "none")
SECRET_FILE = "cluster.secret"
"""The cluster secret LocalCluster generates, in its data dir (beside the replicas')."""
_STOP_TIMEOUT = 10.0  # seconds a replica gets to exit after SIGTERM before SIGKILL
_POLL_INTERVAL = 0.05


class LocalClusterError(Error):
    """A local replica could not be started, exited early, or the cluster never got ready."""


# ------------------------------------------------------------------ ports and probes


def free_ports(n: int, host: str = _HOST) -> list[int]:
    """Return `n` consecutive TCP ports on `host` that nothing is bound to right now.

    Consecutive so that the result fits ``LocalCluster(base_port=ports[0])``.  Ports
    are picked at random below the usual Linux ephemeral range (32768+), where
    outgoing connections would otherwise take them, so parallel test runs rarely
    collide; there is still a window between this check and the replicas' bind.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - n)
        ports = list(range(base, base + n))
        if all(_port_is_free(host, port) for port in ports):
            return ports
    raise LocalClusterError(f"found no {n} consecutive free ports on {host}")


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # No SO_REUSEADDR: a port in TIME_WAIT counts as taken, which is stricter
        # than what the replica itself needs.
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def child_env(extra: dict | None = None) -> dict:
    """This process's environment for a child Python that must import this very cypaxos
    package (even when ours came from sys.path tweaks: pytest, an uninstalled
    checkout): `PACKAGE_ROOT` in front of PYTHONPATH, then `extra` on top."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def probe(address: str, request_body: list, timeout: float = 1.0) -> tuple:
    """Send one client request to the replica at `address` and return its parsed reply.

    `request_body` is e.g. ``wire.status_request(1)``.  Returns what
    ``wire.parse_reply`` returns: ``("ok", id, payload)``, ``("redirect", id, addr)``
    or ``("error", id, code, message)``.  Raises OSError (including socket.timeout)
    if the replica cannot be reached or does not answer within `timeout` seconds in
    all, wire.ProtocolError if it answers something malformed, and ConfigError for a
    malformed `address`.
    """
    host, port = split_address(address)
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        decoder = wire.FrameDecoder()
        sock.sendall(wire.encode_frame(wire.client_hello()))
        wire.parse_welcome(_read_frame(sock, decoder, deadline))
        sock.sendall(wire.encode_frame(request_body))
        return wire.parse_reply(_read_frame(sock, decoder, deadline))


def _read_frame(sock: socket.socket, decoder: wire.FrameDecoder, deadline: float):
    while True:
        frame = decoder.next_frame()
        if frame is not None:
            return frame
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("timed out waiting for a reply")
        sock.settimeout(remaining)
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed before a reply")
        decoder.feed(data)


def probe_status(address: str, timeout: float = 1.0) -> dict | None:
    """The status dict the replica at `address` reports, or None if it does not answer.

    The dict is the server's own (see docs/internals.md, "Wire"): typically ``id``,
    ``role``, ``ballot``, ``leader``, ``commit_index``, ``applied_index`` and
    ``state_digest``.  None covers every way of not answering in time: refused,
    reset, timed out, malformed, or a non-"ok" reply.
    """
    try:
        reply = probe(address, wire.status_request(1), timeout)
    except (OSError, ValueError):  # wire.ProtocolError is a ValueError
        return None
    if reply[0] != "ok" or type(reply[2]) is not dict:
        return None
    return reply[2]


# ---------------------------------------------------------------------- the cluster


class _Replica:
    """Bookkeeping for one replica subprocess."""

    __slots__ = ("id", "port", "address", "data_dir", "log_path", "process", "paused",
                 "expect_exit")

    def __init__(self, replica_id: int, port: int, data_dir: str, log_path: str):
        self.id = replica_id
        self.port = port
        self.address = f"{_HOST}:{port}"
        self.data_dir = data_dir
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.paused = False
        self.expect_exit = False  # set by stop()/kill(): an exit then is no surprise

    def running(self) -> bool:
        """Started and not (yet known to be) exited."""
        return self.process is not None and self.process.poll() is None


class LocalCluster:
    """A cluster of `replicas` replica subprocesses on 127.0.0.1.

    `base_port`: replica N listens on ``base_port + N - 1`` (or pass `ports`, one per
    replica).  `data_dir`: where the replicas' data dirs and logs go; None makes a
    temporary directory that `close()` removes.  An existing `data_dir` is reused:
    the replicas recover from it.  `fsync` maps to ``--fsync always|off``;
    `extra_args` are appended to every ``cypaxos serve`` command line (e.g.
    ``("--tick-ms", "5")``).  `cluster_id` is passed as ``--cluster-id`` if given.

    `auth`: how the replicas authenticate (docs/security.md).  "secret" (the
    default): a cluster secret generated in ``DATA_DIR/cluster.secret`` (mode 0600,
    kept and reused with the data dir), and anonymous clients, which is safe because
    every replica binds 127.0.0.1; "insecure": ``--insecure``; "none": no flags, for a
    caller that passes its own in `extra_args`.

    The constructor starts nothing; `start_all()` (or entering the ``with`` block)
    starts every replica, and `wait_ready()` waits for a leader.

    Call `start()` from the main thread when you can: a replica is asked to die with
    the thread that started it (so that a SIGKILLed parent leaves no orphans), and
    only the main thread is sure to outlive the replicas; from other threads the
    replica is started without that safety net.
    """

    def __init__(
        self,
        replicas: int = 3,
        base_port: int = 7001,
        data_dir: str | os.PathLike | None = None,
        fsync: bool = True,
        extra_args: Iterable[str] = (),
        *,
        ports: Sequence[int] | None = None,
        cluster_id: str | None = None,
        python: str = sys.executable,
        metrics_ports: Sequence[int] | None = None,
        auth: str = "secret",
    ) -> None:
        if auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {', '.join(AUTH_MODES)}, not {auth!r}")
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        if ports is None:
            ports = range(base_port, base_port + replicas)
        ports = list(ports)
        if len(ports) != replicas:
            raise ValueError(f"{replicas} replicas need {replicas} ports, not {len(ports)}")
        for port in ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is out of range 1..65535")
        if metrics_ports is not None and len(metrics_ports) != replicas:
            raise ValueError(f"{replicas} replicas need {replicas} metrics ports")
        self.metrics_ports = list(metrics_ports) if metrics_ports is not None else None
        self._own_dir = data_dir is None
        if data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="cypaxos-local-")
        else:
            self.data_dir = os.path.abspath(os.fspath(data_dir))
            os.makedirs(self.data_dir, exist_ok=True)
        self.fsync = fsync
        self.extra_args = tuple(extra_args)
        self.auth = auth
        self.secret_file = None
        if auth == "secret":
            self.secret_file = os.path.join(self.data_dir, SECRET_FILE)
            load_or_create_key_file(self.secret_file, "cluster secret file")
        self.cluster_id = cluster_id
        self.python = python
        self._replicas = {
            i: _Replica(i, port, os.path.join(self.data_dir, f"replica{i}"),
                        os.path.join(self.data_dir, f"replica{i}.log"))
            for i, port in enumerate(ports, start=1)
        }
        self._closed = False
        self._lock = threading.Lock()
        atexit.register(self.close)  # a forgotten close() still stops the replicas

    # -------------------------------------------------------------- descriptions

    @property
    def ids(self) -> list[int]:
        """The replica ids, 1..replicas."""
        return list(self._replicas)

    @property
    def addresses(self) -> list[str]:
        """Every replica's ``host:port``, in id order."""
        return [r.address for r in self._replicas.values()]

    @property
    def cluster_arg(self) -> str:
        """The ``--cluster`` value for client commands: ``host:port,host:port,...``."""
        return ",".join(self.addresses)

    @property
    def cluster_spec(self) -> str:
        """The ``serve --cluster`` value: ``1=host:port,2=host:port,...``."""
        return ",".join(f"{r.id}={r.address}" for r in self._replicas.values())

    def address(self, replica_id: int) -> str:
        """Replica `replica_id`'s ``host:port``."""
        return self._get(replica_id).address

    def metrics_address(self, replica_id: int) -> str | None:
        """Replica `replica_id`'s ``--metrics-address`` (None without `metrics_ports`)."""
        self._get(replica_id)
        if self.metrics_ports is None:
            return None
        return f"{_HOST}:{self.metrics_ports[replica_id - 1]}"

    def log_path(self, replica_id: int) -> str:
        """The file replica `replica_id`'s stdout and stderr go to."""
        return self._get(replica_id).log_path

    def replica_data_dir(self, replica_id: int) -> str:
        """Replica `replica_id`'s ``--data-dir``."""
        return self._get(replica_id).data_dir

    def process(self, replica_id: int) -> subprocess.Popen | None:
        """The replica's current Popen (None if never started)."""
        return self._get(replica_id).process

    def is_running(self, replica_id: int) -> bool:
        """True if the replica's process is alive (paused counts as alive)."""
        return self._get(replica_id).running()

    def running_ids(self) -> list[int]:
        """Ids of the replicas whose process is alive and not paused."""
        return [r.id for r in self._replicas.values() if r.running() and not r.paused]

    def _get(self, replica_id: int) -> _Replica:
        try:
            return self._replicas[replica_id]
        except KeyError:
            raise ValueError(
                f"no replica {replica_id!r} (ids are 1..{len(self._replicas)})") from None

    def command(self, replica_id: int) -> list[str]:
        """The ``cypaxos serve`` command line that starts replica `replica_id`."""
        r = self._get(replica_id)
        argv = [
            self.python, "-m", "cypaxos", "serve",
            "--id", str(r.id),
            "--cluster", self.cluster_spec,
            "--data-dir", r.data_dir,
            "--fsync", "always" if self.fsync else "off",
        ]
        if self.cluster_id is not None:
            argv += ["--cluster-id", self.cluster_id]
        if self.metrics_ports is not None:
            argv += ["--metrics-address", self.metrics_address(replica_id)]
        return argv + self.auth_args() + list(self.extra_args)

    def auth_args(self) -> list[str]:
        """The ``serve`` flags of `auth`."""
        if self.auth == "secret":
            return ["--cluster-secret-file", self.secret_file, "--allow-anonymous-clients"]
        if self.auth == "insecure":
            return ["--insecure"]
        return []

    # ------------------------------------------------------------------ lifecycle

    def start_all(self) -> None:
        """Start every replica that is not running."""
        for replica_id in self._replicas:
            if not self.is_running(replica_id):
                self.start(replica_id)

    def start(self, replica_id: int) -> None:
        """Start replica `replica_id` (restart it, with its data dir, if it exited)."""
        with self._lock:
            if self._closed:
                raise LocalClusterError("the local cluster is closed")
            r = self._get(replica_id)
            if r.running():
                raise LocalClusterError(f"replica {replica_id} is already running")
            env = child_env({"PYTHONUNBUFFERED": "1"})
            env.pop(PARENT_PID_ENV, None)
            if threading.current_thread() is threading.main_thread():
                env[PARENT_PID_ENV] = str(os.getpid())
            # The child gets its own copy of the log file descriptor; ours can go.
            with open(r.log_path, "ab") as log_file:
                r.process = subprocess.Popen(
                    self.command(replica_id),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    # Own session: a Ctrl-C in the terminal reaches only the parent,
                    # which then stops the replicas in order (stop() / close()).
                    start_new_session=True,
                    close_fds=True,
                )
            r.paused = False
            r.expect_exit = False

    def stop(self, replica_id: int, timeout: float = _STOP_TIMEOUT) -> int | None:
        """Stop replica `replica_id` cleanly: SIGTERM, then wait for it to exit.

        Returns its exit status (None if it was not running).  If it has not exited
        after `timeout` seconds it is SIGKILLed and LocalClusterError is raised.
        """
        r = self._get(replica_id)
        if r.process is None:
            return None
        r.expect_exit = True
        if r.process.poll() is None:
            self._signal(r, signal.SIGTERM)
            if r.paused:
                # A stopped process keeps SIGTERM pending until it runs again.
                self._signal(r, signal.SIGCONT)
                r.paused = False
            try:
                r.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(r, signal.SIGKILL)
                r.process.wait()
                raise LocalClusterError(
                    f"replica {replica_id} did not exit within {timeout:g}s of SIGTERM; "
                    f"killed it (see {r.log_path})") from None
        return r.process.returncode

    def kill(self, replica_id: int) -> None:
        """Crash replica `replica_id`: SIGKILL, then wait for it to be gone."""
        r = self._get(replica_id)
        if r.process is None:
            return
        r.expect_exit = True
        if r.process.poll() is None:
            self._signal(r, signal.SIGKILL)
            r.process.wait()
        r.paused = False

    def pause(self, replica_id: int) -> None:
        """Freeze replica `replica_id` (SIGSTOP): it stays connected but answers nothing."""
        r = self._get(replica_id)
        if not r.running():
            raise LocalClusterError(f"replica {replica_id} is not running")
        self._signal(r, signal.SIGSTOP)
        r.paused = True

    def resume(self, replica_id: int) -> None:
        """Unfreeze replica `replica_id` (SIGCONT)."""
        r = self._get(replica_id)
        if not r.running():
            raise LocalClusterError(f"replica {replica_id} is not running")
        self._signal(r, signal.SIGCONT)
        r.paused = False

    @staticmethod
    def _signal(r: _Replica, signum: int) -> None:
        try:
            r.process.send_signal(signum)
        except ProcessLookupError:
            pass  # exited meanwhile; the caller's wait/poll sees it

    def close(self) -> None:
        """Stop every replica (SIGTERM, SIGKILL after a timeout) and clean up.

        Removes the data dir if this object created it.  Idempotent.  Never raises
        for a replica that had to be killed: closing must always finish.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        for r in self._replicas.values():
            r.expect_exit = True
            if r.process is not None and r.process.poll() is None:
                self._signal(r, signal.SIGTERM)
                if r.paused:
                    self._signal(r, signal.SIGCONT)
        deadline = time.monotonic() + _STOP_TIMEOUT
        for r in self._replicas.values():
            if r.process is None:
                continue
            try:
                r.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(r, signal.SIGKILL)
                r.process.wait()
            r.paused = False
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    @property
    def closed(self) -> bool:
        """True once close() has run."""
        return self._closed

    def __enter__(self) -> "LocalCluster":
        try:
            self.start_all()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---------------------------------------------------------------- observation

    def exit_codes(self) -> dict[int, int]:
        """Replicas that were started and have exited since: id -> exit status."""
        return {r.id: r.process.returncode for r in self._replicas.values()
                if r.process is not None and r.process.poll() is not None}

    def unexpected_exits(self) -> dict[int, int]:
        """Replicas that exited without stop()/kill()/close() asking: id -> exit status."""
        return {r.id: r.process.returncode for r in self._replicas.values()
                if r.process is not None and not r.expect_exit
                and r.process.poll() is not None}

    def log_tail(self, replica_id: int, lines: int = 5) -> str:
        """The last `lines` non-empty lines of replica `replica_id`'s log."""
        try:
            with open(self._get(replica_id).log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])

    def status(self, replica_id: int, timeout: float = 1.0) -> dict | None:
        """Replica `replica_id`'s status dict, or None if it does not answer.

        A paused replica is not asked (it could only time out).
        """
        r = self._get(replica_id)
        if r.paused:
            return None
        return probe_status(r.address, timeout)

    def statuses(self, timeout: float = 1.0) -> dict[int, dict | None]:
        """Every replica's status (None for stopped, paused or silent ones), in parallel."""
        results: dict[int, dict | None] = {i: None for i in self._replicas}

        def ask(r: _Replica) -> None:
            results[r.id] = probe_status(r.address, timeout)

        threads = [threading.Thread(target=ask, args=(r,), daemon=True)
                   for r in self._replicas.values() if r.running() and not r.paused]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def leader_id(self, timeout: float = 1.0) -> int | None:
        """The id of the replica that says it leads, or None.

        If several say so (an old leader that has not heard of the new ballot yet),
        the one with the highest ballot wins: only it can get anything chosen.
        """
        return leader_of(self.statuses(timeout))

    def wait_ready(self, timeout: float = 30.0, *, replicas: Iterable[int] | None = None
                   ) -> int:
        """Wait until a leader exists and every running replica answers status.

        `replicas` narrows "every running replica" to those ids.  Returns the
        leader's id.  Raises LocalClusterError at once if a replica that should be
        running has exited (with the tail of its log), or when `timeout` seconds
        pass without the cluster getting there (saying what was missing).
        """
        deadline = time.monotonic() + timeout
        wanted = None if replicas is None else set(replicas)
        missing = "no replica answered"
        while True:
            self._check_alive(wanted)
            expected = [i for i in self.running_ids() if wanted is None or i in wanted]
            per_probe = max(0.05, min(1.0, deadline - time.monotonic()))
            statuses = self.statuses(per_probe)
            silent = [i for i in expected if statuses.get(i) is None]
            leader = leader_of(statuses)
            if not silent and leader is not None:
                return leader
            if silent:
                missing = "replica(s) " + ", ".join(map(str, silent)) + " did not answer status"
            else:
                missing = "no replica is leader"
            if time.monotonic() >= deadline:
                raise LocalClusterError(
                    f"local cluster not ready after {timeout:g}s: {missing}")
            time.sleep(_POLL_INTERVAL)

    def _check_alive(self, wanted: set[int] | None) -> None:
        for r in self._replicas.values():
            if wanted is not None and r.id not in wanted:
                continue
            if r.process is not None and not r.expect_exit and r.process.poll() is not None:
                tail = self.log_tail(r.id, 1)
                raise LocalClusterError(
                    f"replica {r.id} exited with status {r.process.returncode}"
                    + (f": {tail}" if tail else "") + f" (log: {r.log_path})")


# Runs one replica from a JSON dict of ServerOptions fields (argv[1]).  Like `cypaxos
# serve` it asks to be SIGTERMed when its parent dies and reports an expected failure
# as one line.
_OPTIONS_LAUNCHER = r'''
import ctypes, json, os, signal, sys
parent = os.environ.get("%s")
if parent and sys.platform.startswith("linux"):
    ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0)
    if str(os.getppid()) != parent:
        sys.exit(1)
from cypaxos.errors import Error
from cypaxos.replica.options import ServerOptions
from cypaxos.replica.server import run_server
options = json.loads(sys.argv[1])
options["cluster"] = {int(k): v for k, v in options["cluster"].items()}
try:
    sys.exit(run_server(ServerOptions(**options)))
except Error as exc:
    print("cypaxos: error: %%s" %% exc, file=sys.stderr)
    sys.exit(1)
''' % PARENT_PID_ENV


class OptionsCluster(LocalCluster):
    """A LocalCluster whose replicas run with extra `ServerOptions` fields.

    For knobs `cypaxos serve` has no flag for (snapshot thresholds, segment sizes,
    core settings): `options` is a dict of ServerOptions fields (JSON values), given
    to every replica.  `extra_args` does not apply (there is no command line).
    """

    def __init__(self, *args, options: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.options = dict(options or {})

    def command(self, replica_id: int) -> list[str]:
        """The ``python -c`` command line that starts replica `replica_id`."""
        options = dict(replica_id=replica_id, cluster={i: self.address(i) for i in self.ids},
                       data_dir=self.replica_data_dir(replica_id), fsync=self.fsync,
                       **self.options)
        if self.cluster_id is not None:
            options.setdefault("cluster_id", self.cluster_id)
        if self.auth == "secret":
            options.setdefault("cluster_secret_file", self.secret_file)
            options.setdefault("allow_anonymous_clients", True)
        elif self.auth == "insecure":
            options.setdefault("insecure", True)
        return [self.python, "-c", _OPTIONS_LAUNCHER, json.dumps(options)]


def leader_of(statuses: dict[int, dict | None]) -> int | None:
    """The leader's id in {replica_id: status or None}, as `LocalCluster.leader_id` picks it."""
    best = None
    for replica_id, st in statuses.items():
        if st and st.get("role") == "leader":
            ballot = st.get("ballot") or 0
            if best is None or ballot > best[0]:
                best = (ballot, st.get("id", replica_id))
    return None if best is None else best[1]
