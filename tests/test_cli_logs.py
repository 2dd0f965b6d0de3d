"""Log lines (cypaxos.logs): levels in any case, text or JSON, rate-limited warnings
with their counts as fields; `serve` and `local` with --log-level/--log-format."""
from __future__ import annotations

import io
import json
import logging
import re
import signal
import socket
import subprocess
import sys

import pytest

from cypaxos import logs
from cypaxos.errors import ConfigError
from cypaxos.tools.local import LocalCluster, free_ports
from test_cli import _env, run_cli, started_local


@pytest.fixture
def root_logging():
    """Leave the root logger as it was (configure() changes it)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_levels_in_any_case():
    assert logs.parse_level("debug") == logging.DEBUG
    assert logs.parse_level(" WaRnInG ") == logging.WARNING
    with pytest.raises(ConfigError, match="--log-level 'verbose' is not one of debug"):
        logs.parse_level("verbose")
    with pytest.raises(ConfigError, match="CYPAXOS_LOG_FORMAT 'xml'"):
        logs.parse_format("xml", "CYPAXOS_LOG_FORMAT")


def test_configure_reads_the_environment_and_replaces_itself(root_logging):
    out = io.StringIO()
    logs.configure(environ={"CYPAXOS_LOG_LEVEL": "warning", "CYPAXOS_LOG_FORMAT": "JSON"},
                   stream=out)
    assert root_logging.level == logging.WARNING
    logging.getLogger("cypaxos.test").info("hidden")
    logging.getLogger("cypaxos.test").warning("shown %d", 1)
    (line,) = out.getvalue().splitlines()
    assert json.loads(line)["message"] == "shown 1"
    # Arguments win over the environment; a second call replaces the first handler.
    again = io.StringIO()
    logs.configure("DEBUG", "text", stream=again,
                   environ={"CYPAXOS_LOG_LEVEL": "error", "CYPAXOS_LOG_FORMAT": "json"})
    assert sum(isinstance(h, logs._Handler) for h in root_logging.handlers) == 1
    logging.getLogger("cypaxos.test").debug("plain %s", "text")
    assert re.fullmatch(r"\S+ \S+ cypaxos\.test\[\d+\] DEBUG plain text\n", again.getvalue())
    with pytest.raises(ConfigError, match="CYPAXOS_LOG_LEVEL 'loud'"):
        logs.configure(environ={"CYPAXOS_LOG_LEVEL": "loud"}, stream=again)


def test_json_lines_carry_the_fields_of_the_call():
    formatter = logs.JsonFormatter()
    record = logging.LogRecord("cypaxos.server", logging.WARNING, __file__, 1,
                               "dropped connection from %s: %s",
                               ("10.0.0.9:4711", "bad frame"), None)
    record.peer = "10.0.0.9:4711"
    record.bytes = b"\x00\xff"
    record.level = "mine"  # a field named like a line's own key keeps both
    doc = json.loads(formatter.format(record))
    assert doc["message"] == "dropped connection from 10.0.0.9:4711: bad frame"
    assert (doc["level"], doc["logger"], doc["peer"], doc["bytes"]) == (
        "WARNING", "cypaxos.server", "10.0.0.9:4711", "00ff")
    assert doc["extra.level"] == "mine"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"])
    assert isinstance(doc["pid"], int)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (),
                                   sys.exc_info())
    line = formatter.format(record)
    assert "\n" not in line  # one object per line, whatever the traceback holds
    assert "ValueError: boom" in json.loads(line)["exception"]


def test_a_repeated_warning_is_counted_in_its_fields():
    now = [0.0]
    out = io.StringIO()
    logger = logging.getLogger("test.ratelimit.json")
    logger.propagate = False
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    logger.addHandler(handler)
    try:
        limited = logs.RateLimitedLog(logger, 60.0, clock=lambda: now[0])
        for i in range(50):
            now[0] = float(i)
            limited.warning(("bad_frame", "10.0.0.9"), "dropped connection from %s: %s",
                            "10.0.0.9", "bad frame", extra={"peer": "10.0.0.9"})
        now[0] = 61.0
        assert limited.flush() == 1
    finally:
        logger.removeHandler(handler)
    first, last = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["peer"] == "10.0.0.9" and "suppressed" not in first
    assert last["suppressed"] == 49 and last["peer"] == "10.0.0.9"
    assert last["message"] == ("dropped connection from 10.0.0.9: bad frame "
                               "(and 49 more like it in the last 61 s)")


# ------------------------------------------------------------ real processes


def test_serve_logs_json_lines_even_when_it_fails(tmp_path):
    port = free_ports(1)[0]
    argv = [sys.executable, "-m", "cypaxos", "serve", "--insecure", "--id", "1", "--cluster",
            f"1=127.0.0.1:{port}", "--data-dir", str(tmp_path / "d"), "--log-format", "json",
            "--log-level", "Info"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, env=_env(), text=True)
    try:
        first = json.loads(proc.stderr.readline())
        assert "serving on" in first["message"] and first["level"] == "INFO"
        # A second replica on the same port and data dir cannot start: its one line is
        # a JSON record too, and it exits 1.
        failed = run_cli(*argv[3:])
        assert failed.returncode == 1
        (line,) = failed.stderr.decode().splitlines()
        doc = json.loads(line)
        assert doc["level"] == "CRITICAL" and doc["exit_status"] == 1
        assert "Traceback" not in doc["message"]
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        rest = proc.stderr.read().splitlines()
        assert rest and all(json.loads(line)["logger"].startswith("cypaxos") for line in rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_log_level_hides_what_is_below_it(tmp_path):
    with LocalCluster(1, ports=free_ports(1), data_dir=tmp_path, fsync=False,
                      extra_args=("--log-level", "WARNING")) as cluster:
        cluster.wait_ready(timeout=60)  # no INFO line says it serves: it is asked
        # Bad bytes make a WARNING ("refused a client connection ..."), which is shown.
        host, port = cluster.address(1).rsplit(":", 1)
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"\xff\xff\xff\xff garbage")
            sock.settimeout(10)
            while sock.recv(4096):
                pass
        assert cluster.stop(1) == 0
    log = (tmp_path / "replica1.log").read_text()
    assert "INFO" not in log and "WARNING" in log and "refused a client connection" in log, log


def test_local_passes_its_log_settings_to_every_replica(tmp_path):
    ports = free_ports(2)
    with started_local("--replicas", "2", "--port", str(ports[0]), "--fsync", "off",
                       "--data-dir", str(tmp_path), "--log-format", "JSON", "--log-level",
                       "info") as (proc, _):
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    for replica in (1, 2):
        lines = (tmp_path / f"replica{replica}.log").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert any("serving on" in r["message"] for r in records), lines
        assert all(r["level"] in ("INFO", "WARNING") for r in records), lines
