"""The ordered, revisioned store through the clients, on a real 3-replica cluster:
revisioned get, range (prefix, end, limit, past revisions, continuation past the
store's reply bound at one revision, CompactedError), transactions (both branches,
atomicity, revisions, concurrent clients against a model), and argument checks.

Every test uses keys of its own prefix on one shared cluster; the compaction test
pushes the history window forward, so it reads its own early revision only.
"""
from __future__ import annotations

import json
import random

import pytest
import trio

import cypaxos
from cypaxos import Compare, CompactedError, KeyValue, Op, RequestError, TxnResult
from cypaxos.client import open_client


@pytest.fixture(scope="module")
def cluster(shared_cluster):
    return shared_cluster


def kvs(prefix: bytes, n: int) -> list[tuple[bytes, bytes]]:
    return [(prefix + b"%03d" % i, b"v%d" % i) for i in range(n)]


async def test_get_with_revision(cluster):
    async with open_client(cluster.cluster_arg, timeout=30) as kv:
        assert await kv.get(b"gr/absent", with_revision=True) == (None, 0)
        result = await kv.txn(success=[Op.put(b"gr/k", b"one")])
        assert await kv.get(b"gr/k", with_revision=True) == (b"one", result.revision)
        assert await kv.get(b"gr/k") == b"one"        # plain get unchanged
        await kv.put(b"gr/k", b"two")
        value, revision = await kv.get("gr/k", with_revision=True, stale=False)
        assert value == b"two" and revision > result.revision


async def test_range_prefix_end_limit_and_order(cluster):
    async with open_client(cluster.cluster_arg, timeout=30) as kv:
        items = kvs(b"rg/", 20)
        shuffled = items[:]
        random.Random(1).shuffle(shuffled)
        await kv.put_many(shuffled)
        await kv.put(b"rg", b"outside")      # before the prefix
        await kv.put(b"rg0", b"outside")     # after it
        got = await kv.range(prefix=b"rg/")
        assert [(x.key, x.value) for x in got] == items
        assert all(type(x) is KeyValue and x.revision > 0 for x in got)
        assert await kv.range(b"rg/005", b"rg/008") == got[5:8]           # end exclusive
        assert await kv.range(b"rg/005", b"rg/008", limit=2) == got[5:7]
        assert await kv.range(prefix="rg/", limit=1) == got[:1]
        assert (await kv.range(b"rg/018"))[:3] == got[18:] + [
            KeyValue(b"rg0", b"outside", (await kv.get(b"rg0", with_revision=True))[1])]
        assert await kv.range(b"rg/009", b"rg/003") == []
        # The revision of each key is its last change.
        await kv.put(b"rg/007", b"new")
        _, rev7 = await kv.get(b"rg/007", with_revision=True)
        now = await kv.range(prefix=b"rg/")
        assert now[7] == KeyValue(b"rg/007", b"new", rev7)
        assert [x.revision for i, x in enumerate(now) if i != 7] == \
            [x.revision for i, x in enumerate(got) if i != 7]


async def test_range_at_a_past_revision(cluster):
    async with open_client(cluster.cluster_arg, timeout=30) as kv:
        first = await kv.txn(success=[Op.put(b"rp/a", b"1"), Op.put(b"rp/b", b"1")])
        second = await kv.txn(success=[Op.put(b"rp/a", b"2"), Op.delete(b"rp/b"),
                                       Op.put(b"rp/c", b"2")])
        assert second.revision > first.revision
        then = await kv.range(prefix=b"rp/", revision=first.revision)
        assert then == [KeyValue(b"rp/a", b"1", first.revision),
                        KeyValue(b"rp/b", b"1", first.revision)]
        assert await kv.range(prefix=b"rp/") == [
            KeyValue(b"rp/a", b"2", second.revision), KeyValue(b"rp/c", b"2", second.revision)]
        with pytest.raises(RequestError, match="in the future"):
            await kv.range(prefix=b"rp/", revision=second.revision + 10**9)


