"""The compare job: build, train, predict and score several backbones on one clip-level split.

Each backbone's features are built (or found) for the whole dataset, a decoder is trained on the
training clips and validated on the held-out clips, and the held-out clips are then predicted from the
stored features into a contest result and scored with ``jobs.evaluate``, exactly as a submission would
be. Every step is a content-keyed artifact, so running the same comparison again computes nothing, and
adding a backbone computes only that backbone. A backbone over the parameter budget becomes a row
saying so, not the end of the comparison.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from decoders import DEFAULT_DECODER, HeadConfig, holdout_split
from decoders.training import build_head
from featstore.accounting import check_budget
from featstore.backbones import create_backbone, get_backbone_spec
from featstore.datasets import Dataset, load_dataset
from featstore.errors import BudgetError, FeatstoreError
from featstore.store import Store, hidden_sibling
from jobs.evaluate import evaluate
from jobs.featurize import build_features, resolve_device
from jobs.predict import predict_dataset
from jobs.train import DEFAULT_BUDGET, train_decoders

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


@dataclass(frozen=True)
class CompareResult:
    """The leaderboard (rows sorted by held-out mean IoU) and the files it was written to."""

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
                "store": [_megabytes(r["store_bytes"]) for r in self.rows],
            }
        )
        table.index = range(1, len(table) + 1)
        return table.to_string()


def row_label(row: dict[str, Any]) -> str:
    return str(row["backbone"]) if row["weights"] == "imagenet" else f"{row['backbone']}@{row['weights']}"


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _megabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f} MB"


def compare_backbones(
    store: Store,
    data: str | Path | None,
    backbones: Sequence[str],
    *,
    decoder: str | None = None,
    weights: str = "imagenet",
    holdout_fraction: float = 0.25,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 8,
    budget: int = DEFAULT_BUDGET,
    device: str = "auto",
    out_dir: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> CompareResult:
    """Build, train, predict and score each backbone on one clip-level split; write the csv and plot.

    ``backbones`` entries are ``NAME`` (with ``weights``) or ``NAME@WEIGHTS``, e.g. ``tiny@random``.
    ``out_dir`` defaults to ``<store>/compare/<dataset name>/``. ``force`` recomputes every step (build,
    train, predict) of every backbone as new versions instead of reusing committed ones.
    """
    choices = parse_backbones(backbones, weights)
    head = HeadConfig(decoder=decoder or DEFAULT_DECODER)
    if budget < 1:
        raise FeatstoreError(f"--budget {budget} must be a positive number of parameters")
    if epochs < 1:
        raise FeatstoreError(f"--epochs {epochs} must be at least 1")
    resolve_device(device)
    dataset = load_dataset(data, demo_root=store.root / "demo")
    if not dataset.has_annotations:
        raise FeatstoreError(
            f"{dataset.root}: comparing backbones needs annotations to train and score, but dataset "
            f"{dataset.name!r} has frames without masks; pass an annotated dataset"
        )
    _, held_out_clips = holdout_split(list(dataset.clips()), holdout_fraction, seed)  # the split train makes
    target = Path(out_dir).expanduser().absolute() if out_dir is not None else store.root / "compare" / dataset.name
    sizes = {choice: _parameter_count(choice, head, seed) for choice in choices}
    rows: list[dict[str, Any]] = []
    for index, choice in enumerate(choices, start=1):
        print(f"featstore compare: [{index}/{len(choices)}] {choice.label}", file=sys.stderr)
        nparams_backbone, nparams_head = sizes[choice]
        row = _empty_row(choice, head.decoder, nparams_backbone, nparams_head)
        try:
            check_budget(nparams_backbone + nparams_head, budget)
        except BudgetError:
            row["error"] = _over_budget(head.decoder, nparams_backbone, nparams_head, budget)
            print(f"featstore compare: {choice.label}: {row['error']}; not trained", file=sys.stderr)
            rows.append(row)
            continue
        row = _run_one(
            store, dataset, data, choice, row, head.decoder, holdout_fraction=holdout_fraction, seed=seed,
            epochs=epochs, batch_size=batch_size, budget=budget, device=device, progress=progress, force=force,
        )
        rows.append(row)
    rows.sort(key=lambda r: -r["mean_iou"] if r["mean_iou"] is not None else math.inf)
    csv_path, plot_path = target / CSV_FILE, target / PLOT_FILE
    _write_csv(rows, csv_path)
    _write_plot(rows, plot_path, dataset.name, held_out_clips, budget)
    return CompareResult(dataset.name, tuple(held_out_clips), rows, csv_path, plot_path)


def _parameter_count(choice: BackboneChoice, head: HeadConfig, seed: int) -> tuple[int, int]:
    """Backbone and head parameters, from the backbone as it will be built (its weights load, or fail, here)."""
    extractor = create_backbone(choice.name, weights=choice.weights)
    spec = extractor.spec
    channels = {layer: int(spec.channels[layer]) for layer in extractor.layers}
    strides = {layer: int(spec.strides[layer]) for layer in extractor.layers}
    return extractor.nparams, build_head(head, channels, strides, seed).nparams


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


def _run_one(
    store: Store,
    dataset: Dataset,
    data: str | Path | None,
    choice: BackboneChoice,
    row: dict[str, Any],
    decoder: str,
    *,
    holdout_fraction: float,
    seed: int,
    epochs: int,
    batch_size: int,
    budget: int,
    device: str,
    progress: bool,
    force: bool,
) -> dict[str, Any]:
    """Build, train, predict the held-out clips from the stored features, and score them."""
    built = build_features(store, choice.name, data, weights=choice.weights, device=device, progress=progress,
                           force=force)
    if built.record.metadata["dataset"]["digest"] != dataset.digest():
        raise FeatstoreError(
            f"{dataset.root}: the dataset's files changed while comparing (features {built.ref} hold other "
            "content); run the comparison again once the files are stable"
        )
    trained = train_decoders(
        store, built.ref, holdout_fraction=holdout_fraction, seed=seed, decoders=[decoder], epochs=epochs,
        batch_size=batch_size, budget=budget, device=device, progress=progress, force=force,
    )
    meta = trained.record.metadata
    clips = list(meta["val_clips"])
    # Named apart from the whole dataset, so `featstore ls` tells the held-out subset from it.
    held_out = dataclasses.replace(dataset.subset(clips), name=f"{dataset.name}-holdout")
    predicted = predict_dataset(
        store, trained.ref, held_out, features=built.ref, batch_size=batch_size, device=device, progress=progress,
        force=force,
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
    return row


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


def _millions(value: float, _position: int) -> str:
    return f"{value / 1e6:g}M"


def _write_plot(
    rows: Sequence[dict[str, Any]], path: Path, dataset: str, val_clips: Sequence[str], budget: int
) -> None:
    """Held-out mean IoU against total parameters (log scale), the budget line and the Pareto front."""
    # The Figure API, not pyplot: no global backend switch under a caller's notebook or GUI.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure = Figure(figsize=(8, 5.4), dpi=120)
    axes = figure.add_subplot()
    backing = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}
    scored = sorted((r for r in rows if r["mean_iou"] is not None), key=lambda r: r["nparams"])
    front = pareto_front(rows)
    axes.scatter([r["nparams"] for r in scored], [r["mean_iou"] for r in scored], s=36, color="tab:blue",
                 zorder=3, label="backbone + head")
    for r, bigger in zip(scored, [*scored[1:], None], strict=True):
        # Right of the point, and below it when the next larger model scores higher (it sits up there).
        below = bigger is not None and bigger["mean_iou"] >= r["mean_iou"]
        axes.annotate(f"{row_label(r)}  {r['mean_iou']:.3f}", (r["nparams"], r["mean_iou"]),
                      textcoords="offset points", xytext=(10, -8 if below else 8), ha="left",
                      va="center", fontsize=8.5, bbox=backing, zorder=2.5)
    if front:
        axes.step([r["nparams"] for r in front], [r["mean_iou"] for r in front], where="post",
                  color="tab:orange", linewidth=1.5, zorder=2, label="Pareto front (best IoU for its size)")
        axes.scatter([r["nparams"] for r in front], [r["mean_iou"] for r in front], s=110,
                     facecolors="none", edgecolors="tab:orange", linewidths=1.5, zorder=4)
    for r in (r for r in rows if r["mean_iou"] is None):  # not trained: marked on the bottom edge
        axes.plot(r["nparams"], 0.0, marker="x", markersize=9, color="tab:red", clip_on=False, zorder=5,
                  transform=axes.get_xaxis_transform())
        axes.annotate(f"{row_label(r)}: over budget", (r["nparams"], 0.0), xycoords=axes.get_xaxis_transform(),
                      textcoords="offset points", xytext=(-6, 8), ha="right", fontsize=8.5, color="tab:red", bbox=backing)
    axes.axvline(budget, color="tab:red", linestyle="--", linewidth=1,
                 label=f"budget: {budget / 1e6:g}M parameters")
    sizes = [r["nparams"] for r in rows] + [budget]
    axes.set_xscale("log")
    axes.set_xlim(min(sizes) / 1.6, max(sizes) * 1.6)
    axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(FuncFormatter(_millions))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("parameters, backbone + head (log scale)")
    axes.set_ylabel("mean IoU on held-out clips")
    clips = ", ".join(val_clips) if len(val_clips) <= 4 else f"{len(val_clips)} clips"
    axes.set_title(f"{dataset}: held-out mean IoU against model size" + (f" ({clips})" if val_clips else ""))
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8.5, frameon=False)
    figure.tight_layout()
    scratch = _temporary_sibling(path)
    try:
        figure.savefig(scratch, format="png")
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
