"""Boards over TVM RPC: the RPC and tracker client and server processes (``rpc``), the remote
stream (``remote``) and the emulated aarch64 board (``emulator``).
"""
