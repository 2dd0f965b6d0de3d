"""argparse value types shared by the command line and the bench tool.

Each type may say which TOML types a config file may give for it (`config_types`,
read by `cypaxos.tools.config`): the value's text then goes through the same check
as the command line's.
"""
from __future__ import annotations

import argparse
import math
from typing import Sequence

from ..errors import ConfigError

__all__ = ["positive_float", "non_negative_float", "int_in", "name_in", "check_port_range",
           "PORT_MAX"]

PORT_MAX = 65535


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_float(text: str) -> float:
    """A finite number > 0 (NaN and infinity refused)."""
    value = _number(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (NaN and infinity refused)."""
    value = _number(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


positive_float.config_types = non_negative_float.config_types = (int, float)


def int_in(low: int, high: int):
    """A type that accepts integers in low..high."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
        return value
    parse.__name__ = "integer"  # what argparse names the type in its messages
    parse.config_types = (int,)
    return parse


def name_in(names: Sequence[str]):
    """A type that accepts one of `names` in any case and returns it in lower case."""
    def parse(text: str) -> str:
        name = text.strip().lower()
        if name not in names:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not one of {', '.join(names)}")
        return name
    parse.__name__ = "name"
    parse.config_types = (str,)
    return parse


def check_port_range(port: int, count: int, flag: str = "--port") -> None:
    """ConfigError unless `count` consecutive ports from `port` are all valid ports."""
    last = port + count - 1
    if last > PORT_MAX:
        raise ConfigError(f"{flag} {port} leaves no room for {count} replicas: they take "
                          f"ports {port}..{last}, and ports end at {PORT_MAX}")
