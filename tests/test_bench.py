"""`cypaxos bench` (cypaxos.tools.bench): a short real run against its own local cluster.

No timing assertions: the machine running the tests may be slow and shared.  The run
checks the JSON shape that DESIGN.md section 4 fixes and that operations completed.
"""
import argparse
import json
import random

import pytest

from cypaxos.tools import bench


def parse(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_histogram_percentiles_within_bucket_precision():
    rng = random.Random(5)
    values = [int(rng.lognormvariate(13, 1)) for _ in range(20_000)]  # ~0.4 ms median
    h = bench.Histogram()
    for v in values:
        h.record(v)
    values.sort()
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = values[max(0, int(q * len(values) + 0.999999) - 1)]
        assert abs(h.percentile_ns(q) - exact) <= exact / 100 + 1
    assert h.max_ns == values[-1] and h.min_ns == values[0]
    again = bench.Histogram.from_json(json.loads(json.dumps(h.to_json())))
    again.merge(h)
    assert again.total == 2 * len(values)
    assert again.percentile_ns(0.5) == h.percentile_ns(0.5)
    assert bench.Histogram().summary_ms()["p50"] is None


def test_histogram_buckets_are_contiguous():
    high_before = 0
    for index in range(40 << 7):
        low, high = bench.Histogram.bucket_bounds(index)
        assert low == high_before
        assert bench.Histogram.index(low) == index == bench.Histogram.index(high - 1)
        assert high - low <= max(1, low / 128)
        high_before = high


def test_bad_settings_exit_2(capsys):
    assert bench.run(parse(["--clients", "1", "--processes", "2", "--json"])) == 2
    assert "--processes" in capsys.readouterr().err


def test_unreachable_cluster_exits_3(capsys):
    from cypaxos.tools.local import free_ports

    port = free_ports(1)[0]
    code = bench.run(parse(["--cluster", f"127.0.0.1:{port}", "--timeout", "1",
                            "--duration", "1", "--json"]))
    assert code == 3
    err = capsys.readouterr().err
    assert err.startswith("cypaxos: error:") and "Traceback" not in err


@pytest.mark.slow
def test_short_run_against_a_local_cluster(capsys):
    code = bench.run(parse(["--duration", "2", "--warmup", "0.5", "--keys", "200",
                            "--read-ratio", "0.5", "--clients", "2", "--processes", "2",
                            "--outstanding", "16", "--json"]))
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out        # ONE JSON object, nothing else on stdout
    result = json.loads(lines[0])
    for key in ("writes_per_s", "reads_per_s", "write_latency_ms", "read_latency_ms"):
        assert key in result
    for key in ("write_latency_ms", "read_latency_ms"):
        lat = result[key]
        for p in ("p50", "p90", "p99", "p999", "max"):
            assert isinstance(lat[p], float) and lat[p] > 0
        assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    assert result["writes"] > 0 and result["reads"] > 0
    assert result["writes_per_s"] > 0 and result["reads_per_s"] > 0
    s = result["settings"]
    assert s["local_cluster"] is True and s["fsync"] == "always" and s["replicas"] == 3
    assert (s["clients"], s["processes"], s["outstanding"]) == (2, 2, 16)
    assert (s["duration"], s["warmup"], s["keys"], s["read_ratio"]) == (2.0, 0.5, 200, 0.5)
    assert s["value_size"] == 64 and s["mode"] == "closed"


@pytest.mark.slow
def test_open_loop_run(capsys):
    code = bench.run(parse(["--duration", "1.5", "--warmup", "0.5", "--rate", "300",
                            "--clients", "1", "--json"]))
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["settings"]["mode"] == "open" and result["settings"]["rate"] == 300
    assert result["settings"]["processes"] == 1
    assert result["writes"] > 0 and result["reads"] == 0
    assert result["read_latency_ms"]["p50"] is None
