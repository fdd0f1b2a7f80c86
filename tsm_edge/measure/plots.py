"""PNG plots (matplotlib, Agg backend; no display needed), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

from ..support.files import atomic_write_bytes


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


def drift_plot(report: dict, path: str | Path) -> Path:
    """Per-frame largest logit difference over the stream, its least-squares line, the frames
    whose top-1 class differs, and the largest relative cache difference, from a drift report."""
    import numpy as np

    diff = np.asarray(report["per_frame_max_logit_diff"])
    t = np.arange(len(diff))
    plt, (fig, ax) = _figure(figsize=(10, 4))
    ax.plot(t, diff, linewidth=0.8, label="max |logit diff| per frame")
    slope = report["drift_slope"] / 1000
    line = diff.mean() + slope * (t - t.mean())
    ax.plot(t, line, color="black", linewidth=1.5,
            label=f"trend {report['drift_slope']:+.3g} per 1000 frames")
    bad = report.get("top1_disagreement_frames") or []
    if bad:
        ax.scatter(bad, diff[bad], color="red", s=12, zorder=3,
                   label=f"top-1 differs ({len(bad)} frames)")
    ax.set_xlabel("frame")
    ax.set_ylabel("max |logit diff|")
    if "per_frame_cache_max_relative_diff" in report:
        ax2 = ax.twinx()
        ax2.plot(t, report["per_frame_cache_max_relative_diff"], color="tab:orange",
                 linewidth=0.6, alpha=0.7, label="max cache diff / cache scale, per frame")
        ax2.set_ylabel("relative cache diff", color="tab:orange")
        ax2.legend(loc="upper right")
    ax.set_title(f"{report.get('model', '')} {report.get('precision', '')} against "
                 f"{report.get('reference_precision', '')}: {report['frames']} frames, top-1 "
                 f"agreement {report['top1_agreement']:.2%}")
    ax.legend(loc="upper left")
    return _save(plt, fig, path)


def confusion_plot(report: dict, path: str | Path) -> Path:
    """The confusion matrix of an evaluate report, counts in the cells, rows the true label."""
    import numpy as np

    labels = report["labels"]
    cm = np.asarray(report["confusion"], dtype=float)
    k = len(labels)
    side = min(4 + 0.55 * k, 30)
    plt, (fig, ax) = _figure(figsize=(side + 1.5, side))
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # colour: fraction of the true class
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 40:
        ax.set_xticks(range(k), labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), labels, fontsize=8)
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if shown[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{report.get('model', '')}: top-1 {100 * report['top1']:.1f}% on "
                 f"{report['clips']} clips ({report['rule']})")
    return _save(plt, fig, path)
