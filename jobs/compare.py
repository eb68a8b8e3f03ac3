"""The compare job: build, train, predict and score backbones and heads on one clip-level split.

Each backbone's features are built (or found) once for the whole dataset and shared by every head
compared on it. Each (backbone, decoder) pair is trained on the training clips as its own decoder
artifact and validated on the held-out clips, which are then predicted from the stored features into a
contest result and scored with ``jobs.evaluate``, exactly as a submission would be. Every step is a
content-keyed artifact, so running the same comparison again computes nothing, and adding a backbone or
a head computes only that. A pair over the parameter budget becomes a row saying so, not the end of the
comparison.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from decoders import DEFAULT_DECODER, HeadConfig, get_decoder_class, holdout_split
from decoders.training import DEFAULT_HOLDOUT_FRACTION, build_head
from featstore.accounting import check_budget
from featstore.backbones import create_backbone, get_backbone_spec
from featstore.datasets import Dataset, load_dataset
from featstore.errors import BudgetError, FeatstoreError
from featstore.store import Store, hidden_sibling
from featstore.units import format_bytes
from featstore.wandb_sync import WandbJob, wandb_group, wandb_requested
from jobs.evaluate import evaluate
from jobs.featurize import build_features, choose_gpu_decode, resolve_device
from jobs.predict import predict_dataset
from jobs.train import DEFAULT_BUDGET, train_decoders

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CSV_FILE = "compare.csv"
PLOT_FILE = "compare.png"
DEFAULT_EPOCHS = 10
COLUMNS = (
    "backbone",
    "weights",
    "decoder",
    "mean_iou",
    "j_mean",
    "val_mean_iou",
    "nparams_backbone",
    "nparams_head",
    "nparams",
    "within_budget",
    "featurize_fps",
    "train_seconds",
    "store_bytes",
    "features_ref",
    "decoder_ref",
    "result_ref",
    "error",
)
"""Columns of ``compare.csv``; rows also say whether everything was ``cached``."""


@dataclass(frozen=True)
class BackboneChoice:
    """One ``--backbones`` entry: ``NAME`` or ``NAME@WEIGHTS`` (``imagenet``, ``random`` or a file)."""

    name: str
    weights: str

    @property
    def label(self) -> str:
        return self.name if self.weights == "imagenet" else f"{self.name}@{self.weights}"


def parse_backbones(entries: Sequence[str], default_weights: str = "imagenet") -> list[BackboneChoice]:
    """Parse ``NAME[@WEIGHTS]`` entries, checking every name before any work starts."""
    choices: list[BackboneChoice] = []
    for entry in entries:
        name, _, weights = entry.strip().partition("@")
        if not name:
            raise FeatstoreError(f"--backbones entry {entry!r} has no backbone name: use NAME or NAME@random")
        get_backbone_spec(name)  # BackboneError naming close matches for an unknown name
        choice = BackboneChoice(name, weights or default_weights)
        if choice in choices:
            raise FeatstoreError(f"--backbones lists {choice.label} twice; name each backbone once")
        choices.append(choice)
    if not choices:
        raise FeatstoreError("--backbones is empty: name at least one backbone, e.g. efficientnet_lite0,alexnet")
    return choices


def parse_decoders(decoders: str | Sequence[str] | None) -> list[str]:
    """Registered head names, each once; a string is a comma-separated list, ``None`` the default head."""
    if decoders is None:
        return [DEFAULT_DECODER]
    names = [name.strip() for name in (decoders.split(",") if isinstance(decoders, str) else decoders)]
    if not names or not all(names):
        raise FeatstoreError(
            f"--decoder {','.join(names)!r} has an empty name: give heads such as linear,fpn separated by single commas"
        )
    for name in names:
        get_decoder_class(name)  # one line naming the registered heads for an unknown name
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise FeatstoreError(f"--decoder lists {', '.join(repeated)} twice; name each decoder once")
    return names


@dataclass(frozen=True)
class CompareResult:
    """The leaderboard (one row per backbone and decoder, sorted by held-out mean IoU) and its files."""

    dataset: str
    val_clips: tuple[str, ...]
    rows: list[dict[str, Any]]
    csv: Path
    plot: Path

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "val_clips": list(self.val_clips),
            "rows": self.rows,
            "csv": str(self.csv),
            "plot": str(self.plot),
        }

    def leaderboard(self) -> str:
        """The rows as a fixed-width text table, best first."""
        import pandas as pd

        shown = pd.DataFrame(self.rows, columns=list(COLUMNS))
        table = pd.DataFrame(
            {
                "backbone": [row_label(r) for r in self.rows],
                "decoder": shown["decoder"],
                "mean IoU": [_number(r["mean_iou"], "{:.4f}") for r in self.rows],
                "J mean": [_number(r["j_mean"], "{:.4f}") for r in self.rows],
                "params": [f"{r['nparams']:,}" for r in self.rows],
                "budget": ["ok" if r["within_budget"] else "OVER" for r in self.rows],
                "featurize fps": [_number(r["featurize_fps"], "{:.1f}") for r in self.rows],
                "train s": [_number(r["train_seconds"], "{:.1f}") for r in self.rows],
                "store": ["-" if r["store_bytes"] is None else format_bytes(r["store_bytes"]) for r in self.rows],
            }
        )
        table.index = range(1, len(table) + 1)
        return table.to_string()


def row_label(row: dict[str, Any]) -> str:
    return str(row["backbone"]) if row["weights"] == "imagenet" else f"{row['backbone']}@{row['weights']}"


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def compare_backbones(
    store: Store,
    data: str | Path | None,
    backbones: Sequence[str],
    *,
    decoders: str | Sequence[str] | None = None,
    weights: str = "imagenet",
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 8,
    budget: int = DEFAULT_BUDGET,
    device: str = "auto",
    out_dir: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
    jpeg_decoder: str = "auto",
    wandb: bool = False,
) -> CompareResult:
    """Build, train, predict and score each backbone with each head on one clip-level split; write the csv and plot.

    ``backbones`` entries are ``NAME`` (with ``weights``) or ``NAME@WEIGHTS``, e.g. ``tiny@random``.
    ``decoders`` are head names (``["linear", "fpn"]`` or ``"linear,fpn"``; default: the default head):
    each backbone's features are built once and every head is trained on them as its own decoder, one
    leaderboard row per pair. ``out_dir`` defaults to ``<store>/compare/<dataset name>/``. ``force``
    recomputes every step (build, train, predict) of every pair as new versions instead of reusing
    committed ones. ``jpeg_decoder`` is ``build``'s ``--jpeg-decoder``, for every backbone's features.
    ``wandb``: every job's run joins one W&B group, and a ``compare`` run that uses the results logs the
    leaderboard as a table and the plot as an image.
    """
    choices = parse_backbones(backbones, weights)
    heads = [HeadConfig(decoder=name) for name in parse_decoders(decoders)]
    if budget < 1:
        raise FeatstoreError(f"--budget {budget} must be a positive number of parameters")
    if epochs < 1:
        raise FeatstoreError(f"--epochs {epochs} must be at least 1")
    if holdout_fraction == 0.0:
        raise FeatstoreError("compare --holdout-fraction 0 leaves no clip to score the leaderboard on: "
                             "hold out a fraction above 0 (default 0.25)")
    choose_gpu_decode(jpeg_decoder, device, resolve_device(device))  # refused before any backbone is built
    dataset = load_dataset(data, demo_root=store.root / "demo")
    if not dataset.has_annotations:
        raise FeatstoreError(
            f"{dataset.root}: comparing backbones needs annotations to train and score, but dataset "
            f"{dataset.name!r} has frames without masks; pass an annotated dataset"
        )
    _, held_out_clips = holdout_split(list(dataset.clips()), holdout_fraction, seed)  # the split train makes
    target = Path(out_dir).expanduser().absolute() if out_dir is not None else store.root / "compare" / dataset.name
    sizes = {choice: _parameter_counts(choice, heads, seed) for choice in choices}
    logging = wandb_requested(wandb)
    group = f"compare {dataset.name} {time.strftime('%Y-%m-%d %H:%M:%S')}" if logging else None
    with wandb_group(group) if group else contextlib.nullcontext():
        rows = _leaderboard_rows(
            store, dataset, data, choices, heads, sizes, holdout_fraction=holdout_fraction, seed=seed,
            epochs=epochs, batch_size=batch_size, budget=budget, device=device, progress=progress, force=force,
            jpeg_decoder=jpeg_decoder, wandb=logging,
        )
        csv_path, plot_path = target / CSV_FILE, target / PLOT_FILE
        _write_csv(rows, csv_path)
        _write_plot(rows, plot_path, dataset.name, held_out_clips, budget,
                    styles=plot_styles([c.label for c in choices], [h.decoder for h in heads]))
        config = {"dataset": dataset.name, "backbones": [c.label for c in choices], "decoders": [h.decoder for h in heads],
                  "held_out_clips": held_out_clips, "epochs": epochs, "budget": budget, "seed": seed}
        with WandbJob("compare", config, enabled=logging, store=store) as job:
            for row in rows:
                if logging and row["result_ref"]:  # no record read when nothing is logged
                    job.use(store.resolve(row["result_ref"]))
            job.log_table("leaderboard", [{k: row[k] for k in COLUMNS} for row in rows])
            job.log_image("iou_vs_parameters", plot_path)
    return CompareResult(dataset.name, tuple(held_out_clips), rows, csv_path, plot_path)


def _leaderboard_rows(
    store: Store,
    dataset: Dataset,
    data: str | Path | None,
    choices: Sequence[BackboneChoice],
    heads: Sequence[HeadConfig],
    sizes: dict[BackboneChoice, tuple[int, dict[str, int]]],
    **options: Any,
) -> list[dict[str, Any]]:
    """One row per (backbone, head), best held-out mean IoU first; over-budget pairs say so, untrained."""
    budget = options["budget"]
    rows: list[dict[str, Any]] = []
    for index, choice in enumerate(choices, start=1):
        print(f"featstore compare: [{index}/{len(choices)}] {choice.label}", file=sys.stderr)
        nparams_backbone, nparams_heads = sizes[choice]
        within: list[dict[str, Any]] = []
        for head in heads:
            row = _empty_row(choice, head.decoder, nparams_backbone, nparams_heads[head.decoder])
            rows.append(row)
            try:
                check_budget(row["nparams"], budget)
            except BudgetError:
                row["error"] = _over_budget(head.decoder, nparams_backbone, nparams_heads[head.decoder], budget)
                print(f"featstore compare: {choice.label} + {head.decoder}: {row['error']}; not trained",
                      file=sys.stderr)
                continue
            within.append(row)
        if within:  # features only for a backbone that some head fits the budget with
            _run_backbone(store, dataset, data, choice, within, announce=len(heads) > 1, **options)
    rows.sort(key=lambda r: -r["mean_iou"] if r["mean_iou"] is not None else math.inf)
    return rows


def _parameter_counts(choice: BackboneChoice, heads: Sequence[HeadConfig], seed: int) -> tuple[int, dict[str, int]]:
    """Backbone parameters and each head's, from the backbone as it will be built (its weights load, or fail, here)."""
    extractor = create_backbone(choice.name, weights=choice.weights)
    spec = extractor.spec
    channels = {layer: int(spec.channels[layer]) for layer in extractor.layers}
    strides = {layer: int(spec.strides[layer]) for layer in extractor.layers}
    return extractor.nparams, {head.decoder: build_head(head, channels, strides, seed).nparams for head in heads}


