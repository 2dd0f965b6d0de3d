"""Smoke test of an installed cypaxos: what to run after `pip install` to see that it works.

    python tests/smoke.py

It checks the cypaxos that this interpreter imports (run it from outside a source
checkout, or in a venv where cypaxos is installed, to check the installed one):

1. every module imports, the compiled core really is compiled, `py.typed` ships, and the
   installed metadata, `cypaxos.__version__` and `cypaxos --version` agree;
2. `cypaxos serve` on a port already in use fails with one line and exit 1, no traceback;
3. `cypaxos local` starts a 3-replica cluster; `cypaxos put`, `get` and `status --json`
   and the Python client (`put`, `get`, `cas`, `delete`, `put_many`, `get_many`) work
   against it;
4. SIGTERM stops it: exit 0, no traceback, its temporary data dir removed.

Prints one line per check and last ``smoke: N passed, N failed``; exits 0 only if every
check passed.  It needs nothing but the package (no test extras, no fault tools) and
takes a few seconds.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import json
import os
import pkgutil
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import cypaxos

TIMEOUT_S = 120.0  # generous: the machine may be busy, or an emulated architecture
WORK_DIR = tempfile.mkdtemp(prefix="cypaxos-smoke-")  # the children's cwd: no source tree


def cli_command() -> list[str]:
    """The `cypaxos` console script installed beside this interpreter, else `-m cypaxos`."""
    script = os.path.join(os.path.dirname(sys.executable), "cypaxos")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "cypaxos"]


CLI = cli_command()


def run_cli(*args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run the command line to completion (text output)."""
    env = dict(os.environ)
    env.pop("CYPAXOS_CLUSTER", None)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=WORK_DIR, env=env)


# ---------------------------------------------------------------------- checks


def check_every_module_imports() -> str:
    names = [info.name for info in pkgutil.walk_packages(cypaxos.__path__, "cypaxos.")]
    compiled = []
    for name in names:
        module = importlib.import_module(name)
        if isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader):
            compiled.append(name)
    # The compiled core is what a broken build leaves out (a pure-Python wheel).
    for required in ("cypaxos.core", "cypaxos.statemachine"):
        assert required in compiled, f"{required} is not a compiled extension; compiled: {compiled}"
    marker = os.path.join(os.path.dirname(cypaxos.__file__), "py.typed")
    assert os.path.isfile(marker), f"{marker} is missing"
    return f"{len(names)} modules from {os.path.dirname(cypaxos.__file__)}, {len(compiled)} compiled"


def check_versions_agree() -> str:
    installed = importlib.metadata.version("cypaxos")
    assert installed == cypaxos.__version__, (installed, cypaxos.__version__)
    result = run_cli("--version")
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"cypaxos {cypaxos.__version__}", result.stdout
    return result.stdout.strip()


def check_busy_port_is_one_line() -> str:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--insecure", "--id", "1", "--cluster", f"1=127.0.0.1:{port}",
                         "--data-dir", os.path.join(WORK_DIR, "busy"))
    lines = result.stderr.splitlines()
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("cypaxos: error: "), result.stderr
    assert str(port) in lines[0], result.stderr
    return lines[0]


