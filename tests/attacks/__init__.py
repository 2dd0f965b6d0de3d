"""Attacks on a live cluster's trust boundary (DESIGN.md section 8, docs/security.md).

Each test module attacks a real 3-replica cluster (one process per replica, loopback)
in each of its modes: mutual TLS, cluster secret (clients with a token) and the local
default (`cypaxos local`: a generated cluster secret, anonymous clients).  The
attacker is an unauthenticated process on loopback that speaks `cypaxos.wire`; what
it may never do is in `tooling` (the clusters, a blocking client that authenticates
like an honest one, raw connections, memory readings).  Run them with
``python -m pytest tests/attacks``.
"""
