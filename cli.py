"""Thin shim so ``python cli.py ...`` works from a checkout; the command is ``tsm-edge``."""

import sys

from tsm_edge.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
