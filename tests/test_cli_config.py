"""`cypaxos serve --config FILE` (cypaxos.tools.config) and the serve options it feeds.

Parsing is tested in this process through the real parser (`build_parser`); a real
`cypaxos serve --config` then runs and serves from a file, bound where `listen` says.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from cypaxos.errors import ConfigError
from cypaxos.tools import config
from cypaxos.tools.argtypes import int_in
from cypaxos.tools.cli import build_parser, main
from cypaxos.tools.local import free_ports, probe_status
from cypaxos.security.secrets import create_key_file
from cypaxos.tools.server_commands import serve_options
from test_cli import _env, assert_one_error_line, run_cli

BASE = ("id = 1\n"
        'cluster = "1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003"\n'
        "insecure = true\n")


def parse(argv: list[str]) -> argparse.Namespace:
    """What main() hands the serve handler for `argv`."""
    parser = build_parser()
    return config.resolve(parser, parser.parse_args(argv), argv)


def write(tmp_path, text: str, name: str = "serve.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def test_every_serve_option_is_a_key():
    keys = set(config.option_keys(serve_parser()))
    options = {o[2:] for a in serve_parser()._actions for o in a.option_strings
               if o.startswith("--") and o not in ("--help", "--config")}
    assert keys == options
    assert {"id", "cluster", "data-dir", "tick-ms", "fsync", "listen", "advertise",
            "log-level", "log-format"} <= keys


def test_values_from_the_file_and_the_command_line_wins(tmp_path):
    path = write(tmp_path, BASE + 'data-dir = "/srv/a"\ntick-ms = 20\n'
                 'fsync = "off"\nlisten = "0.0.0.0:7001"\nlog_level = "DEBUG"\n')
    options = serve_options(parse(["serve", "--config", path]))
    assert (options.replica_id, options.data_dir, options.tick_ms, options.fsync) == (
        1, "/srv/a", 20, False)
    assert options.cluster == {1: "127.0.0.1:7001", 2: "127.0.0.1:7002", 3: "127.0.0.1:7003"}
    assert (options.listen, options.advertise) == ("0.0.0.0:7001", None)
    args = parse(["serve", "--config", path, "--tick-ms", "30", "--id", "2",
                  "--fsync", "always"])
    options = serve_options(args)
    assert (options.replica_id, options.tick_ms, options.fsync) == (2, 30, True)
    assert args.log_level == "debug"
    # Untouched options keep their built-in defaults.
    assert options.snapshot_slots == 100_000 and options.state_machine is None


def test_the_file_beats_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CYPAXOS_LOG_LEVEL", "error")
    path = write(tmp_path, BASE + 'data-dir = "d"\nlog-level = "info"\n')
    assert parse(["serve", "--config", path]).log_level == "info"


def test_required_options_may_come_from_either(tmp_path, capsys):
    path = write(tmp_path, 'data-dir = "d"\n')
    args = parse(["serve", "--config", path, "--id", "3", "--cluster", "3=127.0.0.1:7003"])
    assert (args.id, args.data_dir) == (3, "d")
    with pytest.raises(SystemExit) as exit_:
        parse(["serve", "--config", path, "--id", "3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cluster" in err and "--config" in err
    with pytest.raises(SystemExit):
        parse(["serve", "--insecure", "--id", "1", "--cluster", "1=127.0.0.1:7001"])  # no file, no dir
    assert "--data-dir" in capsys.readouterr().err


@pytest.mark.parametrize("text, contains", [
    ('data-dri = "d"\n', "unknown key 'data-dri' (did you mean 'data-dir'?)"),
    ('config = "other.toml"\n', "unknown key 'config'"),
    ('[serve]\nid = 1\n', "unknown key 'serve'"),
    ('id = "1"\n', "id must be an integer, not a string"),
    ("id = true\n", "id must be an integer, not a boolean"),
    ("id = 1.5\n", "id must be an integer, not a float"),
    ("id = 70000\n", "id: 70000 is not in 1..65535"),
    ("cluster = 7001\n", "cluster must be a string, not an integer"),
    ('fsync = "sometimes"\n', "fsync: 'sometimes' is not one of always, off"),
    ("tick-ms = [10]\n", "tick-ms must be an integer, not an array"),
    ('log-level = "loud"\n', "log-level: 'loud' is not one of"),
    ('data-dir = "a"\ndata_dir = "b"\n', "'data_dir' and 'data-dir' set the same option"),
    ("listen = 2023-01-01\n", "listen must be a string, not a date or time"),
    ("id = \n", "is not valid TOML"),
])
def test_bad_files_are_one_line_naming_the_file_and_key(tmp_path, capsys, text, contains):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        parse(["serve", "--config", path])
    assert contains in str(raised.value) and path in str(raised.value)
    # ... and through main(): exit 2, one line, before anything runs.
    assert main(["serve", "--config", path]) == 2
    err = capsys.readouterr().err
    assert err == f"cypaxos: error: {raised.value}\n"


def test_unreadable_or_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.toml"):
        parse(["serve", "--config", str(tmp_path / "nope.toml")])
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'cluster-id = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="latin1.toml"):
        parse(["serve", "--config", str(path)])


def test_an_option_added_later_is_a_key_with_its_checks(tmp_path):
    # What any future serve option gets (a TLS file, a flag, a repeatable one): the
    # config file reads the parser, not a list of its own.
    parser = build_parser()
    serve = next(a for a in parser._actions
                 if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    serve.add_argument("--future-count", type=int_in(1, 9), default=1)
    serve.add_argument("--future-flag", action="store_true")
    serve.add_argument("--future-off", action="store_false", dest="future_on")
    serve.add_argument("--future-name", action="append", default=[])
    serve.add_argument("--future-switch", action=argparse.BooleanOptionalAction)
    path = write(tmp_path, BASE + 'data-dir = "d"\nfuture-count = 7\nfuture_flag = true\n'
                 'future-off = true\nfuture-name = ["a", "b"]\nfuture-switch = false\n')
    args = config.resolve(parser, parser.parse_args(["serve", "--config", path]),
                          ["serve", "--config", path])
    assert (args.future_count, args.future_flag, args.future_on, args.future_name,
            args.future_switch) == (7, True, False, ["a", "b"], False)
    for text, contains in (("future-count = 10\n", "future-count: 10 is not in 1..9"),
                           ('future-flag = "yes"\n', "future-flag must be true or false"),
                           ('future-name = "a"\n', "future-name must be an array")):
        bad = write(tmp_path, text, "bad.toml")
        with pytest.raises(ConfigError, match=contains):
            config.load(bad, serve)


@pytest.mark.parametrize("args, contains", [
    (("--listen", "0.0.0.0"), "--listen entry '0.0.0.0' is not HOST:PORT"),
    (("--advertise", "db1:99999"), "--advertise"),
    (("--cluster", ",".join(f"{i}=127.0.0.1:{7000 + i}" for i in range(1, 65))),
     "at most 63"),
])
def test_bad_serve_values_are_bad_usage(tmp_path, args, contains):
    base = {"--id": "1", "--cluster": "1=127.0.0.1:7001", "--data-dir": str(tmp_path / "d")}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = [x for pair in base.items() for x in pair]
    assert_one_error_line(run_cli("serve", *argv), 2, contains=contains)
    assert not (tmp_path / "d").exists()


def test_serve_runs_from_a_config_file_bound_where_listen_says(tmp_path):
    advertised, bound = free_ports(2)[0], free_ports(1)[0]
    secret = tmp_path / "cluster.secret"
    create_key_file(secret)
    path = write(tmp_path, f'id = 1\ncluster = "1=127.0.0.1:{advertised}"\n'
                           f'data-dir = "{tmp_path / "data"}"\n'
                           f'cluster-secret-file = "{secret}"\nallow-anonymous-clients = true\n'
                           f'listen = "127.0.0.1:{bound}"\nlog-format = "json"\n')
    proc = subprocess.Popen([sys.executable, "-m", "cypaxos", "serve", "--config", path],
                            stderr=subprocess.PIPE, env=_env(), text=True)
    try:
        line = proc.stderr.readline()  # the replica logs once it serves
        assert "serving on" in json.loads(line)["message"], line + proc.stderr.read()
        status = probe_status(f"127.0.0.1:{bound}", timeout=10)
        assert status is not None and status["id"] == 1
        assert status["address"] == f"127.0.0.1:{advertised}"  # what the others know
        assert probe_status(f"127.0.0.1:{advertised}", timeout=1) is None
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "data" / "identity.json").exists()