def _over_budget(decoder: str, backbone: int, head: int, budget: int) -> str:
    return (
        f"over budget: backbone {backbone:,} + {decoder} head {head:,} = {backbone + head:,} parameters "
        f"exceeds --budget {budget:,}"
    )


def _empty_row(choice: BackboneChoice, decoder: str, nparams_backbone: int, nparams_head: int) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys((*COLUMNS, "cached"))
    row.update(
        backbone=choice.name,
        weights=choice.weights,
        decoder=decoder,
        nparams_backbone=nparams_backbone,
        nparams_head=nparams_head,
        nparams=nparams_backbone + nparams_head,
        within_budget=False,
        cached=False,
        error="",
    )
    return row


def _run_backbone(
    store: Store,
    dataset: Dataset,
    data: str | Path | None,
    choice: BackboneChoice,
    rows: Sequence[dict[str, Any]],
    *,
    holdout_fraction: float,
    seed: int,
    epochs: int,
    batch_size: int,
    budget: int,
    device: str,
    progress: bool,
    force: bool,
    announce: bool,
    jpeg_decoder: str,
    wandb: bool,
) -> None:
    """Build the backbone's features once; then train each row's head on them, predict the held-out clips
    from the stored features and score them, filling in the row."""
    built = build_features(store, choice.name, data, weights=choice.weights, device=device, progress=progress,
                           force=force, jpeg_decoder=jpeg_decoder, wandb=wandb)
    if built.record.metadata["dataset"]["digest"] != dataset.digest():
        raise FeatstoreError(
            f"{dataset.root}: the dataset's files changed while comparing (features {built.ref} hold other "
            "content); run the comparison again once the files are stable"
        )
    for row in rows:
        if announce:
            print(f"featstore compare: {choice.label} + {row['decoder']}", file=sys.stderr)
        trained = train_decoders(
            store, built.ref, holdout_fraction=holdout_fraction, seed=seed, decoders=[row["decoder"]], epochs=epochs,
            batch_size=batch_size, budget=budget, device=device, progress=progress, force=force, wandb=wandb,
        )
        meta = trained.record.metadata
        clips = list(meta["val_clips"])
        # Named apart from the whole dataset, so `featstore ls` tells the held-out subset from it.
        held_out = dataclasses.replace(dataset.subset(clips), name=f"{dataset.name}-holdout")
        predicted = predict_dataset(
            store, trained.ref, held_out, features=built.ref, batch_size=batch_size, device=device,
            progress=progress, force=force, wandb=wandb,
        )
        scores = evaluate(predicted.out, held_out, progress=False if not progress else None)
        row.update(
            mean_iou=scores.mean_iou,
            j_mean=scores.j_mean,
            val_mean_iou=float(meta["val_mean_iou"]),
            nparams_backbone=int(meta["nparams_backbone"]),
            nparams_head=int(meta["nparams_head"]),
            nparams=int(meta["nparams"]),
            within_budget=True,
            featurize_fps=float(built.record.metadata["fps"]),
            train_seconds=float(meta["train_seconds"]),
            store_bytes=int(built.bytes),
            features_ref=built.ref,
            decoder_ref=trained.ref,
            result_ref=predicted.ref,
            cached=built.cached and trained.cached and predicted.cached,
        )


