"""The ``featstore`` command: parses arguments and calls the plain functions in ``jobs`` and ``featstore``.

Every command takes ``--store DIR`` and ``--json``; with ``--json`` the last line on stdout is one JSON
object, ``{"error": ...}`` when the command failed. Progress and logs go to stderr. A ``FeatstoreError``
becomes one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from featstore import __version__
from featstore.errors import FeatstoreError
from featstore.store import Store, default_store_root, recompute_hint
from featstore.units import format_bytes

Handler = Callable[[argparse.Namespace, Store], dict[str, Any]]


def _say(*lines: str) -> None:
    for line in lines:
        print(line)


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet


def cmd_build(args: argparse.Namespace, store: Store) -> dict[str, Any]:
    from jobs.featurize import build_features

    result = build_features(
        store,
        args.backbone,
        args.data,
        weights=args.weights,
        layers=args.layers,
        dtype=args.dtype,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        scheduler=args.scheduler,
        progress=_progress(args),
        wandb=args.wandb,
        force=args.force,
        jpeg_decoder=args.jpeg_decoder,
    )
    if not args.json:
        shapes = ", ".join(f"{layer} {'x'.join(map(str, s))}" for layer, s in result.shapes.items())
        _say(
            f"features          {result.ref}{'  (cached: nothing computed)' if result.cached else ''}",
            f"frames            {result.frames} in {result.clips} clips",
            f"feature shape     {shapes}",
            f"bytes on disk     {format_bytes(result.bytes)}",
            f"frames/s          {result.fps:.1f}" if not result.cached else "frames/s          - (cached)",
            f"nparams_backbone  {result.nparams_backbone:,}",
            f"path              {result.path}",
        )
    return result.to_json()


def cmd_train(args: argparse.Namespace, store: Store) -> dict[str, Any]:
    from jobs.train import train_decoders
    from jobs.training_curves import PLOT_FILE

    result = train_decoders(
        store,
        args.features,
        val_features=args.val_features,
        holdout_fraction=args.holdout_fraction,
        seed=args.seed,
        decoders=args.decoder or None,
        lrs=args.lr,
        weight_decays=args.weight_decay,
        epochs=args.epochs,
        batch_size=args.batch_size,
        budget=args.budget,
        device=args.device,
        progress=_progress(args),
        wandb=args.wandb,
        force=args.force,
    )
    out = result.to_json()
    plot = store.path(result.record) / PLOT_FILE
    out["plot"] = str(plot) if plot.is_file() else None  # decoders trained before the plot existed have none
    if not args.json:
        _say(
            f"decoder           {result.ref}{'  (cached: nothing trained)' if result.cached else ''}",
            f"best head         {out['head']['decoder']} lr={out['head']['lr']:g} of {len(out['heads'])} trained",
            f"val mean IoU      {out['val_mean_iou']:.4f}   (J {out['val_j_mean']:.4f}) on {', '.join(out['val_clips'])}"
            if out["val_mean_iou"] is not None
            else f"val mean IoU      - (trained on all {len(out['train_clips'])} clips: --holdout-fraction 0)",
            f"nparams           {out['nparams']:,} = backbone {out['nparams_backbone']:,} + head {out['nparams_head']:,}",
            f"nflops            {out['nflops']:,}",
            f"train frames/s    {out['train_frames_per_s']:.1f}",
        )
        if len(out["heads"]) > 1:
            for head in sorted(out["heads"], key=lambda h: -(h["val_mean_iou"] or 0)):
                _say(f"  {head['head']:<48} val IoU {head['val_mean_iou']:.4f}")
        if out["plot"]:
            _say(f"loss curves       {out['plot']}")
    return out


def cmd_predict(args: argparse.Namespace, store: Store) -> dict[str, Any]:
    from jobs.predict import predict_dataset

    result = predict_dataset(
        store,
        args.decoder,
        args.data,
        out=args.out,
        batch_size=args.batch_size,
        device=args.device,
        progress=_progress(args),
        wandb=args.wandb,
        force=args.force,
    )
    out = result.to_json()
    if not args.json:
        source = f"stored features {result.features}" if result.features else "the backbone run on the frames"
        _say(
            f"result            {result.ref}{'  (cached: nothing computed)' if result.cached else ''}",
            f"frames            {out['frames']} of dataset {out['dataset']}, from {source}",
            f"nparams           {out['nparams']:,}",
            f"out               {result.out}",
        )
        if result.out != result.folder:
            _say(f"stored as         {result.folder}")
    return out


def cmd_compare(args: argparse.Namespace, store: Store) -> dict[str, Any]:
    from jobs.compare import compare_backbones, row_label

    result = compare_backbones(
        store,
        args.data,
        args.backbones,
        decoders=args.decoder,
        weights=args.weights,
        holdout_fraction=args.holdout_fraction,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        budget=args.budget,
        device=args.device,
        out_dir=args.out,
        progress=_progress(args),
        force=args.force,
        jpeg_decoder=args.jpeg_decoder,
        wandb=args.wandb,
    )
    if not args.json:
        _say(
            f"leaderboard of {result.dataset}: mean IoU on held-out clips {', '.join(result.val_clips) or '-'}",
            result.leaderboard(),
        )
        for row in result.rows:
            if row["error"]:
                _say(f"{row_label(row)}: {row['error']}")
        _say(f"csv               {result.csv}", f"plot              {result.plot}")
    return result.to_json()


def cmd_ls(args: argparse.Namespace, store: Store) -> dict[str, Any]:
    damaged: list[str] = []
    records = store.list(args.type, damaged=damaged)
    for problem in damaged:
        print(f"featstore ls: warning: {problem}", file=sys.stderr)
    sizes = [store.disk_bytes(record) for record in records]
    if not args.json:
        if not records and not damaged:
            _say(f"no artifacts in {store.root}; try `featstore build --backbone efficientnet_lite0`")
        elif records:
            width = max(len(record.ref) for record in records)
            newest: dict[tuple[str, str], int] = {}
            for record in records:
                newest[record.type, record.name] = max(record.version, newest.get((record.type, record.name), 0))
            _say(f"{'TYPE':<9} {'REF':<{width}} {'SIZE':>9}  {'CREATED':<25}  KEY")
            for record, size in zip(records, sizes, strict=True):
                # "latest" only where a name has several versions: it says which one a bare name means.
                latest = record.version > 1 and newest[record.type, record.name] == record.version
                _say(f"{record.type:<9} {record.ref:<{width}} {format_bytes(size):>9}  {record.created:<25}  "
                     f"{record.key[:12]}{'  latest' if latest else ''}")
    summaries = [_summary(r.to_dict()) | {"bytes": size} for r, size in zip(records, sizes, strict=True)]
    return {"artifacts": summaries, "damaged": damaged}


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "manifest"} | {"files": len(record["manifest"])}


def cmd_show(args: argparse.Namespace, store: Store) -> dict[str, Any]:
    record = store.resolve(args.ref)
    lineage = _lineage(store, record.ref)
    out = record.to_dict() | {"path": str(store.path(record)), "lineage": lineage}
    if not args.json:
        _say(
            f"{record.type} {record.ref}",
            f"  path      {store.path(record)}",
            f"  key       {record.key}",
            f"  created   {record.created} (featstore {record.featstore_version})",
            f"  files     {len(record.manifest)}",
            "  lineage   " + ("made from:" if lineage else "(none)"),
            *_lineage_tree(store, record.parents, depth=2),
            "  metadata",
        )
        for key, value in record.metadata.items():
            text = json.dumps(value)
            _say(f"    {key}: {text if len(text) < 100 else text[:97] + '...'}")
    out.pop("manifest")
    return out


def _lineage(store: Store, ref: str) -> list[str]:
    """Ancestors of an artifact, nearest first (depth-first over parents)."""
    seen: list[str] = []
    stack = list(store.resolve(ref).parents)
    while stack:
        parent = stack.pop(0)
        if parent in seen:
            continue
        seen.append(parent)
        try:
            stack.extend(store.resolve(parent).parents)
        except FeatstoreError:
            continue
    return seen


def _lineage_tree(store: Store, parents: Sequence[str], depth: int, seen: set[str] | None = None) -> list[str]:
    """One line per parent, indented under what was made from it; a parent met before is not expanded again."""
    seen = set() if seen is None else seen
    lines = []
    for parent in parents:
        try:
            record = store.resolve(parent)
        except FeatstoreError as exc:
            lines.append(f"{'  ' * depth}{parent}  ({exc})")
            continue
        again = parent in seen
        lines.append(f"{'  ' * depth}{parent}  ({record.type}{', as above' if again and record.parents else ''})")
        if not again:
            seen.add(parent)
            lines += _lineage_tree(store, record.parents, depth + 1, seen)
    return lines


def cmd_verify(args: argparse.Namespace, store: Store) -> dict[str, Any]:
    record = store.resolve(args.ref)
    problems = store.verify(record)
    fix = recompute_hint(record.type) if problems else None
    if not args.json:
        if problems:
            _say(f"{record.ref}: {len(problems)} problem(s)", *(f"  {p}" for p in problems), f"fix: {fix}")
        else:
            _say(f"{record.ref}: ok, {len(record.manifest)} files match their sha256")
    result = {"ref": record.ref, "ok": not problems, "problems": problems, "files": len(record.manifest)}
    if fix:
        result["fix"] = fix
    if problems:
        raise _VerifyFailed(result)
    return result


class _VerifyFailed(Exception):
    def __init__(self, payload: dict[str, Any]) -> None:
        super().__init__("verification failed")
        self.payload = payload


def cmd_rm(args: argparse.Namespace, store: Store) -> dict[str, Any]:
    from featstore.removal import plan_removal, remove

    if args.dry_run:
        removal, freed = plan_removal(store, args.refs, cascade=args.cascade), None
    else:
        removal, freed = remove(store, args.refs, cascade=args.cascade)
    for warning in removal.warnings:
        print(f"featstore rm: warning: {warning}", file=sys.stderr)
    if not args.json:
        verb = "would remove" if freed is None else "removed"
        _say(*(f"{verb:<13} {record.ref}  ({record.type})" for record in removal.records))
        if freed is None:
            _say(f"{'would free':<13} {format_bytes(removal.bytes)}")
        else:
            _say(f"{'freed':<13} {format_bytes(freed)}")
    if freed is None:
        return {"would_remove": removal.refs, "bytes": removal.bytes, "dry_run": True}
    return {"removed": removal.refs, "bytes": freed, "dry_run": False}


def cmd_gc(args: argparse.Namespace, store: Store) -> dict[str, Any]:
    from featstore.removal import collect_garbage

    abandoned = collect_garbage(store, dry_run=args.dry_run)
    total = sum(item.bytes for item in abandoned)
    if not args.json:
        verb = "would remove" if args.dry_run else "removed"
        _say(*(f"{verb:<13} {item.path}  ({format_bytes(item.bytes)})" for item in abandoned))
        _say(f"{'would free' if args.dry_run else 'freed':<13} {format_bytes(total)} of unfinished work"
             + ("" if abandoned else "; no job left any"))
    return {"staging": [{"path": str(item.path), "bytes": item.bytes} for item in abandoned], "bytes": total,
            "dry_run": args.dry_run}


def cmd_evaluate(args: argparse.Namespace, store: Store) -> dict[str, Any]:
    from featstore.datasets import load_dataset
    from jobs.evaluate import evaluate

    data = args.data if args.data is not None else load_dataset(None, demo_root=store.root / "demo")
    scores = evaluate(args.result_dir, data, progress=False if args.quiet else None)
    result = scores.to_dict()
    if not args.json:
        _say(f"mean_iou  {scores.mean_iou:.4f}   (pooled over {scores.frames_scored} frames)", f"j_mean    {scores.j_mean:.4f}")
        for clip, value in scores.per_clip.items():
            _say(f"  {clip:<24} {value:.4f}")
    return result


def _add_common(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """``--store``, ``--json`` and ``--quiet``, accepted before the command name and after it.

    The command's copies default to ``SUPPRESS``, so they set a value only when given and never overwrite
    one given before the command.
    """
    unset: dict[str, Any] = {} if top_level else {"default": argparse.SUPPRESS}
    parser.add_argument(
        "--store",
        type=Path,
        **({"default": None} | unset),
        help=f"artifact store folder (default: $FEATSTORE_HOME, else {Path('~/.featstore')}; now {default_store_root()})",
    )
    parser.add_argument(
        "--json", action="store_true", **unset, help="print one JSON object as the last line of stdout"
    )
    parser.add_argument("--quiet", action="store_true", **unset, help="no progress bars")


def _add_jpeg_decoder(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--jpeg-decoder", default="auto", choices=["auto", "pil", "nvjpeg"],
        help="auto: nvJPEG on a GPU, PIL on the CPU; pil keeps CPU-identical pixels (and cache keys) on a GPU",
    )


def _add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="recompute even when the same inputs are committed; the result is a new version that supersedes "
        "the old one (how to replace a damaged artifact)",
    )


def _csv(value: str) -> list[str]:
    """A comma-separated list with no empty or repeated item (each item is one head, backbone or layer)."""
    items = [v.strip() for v in value.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"{value!r} has an empty item: separate items with single commas")
    repeated = sorted({v for v in items if items.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{value!r} lists {', '.join(repeated)} twice: give each once")
    return items


def _floats(value: str) -> list[float]:
    items = _csv(value)
    try:
        numbers = [float(v) for v in items]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of numbers") from exc
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{value!r} lists {', '.join(f'{n:g}' for n in repeated)} twice: give each once")
    return numbers


def _seed(value: str) -> int:
    """Seeds go to torch generators, which take 0 to 2**63 - 1."""
    try:
        seed = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from exc
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"{value} is out of range: use a seed from 0 to {2**63 - 1}")
    return seed


def _count(value: str) -> int:
    """A whole number, also written 5e7 or 50_000_000."""
    try:
        number = float(value.replace(",", ""))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of parameters") from exc
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of parameters")
    return int(number)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (every featstore error is one line), pointing at ``--help``
    rather than printing the usage block, plus the ``{"error": ...}`` line ``--json`` promises.

    Whether ``--json`` was given is read from the raw arguments: a usage error stops parsing before the
    option may have been reached.
    """

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            print(json.dumps({"error": f"{self.prog}: {message}"}))
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="featstore",
        description="Compute frozen-backbone features once, store them as versioned zarr artifacts, train decoders from them.",
    )
    parser.add_argument("--version", action="version", version=f"featstore {__version__}")
    _add_common(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = sub.add_parser("build", help="featurize every frame of a dataset into a feature artifact")
    build.add_argument("--backbone", required=True, help="alexnet, a torchvision model, timm:<name>, efficientnet_lite0/1/2")
    build.add_argument("--data", default=None, help="DAVIS folder, contest folder or paths.json (default: demo dataset)")
    build.add_argument("--weights", default="imagenet", help="imagenet, random, or a state-dict FILE")
    build.add_argument("--layers", type=_csv, default=None, help="comma-separated layer names (default: the backbone's)")
    build.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    build.add_argument("--batch-size", type=int, default=16)
    build.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    build.add_argument("--seed", type=_seed, default=0, help="seed of --weights random")
    _add_jpeg_decoder(build)
    build.add_argument("--scheduler", default=None, help="dask scheduler ADDRESS, or local:N for a LocalCluster")
    build.add_argument("--wandb", action="store_true", help="log the job to Weights & Biases (or FEATSTORE_WANDB=1)")
    _add_force(build)
    _add_common(build)
    build.set_defaults(handler=cmd_build)

    train = sub.add_parser("train", help="train decoder heads from device-resident features")
    train.add_argument("--features", required=True, help="feature artifact REF to train on")
    split = train.add_mutually_exclusive_group()
    split.add_argument("--val-features", default=None, help="feature artifact REF of the validation clips")
    split.add_argument("--holdout-fraction", type=float, default=0.25, help="fraction of clips held out (default 0.25); 0 trains one setting on every clip, unvalidated")
    train.add_argument("--seed", type=_seed, default=0, help="seed of the clip split, head initialisation and batches")
    train.add_argument("--decoder", type=_csv, default=None, help="head(s), comma-separated: linear, conv, fpn, temporal (default: fpn, the recommended head)")
    train.add_argument("--lr", type=_floats, default=[1e-3], help="learning rate(s), comma-separated: one head each")
    train.add_argument("--weight-decay", type=_floats, default=[1e-4], help="weight decay(s), comma-separated")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--budget", type=_count, default=50_000_000, help="max parameters, backbone plus head")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    train.add_argument("--wandb", action="store_true", help="log the job to Weights & Biases (or FEATSTORE_WANDB=1)")
    _add_force(train)
    _add_common(train)
    train.set_defaults(handler=cmd_train)

    predict = sub.add_parser("predict", help="run a decoder on a dataset and write a contest result artifact")
    predict.add_argument("--decoder", required=True, help="decoder artifact REF (see `featstore ls --type decoder`)")
    predict.add_argument("--data", default=None, help="DAVIS folder, contest folder or paths.json; annotations optional (default: demo dataset)")
    predict.add_argument("--out", type=Path, default=None, help="also place a copy of the result folder here (must not exist or be empty)")
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    predict.add_argument("--wandb", action="store_true", help="log the job to Weights & Biases (or FEATSTORE_WANDB=1)")
    _add_force(predict)
    _add_common(predict)
    predict.set_defaults(handler=cmd_predict)

    compare = sub.add_parser(
        "compare",
        help="build, train, predict and score backbones and heads on one clip split; print a leaderboard",
        description=(
            "For each backbone: build its features once (or reuse them); for each decoder on it, train a head "
            "on the training clips, predict the held-out clips into a contest result and score it. Prints a "
            "leaderboard with one row per backbone and decoder and writes "
            "compare.csv and compare.png (mean IoU against parameters, with the budget line). Everything is "
            "cached: running it again computes nothing."
        ),
    )
    compare.add_argument("--data", default=None, help="annotated DAVIS folder, contest folder or paths.json (default: demo dataset)")
    compare.add_argument(
        "--backbones",
        type=_csv,
        required=True,
        help="comma-separated backbones, each NAME or NAME@WEIGHTS (imagenet, random or a state-dict FILE), "
        "e.g. efficientnet_lite0,alexnet or tiny@random,timm:resnet18@random to compare without ImageNet weights",
    )
    compare.add_argument("--weights", default="imagenet", help="weights of entries without @WEIGHTS (default imagenet)")
    compare.add_argument("--decoder", type=_csv, default=None, help="head(s), comma-separated: linear, conv, fpn, temporal; each trained on every backbone, one leaderboard row per pair (default: fpn)")
    compare.add_argument("--epochs", type=int, default=10, help="training epochs of each head (default 10)")
    compare.add_argument("--batch-size", type=int, default=8, help="frames per training step and per prediction batch")
    compare.add_argument("--holdout-fraction", type=float, default=0.25, help="fraction of clips held out and scored (default 0.25)")
    compare.add_argument("--seed", type=_seed, default=0, help="seed of the clip split, head initialisation and batches")
    compare.add_argument("--budget", type=_count, default=50_000_000, help="max parameters, backbone plus head; larger models are listed, not trained")
    compare.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _add_jpeg_decoder(compare)
    compare.add_argument("--out", type=Path, default=None, help="folder for compare.csv and compare.png (default: <store>/compare/<dataset>/)")
    compare.add_argument("--wandb", action="store_true", help="log every job, the leaderboard and its plot to Weights & Biases, as one group (or FEATSTORE_WANDB=1)")
    _add_force(compare)
    _add_common(compare)
    compare.set_defaults(handler=cmd_compare)

    ls = sub.add_parser("ls", help="list committed artifacts")
    ls.add_argument("--type", choices=["dataset", "features", "decoder", "result"], default=None)
    _add_common(ls)
    ls.set_defaults(handler=cmd_ls)

    show = sub.add_parser("show", help="metadata and lineage of one artifact")
    show.add_argument("ref", help="NAME:vN, NAME:latest or NAME")
    _add_common(show)
    show.set_defaults(handler=cmd_show)

    verify = sub.add_parser("verify", help="re-hash every file of an artifact against its manifest")
    verify.add_argument("ref")
    _add_common(verify)
    verify.set_defaults(handler=cmd_verify)

    rm = sub.add_parser(
        "rm",
        help="remove committed versions to free disk (never their version numbers); refuses to orphan dependents",
    )
    rm.add_argument("refs", nargs="+", metavar="REF", help="NAME:vN, as `featstore ls` lists them")
    rm.add_argument("--cascade", action="store_true", help="also remove every artifact made from them")
    rm.add_argument("--dry-run", action="store_true", help="print what would be removed and freed; remove nothing")
    _add_common(rm)
    rm.set_defaults(handler=cmd_rm)

    gc = sub.add_parser(
        "gc", help="delete unfinished work of stopped jobs (their resumable staging folders) to free disk"
    )
    gc.add_argument("--dry-run", action="store_true", help="print what would be deleted and freed; delete nothing")
    _add_common(gc)
    gc.set_defaults(handler=cmd_gc)

    evaluate = sub.add_parser("evaluate", help="score a contest result folder against annotations")
    evaluate.add_argument("result_dir", type=Path)
    evaluate.add_argument("--data", default=None, help="the annotated dataset the results are for (default: demo dataset)")
    _add_common(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    _Parser.json_errors = "--json" in arguments
    args = build_parser().parse_args(arguments)
    store = Store(args.store) if args.store is not None else Store()
    handler: Handler = args.handler
    try:
        payload = handler(args, store)
    except _VerifyFailed as failed:
        if args.json:
            print(json.dumps(failed.payload))
        return 1
    except FeatstoreError as exc:
        print(f"featstore {args.command}: error: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": str(exc)}))
        return 1
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`): not an error of ours
        return 0
    except KeyboardInterrupt:
        print(f"featstore {args.command}: interrupted; nothing partial was committed", file=sys.stderr)
        return 130
    if args.json:
        sys.stdout.flush()
        print(json.dumps(payload, default=str))
    return 0


