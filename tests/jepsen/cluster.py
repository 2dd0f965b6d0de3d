"""Replica processes on a test bed, with the levers the nemeses pull.

`JepsenCluster` starts ``python -m cypaxos serve`` once per replica inside its
namespace (see netns.py), optionally routes every peer link through the frame-aware
proxy (proxy.py), optionally runs every replica under libfaketime with a per-replica
offset file, and offers: kill -9, restart, SIGSTOP/SIGCONT, torn-tail injection into
the WAL, clock jumps, proxy faults, status probes, and "wait until healthy/converged"
polls (always with a deadline, never a bare sleep).

Replica N keeps its data in ``ROOT/replicaN`` and appends its output to
``ROOT/replicaN.log`` (each start is preceded by a ``=== harness:`` line).
"""
from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time

from cypaxos.security.secrets import load_or_create_key_file
from cypaxos.storage.wal import RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE
from cypaxos.tools.local import PARENT_PID_ENV, child_env, free_ports
from cypaxos.tools.local import probe_status  # noqa: F401 - also used by test_fuzz_live

from .netns import Bed, NetnsBed
from .replica_shim import delay_file, synced_listing, synced_state

PROXY_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "proxy.py")
SHIM_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "replica_shim.py")
REPLICA_PORT = 7000        # in netns mode every replica listens on its own address:7000
PROXY_PORT_BASE = 7100     # proxy for link i->j listens on address_i:7100+j


