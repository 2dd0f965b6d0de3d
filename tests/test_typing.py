"""The public API type-checks under `mypy --strict` (the configuration in
pyproject.toml's [tool.mypy]: the package's exports, the clients, the errors and the
testing entry points), and a user's code written against it does too."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parent.parent

USER_CODE = '''
import cypaxos

def script(addresses: str) -> bytes | None:
    with cypaxos.connect(addresses, timeout=5.0) as kv:
        kv.put(b"k", b"v")
        kv.cas(b"k", b"v", b"w")
        info: cypaxos.BackupInfo = kv.backup("/tmp/x.cpxbak")
        print(info.index + info.size_bytes)
        value, revision = kv.get(b"k", with_revision=True)
        items: list[cypaxos.KeyValue] = kv.range(prefix=b"k", limit=10, revision=revision)
        result: cypaxos.TxnResult = kv.txn(
            [cypaxos.Compare.revision(b"k", "==", revision), cypaxos.Compare.absent(b"j")],
            [cypaxos.Op.put(b"k", b"w"), cypaxos.Op.get(b"k")], [cypaxos.Op.delete(b"j")])
        print(items[0].revision + result.revision, result.succeeded, value)
        return kv.get(b"k")

async def trio_code(addresses: list[str]) -> bool:
    tls = cypaxos.TLS(ca="ca.pem", cert="client.pem", key="client.key")
    async with cypaxos.open_client(addresses, tls=tls, token="a" * 8 + "0123456789abcdef" * 2) as kv:
        await kv.put(b"k", b"v")
        first: list[cypaxos.KeyValue] = await kv.range(b"a", b"b")
        done = await kv.txn(success=[cypaxos.Op.put(b"k", b"v", lease=None)])
        print(first, done.revision)
        return await kv.delete(b"k")

async def asyncio_code(addresses: str) -> list[bytes | None]:
    async with cypaxos.open_client(addresses, timeout=5.0) as kv:   # under asyncio.run
        await kv.put_many([(b"a", b"1")])
        return await kv.get_many([b"a", b"b"])

try:
    script("127.0.0.1:7001")
except cypaxos.TimeoutError as exc:
    flag: bool = exc.maybe_applied
except cypaxos.CompactedError as exc:
    oldest: int = exc.compact_revision
'''


def mypy(*args: str) -> subprocess.CompletedProcess:
    pytest.importorskip("mypy")
    return subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", *args],
                          cwd=ROOT, capture_output=True, text=True)


def test_the_public_api_passes_mypy_strict():
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not a source checkout")
    result = mypy()
    assert result.returncode == 0, result.stdout + result.stderr


def test_user_code_against_the_api_type_checks(tmp_path):
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not a source checkout")
    user = tmp_path / "user.py"
    user.write_text(USER_CODE)
    result = mypy("--config-file", str(ROOT / "pyproject.toml"), str(user))
    assert result.returncode == 0, result.stdout + result.stderr
    # ... and a wrong use is caught: the types say something.
    user.write_text(USER_CODE + "\nwith cypaxos.connect('x') as kv:\n    kv.put(1, b'v')\n")
    result = mypy("--config-file", str(ROOT / "pyproject.toml"), str(user))
    assert result.returncode == 1 and "put" in result.stdout, result.stdout
