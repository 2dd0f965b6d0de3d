"""A replicated bank ledger: an example cypaxos custom state machine.

Run three replicas of it (the directory of this file must be importable, e.g. on
PYTHONPATH)::

    export PYTHONPATH=docs/examples
    cypaxos serve --id 1 --cluster 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 \\
        --data-dir /tmp/ledger1 --state-machine ledger:Ledger
    # ... and the same with --id 2 / --id 3 and their own --data-dir

and drive it from Python::

    import cypaxos
    import ledger

    with cypaxos.connect("127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003") as kv:
        kv.submit(ledger.open_account("alice"))
        kv.submit(ledger.deposit("alice", 100))
        kv.submit(ledger.open_account("bob"))
        kv.submit(ledger.transfer("alice", "bob", 30))       # -> b'{"alice":70,"bob":30}'
        ledger.decode(kv.query(ledger.balance("bob")))        # -> 30 (linearizable)
        kv.submit(ledger.transfer("alice", "bob", 1000))
        # raises cypaxos.errors.CommandError("InsufficientFunds: alice has 70, needs 1000")
        # on every replica alike; no balance changed.

Commands and queries are small JSON documents (UTF-8 bytes) built by the helper
functions at the bottom of this module; results are JSON too (`decode()` reads them).

The rules every cypaxos state machine must follow, and how this one follows them:

* Deterministic: the state after a sequence of commands depends only on those
  commands.  No clocks, randomness, environment, floats or set/dict iteration of
  unordered data leaks into the state or into a result: amounts are integers,
  snapshots and results are serialized with sorted keys.
* A command that cannot be carried out raises *before* changing anything: every
  check comes first, the mutation last.  cypaxos turns the exception into the
  command's result (status 1, "ExceptionType: message") on every replica alike, and
  the client's `submit()` raises `cypaxos.errors.CommandError` with that text.
* `snapshot()` returns the whole state as bytes; `restore(data)` replaces the whole
  state with it.  `query()` must not change the state.
* `state_digest()` (optional) is a short hash equal on replicas in equal states;
  `cypaxos status` shows it.

This file imports nothing from cypaxos, so the state machine can be unit-tested on
its own.
"""
from __future__ import annotations

import hashlib
import json

__all__ = [
    "Ledger", "LedgerError", "InsufficientFunds", "UnknownAccount", "AccountExists",
    "BadCommand", "open_account", "deposit", "withdraw", "transfer", "balance",
    "balances", "total", "decode", "workload",
]

MAX_AMOUNT = 10**15  # per command; keeps every balance an exact integer
SNAPSHOT_FORMAT = 1


class LedgerError(Exception):
    """Base of the ledger's refusals (they become CommandError at the client)."""


class InsufficientFunds(LedgerError):
    """A withdrawal or transfer larger than the account's balance."""


class UnknownAccount(LedgerError):
    """A command names an account that was never opened."""


class AccountExists(LedgerError):
    """`open` of an account that is already open."""


class BadCommand(LedgerError):
    """Bytes that are not a well-formed ledger command."""