async def test_range_continues_past_the_reply_bound(cluster):
    """1.6 MB of values against the store's 1 MiB reply bound: the store cuts the
    reply and the client goes on from the last key, at the same revision."""
    async with open_client(cluster.cluster_arg, timeout=60) as kv:
        big = [(b"rc/%02d" % i, bytes([65 + i]) * 200_000) for i in range(8)]
        await kv.put_many(big)
        raw = await kv.query(cypaxos.commands.encode_range(prefix=b"rc/"))
        first = cypaxos.commands.decode_range(raw)
        assert first.more and 0 < len(first.items) < 8     # the store did cut it
        got = await kv.range(prefix=b"rc/")
        assert [(x.key, x.value) for x in got] == big
        assert await kv.range(prefix=b"rc/", limit=6) == got[:6]


async def test_pages_join_into_one_view_under_concurrent_writes(cluster):
    """Pages of one item each while another client rewrites the keys: the scan is
    the store exactly as of one revision (checked against every write's revision)."""
    async with open_client(cluster.cluster_arg, timeout=60) as kv, \
            open_client(cluster.cluster_arg, timeout=60) as writer:
        keys = [b"rv/%02d" % i for i in range(30)]
        history = {}   # key -> [(revision, value)]
        for key in keys:
            r = await kv.txn(success=[Op.put(key, b"0")])
            history[key] = [(r.revision, b"0")]
        done = trio.Event()

        async def write() -> None:
            n = 0
            while not done.is_set():
                n += 1
                key = keys[n * 7 % len(keys)]
                value = b"%d" % n
                r = await writer.txn(success=[Op.put(key, value)])
                history[key].append((r.revision, value))
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            items, at = await kv._scan(None, None, b"rv/", None, None, 60,
                                       reply_bytes_max=1)
            done.set()
        assert [x.key for x in items] == keys
        for item in items:
            revision, value = max(h for h in history[item.key] if h[0] <= at)
            assert (item.value, item.revision) == (value, revision), item


async def test_compacted_revision_raises(cluster):
    async with open_client(cluster.cluster_arg, timeout=60) as kv:
        early = await kv.txn(success=[Op.put(b"cp/k", b"early")])
        assert await kv.range(prefix=b"cp/", revision=early.revision)
        # The window keeps 4 MiB of changes: 48 changes of 100 kB push it past.
        await kv.put_many([(b"cp/big%02d" % i, b"x" * 100_000) for i in range(48)])
        with pytest.raises(CompactedError) as caught:
            await kv.range(prefix=b"cp/", revision=early.revision)
        error = caught.value
        assert error.revision == early.revision
        assert error.compact_revision > early.revision
        assert isinstance(error, cypaxos.RequestError) and not error.maybe_applied
        # The oldest retained revision still reads.
        assert await kv.range(b"cp/k", b"cp/k\x00", revision=error.compact_revision) == [
            KeyValue(b"cp/k", b"early", early.revision)]


async def test_txn_branches_results_and_revision(cluster):
    async with open_client(cluster.cluster_arg, timeout=30) as kv:
        made = await kv.txn([Compare.absent(b"tx/k")],
                            [Op.put(b"tx/k", b"v1"), Op.get(b"tx/k")],
                            [Op.get(b"tx/k")])
        assert type(made) is TxnResult
        assert made.succeeded
        assert made.results == [None, KeyValue(b"tx/k", b"v1", made.revision)]
        assert await kv.get(b"tx/k", with_revision=True) == (b"v1", made.revision)

        # The compare fails: the failure branch runs and nothing else changes.
        again = await kv.txn([Compare.absent(b"tx/k")], [Op.put(b"tx/k", b"v2")],
                             [Op.get(b"tx/k"), Op.get(b"tx/none")])
        assert not again.succeeded
        assert again.results == [KeyValue(b"tx/k", b"v1", made.revision), None]
        assert again.revision == made.revision      # nothing changed: no new revision

        rev = made.revision
        cases = [
            (Compare.value(b"tx/k", "==", b"v1"), True),
            (Compare.value(b"tx/k", "!=", b"v1"), False),
            (Compare.value(b"tx/k", "<", b"v2"), True),
            (Compare.value(b"tx/k", ">", b"v2"), False),
            (Compare.value(b"tx/none", "==", b""), False),   # absent: value compares fail
            (Compare.revision(b"tx/k", "==", rev), True),
            (Compare.revision(b"tx/k", "<", rev), False),
            (Compare.revision(b"tx/k", ">", rev - 1), True),
            (Compare.revision(b"tx/none", "==", 0), True),
            (Compare.absent(b"tx/none"), True),
        ]
        for compare, holds in cases:
            result = await kv.txn([compare], [Op.get(b"tx/k")])
            assert result.succeeded is holds, compare
        assert await kv.get(b"tx/k", with_revision=True) == (b"v1", rev)

        # All compares must hold; a failing one changes nothing of the success branch.
        result = await kv.txn([Compare.value(b"tx/k", "==", b"v1"), Compare.absent(b"tx/k")],
                              [Op.put(b"tx/a", b"x"), Op.delete(b"tx/k")],
                              [Op.put(b"tx/b", b"y")])
        assert not result.succeeded and result.results == [None]
        assert await kv.get(b"tx/a") is None and await kv.get(b"tx/k") == b"v1"
        assert await kv.get(b"tx/b", with_revision=True) == (b"y", result.revision)

        # One revision for every change of a transaction; delete says if it existed.
        both = await kv.txn(success=[Op.delete(b"tx/k"), Op.delete(b"tx/k"),
                                     Op.put(b"tx/c", b"z")])
        assert both.succeeded and both.results == [True, False, None]
        assert await kv.range(b"tx/c", b"tx/d") == [KeyValue(b"tx/c", b"z", both.revision)]
        assert (await kv.txn()).succeeded       # nothing to compare holds


