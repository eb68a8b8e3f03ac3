"""The plot a grid search is read from: every head's training loss per epoch, labelled with its validation IoU.

A table of final scores says which learning rate won; the curves say why the others lost (diverged, still
falling when training stopped, or flat), which decides what to try next. ``featstore train`` writes it
into the decoder artifact as ``training.png``, from the same per-head records it writes to ``heads.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PLOT_FILE = "training.png"


def write_training_curves(heads: Sequence[Mapping[str, Any]], path: Path, *, best: str, title: str) -> None:
    """Loss per epoch (log scale) for each head record (``TrainedHead.metrics()``); ``best`` names the kept one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    rows = (len(heads) + 1) // 2
    figure, axes = plt.subplots(figsize=(9, 4.6 + 0.22 * rows), dpi=120)
    try:
        ranked = sorted(heads, key=lambda h: -(h["val_mean_iou"] if h["val_mean_iou"] is not None else -1.0))
        for head in ranked:
            curve = head["epoch_losses"]
            kept = head["head"] == best
            score = f"val IoU {head['val_mean_iou']:.3f}" if head["val_mean_iou"] is not None else "not validated"
            axes.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3,
                      linewidth=2.6 if kept else 1.2, zorder=3 if kept else 2,
                      label=f"{head['head']}: {score}" + ("  (kept)" if kept else ""))
        axes.set_yscale("log")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        plain = FuncFormatter(lambda value, _position: f"{value:g}")
        axes.yaxis.set_major_formatter(plain)
        axes.yaxis.set_minor_formatter(plain)
        axes.set_xlabel("epoch")
        axes.set_ylabel("training loss, mean over the epoch (BCE + Dice)")
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        # Below the axes: curves of a grid fill the plot area, and a legend there would hide some.
        axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
