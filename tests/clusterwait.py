"""Waiting on a local cluster from Trio tests: the blocking probes of
`cypaxos.tools.local.LocalCluster` run in a worker thread, so the event loop (and the
test's client) keeps running while they wait."""
from __future__ import annotations

import trio


async def statuses(cluster) -> dict:
    """Every running replica's status (None if silent), off the event loop."""
    return await trio.to_thread.run_sync(lambda: cluster.statuses(timeout=5.0))


async def wait_for(check, timeout: float, what, interval: float = 0.1):
    """Poll `await check()` until it returns something truthy; fail after `timeout` s.

    `what` describes the condition; a callable is called for the description at
    failure time (so it can show the last state seen).
    """
    deadline = trio.current_time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if trio.current_time() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for "
                                 f"{what() if callable(what) else what}")
        await trio.sleep(interval)


def brief(st: dict) -> dict:
    """The positions of every replica's status, for failure messages."""
    keys = ("role", "applied_index", "snapshot_index", "log_start", "wal_first_seq")
    return {i: (None if s is None else {k: s.get(k) for k in keys}) for i, s in st.items()}


async def wait_converged(cluster, timeout: float = 60.0, ids=None) -> dict:
    """Until every replica answers with the same applied_index and state_digest."""
    ids = list(ids or cluster.ids)
    seen = {}

    async def check():
        st = seen["st"] = await statuses(cluster)
        if any(st.get(i) is None for i in ids):
            return None
        if len({(st[i]["applied_index"], st[i]["state_digest"]) for i in ids}) == 1:
            return st
        return None
    return await wait_for(check, timeout,
                          lambda: f"replicas {ids} to converge: {brief(seen.get('st', {}))}")


async def wait_ready(cluster, timeout: float = 30.0) -> int:
    """The leader's id once the cluster is ready (LocalCluster.wait_ready, in a thread)."""
    return await trio.to_thread.run_sync(lambda: cluster.wait_ready(timeout=timeout))