async def test_txn_with_a_missing_lease_is_refused_whole(cluster):
    async with open_client(cluster.cluster_arg, timeout=30) as kv:
        with pytest.raises(RequestError, match="lease 987654321 does not exist") as caught:
            await kv.txn(success=[Op.put(b"tl/a", b"1"),
                                  Op.put(b"tl/b", b"1", lease=987654321)])
        assert not caught.value.maybe_applied
        assert await kv.range(prefix=b"tl/") == []


async def test_concurrent_txns_against_a_model(cluster):
    """Clients move units between accounts with compare-on-revision transactions;
    every success is applied once and atomically: the model built from the
    successes (in revision order) is the store, and the total never changes."""
    accounts = [b"tm/%d" % i for i in range(4)]
    async with open_client(cluster.cluster_arg, timeout=60) as setup:
        await setup.txn(success=[Op.put(a, b"100") for a in accounts])
    applied = []   # (revision, src, dst, amount)

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        async with open_client(cluster.cluster_arg, timeout=60) as kv:
            for _ in range(15):
                src, dst = rng.sample(accounts, 2)
                read = await kv.txn(success=[Op.get(src), Op.get(dst)])
                a, b = read.results
                amount = rng.randint(0, 20)
                result = await kv.txn(
                    [Compare.revision(src, "==", a.revision),
                     Compare.revision(dst, "==", b.revision)],
                    [Op.put(src, b"%d" % (int(a.value) - amount)),
                     Op.put(dst, b"%d" % (int(b.value) + amount))],
                    [Op.get(src)])
                if result.succeeded:
                    applied.append((result.revision, src, dst, amount))
                else:
                    assert result.results[0].revision != a.revision or \
                        (await kv.get(dst, with_revision=True))[1] != b.revision

    async with trio.open_nursery() as nursery:
        for seed in range(3):
            nursery.start_soon(client, seed)
    assert applied
    assert len({rev for rev, *_ in applied}) == len(applied)   # one revision each
    model = {a: 100 for a in accounts}
    for _, src, dst, amount in sorted(applied):
        model[src] -= amount
        model[dst] += amount
    async with open_client(cluster.cluster_arg, timeout=60) as kv:
        store = {x.key: int(x.value) for x in await kv.range(prefix=b"tm/")}
    assert store == model and sum(store.values()) == 400


def test_blocking_client(cluster):
    with cypaxos.connect(cluster.cluster_arg, timeout=30) as kv:
        result = kv.txn([Compare.absent("bl/k")], [Op.put("bl/k", "v")])
        assert result.succeeded
        assert kv.get("bl/k", with_revision=True) == (b"v", result.revision)
        assert kv.range(prefix="bl/") == [KeyValue(b"bl/k", b"v", result.revision)]
        assert kv.range("bl/", "bl/k") == []
        # Generators are fine as arguments.
        assert kv.txn((c for c in [Compare.value("bl/k", "==", "v")]),
                      (o for o in [Op.get("bl/k")])).results[0].value == b"v"


