"""`python -m peer.tools.testbed ...` (what scripts/testbed runs): the command line of cli.py."""

import sys

from peer.tools.testbed.cli import main

if __name__ == "__main__":
    sys.exit(main())
