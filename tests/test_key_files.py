"""Cluster secret and token files (cypaxos.security.secrets): real files, real modes."""
from __future__ import annotations

import hashlib
import logging
import os
import stat

import pytest

from cypaxos.errors import ConfigError
from cypaxos.security import secrets

pytestmark = pytest.mark.fast

KEY = b"5f0c7a1e9b3d2c4a6e8f0b1d3c5a7e9f"
OTHER = b"Z9y8X7w6V5u4T3s2R1q0P9o8N7m6L5k4"


def key_file(tmp_path, text: bytes, mode: int = 0o600, name: str = "keys"):
    path = tmp_path / name
    path.write_bytes(text)
    os.chmod(path, mode)
    return path


def test_keys_comments_blank_lines_and_order(tmp_path):
    path = key_file(tmp_path, b"# rotated 2024-05\n\n  " + OTHER + b"  \r\n" + KEY + b"\n" + OTHER + b"\n")
    assert secrets.load_keys(path, "token file") == (OTHER, KEY)


@pytest.mark.parametrize("text, message", [
    (b"", "holds no key"),
    (b"# only a comment\n\n", "holds no key"),
    (b"short\n", "32 to 256 characters long, not 5"),
    (b"x" * 257 + b"\n", "not 257"),
    (b"a" * 40 + b"\n", "too weak"),
    (b"0123456780123456780123456780123456", "too weak"),
    (KEY[:16] + b" " + KEY[16:] + b"\n", "printable ASCII without spaces"),
    (KEY + b"\xc3\xa9\n", "printable ASCII"),
    (b"".join(hashlib.sha256(b"%d" % i).hexdigest().encode() + b"\n" for i in range(65)),
     "65 keys, more than 64"),
])
def test_bad_key_files(tmp_path, text, message):
    path = key_file(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        secrets.load_keys(path, "cluster secret file")
    assert message in str(raised.value)
    assert str(raised.value).startswith(f"cluster secret file {path}")


def test_line_number_in_message(tmp_path):
    path = key_file(tmp_path, KEY + b"\n# fine\nweak\n")
    with pytest.raises(ConfigError, match=f"token file {path} line 3: a key must be"):
        secrets.load_keys(path, "token file")


def test_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="No such file or directory"):
        secrets.load_keys(tmp_path / "missing", "token file")
    with pytest.raises(ConfigError, match="is not a regular file"):
        secrets.load_keys(tmp_path, "token file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):  # and does not hang
        secrets.load_keys(fifo, "token file")
    big = key_file(tmp_path, b"#" * (1 << 20), name="big")
    with pytest.raises(ConfigError, match="too large for a key file"):
        secrets.load_keys(big, "token file")


@pytest.mark.parametrize("mode, warns", [(0o600, False), (0o400, False), (0o640, True),
                                         (0o604, True), (0o660, True)])
def test_exposed_file_warns(tmp_path, caplog, mode, warns):
    path = key_file(tmp_path, KEY + b"\n", mode)
    with caplog.at_level(logging.WARNING, logger="cypaxos.security"):
        assert secrets.load_keys(path, "cluster secret file") == (KEY,)
    assert ("may be read by group or others" in caplog.text) == warns
    if warns:
        assert f"(mode {mode:04o})" in caplog.text and "chmod 600" in caplog.text


def test_generate_and_create(tmp_path):
    keys = {secrets.generate_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        secrets.check_key(key, "generated")
        assert len(key) == 2 * secrets.KEY_RANDOM_BYTES
    for umask in (0o000, 0o022, 0o377):
        old = os.umask(umask)
        try:
            path = tmp_path / f"secret-{umask:o}"
            key = secrets.create_key_file(path)
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert path.read_bytes() == key + b"\n"
        assert secrets.load_keys(path, "cluster secret file") == (key,)
    with pytest.raises(FileExistsError):
        secrets.create_key_file(tmp_path / "secret-0")
    replaced = secrets.create_key_file(tmp_path / "secret-0", replace=True)
    assert secrets.load_keys(tmp_path / "secret-0", "x") == (replaced,)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_load_or_create_reuses(tmp_path):
    path = tmp_path / "cluster.secret"
    first = secrets.load_or_create_key_file(path, "cluster secret file")
    assert secrets.load_or_create_key_file(path, "cluster secret file") == first
    with pytest.raises(ConfigError, match="cannot create"):
        secrets.load_or_create_key_file(tmp_path / "no" / "such" / "dir", "cluster secret file")
