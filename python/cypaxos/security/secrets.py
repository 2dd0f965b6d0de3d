"""Cluster secrets and client tokens: key files loaded, checked and generated.

A key file is text: one key per line, blank lines and lines starting with ``#``
ignored, surrounding whitespace stripped.  A key is KEY_CHARS_MIN to KEY_CHARS_MAX
printable ASCII characters without spaces, with at least KEY_DISTINCT_MIN different
characters (which "aaaa..." or "1234...1234" fail and any random key passes).  The
first key of a file is the one this process proves with; every key of the file is
accepted from the other side, so a key is rotated by adding the new one, then moving
it first, then removing the old one, one replica at a time (docs/security.md).

`generate_key()` makes KEY_RANDOM_BYTES random bytes as hex (256 bits);
`create_key_file` writes one with mode 0600, created that way.

A file that group or others may read is used, with a warning: refusing it would stop
a cluster on a `chmod` mistake, while the warning says how to fix it.
"""
from __future__ import annotations

import logging
import os
import stat

from cypaxos.errors import ConfigError
from cypaxos.security.files import warn_if_exposed, write_file

__all__ = [
    "KEY_CHARS_MIN", "KEY_CHARS_MAX", "KEY_DISTINCT_MIN", "KEYS_PER_FILE_MAX",
    "KEY_RANDOM_BYTES", "KEY_FILE_MODE", "check_key", "parse_keys", "load_keys",
    "generate_key", "create_key_file", "load_or_create_key_file",
]

log = logging.getLogger("cypaxos.security")

KEY_CHARS_MIN = 32
"""A key is at least this many characters (128 bits of hex; generated keys have 64)."""
KEY_CHARS_MAX = 256
KEY_DISTINCT_MIN = 10
KEYS_PER_FILE_MAX = 64
"""A replica tries every key of a file on a handshake: the count is bounded."""
KEY_RANDOM_BYTES = 32
KEY_FILE_MODE = 0o600
_FILE_BYTES_MAX = KEYS_PER_FILE_MAX * (KEY_CHARS_MAX + 1) + 16384  # room for comments


def check_key(key: bytes, where: str) -> None:
    """ConfigError unless `key` is a usable key; `where` names it in the message."""
    if type(key) is not bytes:
        raise ConfigError(f"{where}: a key is bytes, not {type(key).__name__}")
    if not KEY_CHARS_MIN <= len(key) <= KEY_CHARS_MAX:
        raise ConfigError(f"{where}: a key must be {KEY_CHARS_MIN} to {KEY_CHARS_MAX} "
                          f"characters long, not {len(key)} (make one with: "
                          f"python3 -c 'import secrets; print(secrets.token_hex(32))')")
    if any(not 0x21 <= byte <= 0x7E for byte in key):
        raise ConfigError(f"{where}: a key is printable ASCII without spaces")
    if len(set(key)) < KEY_DISTINCT_MIN:
        raise ConfigError(f"{where}: the key is too weak (fewer than {KEY_DISTINCT_MIN} "
                          f"different characters); use a random one")


def parse_keys(text: bytes, where: str) -> tuple[bytes, ...]:
    """The keys in a key file's contents, checked; ConfigError if it has none."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        check_key(line, f"{where} line {number}")
        if line not in keys:
            keys.append(line)
    if not keys:
        raise ConfigError(f"{where} holds no key")
    if len(keys) > KEYS_PER_FILE_MAX:
        raise ConfigError(f"{where} holds {len(keys)} keys, more than {KEYS_PER_FILE_MAX}")
    return tuple(keys)


def load_keys(path: str | os.PathLike, what: str) -> tuple[bytes, ...]:
    """Read and check the key file `path`; `what` ("cluster secret file", "token file")
    names it in errors.  Logs a warning if group or others may read it.
    """
    where = f"{what} {os.fspath(path)}"
    try:
        # O_NONBLOCK: a FIFO given by mistake must not hang the start.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{where} is not a regular file")
        if info.st_size > _FILE_BYTES_MAX:
            raise ConfigError(f"{where} is {info.st_size} bytes, too large for a key file")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    keys = parse_keys(b"".join(chunks), where)
    warn_if_exposed(os.fspath(path), info.st_mode, what, log)
    return keys


def generate_key() -> bytes:
    """A new random key: KEY_RANDOM_BYTES bytes from the OS, as hex."""
    return os.urandom(KEY_RANDOM_BYTES).hex().encode()


def create_key_file(path: str | os.PathLike, *, replace: bool = False) -> bytes:
    """Write a new key to `path` (mode 0600 from creation) and return it.

    FileExistsError if `path` exists and `replace` is false; OSError if it cannot be
    written.
    """
    key = generate_key()
    write_file(os.fspath(path), key + b"\n", KEY_FILE_MODE, replace=replace)
    return key


def load_or_create_key_file(path: str | os.PathLike, what: str) -> tuple[bytes, ...]:
    """The keys of `path`, after writing a new one there if it does not exist.

    What `cypaxos local` and `cypaxos demo` do with the cluster secret in their data
    dir: the first run makes it, later runs over the same data dir reuse it.
    """
    try:
        create_key_file(path)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"{what} {os.fspath(path)}: cannot create: {exc.strerror or exc}") from None
    return load_keys(path, what)
