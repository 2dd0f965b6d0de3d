"""One replica: the I/O-free node around the core, and the Trio server that runs it.

`node` (ReplicaNode: every rule around the core, no I/O), `interfaces` (the Storage
and Transport protocols it is given, NodeOptions), `transfer` (the snapshot transfer's
sans-I/O state machines), `server` (ReplicaServer, serve, run_server: the Trio wiring),
`peers` and `clients` (serving connections), `disk` (the node's storage over the data
dir), `outbox` (send queues, the node's transport), `walsync` (the WAL's fsyncs driven
from Trio), `framing`, `options` (ServerOptions: how to run one; no I/O).
"""