def _temporary_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return hidden_sibling(path, ".partial")


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    scratch = _temporary_sibling(path)
    try:
        pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(scratch, index=False)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scored rows that no row with as few or fewer parameters beats on mean IoU, by increasing size."""
    scored = sorted((r for r in rows if r["mean_iou"] is not None), key=lambda r: (r["nparams"], -r["mean_iou"]))
    front: list[dict[str, Any]] = []
    for row in scored:
        if not front or row["mean_iou"] > front[-1]["mean_iou"]:
            front.append(row)
    return front


def _parameters(value: float, _position: int | None = None, *, figures: str = "g") -> str:
    """A parameter count as tick labels and the legend print it: ``300``, ``5k``, ``1.5M``, ``7B``.

    ``figures=".3g"`` gives a point's own count to three figures (``3.1M`` against ``3.87M``), which the log
    axis between its ticks does not let anyone read.
    """
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:{figures}}{unit}"
    return f"{value:{figures}}"


# One colour per backbone (not red: the budget's, nor orange: the Pareto front's), one marker per head.
_BACKBONE_COLOURS = ("tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:cyan", "tab:olive",
                     "tab:gray")
_DECODER_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# Where a point's label may go, in points from the point, tried in order: beside it, then stepped up and
# down, then the same on its left, until the label overlaps no other label or point and stays in the axes.
_LABEL_OFFSETS = tuple(dict.fromkeys((side * 9, sign * step) for side in (1, -1) for step in range(0, 130, 10) for sign in (1, -1)))


def plot_styles(backbones: Sequence[str], decoders: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """A colour per backbone label and a marker per decoder, by the order they were listed in, not by score,
    so that reruns and comparisons that share a backbone draw it alike."""
    colour = {b: _BACKBONE_COLOURS[i % len(_BACKBONE_COLOURS)] for i, b in enumerate(backbones)}
    marker = {d: _DECODER_MARKERS[i % len(_DECODER_MARKERS)] for i, d in enumerate(decoders)}
    return colour, marker


def _write_plot(
    rows: Sequence[dict[str, Any]],
    path: Path,
    dataset: str,
    val_clips: Sequence[str],
    budget: int,
    *,
    styles: tuple[dict[str, str], dict[str, str]],
) -> None:
    """Save ``plot_figure`` as a PNG, atomically so that a reader never sees half a plot."""
    figure = plot_figure(rows, dataset, val_clips, budget, styles=styles)
    scratch = _temporary_sibling(path)
    try:
        figure.savefig(scratch, format="png")
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


def plot_figure(
    rows: Sequence[dict[str, Any]],
    dataset: str,
    val_clips: Sequence[str],
    budget: int,
    *,
    styles: tuple[dict[str, str], dict[str, str]],
) -> Figure:
    """Held-out mean IoU against total parameters (log scale), the budget line and the Pareto front, laid out.

    Colour says the backbone and the marker the decoder (``styles``), and each point is labelled with both.
    Tick labels and the title are fitted to the drawn size, not to a count of characters, so that neither
    overlaps nor leaves the figure whatever the clip names and the range of sizes.
    """
    # The Figure API, not pyplot: no global backend switch under a caller's notebook or GUI.
    from matplotlib.artist import Artist
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    figure = Figure(figsize=(8, 5.4), dpi=120)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colour, marker = styles
    backbones, decoders = list(colour), list(marker)
    scored = sorted((r for r in rows if r["mean_iou"] is not None), key=lambda r: (r["nparams"], -r["mean_iou"]))
    unscored = [r for r in rows if r["mean_iou"] is None]
    front = pareto_front(rows)
    for r in scored:
        axes.scatter([r["nparams"]], [r["mean_iou"]], s=40, color=colour[row_label(r)],
                     marker=marker[str(r["decoder"])], zorder=3)
    if front:
        axes.step([r["nparams"] for r in front], [r["mean_iou"] for r in front], where="post",
                  color="tab:orange", linewidth=1.5, zorder=2, label="Pareto front (best IoU for its size)")
        axes.scatter([r["nparams"] for r in front], [r["mean_iou"] for r in front], s=120,
                     facecolors="none", edgecolors="tab:orange", linewidths=1.5, zorder=4)
    if scored:  # the leaderboard's first row: the pair to submit
        best = max(scored, key=lambda r: r["mean_iou"])
        axes.scatter([best["nparams"]], [best["mean_iou"]], s=340, marker="*", color="gold", edgecolors="0.25",
                     linewidths=0.8, zorder=2.8)
    for r in unscored:  # not trained: marked on the bottom edge
        axes.plot(r["nparams"], 0.0, marker="x", markersize=9, color="tab:red", clip_on=False, zorder=5,
                  transform=axes.get_xaxis_transform())
    axes.axvline(budget, color="tab:red", linestyle="--", linewidth=1,
                 label=f"budget: {_parameters(budget)} parameters")
    # A budget far beyond every model would leave most of the width empty: the axis then stops short of
    # it and an arrow on the right edge says where it is.
    sizes = [r["nparams"] for r in rows]
    budget_in_view = budget <= max(sizes) * 4
    sizes += [budget] if budget_in_view else []
    axes.set_xscale("log")
    axes.set_xlim(min(sizes) / 1.6, max(sizes) * 1.6)
    if not budget_in_view:
        axes.annotate(f"budget {_parameters(budget)} →", (1.0, 0.97), xycoords="axes fraction", ha="right", va="top",
                      fontsize=8.5, color="tab:red")
    axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,)))
    axes.xaxis.set_major_formatter(FuncFormatter(_parameters))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("parameters, backbone + head (log scale)")
    axes.set_ylabel("mean IoU on held-out clips")
    # Laid out with the clips only counted and fitted after (_fit_title), so long names cannot squeeze the axes.
    title = axes.set_title(next(_headlines(dataset)) + (f"\n{_clip_count(len(val_clips))}" if val_clips else ""))
    axes.grid(True, which="major", alpha=0.3)
    # The legend's columns: backbones by colour, decoders by marker, then the front and the budget line.
    columns: list[list[Artist]] = [
        [Line2D([], [], linestyle="none", marker="o", color=colour[b], label=b) for b in backbones],
        [Line2D([], [], linestyle="none", marker=marker[d], color="0.35", label=f"{d} head") for d in decoders],
        [*axes.get_legend_handles_labels()[0],
         *([Line2D([], [], linestyle="none", marker="*", markersize=12, color="gold", markeredgecolor="0.25",
                   markeredgewidth=0.8, label="best held-out IoU")] if scored else [])],
    ]
    height = max(len(column) for column in columns)
    keys = [
        key
        for column in columns
        for key in [*column, *(Line2D([], [], linestyle="none", label=" ") for _ in range(height - len(column)))]
    ]
    axes.legend(handles=keys, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8.5, frameon=False)
    renderer = canvas.get_renderer()
    figure.tight_layout()
    # Ticks fit the laid-out axes, whose width their labels change a little in turn: repeated until both agree.
    for _ in range(3):
        ticks = _spaced_ticks(axes, renderer)
        if list(axes.xaxis.get_majorticklocs()) == ticks:
            break
        axes.xaxis.set_major_locator(FixedLocator(ticks))
        figure.tight_layout()
    # The axes' final place: the title is centred over it, and labels are fitted around the points in it.
    _fit_title(title, axes, renderer, dataset, val_clips)
    _label_points(axes, renderer, scored, unscored, front)
    return figure


def _headlines(dataset: str) -> Iterator[str]:
    """The title's first line, longest first: a dataset name too long for the figure is cut short."""
    what = "held-out mean IoU against model size"
    yield f"{dataset}: {what}"
    for keep in range(len(dataset) - 1, 0, -1):
        yield f"{dataset[:keep]}…: {what}"
    yield what


