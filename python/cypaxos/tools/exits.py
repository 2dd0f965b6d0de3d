"""Exit statuses of the `cypaxos` command line and its one-line error output.

Shared by every subcommand (and `python -m cypaxos.tools.bench`):

* 0 - done;
* 1 - the command ran but the answer is "no" (get/delete: no such key; cas: the
  value was not the expected one; snapshot: not every replica took one) or it failed
  (serve: a data dir it cannot use, a port in use; local: a replica did not start;
  demo: a check failed; bench: the run failed);
* 2 - bad command line or configuration (argparse errors, a bad --cluster, a bad
  config file, other bad values);
* 3 - the cluster could not answer (unreachable, no leader, timed out, session lost);
* 4 - the cluster answered "refused": the state machine raised while applying the
  command (it was applied as a failed command) or while answering the query, or the
  request was refused as malformed or too large;
* 130 - interrupted (Ctrl-C), except `local` and `serve`, whose normal way to end is a
  signal (they exit 0); 143 - `demo` stopped by SIGTERM.

Expected failures print one line, ``cypaxos: error: ...``, on stderr; never a
traceback.
"""
from __future__ import annotations

import sys

__all__ = [
    "PROG", "EXIT_OK", "EXIT_NO", "EXIT_USAGE", "EXIT_UNAVAILABLE", "EXIT_REFUSED",
    "EXIT_INTERRUPTED", "EXIT_TERMINATED", "EXIT_STATUS_SUMMARY", "Negative", "say",
    "error", "one_line",
]

PROG = "cypaxos"

EXIT_OK = 0
EXIT_NO = 1  # a negative answer, or a failure of serve/local/demo/bench/certs
EXIT_USAGE = 2  # what argparse uses too
EXIT_UNAVAILABLE = 3
EXIT_REFUSED = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM

EXIT_STATUS_SUMMARY = (
    "Exit status: 0 done; 1 the answer is no (not found, cas failed) or the command "
    "failed; 2 bad usage or configuration; 3 the cluster could not answer "
    "(unreachable, no leader, timed out); 4 the cluster refused the command (the "
    "state machine raised, or the request was malformed or too large); 130 "
    "interrupted.")
"""The exit statuses in one paragraph, for `--help`."""


class Negative(Exception):
    """A command's answer is "no": print `message` on stderr, exit 1."""


def say(line: str) -> None:
    """Print `line` on stderr at once."""
    print(line, file=sys.stderr, flush=True)


def one_line(message) -> str:
    """`message` as one line of text, whatever it holds."""
    return " ".join(str(message).split()) or "unknown error"


def error(message) -> None:
    """Print ``cypaxos: error: MESSAGE`` on stderr, as one line."""
    say(f"{PROG}: error: {one_line(message)}")