def test_arguments_are_checked_at_once(cluster):
    with cypaxos.connect(cluster.cluster_arg, timeout=30) as kv:
        with pytest.raises(ValueError, match="prefix or a start"):
            kv.range("a", prefix="p")
        with pytest.raises(ValueError, match="limit"):
            kv.range(limit=0)
        with pytest.raises(TypeError, match="limit"):
            kv.range(limit=1.5)   # type: ignore[arg-type]
        with pytest.raises(ValueError, match="revision"):
            kv.range(revision=0)
        with pytest.raises(TypeError, match="start"):
            kv.range(5)           # type: ignore[arg-type]
        with pytest.raises(TypeError, match="Compare"):
            kv.txn([Op.get("k")])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="list of Op"):
            kv.txn(success=Op.get("k"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="operator"):
        Compare.value("k", "=", "v")
    with pytest.raises(ValueError, match="revision"):
        Compare.revision("k", "==", -1)
    with pytest.raises(TypeError, match="revision"):
        Compare.revision("k", "==", True)
    with pytest.raises(ValueError, match="lease"):
        Op.put("k", "v", lease=0)
    with pytest.raises(TypeError, match="value"):
        Op.put("k", 5)            # type: ignore[arg-type]
    assert repr(Op.put(b"k", b"v")) == "Op.put(b'k', b'v')"
    assert repr(Compare.revision(b"k", "<", 3)) == "Compare.revision(b'k', '<', 3)"
    assert Op.get("k") == Op.get(b"k") and Compare.absent("k") == Compare.absent(b"k")
    assert len({Op.get("k"), Op.get(b"k"), Op.delete("k")}) == 2
    with pytest.raises(AttributeError):
        Op.get("k")._spec = ("delete", b"k")


# ------------------------------------------------------------- the command line

def cli(cluster, *args, stdin: bytes | None = None):
    from test_cli import run_cli
    return run_cli(args[0], "--cluster", cluster.cluster_arg, "--timeout", "30", *args[1:],
                   input=stdin)


def test_cli_range(cluster):
    with cypaxos.connect(cluster.cluster_arg, timeout=30) as kv:
        kv.put_many([(b"cr/a", b"1"), (b"cr/b", b"two words"), (b"cr/c", b"\xff\tx\n"),
                     (b"cr/d", b"4")])
        expected = kv.range(prefix=b"cr/")
    result = cli(cluster, "range", "--prefix", "cr/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == "cr/a\t1\ncr/b\ttwo words\ncr/c\t\\xff\\tx\\n\ncr/d\t4\n"
    result = cli(cluster, "range", "cr/b", "cr/d", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["kvs"] == [
        {"key": "cr/b", "value": "two words", "revision": expected[1].revision},
        {"key": "cr/c", "value": {"hex": "ff09780a"}, "revision": expected[2].revision}]
    assert doc["revision"] >= expected[-1].revision
    result = cli(cluster, "range", "cr/", "--limit", "1")
    assert result.stdout == b"cr/a\t1\n", result.stderr
    # As of a past revision: before cr/d was written (put_many applies in order).
    result = cli(cluster, "range", "--prefix", "cr/", "--revision",
                 str(expected[3].revision - 1), "--json")
    assert [x["key"] for x in json.loads(result.stdout)["kvs"]] == ["cr/a", "cr/b", "cr/c"]
    result = cli(cluster, "range", "--prefix", "cr/nothing")
    assert (result.returncode, result.stdout) == (0, b"")


def test_cli_range_errors(cluster):
    from test_cli import assert_one_error_line
    assert_one_error_line(cli(cluster, "range", "--prefix", "p", "a"), 2, contains="not both")
    assert_one_error_line(cli(cluster, "range", "--limit", "0"), 2, contains="positive")
    assert_one_error_line(cli(cluster, "range", "--revision", str(2**62)), 4,
                          contains="in the future")


def test_cli_against_a_cluster_that_is_down(tmp_path):
    from test_cli import assert_one_error_line, run_cli
    from cypaxos.tools.local import free_ports
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    assert_one_error_line(run_cli("range", "--cluster", dead, "--timeout", "10"), 3,
                          contains="connection refused")
    path = tmp_path / "t.json"
    path.write_text('{"success": [{"put": "k", "value": "v"}]}')
    assert_one_error_line(run_cli("txn", "--cluster", dead, "--timeout", "10", str(path)),
                          3, contains="connection refused")


def test_cli_txn(cluster, tmp_path):
    txn = tmp_path / "txn.json"
    txn.write_text(json.dumps({
        "compare": [{"key": "ct/k", "absent": True}],
        "success": [{"put": "ct/k", "value": {"hex": "00ff"}}, {"get": "ct/k"},
                    {"delete": "ct/none"}],
        "failure": [{"get": "ct/k"}],
    }))
    result = cli(cluster, "txn", str(txn), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    rev = doc["revision"]
    assert doc == {"succeeded": True, "revision": rev, "results": [
        None, {"key": "ct/k", "value": {"hex": "00ff"}, "revision": rev}, False]}
    # The same again: the compare fails, the failure branch runs, exit 1.
    result = cli(cluster, "txn", str(txn))
    assert result.returncode == 1, result.stderr
    assert result.stdout.decode() == f"failed at revision {rev}\nget\tct/k\t\\x00\\xff\t{rev}\n"
    # From stdin, compares on value and revision.
    spec = {"compare": [{"key": "ct/k", "value": {"hex": "00ff"}, "op": "=="},
                        {"key": "ct/k", "revision": rev, "op": "=="}],
            "success": [{"put": "ct/k", "value": "next"}, {"delete": "ct/k"}]}
    result = cli(cluster, "txn", "-", stdin=json.dumps(spec).encode())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("succeeded at revision ") and lines[1:] == [
        "put\tct/k", "delete\tct/k\tdeleted"]
    with cypaxos.connect(cluster.cluster_arg, timeout=30) as kv:
        assert kv.get(b"ct/k", with_revision=True) == (None, 0)


@pytest.mark.parametrize("doc, code, message", [
    ("{", 2, "is not JSON"),
    ('{"compares": []}', 2, "unknown field compares"),
    ('{"compare": [{"key": "k", "value": "v"}]}', 2, "lacks op"),
    ('{"compare": [{"key": "k", "value": "v", "op": "="}]}', 2, "operator"),
    ('{"compare": [{"key": "k", "absent": false}]}', 2, "absent must be true"),
    ('{"success": [{"put": "k"}]}', 2, "lacks value"),
    ('{"success": [{"put": "k", "value": {"hex": "zz"}}]}', 2, "not hex"),
    ('{"success": [{"frob": "k"}]}', 2, "must be"),
    ('{"success": [{"put": "ct2/k", "value": "v", "lease": 987654}]}', 4,
     "lease 987654 does not exist"),
])
def test_cli_txn_errors(cluster, tmp_path, doc, code, message):
    from test_cli import assert_one_error_line
    path = tmp_path / "t.json"
    path.write_text(doc)
    assert_one_error_line(cli(cluster, "txn", str(path)), code, contains=message)


def test_cli_txn_missing_file(cluster, tmp_path):
    from test_cli import assert_one_error_line
    assert_one_error_line(cli(cluster, "txn", str(tmp_path / "nope.json")), 2,
                          contains="cannot read txn file")


def test_the_clients_range_decoder_agrees_with_the_reference():
    """`decode_range_page` (the scan's fast decoder) against `commands.decode_range`
    on a store's real replies, every truncation of one, and trailing bytes."""
    from cypaxos import commands
    from cypaxos.client.store import decode_range_page
    from cypaxos.statemachine import KVStore

    store = KVStore()
    store.apply_many([commands.encode_put(b"k%03d" % i, bytes([i]) * (i % 7))
                      for i in range(200)])
    replies = [store.query(commands.encode_range(b"k", limit=n)) for n in (0, 1, 3)]
    replies.append(store.query(commands.encode_range(b"k", reply_bytes_max=300)))
    replies.append(store.query(commands.encode_range(b"k", revision=10**6)))  # future
    for reply in replies:
        ref = commands.decode_range(reply)
        assert decode_range_page(reply) == (ref.status, ref.revision, ref.compact_revision,
                                            ref.more, ref.items)
    short = replies[2]
    for cut in range(len(short)):
        with pytest.raises(ValueError):
            decode_range_page(short[:cut])
    with pytest.raises(ValueError, match="trailing"):
        decode_range_page(short + b"\x00")
    with pytest.raises(ValueError, match="count"):
        decode_range_page(short[:18] + (10**6).to_bytes(4, "little") + short[22:])
