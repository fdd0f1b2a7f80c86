"""Tool versions recorded in manifests, calibration files and tuning records."""

from __future__ import annotations

import platform
from importlib import metadata

from .. import __version__

TVM_DISTS = ("apache-tvm", "apache-tvm-ffi")


def dist_versions(dists: tuple[str, ...]) -> dict[str, str]:
    """Installed version of each distribution, ``"missing"`` where it is not installed."""
    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def versions() -> dict[str, str]:
    """The TVM wheels' versions (the pins a board must match)."""
    return dist_versions(TVM_DISTS)


def tool_versions() -> dict:
    """Everything that shaped a compiled artifact."""
    return {"tsm-edge": __version__, "python": platform.python_version(),
            **dist_versions(("torch", "numpy") + TVM_DISTS)}
