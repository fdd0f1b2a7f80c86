"""Importing TVM, in one place (the compiler and the runtime both call it)."""

from __future__ import annotations


def import_tvm():
    """The ``tvm`` module, imported on first use (so ``tsm-edge --help`` stays instant)."""
    import tvm

    return tvm
