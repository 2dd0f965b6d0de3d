"""Exceptions raised by cypaxos."""


class Error(Exception):
    """Base of every cypaxos error."""


class StorageError(Error):
    """A data dir or write-ahead log cannot be used as asked."""


class DataDirError(StorageError):
    """A data dir is missing, foreign, locked, or belongs to another replica."""


class WalCorruptError(StorageError):
    """A write-ahead log holds a bad record or segment that is not a torn tail.

    Recovery never drops such data silently: an operator has to look.
    """