def _clip_count(count: int) -> str:
    return f"{count} held-out clip{'' if count == 1 else 's'}"


def _clip_lines(clips: Sequence[str]) -> Iterator[str]:
    """The title's line naming the held-out clips, longest first: as many names as fit, then how many more."""
    count = _clip_count(len(clips))
    yield f"{count}: {', '.join(clips)}"
    for shown in range(len(clips) - 1, 0, -1):
        yield f"{count}: {', '.join(clips[:shown])}, … and {len(clips) - shown} more"
    yield count


def _fit_title(title: Any, axes: Any, renderer: Any, dataset: str, clips: Sequence[str]) -> None:
    """Set ``title`` to the longest lines that, centred over ``axes``, stay inside the figure."""
    figure = axes.get_figure().bbox
    centre = axes.get_window_extent(renderer).intervalx.mean()
    pad = title.get_fontsize() * axes.get_figure().dpi / 72 / 2
    width = 2 * min(centre - figure.x0, figure.x1 - centre) - 2 * pad
    lines = [_first_fitting(title, renderer, width, _headlines(dataset))]
    if clips:
        lines.append(_first_fitting(title, renderer, width, _clip_lines(clips)))
    title.set_text("\n".join(lines))


def _first_fitting(text: Any, renderer: Any, width: float, candidates: Iterable[str]) -> str:
    """The first of ``candidates`` that ``text`` draws at most ``width`` pixels wide, else the last."""
    chosen = ""
    for chosen in candidates:
        text.set_text(chosen)
        if text.get_window_extent(renderer).width <= width:
            break
    return chosen


