"""Tools on top of the client and the replica: the `cypaxos` command line (`cli`, with
its handlers in `server_commands` and `client_commands`, the status output in
`status`, config files in `config` and exit statuses in `exits`), a local
multi-process cluster (`local`), the demo (`demo`), the load generator (`bench`) and
their shared argparse types (`argtypes`)."""
