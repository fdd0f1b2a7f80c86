"""Leaf helpers every stage may use: atomic files and hashes, threads, the machine, versions,
the host platform, and the TVM import.
"""