def _spaced_ticks(axes: Any, renderer: Any) -> list[float]:
    """The densest major ticks on the log x axis whose labels keep half an em apart.

    Tried in order: 1 to 9 in each decade where the axis spans less than one, 1, 2 and 5 in each decade,
    then 1 and 3, then each power of ten, then every second, third... power of ten, so that sizes spanning
    many decades still get a few readable labels.
    """
    low, high = axes.get_xlim()
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    powers = range(first, last + 1)
    steps = ((1, 2, 3, 4, 5, 6, 7, 8, 9),) if high / low < 10 else ()
    schemes = [[m * 10.0**p for p in powers for m in subs] for subs in (*steps, (1, 2, 5), (1, 3), (1,))]
    schemes += [[10.0**p for p in powers if p % stride == 0] for stride in range(2, max(last - first, 2) + 1)]
    font = axes.xaxis.get_major_ticks(1)[0].label1.get_fontproperties()
    gap = font.get_size_in_points() * axes.get_figure().dpi / 72 / 2
    chosen: list[float] = []
    for scheme in schemes:
        ticks = [t for t in scheme if low <= t <= high]
        if not ticks:
            continue
        chosen = ticks
        centres = axes.transData.transform([(t, 0.0) for t in ticks])[:, 0]
        widths = [renderer.get_text_width_height_descent(_parameters(t), font, ismath=False)[0] for t in ticks]
        if all(c1 - c0 >= (w0 + w1) / 2 + gap
               for c0, c1, w0, w1 in zip(centres, centres[1:], widths, widths[1:], strict=False)):
            break
    return chosen


