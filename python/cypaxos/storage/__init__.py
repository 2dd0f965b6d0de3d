"""Storage: a replica's data dir (`datadir`), write-ahead log (`wal`) and snapshot
files (`snapshots`), with the small durable-file helpers they share (`files`).

Blocking calls and one native fsync thread; no event loop here (the replica's Trio
adapter for the WAL's fsyncs is `cypaxos.replica.walsync`).
"""