def wal_records(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of every record of a WAL segment's bytes, read by their length
    fields alone (no checksums): they end at a zero length (the preallocated rest) or
    at the end of the bytes."""
    off, records = SEGMENT_HEADER_SIZE, []
    while off + RECORD_HEADER_SIZE <= len(data):
        (length,) = struct.unpack_from("<I", data, off)
        if length == 0 or off + RECORD_HEADER_SIZE + length > len(data):
            break
        records.append((off, length))
        off += RECORD_HEADER_SIZE + length
    return records


def wal_records_end(data: bytes) -> int:
    """Where the records of a WAL segment's bytes end (the rest is preallocated zeros)."""
    records = wal_records(data)
    if not records:
        return SEGMENT_HEADER_SIZE
    off, length = records[-1]
    return off + RECORD_HEADER_SIZE + length


class ClusterError(RuntimeError):
    pass


class Replica:
    def __init__(self, rid: int, address: str, data_dir: str, log_path: str):
        self.id = rid
        self.address = address
        self.data_dir = data_dir
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.paused = False
        self.starts = 0
        self.clock_offset = 0.0   # seconds, cumulative (libfaketime)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class ProxyProcess:
    """One proxy process (all outgoing links of one replica) and its control pipe."""

    def __init__(self, bed: Bed, node: str, links: list[dict], seed: int, log_path: str):
        self.links = [link["name"] for link in links]
        self.log = open(log_path, "ab")
        argv = bed.wrap(node, [sys.executable, PROXY_SCRIPT,
                               json.dumps({"links": links, "seed": seed})])
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, env=_child_env(), text=True,
                                        bufsize=1, start_new_session=True)
        self.lock = threading.Lock()
        line = self.process.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            raise ClusterError(f"proxy for {node} did not start (see {log_path})")

    def command(self, cmd: dict) -> dict:
        with self.lock:
            if self.process.poll() is not None:
                raise ClusterError("proxy process exited")
            self.process.stdin.write(json.dumps(cmd) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        if not line:
            raise ClusterError("proxy closed its stdout")
        return json.loads(line)

    def close(self):
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _child_env(extra: dict | None = None) -> dict:
    env = child_env({"PYTHONUNBUFFERED": "1"})
    env.pop("LD_PRELOAD", None)
    for key in list(env):
        if key.startswith("FAKETIME"):
            del env[key]
    if extra:
        env.update(extra)
    return env


class JepsenCluster:
    def __init__(self, bed: Bed, replicas: int, root: str, *, proxy: bool = False,
                 faketime: str | None = None, tick_ms: int = 10, seed: int = 0,
                 extra_args: tuple = (), auth: str = "secret"):
        # auth "secret": the replicas prove a cluster secret generated in `root` and
        # admit anonymous clients (as `cypaxos local`'s do), so every fault runs over
        # authenticated peer links; "insecure": --insecure, for tests that speak to a
        # replica as a peer without the secret.
        if auth not in ("secret", "insecure"):
            raise ValueError(f"auth {auth!r}")
        self.bed = bed
        self.n = replicas
        self.root = root
        self.use_proxy = proxy
        self.faketime = faketime
        self.tick_ms = tick_ms
        self.extra_args = tuple(extra_args)
        self.cluster_id = f"jepsen-{seed}"
        self.ids = list(range(1, replicas + 1))
        os.makedirs(root, exist_ok=True)
        if auth == "secret":
            self.secret_file = os.path.join(root, "cluster.secret")
            load_or_create_key_file(self.secret_file, "cluster secret file")
            self.auth_args = ["--cluster-secret-file", self.secret_file,
                              "--allow-anonymous-clients"]
        else:
            self.auth_args = ["--insecure"]
        netns = isinstance(bed, NetnsBed)
        if netns:
            ports = {i: REPLICA_PORT for i in self.ids}
            proxy_ports = {(i, j): PROXY_PORT_BASE + j for i in self.ids for j in self.ids if i != j}
        else:
            free = free_ports(replicas + replicas * (replicas - 1))
            ports = {i: free[i - 1] for i in self.ids}
            pairs = [(i, j) for i in self.ids for j in self.ids if i != j]
            proxy_ports = {pair: free[replicas + k] for k, pair in enumerate(pairs)}
        self.replicas = {
            i: Replica(i, f"{bed.host(f'r{i}')}:{ports[i]}", os.path.join(root, f"replica{i}"),
                       os.path.join(root, f"replica{i}.log"))
            for i in self.ids}
        self.proxy_address = {(i, j): f"{bed.host(f'r{i}')}:{p}" for (i, j), p in proxy_ports.items()}
        self.proxies: dict[int, ProxyProcess] = {}
        self.events: list[str] = []   # a timeline of what the harness did
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self.closed = False

    # ---------------------------------------------------------------- layout

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas.values()]

    def cluster_spec(self, i: int) -> str:
        """Replica i's --cluster: its own real address, and proxies for its peers."""
        parts = []
        for j in self.ids:
            if j == i or not self.use_proxy:
                parts.append(f"{j}={self.replicas[j].address}")
            else:
                parts.append(f"{j}={self.proxy_address[(i, j)]}")
        return ",".join(parts)

    def note(self, text: str) -> None:
        line = f"{time.monotonic() - self._t0:9.3f} {text}"
        with self._lock:
            self.events.append(line)

    # ------------------------------------------------------------- lifecycle

    def start_all(self) -> None:
        if self.use_proxy:
            for i in self.ids:
                links = [{"name": f"{i}->{j}",
                          "listen": self.proxy_address[(i, j)].rsplit(":", 1),
                          "target": self.replicas[j].address.rsplit(":", 1)}
                         for j in self.ids if j != i]
                for link in links:
                    link["listen"][1] = int(link["listen"][1])
                    link["target"][1] = int(link["target"][1])
                self.proxies[i] = ProxyProcess(self.bed, f"r{i}", links, seed=i,
                                               log_path=os.path.join(self.root, f"proxy{i}.log"))
        for i in self.ids:
            self.start(i)

    def command(self, i: int) -> list[str]:
        r = self.replicas[i]
        # The shim records what each fsync made durable (for the power-loss nemesis);
        # past that it is exactly `python -m cypaxos serve ...`.
        argv = [sys.executable, SHIM_SCRIPT, self.synced_log(i), "serve", *self.auth_args, "--id", str(i),
                "--cluster", self.cluster_spec(i), "--cluster-id", self.cluster_id,
                "--data-dir", r.data_dir, "--fsync", "always", "--tick-ms", str(self.tick_ms)]
        return self.bed.wrap(f"r{i}", argv + list(self.extra_args))

    def synced_log(self, i: int) -> str:
        return os.path.join(self.root, f"replica{i}.synced")  # a directory (replica_shim)

    def clock_file(self, i: int) -> str:
        return os.path.join(self.root, f"replica{i}.faketime")

    def start(self, i: int) -> None:
        r = self.replicas[i]
        if r.running():
            raise ClusterError(f"replica {i} is already running")
        extra = {}
        if threading.current_thread() is threading.main_thread():
            extra[PARENT_PID_ENV] = str(os.getpid())
        if self.faketime:
            if not os.path.exists(self.clock_file(i)):
                self._write_clock(i, r.clock_offset)
            # The offset file is re-read at most once a second; an offset (not a rate)
            # keeps CLOCK_MONOTONIC continuous except at the jumps we make.
            extra.update(LD_PRELOAD=self.faketime, FAKETIME_TIMESTAMP_FILE=self.clock_file(i),
                         FAKETIME_CACHE_DURATION="1")
        r.starts += 1
        with open(r.log_path, "ab") as log:
            log.write(f"=== harness: start #{r.starts} of replica {i} at "
                      f"{time.strftime('%H:%M:%S')}: {' '.join(self.command(i))}\n".encode())
            log.flush()
            r.process = subprocess.Popen(self.command(i), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=_child_env(extra),
                                         start_new_session=True)
        r.paused = False
        self.note(f"start replica {i} (pid {r.process.pid})")

    def kill(self, i: int) -> None:
        r = self.replicas[i]
        if r.process is not None and r.process.poll() is None:
            r.process.send_signal(signal.SIGKILL)
            r.process.wait()
        r.paused = False
        self.note(f"kill -9 replica {i}")

    def pause(self, i: int) -> None:
        r = self.replicas[i]
        if r.running():
            r.process.send_signal(signal.SIGSTOP)
            r.paused = True
            self.note(f"SIGSTOP replica {i}")

    def resume(self, i: int) -> None:
        r = self.replicas[i]
        if r.running():
            r.process.send_signal(signal.SIGCONT)
        r.paused = False
        self.note(f"SIGCONT replica {i}")

    def running_ids(self) -> list[int]:
        return [i for i, r in self.replicas.items() if r.running() and not r.paused]

    def unexpected_exits(self) -> dict[int, int]:
        """Replicas whose process ended without the harness killing it."""
        out = {}
        for i, r in self.replicas.items():
            if r.process is not None and r.process.poll() is not None and r.process.returncode != -9:
                out[i] = r.process.returncode
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for r in self.replicas.values():
            if r.process is not None and r.process.poll() is None:
                if r.paused:
                    r.process.send_signal(signal.SIGCONT)
                r.process.send_signal(signal.SIGKILL)
                r.process.wait()
        for p in self.proxies.values():
            p.close()
        self.proxies.clear()

    # ----------------------------------------------------------------- faults

    def _write_clock(self, i: int, offset: float) -> None:
        path = self.clock_file(i)
        with open(path + ".tmp", "w") as f:
            f.write(f"{offset:+.3f}\n")
        os.replace(path + ".tmp", path)

    def jump_clock(self, i: int, seconds: float) -> None:
        """Move replica i's clock (wall and monotonic) by `seconds` (within ~1 s)."""
        r = self.replicas[i]
        r.clock_offset += seconds
        self._write_clock(i, r.clock_offset)
        self.note(f"clock of replica {i} jumps {seconds:+.1f}s (offset now {r.clock_offset:+.1f}s)")

    def tear_wal_tail(self, i: int, rng: random.Random) -> tuple[str, bool]:
        """Leave the remains of an interrupted, never-fsynced append at the end of the
        last WAL segment's records of stopped replica i (what a crash mid-write leaves);
        return a description and whether the replica must report a torn tail (zeros
        after the records are unused space, not reported)."""
        r = self.replicas[i]
        if r.running():
            raise ClusterError("tear the WAL only of a stopped replica")
        wal_dir = os.path.join(r.data_dir, "wal")
        segments = sorted(f for f in os.listdir(wal_dir) if f.endswith(".wal"))
        path = os.path.join(wal_dir, segments[-1])
        kind = rng.choice(["short_header", "short_payload", "bad_crc", "zeros"])
        if kind == "short_header":
            junk = bytes([rng.randint(1, 255)]) + os.urandom(rng.randint(0, 6))
        elif kind == "short_payload":
            length = rng.randint(64, 4096)
            junk = struct.pack("<II", length, rng.getrandbits(32)) + os.urandom(rng.randint(0, length - 1))
        elif kind == "bad_crc":
            length = rng.randint(16, 512)
            junk = struct.pack("<II", length, rng.getrandbits(32)) + os.urandom(length)
        else:
            junk = b"\0" * rng.randint(1, 8192)
        with open(path, "r+b") as f:
            if kind == "zeros":
                f.seek(0, os.SEEK_END)  # a size change whose data never came
            else:
                f.seek(wal_records_end(f.read()))  # over the preallocated zeros
            f.write(junk)
        desc = f"{kind}: {len(junk)} bytes written to {os.path.basename(path)}"
        self.note(f"torn WAL tail on replica {i}: {desc}")
        return desc, kind != "zeros"

    def drop_unsynced(self, i: int) -> str:
        """After a SIGKILL: undo in replica i's WAL what its syncs had not made durable,
        as a power cut may (see replica_shim.py); describe what went."""
        r = self.replicas[i]
        if r.running():
            raise ClusterError("drop the unsynced tail only of a stopped replica")
        synced_dir = self.synced_log(i)
        state = synced_state(synced_dir)
        listing = synced_listing(synced_dir)
        wal_dir = os.path.realpath(os.path.join(r.data_dir, "wal"))
        dropped = files = vanished = emptied = 0
        for name in sorted(os.listdir(wal_dir)):
            path = os.path.join(wal_dir, name)
            if not name.endswith(".wal"):
                continue  # the spare: not part of the log (the WAL deletes a leftover)
            if listing is not None and name not in listing:
                # Created or renamed into place after the last directory sync.
                os.unlink(path)
                try:
                    os.unlink(os.path.join(synced_dir, name))  # a record of a former file
                except FileNotFoundError:
                    pass
                vanished += 1
                continue
            if name not in state:
                if listing is not None:  # its entry is durable, no data sync completed
                    os.truncate(path, 0)
                    emptied += 1
                continue  # no directory sync either: keep it (keeping more is legal)
            data_end, size = state[name]
            with open(path, "r+b") as f:
                f.seek(0, os.SEEK_END)
                current = f.tell()
                cut = 0
                if current > size:
                    f.truncate(size)
                    cut = current - size
                    current = size
                f.seek(data_end)
                unsynced = len(f.read(max(0, current - data_end)).rstrip(b"\0"))
                if unsynced:
                    f.seek(data_end)
                    f.write(bytes(unsynced))
            if cut or unsynced:
                dropped += cut + unsynced
                files += 1
        desc = f"dropped {dropped} unsynced bytes from {files} segment(s)"
        if vanished or emptied:
            desc += f", {vanished} new segment(s) vanished, {emptied} came back empty"
        self.note(f"power loss on replica {i}: {desc}")
        return desc

    def slow_disk(self, i: int, seconds: float) -> None:
        """Make every WAL sync of replica i take `seconds` longer (0 to stop)."""
        os.makedirs(self.synced_log(i), exist_ok=True)
        path = delay_file(self.synced_log(i))
        with open(path + ".tmp", "w") as f:
            f.write(f"{seconds:.4f}\n")
        os.replace(path + ".tmp", path)
        self.note(f"slow disk on replica {i}: +{seconds * 1000:.0f} ms per sync")

    def proxy_set(self, links, **faults) -> None:
        """Set faults on directed links [(i, j), ...] ("*" for all); replaces earlier ones."""
        if not self.proxies:
            raise ClusterError("this cluster runs without proxies")
        by_src: dict[int, list[str]] = {}
        pairs = ([(i, j) for i in self.ids for j in self.ids if i != j] if links == "*" else links)
        for i, j in pairs:
            by_src.setdefault(i, []).append(f"{i}->{j}")
        for i, names in by_src.items():
            self.proxies[i].command({"cmd": "set", "links": names, **faults})
        self.note(f"proxy faults {faults} on {len(pairs)} link(s)")

    def proxy_clear(self) -> None:
        for p in self.proxies.values():
            p.command({"cmd": "clear"})

    def proxy_stats(self) -> dict:
        total: dict[str, int] = {}
        for p in self.proxies.values():
            for stats in p.command({"cmd": "stats"})["stats"].values():
                for k, v in stats.items():
                    total[k] = total.get(k, 0) + v
        return total

    # ------------------------------------------------------------ observation

    def status(self, i: int, timeout: float = 1.0) -> dict | None:
        r = self.replicas[i]
        if not r.running() or r.paused:
            return None
        return self.bed.executor("c").call(probe_status, r.address, timeout)

    def statuses(self, timeout: float = 1.0) -> dict[int, dict | None]:
        ex = self.bed.executor("c")
        ids = [i for i in self.ids if self.replicas[i].running() and not self.replicas[i].paused]
        results = ex.map(lambda i: probe_status(self.replicas[i].address, timeout), ids)
        out = {i: None for i in self.ids}
        out.update(zip(ids, results))
        return out

    @staticmethod
    def leader_of(statuses: dict) -> int | None:
        best = None
        for i, st in statuses.items():
            if st and st.get("role") == "leader":
                if best is None or st.get("ballot", 0) > best[0]:
                    best = (st.get("ballot", 0), i)
        return best and best[1]

    def leader(self, timeout: float = 1.0) -> int | None:
        return self.leader_of(self.statuses(timeout))

    def wait_healthy(self, timeout: float, ids=None) -> int:
        """Poll until some replica leads and every running replica answers; the leader."""
        deadline = time.monotonic() + timeout
        while True:
            sts = self.statuses(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            want = [i for i in (ids or self.running_ids())]
            leader = self.leader_of(sts)
            if leader is not None and all(sts.get(i) for i in want):
                return leader
            if time.monotonic() > deadline:
                raise ClusterError(f"no healthy cluster within {timeout:g}s: leader={leader}, "
                                   f"silent={[i for i in want if not sts.get(i)]}")
            time.sleep(0.05)

    def wait_converged(self, timeout: float) -> dict[int, dict]:
        """Poll until every replica answers with the same applied index and commit index
        (then compare digests: equal indexes with different digests is divergence)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            sts = self.statuses(timeout=1.0)
            last = sts
            if all(sts.values()):
                applied = {st["applied_index"] for st in sts.values()}
                commit = {st["commit_index"] for st in sts.values()}
                if len(applied) == 1 and applied == commit and self.leader_of(sts) is not None:
                    return sts
            if time.monotonic() > deadline:
                brief = {i: (st and (st["role"], st["commit_index"], st["applied_index"]))
                         for i, st in (last or {}).items()}
                raise ClusterError(f"replicas did not converge within {timeout:g}s: {brief}")
            time.sleep(0.1)

    def log_text(self, i: int) -> str:
        try:
            with open(self.replicas[i].log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""
