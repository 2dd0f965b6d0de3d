"""Test beds: where replicas, proxies and clients live, and how their links are cut.

Two kinds, with one interface:

* `NetnsBed` (needs root, iproute2 and a kernel with network namespaces): a hub
  namespace holding a Linux bridge, one namespace per replica and one for the
  clients, each joined to the bridge by a veth pair and given an address in
  10.77.0.0/24.  The addresses exist only inside namespaces this bed created, so all
  test traffic stays inside them; the bridge is in a namespace of its own, so the
  host's namespace is never touched (no interface, address or rule is added there).
  Traffic between replicas crosses a real network stack: veth, bridge, netfilter.
  Partitions are packet filters inside the replicas' namespaces (nftables, or
  iptables when `nft` is missing).
* `LoopbackBed`: everything on 127.0.0.1 in the current namespace.  No packet
  filters (the host's own rules are never touched); partitions are then made by the
  frame-aware proxy (see proxy.py) instead, which the scenario asks for by checking
  `bed.firewall is None`.

Every command the bed runs is listed in `bed.commands` (for a failing run's report).
`close()` is idempotent and deletes every namespace (which removes their veths, the
bridge and their rules with them); namespaces left by a test process that died are
removed by `cleanup_stale()` (only ours: the name carries the owner's pid).
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import subprocess
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

SUBNET = "10.77.0"
PREFIX = "cpxj"           # namespace names: cpxj-<pid>-<tag>-<role>
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


class BedError(RuntimeError):
    """A test bed command failed."""


def _run(argv, *, check=True, input=None, timeout=30):
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise BedError(f"{' '.join(argv)} -> exit {proc.returncode}: "
                       f"{(proc.stderr or proc.stdout).strip()[:500]}")
    return proc


def setns(name: str) -> None:
    """Move the calling thread into network namespace `name` (sockets it makes live there)."""
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


# ---------------------------------------------------------------- capabilities


@functools.lru_cache(maxsize=None)
def capabilities() -> dict:
    """What this machine allows, each with a reason when not: probed once per process.

    Keys: ``netns`` (bool), ``netns_reason``, ``firewall`` ("nft", "iptables" or
    None), ``firewall_reason``, ``faketime`` (path of libfaketime or None),
    ``faketime_reason``.
    """
    caps = {"netns": False, "netns_reason": "", "firewall": None, "firewall_reason": "",
            "faketime": None, "faketime_reason": ""}
    lib = find_libfaketime()
    if lib:
        caps["faketime"] = lib
    else:
        caps["faketime_reason"] = ("libfaketime not found (apt-get install faketime): "
                                   "clock-jump faults are skipped")
    if os.geteuid() != 0:
        caps["netns_reason"] = "not root: network namespaces need CAP_NET_ADMIN"
    elif not shutil.which("ip"):
        caps["netns_reason"] = "iproute2's `ip` is missing (apt-get install iproute2)"
    else:
        probe = f"{PREFIX}-{os.getpid()}-probe{uuid.uuid4().hex[:6]}"
        try:
            _run(["ip", "netns", "add", probe])
            try:
                _run(["ip", "-n", probe, "link", "set", "lo", "up"])
                _run(["ip", "-n", probe, "link", "add", "p0", "type", "veth",
                      "peer", "name", "p1"])
                caps["netns"] = True
                fw_errors = []
                if shutil.which("nft"):
                    try:
                        _run(["ip", "netns", "exec", probe, "nft", "add", "table", "inet", "probe"])
                        caps["firewall"] = "nft"
                    except BedError as exc:
                        fw_errors.append(f"nft: {exc}")
                else:
                    fw_errors.append("nft is missing (apt-get install nftables)")
                if caps["firewall"] is None:
                    if shutil.which("iptables"):
                        try:
                            _run(["ip", "netns", "exec", probe, "iptables", "-A", "INPUT",
                                  "-s", "192.0.2.1", "-j", "DROP"])
                            caps["firewall"] = "iptables"
                        except BedError as exc:
                            fw_errors.append(f"iptables: {exc}")
                    else:
                        fw_errors.append("iptables is missing (apt-get install iptables)")
                if caps["firewall"] is None:
                    caps["firewall_reason"] = "; ".join(fw_errors)
            finally:
                _run(["ip", "netns", "del", probe], check=False)
        except (BedError, OSError, subprocess.TimeoutExpired) as exc:
            caps["netns_reason"] = f"cannot create a network namespace: {exc}"
    if not caps["netns"] and not caps["firewall_reason"]:
        caps["firewall_reason"] = "no network namespaces: " + caps["netns_reason"]
    return caps


def find_libfaketime() -> str | None:
    candidates = [os.environ.get("CYPAXOS_LIBFAKETIME", "")]
    for base in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                 "/usr/lib", "/usr/local/lib"):
        candidates.append(os.path.join(base, "faketime", "libfaketime.so.1"))
    for path in candidates:
        if path and os.path.exists(path):
            return path
    return None


def cleanup_stale() -> list[str]:
    """Delete namespaces of ours whose owning process is gone; return their names."""
    removed = []
    if os.geteuid() != 0 or not shutil.which("ip"):
        return removed
    proc = _run(["ip", "netns", "list"], check=False)
    for line in proc.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.match(rf"{PREFIX}-(\d+)-", name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and os.path.exists(f"/proc/{pid}"):
            continue
        _kill_ns_processes(name)
        _run(["ip", "netns", "del", name], check=False)
        removed.append(name)
    return removed


def _kill_ns_processes(name: str) -> None:
    proc = _run(["ip", "netns", "pids", name], check=False)
    for pid in proc.stdout.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


# ---------------------------------------------------------------------- beds


class _Executor:
    """Threads that run callables inside one network namespace (or here, for None)."""

    def __init__(self, ns: str | None, workers: int = 8):
        init = (lambda: setns(ns)) if ns else None
        self.pool = ThreadPoolExecutor(max_workers=workers, initializer=init,
                                       thread_name_prefix=f"ns-{ns or 'host'}")

    def call(self, fn, *args, timeout=None, **kwargs):
        return self.pool.submit(fn, *args, **kwargs).result(timeout)

    def map(self, fn, items, timeout=None):
        futures = [self.pool.submit(fn, item) for item in items]
        return [f.result(timeout) for f in futures]

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


class Bed:
    """Common interface.  Nodes are named "r1".."rN" (replicas) and "c" (clients)."""

    kind = "?"
    firewall: str | None = None

    def __init__(self):
        self.commands: list[str] = []
        self._executors: dict[str | None, _Executor] = {}
        self._lock = threading.Lock()
        self.closed = False

    # where things live
    def host(self, node: str) -> str:
        raise NotImplementedError

    def ns(self, node: str) -> str | None:
        return None

    def wrap(self, node: str, argv: list[str]) -> list[str]:
        """The argv that runs `argv` inside `node`'s namespace."""
        return list(argv)

    def executor(self, node: str = "c") -> _Executor:
        """Threads whose sockets live in `node`'s namespace (the clients' by default)."""
        ns = self.ns(node)
        with self._lock:
            if ns not in self._executors:
                self._executors[ns] = _Executor(ns)
            return self._executors[ns]

    def thread_init(self, node: str = "c"):
        """A function that moves the calling thread into `node`'s namespace."""
        ns = self.ns(node)
        return (lambda: setns(ns)) if ns else (lambda: None)

    # partitions (packet filters); only NetnsBed has them
    def block(self, dst: str, srcs) -> None:
        raise NotImplementedError("this bed has no packet filter")

    def heal(self) -> None:
        pass

    def close(self) -> None:
        for ex in self._executors.values():
            ex.close()
        self._executors.clear()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LoopbackBed(Bed):
    kind = "loopback"

    def host(self, node: str) -> str:
        return "127.0.0.1"