def _label_points(axes: Any, renderer: Any, scored: Sequence[dict[str, Any]],
                  unscored: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]]) -> None:
    """Name every point by backbone, decoder and size, each label placed clear of the points, the Pareto
    front's line and other labels.

    Heads on one backbone differ in size by far less than backbones do, so their points sit almost one
    above the other: labels at a fixed offset would print over each other. Labels moved off their point
    get a leader line back to it, so each over-budget mark on the bottom edge is told from the others.
    """
    backing = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}
    leader = {"arrowstyle": "-", "color": "0.5", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 4}
    frame = axes.get_window_extent(renderer)
    points = axes.transData.transform([(r["nparams"], r["mean_iou"]) for r in scored]).reshape(-1, 2)
    taken = [_box(x - 6, y - 6, x + 6, y + 6) for x, y in points] + _front_boxes(axes, front)
    stacked = tuple((-6, 8 + 12 * k) for k in range(len(unscored) + 3))  # up from the bottom edge, left of the mark
    for r in unscored:
        def over(dx: float, dy: float, final: bool, r: dict[str, Any] = r) -> Any:
            return axes.annotate(f"{row_label(r)} + {r['decoder']} ({_parameters(r['nparams'], figures='.3g')}): over budget",
                                 (r["nparams"], 0.0), xycoords=axes.get_xaxis_transform(), textcoords="offset points",
                                 xytext=(dx, dy), ha="right", va="bottom", fontsize=8.5, color="tab:red",
                                 bbox=backing if final else None, arrowprops=leader if final else None)

        _fit_label(renderer, frame, taken, stacked, over)
    for r in scored:
        def scored_label(dx: float, dy: float, final: bool, r: dict[str, Any] = r) -> Any:
            text = f"{row_label(r)} + {r['decoder']}  {r['mean_iou']:.3f}, {_parameters(r['nparams'], figures='.3g')}"
            return axes.annotate(text, (r["nparams"], r["mean_iou"]),
                                 textcoords="offset points", xytext=(dx, dy), ha="left" if dx > 0 else "right",
                                 va="center", fontsize=8.5, bbox=backing if final else None,
                                 arrowprops=leader if final and dy else None, zorder=2.5)

        _fit_label(renderer, frame, taken, _LABEL_OFFSETS, scored_label)


