"""Fault-injection test bed for cypaxos (see docs/testing.md).

netns.py       network namespaces + bridge (or loopback), packet-filter partitions
proxy.py       frame-aware user-space TCP proxy: delay, loss, duplication, cuts
replica_shim.py  `cypaxos serve` that records what each fsync made durable
cluster.py     replica processes on a bed, and the levers (kill, pause, clock, disk)
nemesis.py     the fault kinds and a seeded schedule
workload.py    concurrent clients, the recorded history, the checks
scenario.py    one scenario: setup + workload + nemesis + checks + evidence
"""
