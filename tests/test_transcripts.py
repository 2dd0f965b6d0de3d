"""Run every tests/testdata/*.txt protocol transcript (see tests/transcript.py).

Each script is a sequence of commands, each followed by `----` and the output it is
expected to print.  When behaviour changes on purpose, regenerate the expected
outputs and review the diff:

    CYPAXOS_REWRITE=1 pytest -q tests/test_transcripts.py

A new script may be written as bare commands (no `----` sections); the rewrite fills
them in.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from transcript import run_script

pytestmark = pytest.mark.fast

TESTDATA = Path(__file__).parent / "testdata"
SCRIPTS = sorted(TESTDATA.glob("*.txt"))
REWRITE = os.environ.get("CYPAXOS_REWRITE", "") not in ("", "0")

# Scripts that show a known core bug: {file name: reason}.  For these the test only
# checks that the run is clean (no SAFETY VIOLATION, no error), so it is a strict
# xfail: once the core is fixed it XPASSes, which fails the suite until the transcript
# is rewritten and the entry removed.
KNOWN_BUGS: dict[str, str] = {}

# Lines that make a transcript fail even if it matches: the driver's safety checker
# and exceptions raised by the core (MessageError, failed invariants).
FATAL_MARKERS = ("SAFETY VIOLATION", "  error: ", "script error: ")


def params():
    for path in SCRIPTS:
        marks = []
        if path.name in KNOWN_BUGS:
            marks.append(pytest.mark.xfail(reason=KNOWN_BUGS[path.name], strict=True))
        yield pytest.param(path, id=path.stem, marks=marks)


def test_scripts_exist():
    assert SCRIPTS, f"no transcripts under {TESTDATA}"


@pytest.mark.parametrize("path", list(params()))
def test_transcript(path: Path):
    text = path.read_text()
    rewritten, mismatches, outputs = run_script(text)
    if REWRITE and rewritten != text:
        path.write_text(rewritten)
    fatal = [line for output in outputs for line in output.splitlines()
             if any(marker in line for marker in FATAL_MARKERS)]
    if path.name in KNOWN_BUGS:
        assert not fatal, "\n".join(fatal)
        return
    assert not fatal, "\n".join(fatal)
    if REWRITE or not mismatches:
        return
    lineno, command, expected, actual = mismatches[0]
    diff = "\n".join(difflib.unified_diff(
        text.splitlines(), rewritten.splitlines(),
        fromfile=f"{path.name} (expected)", tofile=f"{path.name} (actual)", lineterm=""))
    pytest.fail(
        f"{path.name}:{lineno}: `{command}` printed something else "
        f"({len(mismatches)} command(s) differ; rerun with CYPAXOS_REWRITE=1 to accept).\n"
        f"--- expected\n{expected}\n--- actual\n{actual}\n\nfull diff:\n{diff}",
        pytrace=False)