def _front_boxes(axes: Any, front: Sequence[dict[str, Any]]) -> list[Any]:
    """Thin boxes along the Pareto front's steps (over, then up), in display units, for labels to keep off."""
    corners = axes.transData.transform([(r["nparams"], r["mean_iou"]) for r in front]).reshape(-1, 2)
    boxes = []
    for (x0, y0), (x1, y1) in itertools.pairwise(corners):
        boxes.append(_box(min(x0, x1), y0 - 2, max(x0, x1), y0 + 2))
        boxes.append(_box(x1 - 2, min(y0, y1), x1 + 2, max(y0, y1)))
    return boxes


def _fit_label(renderer: Any, frame: Any, taken: list[Any], offsets: Sequence[tuple[float, float]],
               draw: Callable[[float, float, bool], Any]) -> None:
    """Draw a label at the first offset where its text stays in ``frame`` and clear of ``taken``, and take its place.

    ``draw(dx, dy, final)`` makes the label; probes (``final`` false) are measured and removed. Where no
    offset is clear, the label goes where it stays in the frame and covers the fewest others.
    """
    best: tuple[tuple[bool, int], float, float, Any] | None = None
    for dx, dy in offsets:
        probe = draw(dx, dy, False)
        box = probe.get_window_extent(renderer).padded(2)
        probe.remove()
        cost = (not _inside(box, frame), sum(box.overlaps(other) for other in taken))
        if best is None or cost < best[0]:
            best = (cost, dx, dy, box)
        if cost == (False, 0):
            break
    assert best is not None, "at least one offset to try"
    _, dx, dy, box = best
    label = draw(dx, dy, True)
    label.set_in_layout(False)  # placed inside the axes, after the layout
    taken.append(box)


def _box(x0: float, y0: float, x1: float, y1: float) -> Any:
    from matplotlib.transforms import Bbox

    return Bbox([[x0, y0], [x1, y1]])


def _inside(box: Any, frame: Any) -> bool:
    return bool(frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1)
