"""Importing TVM, in one place (the compiler and the runtime both call it)."""

from __future__ import annotations


def import_tvm():
    import tvm

    return tvm
