"""The replica shell: one replica process around the pure core.

`options` (ServerOptions: how to run one; no I/O), `outbox` (per-connection send
queues), `walsync` (the WAL's fsyncs driven from Trio), `server` (ReplicaServer,
serve, run_server: the network, the WAL and the loop around the core).
"""
