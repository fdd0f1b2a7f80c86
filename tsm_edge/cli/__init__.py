"""The ``tsm-edge`` command: parses, resolves presets, calls the library. Nothing else.

One module per verb family (``build``, ``run``, ``measure``, ``device``); the group, the shared
options and the entry point are in ``app``. Spellings follow the CLI contract: a user error is one
``error: ...`` line on stderr and exit status 2 (``--debug`` shows the traceback); outputs are
written atomically.
"""

from . import build, device, measure, run, train  # noqa: F401 - each module registers its verbs
from .app import main

__all__ = ["main"]
