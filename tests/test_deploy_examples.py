"""The deployment examples in docs/examples/deploy say what cypaxos does: every metric
the Grafana dashboard and the alert rules use is one a replica exports, and every key
of the replicas' config files is an option of `serve`, with a value it accepts."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from cypaxos.tools import cli, config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "docs" / "examples" / "deploy"

pytestmark = pytest.mark.skipif(not DEPLOY.is_dir(), reason="not a source checkout")

def metric_names(text: str) -> set[str]:
    return set(re.findall(r"\b(cypaxos_[a-z_]+)\b", text))


def test_the_dashboard_and_the_alerts_use_only_exported_metrics(new_cluster):
    from test_metrics import metrics_cluster, scrape

    cluster = metrics_cluster(new_cluster, fsync=False)
    exported = {name for name, _ in scrape(cluster.metrics_address(cluster.leader_id()))}
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set().union(*(metric_names(e) for e in exprs))
    alerts = (DEPLOY / "alerts.yml").read_text()
    used |= metric_names(alerts)
    assert used and not (used - exported), sorted(used - exported)


@pytest.mark.fast
@pytest.mark.parametrize("replica", [1, 2, 3])
def test_the_replica_config_files_hold_serve_options(replica, tmp_path):
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    path = DEPLOY / f"replica-{replica}.toml"
    document = tomllib.loads(path.read_text())
    assert document["id"] == replica
    serve = cli.build_parser()._subparsers._group_actions[0].choices["serve"]
    keys = config.option_keys(serve)
    unknown = set(document) - set(keys)
    assert not unknown, unknown
    checked = tmp_path / "replica.toml"
    checked.write_text(path.read_text())
    values = config.load(str(checked), serve)
    assert values["metrics_address"].endswith(":9701")
