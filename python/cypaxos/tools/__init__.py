"""Tools on top of the client and the replica: the `cypaxos` command line (`cli`), a
local multi-process cluster (`local`), the demo (`demo`), the load generator
(`bench`) and their shared argparse types (`argtypes`)."""