class NetnsBed(Bed):
    """Namespaces hub + r1..rN + c on one bridge; see the module docstring."""

    kind = "netns"

    def __init__(self, replicas: int, *, firewall: str | None = "auto", tag: str | None = None):
        super().__init__()
        caps = capabilities()
        if not caps["netns"]:
            raise BedError(caps["netns_reason"])
        self.firewall = caps["firewall"] if firewall == "auto" else firewall
        self.tag = tag or uuid.uuid4().hex[:6]
        self.base = f"{PREFIX}-{os.getpid()}-{self.tag}"
        self.hub = f"{self.base}-hub"
        self.nodes = [f"r{i}" for i in range(1, replicas + 1)] + ["c"]
        self._addr = {f"r{i}": f"{SUBNET}.{10 + i}" for i in range(1, replicas + 1)}
        self._addr["c"] = f"{SUBNET}.200"
        self._created: list[str] = []
        self._blocked: set[tuple[str, str]] = set()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def ns(self, node: str) -> str:
        return f"{self.base}-{node}"

    def host(self, node: str) -> str:
        return self._addr[node]

    def wrap(self, node: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(node)] + list(argv)

    def _cmd(self, argv, **kw):
        self.commands.append(" ".join(argv))
        return _run(argv, **kw)

    def _add_ns(self, name):
        self._cmd(["ip", "netns", "add", name])
        self._created.append(name)
        self._cmd(["ip", "-n", name, "link", "set", "lo", "up"])

    def _build(self):
        self._add_ns(self.hub)
        self._cmd(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        self._cmd(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for node in self.nodes:
            ns = self.ns(node)
            self._add_ns(ns)
            # Both ends are created inside our namespaces: the host never sees them.
            self._cmd(["ip", "-n", self.hub, "link", "add", f"h-{node}", "type", "veth",
                       "peer", "name", "eth0", "netns", ns])
            self._cmd(["ip", "-n", self.hub, "link", "set", f"h-{node}", "master", "br0", "up"])
            self._cmd(["ip", "-n", ns, "addr", "add", f"{self._addr[node]}/24", "dev", "eth0"])
            self._cmd(["ip", "-n", ns, "link", "set", "eth0", "up"])
            if node != "c" and self.firewall == "nft":
                self._cmd(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=(
                    "table inet jepsen {\n"
                    "  chain input { type filter hook input priority 0; policy accept; }\n"
                    "}\n"))

    # -- partitions

    def block(self, dst: str, srcs) -> None:
        """Drop every packet that reaches `dst` from any node in `srcs` (one direction)."""
        if self.firewall is None:
            raise BedError("no packet filter available")
        ns = self.ns(dst)
        for src in srcs:
            if (dst, src) in self._blocked or src == dst:
                continue
            addr = self._addr[src]
            if self.firewall == "nft":
                self._cmd(["ip", "netns", "exec", ns, "nft", "add", "rule", "inet", "jepsen",
                           "input", "ip", "saddr", addr, "drop"])
            else:
                self._cmd(["ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-s", addr,
                           "-j", "DROP"])
            self._blocked.add((dst, src))

    def heal(self) -> None:
        """Remove every partition rule."""
        for dst in {d for d, _ in self._blocked}:
            ns = self.ns(dst)
            if self.firewall == "nft":
                self._cmd(["ip", "netns", "exec", ns, "nft", "flush", "chain", "inet",
                           "jepsen", "input"])
            else:
                self._cmd(["ip", "netns", "exec", ns, "iptables", "-F", "INPUT"])
        self._blocked.clear()

    def blocked(self) -> set[tuple[str, str]]:
        return set(self._blocked)

    def rules(self) -> str:
        """The current filter rules of every replica namespace (for reports)."""
        out = []
        for node in self.nodes:
            if node == "c":
                continue
            argv = (["nft", "list", "ruleset"] if self.firewall == "nft"
                    else ["iptables", "-S", "INPUT"])
            proc = _run(self.wrap(node, argv), check=False)
            out.append(f"# {node}\n{proc.stdout}")
        return "\n".join(out)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        for name in reversed(self._created):
            _kill_ns_processes(name)
            _run(["ip", "netns", "del", name], check=False)
        self._created.clear()


def make_bed(replicas: int, prefer: str = "netns") -> Bed:
    """A NetnsBed when possible (and preferred), else a LoopbackBed."""
    if prefer == "netns" and capabilities()["netns"]:
        return NetnsBed(replicas)
    return LoopbackBed()
