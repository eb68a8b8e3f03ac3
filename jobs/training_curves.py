"""The plot a grid search is read from: every head's training loss per epoch, labelled with its validation IoU.

A table of final scores says which learning rate won; the curves say why the others lost (diverged, still
falling when training stopped, or flat), which decides what to try next. ``featstore train`` writes it
into the decoder artifact as ``training.png``, from the same per-head records it writes to ``heads.json``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PLOT_FILE = "training.png"
STYLES = ("-", "--", ":", "-.")


def diverged(curve: Sequence[float | None]) -> bool:
    """A loss that became NaN or infinite, or ended above where it started."""
    values = [value for value in curve if value is not None and math.isfinite(value)]
    if len(values) < len(curve):
        return True
    return len(values) > 1 and values[-1] > values[0]


def loss_ceiling(curves: Sequence[Sequence[float | None]]) -> float:
    """Top of the loss axis: a little over the heads' typical first-epoch loss, so one runaway head (loss
    1e27) does not flatten every other curve into a line; what lies above is drawn off the top."""
    starts = [c[0] for c in curves if c and c[0] is not None and math.isfinite(c[0])]
    if not starts:
        return 1.0
    finite = [v for c in curves for v in c if v is not None and math.isfinite(v)]
    return min(max(finite), 1.5 * statistics.median(starts)) * 1.05


def write_training_curves(heads: Sequence[Mapping[str, Any]], path: Path, *, best: str, title: str) -> None:
    """Loss per epoch for each head record (``TrainedHead.metrics()``); ``best`` names the kept head."""
    # The Figure API, not pyplot: no global backend switch under a caller's notebook or GUI.
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = (len(heads) + 1) // 2
    figure = Figure(figsize=(9, 4.6 + 0.22 * rows), dpi=120)
    axes = figure.add_subplot()
    # tab10 repeats after ten heads; tab20 and four line styles keep up to 80 apart.
    palette = colormaps["tab10" if len(heads) <= 10 else "tab20"]
    colours = [palette(i) for i in range(palette.N)]
    ceiling = loss_ceiling([h["epoch_losses"] for h in heads])
    ranked = sorted(heads, key=lambda h: -(h["val_mean_iou"] if h["val_mean_iou"] is not None else -1.0))
    for i, head in enumerate(ranked):
        curve = [math.nan if v is None else v for v in head["epoch_losses"]]
        kept = head["head"] == best
        score = f"val IoU {head['val_mean_iou']:.3f}" if head["val_mean_iou"] is not None else "not validated"
        finite = [v for v in curve if math.isfinite(v)]
        note = "  (kept)" if kept else "  (diverged)" if diverged(head["epoch_losses"]) else ""
        if finite and min(finite) > ceiling:
            note += f"  (off the chart: loss {min(finite):.3g} at best)"
        axes.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3,
                  color=colours[i % len(colours)], linestyle=STYLES[(i // len(colours)) % len(STYLES)],
                  linewidth=2.6 if kept else 1.2, zorder=3 if kept else 2, label=f"{head['head']}: {score}{note}")
    axes.set_ylim(0.0, ceiling)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel("training loss, mean over the epoch (BCE + Dice)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    # Below the axes: curves of a grid fill the plot area, and a legend there would hide some.
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    figure.tight_layout()
    figure.savefig(path, format="png", bbox_inches="tight")  # "tight": long legend entries stay whole
