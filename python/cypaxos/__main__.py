"""`python -m cypaxos`: the same command line as the `cypaxos` console script."""
import sys

from cypaxos.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