def _dumps(obj) -> bytes:
    """Canonical JSON: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class Ledger:
    """Accounts with integer balances; see the module docstring for the commands."""

    def __init__(self) -> None:
        self.accounts: dict[str, int] = {}
        self.transactions = 0  # commands that changed something (failed ones don't count)

    # -- the four methods cypaxos calls --------------------------------------

    def apply(self, command: bytes) -> bytes:
        """Apply one command; return its result, or raise to refuse it (no change)."""
        op, args = self._parse(command)
        handler = self._COMMANDS.get(op)
        if handler is None:
            raise BadCommand(f"unknown command {op!r}")
        return handler(self, *args)

    def query(self, query: bytes) -> bytes:
        """Answer a read-only query; never changes the state."""
        op, args = self._parse(query)
        if op == "balance" and len(args) == 1:
            name = self._name(args[0])
            if name not in self.accounts:
                raise UnknownAccount(f"no account {name!r}")
            return _dumps(self.accounts[name])
        if op == "balances" and not args:
            return _dumps(self.accounts)
        if op == "total" and not args:
            return _dumps({"accounts": len(self.accounts), "total": sum(self.accounts.values()),
                           "transactions": self.transactions})
        if op == "digest" and not args:
            return _dumps(self.state_digest())
        raise BadCommand(f"unknown query {op!r}")

    def snapshot(self) -> bytes:
        """The whole state as canonical bytes (sorted, so equal states give equal bytes)."""
        return _dumps({"format": SNAPSHOT_FORMAT, "accounts": self.accounts,
                       "transactions": self.transactions})

    def restore(self, data: bytes) -> None:
        """Replace the whole state with one produced by `snapshot()`."""
        doc = json.loads(data)
        if doc.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"ledger snapshot format {doc.get('format')!r} is not "
                             f"{SNAPSHOT_FORMAT}")
        accounts = doc["accounts"]
        if not all(isinstance(k, str) and type(v) is int and v >= 0
                   for k, v in accounts.items()):
            raise ValueError("ledger snapshot holds a bad account")
        self.accounts = dict(sorted(accounts.items()))
        self.transactions = int(doc["transactions"])

    def state_digest(self) -> str:
        """A short hash of the state, equal on replicas in equal states."""
        return hashlib.blake2b(self.snapshot(), digest_size=8).hexdigest()

    # -- commands -------------------------------------------------------------
    # Each one checks everything first and mutates last, so a refusal changes nothing.

    def _open(self, name) -> bytes:
        name = self._name(name)
        if name in self.accounts:
            raise AccountExists(f"account {name!r} already exists")
        self.accounts[name] = 0
        self.transactions += 1
        return _dumps({name: 0})

    def _deposit(self, name, amount) -> bytes:
        name, amount = self._existing(name), self._amount(amount)
        self.accounts[name] += amount
        self.transactions += 1
        return _dumps({name: self.accounts[name]})

    def _withdraw(self, name, amount) -> bytes:
        name, amount = self._existing(name), self._amount(amount)
        if self.accounts[name] < amount:
            raise InsufficientFunds(f"{name} has {self.accounts[name]}, needs {amount}")
        self.accounts[name] -= amount
        self.transactions += 1
        return _dumps({name: self.accounts[name]})

    def _transfer(self, source, target, amount) -> bytes:
        source, target = self._existing(source), self._existing(target)
        amount = self._amount(amount)
        if source == target:
            raise BadCommand("a transfer needs two different accounts")
        if self.accounts[source] < amount:
            raise InsufficientFunds(f"{source} has {self.accounts[source]}, needs {amount}")
        self.accounts[source] -= amount
        self.accounts[target] += amount
        self.transactions += 1
        return _dumps({source: self.accounts[source], target: self.accounts[target]})

    _COMMANDS = {"open": _open, "deposit": _deposit, "withdraw": _withdraw,
                 "transfer": _transfer}

    # -- validation -----------------------------------------------------------

    @staticmethod
    def _parse(data: bytes):
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise BadCommand("not a JSON ledger command") from None
        if not (isinstance(doc, list) and doc and isinstance(doc[0], str)):
            raise BadCommand("a ledger command is a JSON list [op, args...]")
        return doc[0], doc[1:]

    @staticmethod
    def _name(name) -> str:
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            raise BadCommand(f"bad account name {name!r}")
        return name

    def _existing(self, name) -> str:
        name = self._name(name)
        if name not in self.accounts:
            raise UnknownAccount(f"no account {name!r}")
        return name

    @staticmethod
    def _amount(amount) -> int:
        # bool is an int subclass; floats would make balances inexact.
        if type(amount) is not int or not 0 < amount <= MAX_AMOUNT:
            raise BadCommand(f"bad amount {amount!r} (an integer in 1..{MAX_AMOUNT})")
        return amount


# -- building commands and queries (client side) --------------------------------

def open_account(name: str) -> bytes:
    """Command: open an account with balance 0 (AccountExists if it is open)."""
    return _dumps(["open", name])


def deposit(name: str, amount: int) -> bytes:
    """Command: add `amount` to the account; result `{name: new_balance}`."""
    return _dumps(["deposit", name, amount])


def withdraw(name: str, amount: int) -> bytes:
    """Command: take `amount` out (InsufficientFunds if the balance is smaller)."""
    return _dumps(["withdraw", name, amount])


def transfer(source: str, target: str, amount: int) -> bytes:
    """Command: move `amount` between accounts, atomically; result both new balances."""
    return _dumps(["transfer", source, target, amount])


def balance(name: str) -> bytes:
    """Query: one account's balance (an int)."""
    return _dumps(["balance", name])


def balances() -> bytes:
    """Query: every account's balance, `{name: balance}`."""
    return _dumps(["balances"])


def total() -> bytes:
    """Query: `{"accounts": n, "total": sum of balances, "transactions": n}`."""
    return _dumps(["total"])


def decode(result: bytes):
    """A command's or query's result bytes -> the Python value."""
    return json.loads(result)


def workload(rng) -> bytes:
    """A random ledger command (for `cypaxos.testing.simulate`): opens, deposits,
    withdrawals and transfers among a few accounts, some of them refused."""
    names = ["alice", "bob", "carol", "dave"]
    kind = rng.random()
    if kind < 0.15:
        return open_account(rng.choice(names))
    if kind < 0.45:
        return deposit(rng.choice(names), rng.randint(1, 100))
    if kind < 0.65:
        return withdraw(rng.choice(names), rng.randint(1, 100))
    return transfer(rng.choice(names), rng.choice(names), rng.randint(1, 100))
