"""Exceptions raised by cypaxos."""


class Error(Exception):
    """Base of every cypaxos error."""


class StorageError(Error):
    """A data dir or write-ahead log cannot be used as asked."""


class DataDirError(StorageError):
    """A data dir is missing, foreign, locked, or belongs to another replica."""


class IdentityMismatchError(DataDirError):
    """A data dir's identity (cluster id, replica id) is not the one asked for.

    `path`, `found_cluster_id`, `found_replica_id` (what the data dir holds) and
    `cluster_id`, `replica_id` (what was asked for) say exactly what differs.
    """

    def __init__(self, path: str, found_cluster_id: str, found_replica_id: int,
                 cluster_id: str, replica_id: int) -> None:
        super().__init__(
            f"data dir {path} belongs to cluster {found_cluster_id!r} replica "
            f"{found_replica_id}, not cluster {cluster_id!r} replica {replica_id}")
        self.path = path
        self.found_cluster_id = found_cluster_id
        self.found_replica_id = found_replica_id
        self.cluster_id = cluster_id
        self.replica_id = replica_id


class WalCorruptError(StorageError):
    """A write-ahead log holds a bad record or segment that is not a torn tail.

    Recovery never drops such data silently: an operator has to look.
    """


class ConfigError(Error):
    """Command-line or configuration values that cannot work (a bad --cluster, say)."""


class ClientError(Error):
    """Base of the errors a client call raises.

    `maybe_applied` says whether the command may have taken effect: False means it
    certainly did not (it never left the client, or the cluster refused it); True means
    it may have been applied (retrying it through the same client is still safe: the
    session makes it exactly-once).
    """

    maybe_applied: bool = False

    def __init__(self, message: str, *, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class UnavailableError(ClientError):
    """No replica of the cluster could be reached, or none leads, within the timeout."""


class TimeoutError(ClientError):  # noqa: A001 - deliberately cypaxos.TimeoutError
    """The call did not complete within its timeout; see `maybe_applied`."""


class CommandError(ClientError):
    """The state machine raised while applying the command (replicated identically).

    The command *was* applied (as a failed command) on every replica.
    """

    maybe_applied = True

    def __init__(self, message: str) -> None:
        super().__init__(message, maybe_applied=True)


class SessionExpiredError(ClientError):
    """The cluster had evicted this client's session (its table holds `max_sessions`).

    The command was not applied this time, but an earlier try of it may have been, so
    `maybe_applied` is True; the client's later calls go in a new session.
    """

    maybe_applied = True

    def __init__(self, message: str, *, maybe_applied: bool = True) -> None:
        super().__init__(message, maybe_applied=maybe_applied)


class RequestError(ClientError):
    """The cluster refused the request as malformed or too large; nothing was applied."""


class ClosedError(ClientError):
    """The client was closed while the call was pending."""


class CompactedError(RequestError):
    """A read as of `revision` asked for history the store no longer retains.

    The store keeps a bounded window of recent changes; `compact_revision` is the
    oldest revision it can still read as of (the newest whose later changes are all
    kept).  Nothing
    was applied.
    """

    def __init__(self, revision: int, compact_revision: int) -> None:
        super().__init__(f"revision {revision} is compacted: the store retains history "
                         f"from revision {compact_revision} on")
        self.revision = revision
        self.compact_revision = compact_revision
