"""PNG plots (matplotlib, Agg backend; no display needed), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

from .artifact import atomic_write_bytes


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(*args, **kwargs)


def _save(plt, fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def latency_plot(result: dict, path: str | Path) -> Path:
    """Latency over frames (left) and a histogram per backend (right) of a bench result."""
    series = result["latencies_ms"]
    plt, (fig, (ax_t, ax_h)) = _figure(1, 2, figsize=(11, 4))
    for name, lat in series.items():
        ax_t.plot(range(len(lat)), lat, label=name, linewidth=1)
        ax_h.hist(lat, bins=30, alpha=0.6, label=name)
    ax_t.set_xlabel("frame")
    ax_t.set_ylabel("latency (ms)")
    ax_t.set_title(f"{result.get('model', '')} {result.get('input_size', '')}px, "
                   f"threads {result.get('threads') or 'default'}")
    ax_t.legend()
    ax_h.set_xlabel("latency (ms)")
    ax_h.set_ylabel("frames")
    ax_h.legend()
    return _save(plt, fig, path)
