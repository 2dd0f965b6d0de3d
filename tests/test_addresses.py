"""cypaxos.addresses (the one address parser), cypaxos.groups and format_ballot."""
import pytest

from cypaxos.addresses import (
    format_address, normalize_address, parse_addresses, parse_cluster, split_address,
)
from cypaxos.ballots import CHOSEN_BALLOT, REPLICA_ID_MAX, format_ballot, make_ballot
from cypaxos.errors import ConfigError, Error
from cypaxos.groups import BaseExceptionGroup, expected_error, first_leaf, leaves


pytestmark = pytest.mark.fast


def test_split_address_rules():
    assert split_address("127.0.0.1:7001") == ("127.0.0.1", 7001)
    assert split_address(" host:1 ") == ("host", 1)
    assert split_address("[::1]:7001") == ("::1", 7001)
    assert split_address("[fe80::1%eth0]:65535") == ("fe80::1%eth0", 65535)
    for bad, why in [("localhost", "is not HOST:PORT"), (":7001", "is not HOST:PORT"),
                     ("[]:7001", "is not HOST:PORT"), ("h:", "port must be"),
                     ("h:0", "port must be"), ("h:65536", "port must be"),
                     ("h:+1", "port must be"), ("h:x", "port must be"),
                     ("h:\u0661", "port must be"),   # a non-ASCII digit
                     ("::1:7001", "IPv6"), ("[::1:7001", "IPv6")]:
        with pytest.raises(ConfigError, match=why.replace("+", r"\+")):
            split_address(bad)


def test_messages_name_the_entry_and_its_source():
    with pytest.raises(ConfigError) as info:
        split_address("localhost", source="--cluster")
    assert str(info.value) == "--cluster entry 'localhost' is not HOST:PORT"
    with pytest.raises(ConfigError) as info:
        split_address("localhost")
    assert str(info.value) == "address 'localhost' is not HOST:PORT"


def test_canonical_text():
    assert format_address("::1", 7001) == "[::1]:7001"
    assert format_address("h", 7001) == "h:7001"
    assert normalize_address("h:07001") == "h:7001"
    assert normalize_address("[::1]:7001") == "[::1]:7001"


def test_parse_addresses():
    assert parse_addresses("a:1, b:2,,a:1,") == ["a:1", "b:2"]
    assert parse_addresses(["127.0.0.1:7001", ("h", 7002), ("::1", 7003)]) == [
        "127.0.0.1:7001", "h:7002", "[::1]:7003"]
    # The serve --cluster form is taken too, ids ignored.
    assert parse_addresses("1=a:1,2=b:2") == ["a:1", "b:2"]
    assert parse_addresses("a:01,a:1") == ["a:1"]
    with pytest.raises(ConfigError, match="^no replica address given$"):
        parse_addresses(" , ")
    with pytest.raises(ConfigError, match="^--cluster is empty"):
        parse_addresses("", source="--cluster")
    for bad in [["h:1", 5], 42, "1=nohost"]:
        with pytest.raises(ConfigError):
            parse_addresses(bad)


def test_parse_cluster():
    assert parse_cluster("1=a:1, 2=[::1]:2") == {1: "a:1", 2: "[::1]:2"}
    for spec, why in [("", "is empty"), ("a:1", "is not ID=HOST:PORT"),
                      ("x=a:1", "is not a replica id"), ("0=a:1", "replica ids are 1..65535"),
                      (f"{REPLICA_ID_MAX + 1}=a:1", "replica ids"), ("1=a", "is not HOST:PORT"),
                      ("1=a:1,1=b:2", "names replica 1 twice"),
                      ("1=a:1,2=a:01", "the same address")]:
        with pytest.raises(ConfigError, match=why):
            parse_cluster(spec)


def test_format_ballot():
    assert format_ballot(make_ballot(3, 2)) == "3.2"
    assert format_ballot(0) == "0"
    assert format_ballot(CHOSEN_BALLOT) == "chosen"
    assert format_ballot(None) == format_ballot(-1) == format_ballot(True) == "-"


def test_groups_flatten_and_pick_the_expected_error():
    inner = BaseExceptionGroup("inner", [KeyError("b")])
    group = BaseExceptionGroup("outer", [ConfigError("a"), inner])
    assert [str(e) for e in leaves(group)] == ["a", "'b'"]
    assert leaves(group)[1].args == ("b",)
    assert isinstance(first_leaf(group, KeyError), KeyError)
    assert first_leaf(group, OSError) is None
    assert expected_error(group, (Error, KeyError)) is leaves(group)[0]
    assert expected_error(group, Error) is group      # something unexpected inside
    plain = ValueError("x")
    assert expected_error(plain, Error) is plain and leaves(plain) == [plain]
