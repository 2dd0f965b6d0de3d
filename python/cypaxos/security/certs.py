"""`cypaxos certs DIR --replicas N [--host NAME ...] [--force]`: a cluster's TLS files.

Writes, in DIR (created mode 0700 if missing):

    ca.pem  ca.key                        the cluster's CA (keep ca.key off the replicas)
    replica-1.pem  replica-1.key  ...     one per replica, naming its id
    client.pem  client.key                for clients; never accepted as a replica

Certificates are mode 0644, keys 0600 from the moment they exist (`files.write_file`).
Nothing is written if any of these files exists, unless ``--force``; a bad ``--host``
is refused before anything is written.  What the certificates contain:
`cypaxos.security.pki` and docs/security.md.

`add_arguments(parser)` and `main(args) -> int` are the subcommand's parts.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Sequence

from cypaxos.tools.argtypes import int_in
from cypaxos.errors import ConfigError, Error
from cypaxos.security.files import fsync_directory, write_file
from cypaxos.security.identity import REPLICA_ID_MAX

__all__ = ["add_arguments", "main", "file_names", "write_certificates",
           "CERT_FILE_MODE", "KEY_FILE_MODE", "DIR_MODE"]

CERT_FILE_MODE = 0o644
KEY_FILE_MODE = 0o600
DIR_MODE = 0o700


def file_names(replicas: int) -> list[str]:
    """The stem of every pair (STEM.pem, STEM.key) written for `replicas` replicas."""
    return ["ca", *(f"replica-{i}" for i in range(1, replicas + 1)), "client"]


def write_certificates(directory: str | os.PathLike, replicas: int,
                       hosts: Sequence[str] = (), *, force: bool = False) -> list[str]:
    """Issue a new CA and its certificates into `directory`; return the paths written.

    ConfigError for a bad host or count; Error if a file exists (without `force`) or
    cannot be written.
    """
    # cryptography takes tens of milliseconds to import: only this command pays it.
    from cypaxos.security import pki

    directory = os.fspath(directory)
    if type(replicas) is not int or not 1 <= replicas <= REPLICA_ID_MAX:
        raise ConfigError(f"--replicas {replicas!r} is not in 1..{REPLICA_ID_MAX}")
    for host in hosts:
        try:
            pki.host_name(host)
        except ValueError as exc:
            raise ConfigError(f"--host {exc}") from None
    targets = []
    for stem in file_names(replicas):
        targets += [os.path.join(directory, stem + ".pem"), os.path.join(directory, stem + ".key")]
    if not force:
        for path in targets:
            if os.path.lexists(path):
                raise Error(f"{path} exists; pass --force to replace every file of the set")
    try:
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=DIR_MODE)
            fsync_directory(os.path.dirname(os.path.abspath(directory)))
    except OSError as exc:
        raise Error(f"cannot create {directory}: {exc.strerror or exc}") from None
    issued = pki.issue(replicas, hosts)
    written = []
    for stem in file_names(replicas):
        # The key first: a certificate on disk always has its key beside it.
        for suffix, data, mode in ((".key", issued[stem].key_pem, KEY_FILE_MODE),
                                   (".pem", issued[stem].cert_pem, CERT_FILE_MODE)):
            path = os.path.join(directory, stem + suffix)
            try:
                write_file(path, data, mode, replace=force)
            except FileExistsError:
                raise Error(f"{path} appeared while writing; nothing else was replaced") from None
            except OSError as exc:
                raise Error(f"cannot write {path}: {exc.strerror or exc}") from None
            written.append(path)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `cypaxos certs`."""
    parser.description = (
        "Write a new CA (ca.pem, ca.key), one certificate and key per replica "
        "(replica-N.pem, replica-N.key) and one for clients (client.pem, client.key) "
        "into DIR.  Keys are mode 0600.  Give every replica ca.pem and its own pair; "
        "keep ca.key off the replicas.")
    parser.add_argument("directory", metavar="DIR", help="where to write (created if missing)")
    parser.add_argument("--replicas", type=int_in(1, REPLICA_ID_MAX), required=True,
                        metavar="N", help="write replica-1 ... replica-N")
    parser.add_argument("--host", action="append", default=[], metavar="NAME",
                        help="a DNS name or IP address of the replicas, put in every "
                             "replica certificate (repeatable; localhost, 127.0.0.1 and "
                             "::1 always are)")
    parser.add_argument("--force", action="store_true",
                        help="replace existing files (every file of the set)")


def main(args: argparse.Namespace) -> int:
    """Run `cypaxos certs`; returns the exit status (errors raise cypaxos.Error)."""
    from cypaxos.security.pki import CA_VALIDITY_DAYS, CERT_VALIDITY_DAYS

    write_certificates(args.directory, args.replicas, args.host, force=args.force)
    today = datetime.datetime.now(datetime.timezone.utc).date()
    names = ", ".join(["localhost", "127.0.0.1", "::1", *args.host])
    out = sys.stdout
    print(f"wrote a new CA, {args.replicas} replica certificate"
          f"{'s' if args.replicas > 1 else ''} and a client certificate to "
          f"{os.path.abspath(args.directory)}", file=out)
    print(f"  ca.pem, ca.key                 the CA, valid until "
          f"{today + datetime.timedelta(days=CA_VALIDITY_DAYS)}; "
          f"keep ca.key off the replicas", file=out)
    print(f"  replica-N.pem, replica-N.key   N = 1..{args.replicas}, for {names}", file=out)
    print("  client.pem, client.key         for clients (never accepted as a replica)", file=out)
    print(f"certificates valid until {today + datetime.timedelta(days=CERT_VALIDITY_DAYS)}; "
          f"keys are mode 0600", file=out)
    return 0