class RunningLocal:
    """`cypaxos local` in the background, read until its banner (the cluster has a leader)."""

    def __init__(self, replicas: int = 3):
        from cypaxos.tools.local import free_ports

        self.ports = free_ports(replicas)
        self.cluster_arg = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        self.stderr = tempfile.TemporaryFile(mode="w+", dir=WORK_DIR)
        self.process = subprocess.Popen(
            [*CLI, "local", "--replicas", str(replicas), "--port", str(self.ports[0]),
             "--fsync", "off"],
            stdout=subprocess.PIPE, stderr=self.stderr, text=True, cwd=WORK_DIR)
        self.banner = ""
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_banner(self) -> str:
        banner = []
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no banner in {TIMEOUT_S:g} s: {''.join(banner)}"
                                     f"{self.stderr_text()}") from None
            if line is None:
                raise AssertionError(f"cypaxos local exited {self.process.wait()}: "
                                     f"{''.join(banner)}{self.stderr_text()}")
            banner.append(line)
            if line.startswith("Press Ctrl-C"):
                return "".join(banner)

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Checks:
    """Runs named checks in order, printing one line each; counts the outcomes."""

    def __init__(self):
        self.passed = self.failed = 0

    def run(self, name: str, check, *args) -> bool:
        start = time.monotonic()
        try:
            detail = check(*args)
        except Exception:
            self.failed += 1
            print(f"FAIL {name}:\n{traceback.format_exc()}", flush=True)
            return False
        self.passed += 1
        print(f"ok   {name} ({time.monotonic() - start:.1f} s): {detail}", flush=True)
        return True


def check_local_starts(local: RunningLocal) -> str:
    local.banner = local.wait_banner()
    assert f"--cluster {local.cluster_arg}" in local.banner, local.banner
    return local.banner.splitlines()[0]


def check_cli_put_get_status(local: RunningLocal) -> str:
    c = ("--cluster", local.cluster_arg)
    put = run_cli("put", *c, "greeting", "hello world")
    assert (put.returncode, put.stdout, put.stderr) == (0, "ok\n", ""), put
    get = run_cli("get", *c, "greeting")
    assert (get.returncode, get.stdout) == (0, "hello world"), get
    status = run_cli("status", *c, "--json")
    assert status.returncode == 0, status
    replicas = json.loads(status.stdout)["replicas"]
    assert len(replicas) == 3 and all(r["reachable"] for r in replicas), replicas
    assert [r["role"] for r in replicas].count("leader") == 1, replicas
    return "put, get, status --json: 3 replicas reachable, one leader"


def check_python_client(local: RunningLocal) -> str:
    with cypaxos.connect(local.cluster_arg, timeout=TIMEOUT_S) as kv:
        assert kv.get(b"greeting") == b"hello world"
        kv.put(b"k", b"v1")
        assert kv.cas(b"k", b"v1", b"v2") is True
        assert kv.cas(b"k", b"v1", b"v3") is False
        assert kv.get(b"k") == b"v2"
        kv.put_many([(b"a", b"1"), (b"b", b"2")])
        assert kv.get_many([b"a", b"b", b"c"]) == [b"1", b"2", None]
        assert kv.delete(b"k") is True
        assert kv.get(b"k") is None
    return "put, get, cas, put_many, get_many, delete"


def check_stops_on_sigterm(local: RunningLocal) -> str:
    data_dir = re.search(r"^data dir: (\S+)", local.banner, re.M).group(1)
    local.process.send_signal(signal.SIGTERM)
    code = local.process.wait(timeout=TIMEOUT_S)
    err = local.stderr_text()
    assert code == 0, (code, err)
    assert "Traceback" not in err, err
    assert not os.path.exists(data_dir), f"{data_dir} is left behind"
    return "exit 0, temporary data dir removed"


def main() -> int:
    print(f"smoke: Python {sys.version.split()[0]}, cypaxos {cypaxos.__version__}, "
          f"command {' '.join(CLI)}", flush=True)
    checks = Checks()
    try:
        checks.run("every module imports", check_every_module_imports)
        checks.run("versions agree", check_versions_agree)
        checks.run("serve on a busy port", check_busy_port_is_one_line)
        local = RunningLocal()
        try:
            # Each cluster step needs the one before it.
            (checks.run("cypaxos local starts", check_local_starts, local)
             and checks.run("command line", check_cli_put_get_status, local)
             and checks.run("Python client", check_python_client, local)
             and checks.run("SIGTERM stops it", check_stops_on_sigterm, local))
        finally:
            local.kill()
    finally:
        shutil.rmtree(WORK_DIR, ignore_errors=True)
    print(f"smoke: {checks.passed} passed, {checks.failed} failed", flush=True)
    return 0 if checks.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
