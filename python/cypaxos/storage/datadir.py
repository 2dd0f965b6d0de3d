"""The data dir: its identity file, its lock, and `open_data_dir`.

A data dir holds::

    identity.json          {"format": 1, "cluster_id": str, "replica_id": int}
    wal/                   the write-ahead log (`cypaxos.storage.wal`)
    snapshots/             snapshot files (`cypaxos.storage.snapshots`)

``identity.json`` is written once, atomically (tmp file, fsync, rename, fsync dir).
It is the commit point of a data dir's creation: ``wal/`` is created before it, so a
dir with an identity always has a ``wal/``.
"""
from __future__ import annotations

import json
import os

from ..ballots import REPLICA_ID_MAX
from ..errors import DataDirError, IdentityMismatchError
from .files import fsync_dir, lock_dir, write_all
from .wal import Wal

__all__ = ["DataDir", "open_data_dir", "IDENTITY_FILE", "IDENTITY_FORMAT", "WAL_DIR"]

IDENTITY_FILE = "identity.json"
IDENTITY_FORMAT = 1
WAL_DIR = "wal"
_IDENTITY_TMP = IDENTITY_FILE + ".tmp"
# Entries a data dir may hold before its identity exists: leftovers of an
# interrupted creation, and the directory a fresh filesystem has at its root.
_FRESH_DIR_ENTRIES = {_IDENTITY_TMP, WAL_DIR, "lost+found"}


class DataDir:
    """An opened data dir whose identity matched; holds an exclusive lock on it.

    Use ``open_data_dir`` to get one; ``close()`` (or ``with``) releases the lock.
    """

    def __init__(self, path: str, cluster_id: str, replica_id: int, lock_fd: int):
        self.path = path  #: absolute path of the data dir
        self.cluster_id = cluster_id  #: the cluster this dir belongs to
        self.replica_id = replica_id  #: the replica this dir belongs to
        self.wal_path = os.path.join(path, WAL_DIR)  #: the WAL directory
        self._lock_fd = lock_fd  # -1 once closed; closing it drops the flock

    def open_wal(self, **options) -> "Wal":
        """Open this data dir's WAL: ``Wal.open(self.wal_path, **options)``."""
        if self._lock_fd < 0:
            raise ValueError(f"data dir {self.path} is closed")
        return Wal.open(self.wal_path, **options)

    def close(self) -> None:
        """Release the data dir's lock. Idempotent."""
        if self._lock_fd >= 0:
            fd, self._lock_fd = self._lock_fd, -1
            os.close(fd)

    def __enter__(self) -> "DataDir":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DataDir({self.path!r}, cluster_id={self.cluster_id!r}, "
            f"replica_id={self.replica_id})"
        )


def open_data_dir(
    path: str | os.PathLike, cluster_id: str, replica_id: int, create: bool = True
) -> DataDir:
    """Open (creating it if missing or empty, when ``create``) and lock a data dir.

    Raises ``DataDirError`` if the dir belongs to another cluster or replica, holds
    files but no identity ("not a cypaxos data dir"), has an unreadable identity, is
    locked by another opener, or is missing/uninitialized and ``create`` is false.
    """
    if not isinstance(cluster_id, str) or not cluster_id:
        raise ValueError(f"cluster_id must be a non-empty str, not {cluster_id!r}")
    if type(replica_id) is not int or not 1 <= replica_id <= REPLICA_ID_MAX:
        raise ValueError(f"replica_id must be an int in 1..{REPLICA_ID_MAX}, not {replica_id!r}")
    path = os.path.abspath(os.fspath(path))

    if not os.path.isdir(path):
        if os.path.lexists(path):
            raise DataDirError(f"data dir {path} is not a directory")
        if not create:
            raise DataDirError(f"data dir {path} does not exist")
        os.makedirs(path, exist_ok=True)
        fsync_dir(os.path.dirname(path))  # make the new dir's entry durable

    lock_fd = lock_dir(path)
    if lock_fd is None:
        raise DataDirError(f"data dir {path} is in use (locked by another opener)")
    try:
        identity = _read_identity(path)
        if identity is None:
            _check_fresh(path)
            if not create:
                raise DataDirError(f"data dir {path} is not initialized")
            _create_identity(path, cluster_id, replica_id)
        else:
            found_cluster, found_replica = identity
            if (found_cluster, found_replica) != (cluster_id, replica_id):
                raise IdentityMismatchError(path, found_cluster, found_replica,
                                            cluster_id, replica_id)
            if not os.path.isdir(os.path.join(path, WAL_DIR)):
                raise DataDirError(f"data dir {path} has an identity but no {WAL_DIR}/")
    except BaseException:
        os.close(lock_fd)
        raise
    return DataDir(path, cluster_id, replica_id, lock_fd)


def _read_identity(path: str) -> tuple[str, int] | None:
    """The (cluster_id, replica_id) in ``path``'s identity file; None if it has none."""
    file = os.path.join(path, IDENTITY_FILE)
    try:
        with open(file, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        version = doc["format"]
        if type(version) is not int:
            raise ValueError(f"bad format {version!r}")
        if version != IDENTITY_FORMAT:
            raise DataDirError(
                f"data dir {path} has identity format {version}, "
                f"this version of cypaxos reads format {IDENTITY_FORMAT}"
            )
        cluster_id, replica_id = doc["cluster_id"], doc["replica_id"]
        if not isinstance(cluster_id, str) or type(replica_id) is not int:
            raise ValueError("bad cluster_id or replica_id")
    except (ValueError, KeyError) as e:
        raise DataDirError(f"data dir {path} has an unreadable {IDENTITY_FILE}: {e}") from e
    return cluster_id, replica_id


def _check_fresh(path: str) -> None:
    """Raise unless ``path`` holds nothing but leftovers of an interrupted creation."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if name == WAL_DIR and os.path.isdir(full) and not os.listdir(full):
            continue
        if name in _FRESH_DIR_ENTRIES and name != WAL_DIR:
            continue
        raise DataDirError(
            f"{path} is not a cypaxos data dir (it holds {name!r} but no {IDENTITY_FILE})"
        )


def _create_identity(path: str, cluster_id: str, replica_id: int) -> None:
    # wal/ first: the identity is the commit point, so an identity implies a wal/.
    os.makedirs(os.path.join(path, WAL_DIR), exist_ok=True)
    fsync_dir(path)  # wal/ durable before the identity can be
    doc = {"format": IDENTITY_FORMAT, "cluster_id": cluster_id, "replica_id": replica_id}
    tmp = os.path.join(path, _IDENTITY_TMP)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, json.dumps(doc, sort_keys=True).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(path, IDENTITY_FILE))
    fsync_dir(path)  # the rename: the data dir now exists
