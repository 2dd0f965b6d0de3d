"""Seeding a new replica's data dir from a backup: `cypaxos restore`.

A backup file (`cypaxos backup`) is a snapshot file of the cluster it came from,
checksummed (`cypaxos.storage.snapshots`).  `restore_backup` checks it whole (magic,
length, CRC32C, format, fields, and that its state restores into the state machine
when given a check), then builds the data dir of replica `replica_id` of the *new*
cluster in a temporary directory beside the target: an identity (`open_data_dir`), an
empty WAL and one snapshot file holding the backup's state, sessions and index under
the new cluster's id, with no promised ballot (ballots of the old cluster mean
nothing in the new one).  The finished directory is renamed onto the target (which
must be missing or empty) and its parent synced: a crash leaves either no data dir or
a whole one, never a fresh-looking replica without the state.

Every replica of the new cluster is restored from the same file, so all of them start
with the same state at the same slot and any of them may lead.  (Restoring one and
starting the others empty is refused by design: two empty replicas are a quorum and
would start the log again at slot 1 under the restored one.)

Memory: the backup is read whole, as a replica reads its snapshot at start.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import DataDirError, StorageError
from . import snapshots
from .datadir import open_data_dir
from .files import fsync_dir

__all__ = ["Restored", "restore_backup", "read_backup"]


@dataclass(frozen=True)
class Restored:
    """What `restore_backup` wrote."""

    data_dir: str           #: the data dir, absolute
    index: int              #: the slot the state is at (the new cluster goes on after it)
    source_cluster_id: str  #: the cluster the backup was taken of
    state_bytes: int        #: size of the state machine's state


def read_backup(file: str) -> tuple[str, tuple]:
    """A backup file's `(cluster_id, (index, promised, sessions, state))`, checked;
    StorageError (one line) if it cannot be read, SnapshotCorruptError if it is bad."""
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise StorageError(f"cannot read backup file {file}: {exc.strerror or exc}") from None
    return snapshots.decode_any(data, f"backup file {file}")


def _check_empty(path: str) -> None:
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise DataDirError(f"data dir {path} is not a directory")
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise DataDirError(f"cannot read data dir {path}: {exc.strerror or exc}") from None
    if names:
        raise DataDirError(f"data dir {path} is not empty (it holds {names[0]!r}): restore "
                           "seeds a new replica's data dir only; give an empty or missing "
                           "directory")


def restore_backup(file: str, data_dir: str, *, cluster_id: str, replica_id: int,
                   validate_state: Optional[Callable[[bytes], object]] = None) -> Restored:
    """Seed `data_dir` (missing or empty) for replica `replica_id` of cluster
    `cluster_id` from backup `file`; nothing is written unless everything checks.

    `validate_state(state)` raises if the state does not restore (the server's
    state machine's `restore`).  Raises DataDirError, StorageError (a corrupt or
    unreadable file) or the error `validate_state` raised, as one line.
    """
    path = os.path.abspath(data_dir)
    _check_empty(path)
    source_cluster, (index, _promised, sessions, state) = read_backup(file)
    if index < 1:
        raise snapshots.SnapshotCorruptError(f"backup file {file} holds no applied slot")
    if validate_state is not None:
        try:
            validate_state(state)
        except Exception as exc:
            raise snapshots.SnapshotCorruptError(
                f"backup file {file}: its state does not restore into the state machine: "
                f"{exc}") from None
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        work = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.restore-", dir=parent)
    except OSError as exc:
        raise DataDirError(f"cannot create a directory beside {path}: "
                           f"{exc.strerror or exc}") from None
    try:
        with open_data_dir(work, cluster_id, replica_id):
            store = snapshots.SnapshotStore(work)
            store.write(index, snapshots.encode_parts(cluster_id, (index, 0, sessions, state)))
        fsync_dir(work)
        # Onto a missing name, or over an empty directory (rename(2) replaces one).
        os.rename(work, path)
        fsync_dir(parent)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, OSError):
            raise DataDirError(f"cannot write data dir {path}: {exc.strerror or exc}") from None
        raise
    return Restored(path, index, source_cluster, len(state))
