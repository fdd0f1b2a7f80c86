"""``python -m tsm_edge.cli``: the ``tsm-edge`` command."""

import sys

from . import main

sys.exit(main())
