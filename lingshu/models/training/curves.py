"""Loss-curve plots of the training loop: raw and smoothed per-step losses as a PNG."""

from __future__ import annotations

from pathlib import Path

from lingshu.io import atomic_path


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def plot_loss_curve(losses: list[float], path: str | Path, title: str = "training loss") -> None:
    """Write the raw and smoothed (trailing moving average) loss curve as a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = list(range(1, len(losses) + 1))
    if losses:
        ax.plot(steps, losses, color="0.7", lw=0.8, label="raw")
        window = max(1, len(losses) // 50)
        ax.plot(steps, _smooth(losses, window), color="C0", lw=1.5,
                label=f"moving average ({window})")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
