"""Removing committed versions: what ``featstore rm`` does to reclaim disk without breaking lineage.

Feature artifacts run to gigabytes per backbone, and ``--force`` leaves superseded versions behind, so a
store needs pruning. A version is removed by one atomic rename of its record to ``removed.json``: from
that instant no reader, cache lookup or ``ls`` sees it, and the folder stays as a tombstone so its version
number is never given to other content and ``NAME:vN`` can say it was removed. Its data files are deleted
after the rename; a removal killed part-way leaves only invisible files, which the next ``rm`` deletes.
Artifacts made from a version (its dependents) go first, or the removal is refused, so no committed
version is left with a parent that is gone.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from featstore.errors import StoreError
from featstore.store import (
    RECORD_FILE,
    REMOVED_FILE,
    ArtifactRecord,
    Store,
    describe_os_error,
    write_json_atomic,
)


@dataclass(frozen=True)
class Removal:
    """The versions one removal takes, dependents before the artifacts they were made from."""

    records: tuple[ArtifactRecord, ...]
    bytes: int

    @property
    def refs(self) -> list[str]:
        return [record.ref for record in self.records]


def dependents(store: Store, records: Sequence[ArtifactRecord]) -> list[ArtifactRecord]:
    """Every committed version made, directly or through others, from one of ``records``."""
    everything = store.list()
    reached = {record.ref for record in records}
    found: list[ArtifactRecord] = []
    changed = True
    while changed:
        changed = False
        for record in everything:
            if record.ref not in reached and reached.intersection(record.parents):
                reached.add(record.ref)
                found.append(record)
                changed = True
    return found


def plan_removal(store: Store, refs: Sequence[str], *, cascade: bool) -> Removal:
    """Resolve explicit ``NAME:vN`` references and order their removal; refuse to orphan a dependent."""
    chosen: list[ArtifactRecord] = []
    for ref in dict.fromkeys(refs):
        if ":v" not in ref:
            raise StoreError(
                f"{ref!r}: name the version to remove, as NAME:vN (`featstore ls` lists them); removal never "
                "guesses a version"
            )
        chosen.append(store.resolve(ref))
    made_from = dependents(store, chosen)
    if made_from and not cascade:
        shown = ", ".join(record.ref for record in made_from[:6]) + (" ..." if len(made_from) > 6 else "")
        raise StoreError(
            f"{len(made_from)} artifact(s) were made from {', '.join(r.ref for r in chosen)}: {shown}. Remove "
            "them first, or pass --cascade to remove them too"
        )
    # Deepest first: a removal stopped part-way never leaves a version whose parent is gone.
    depth = {record.ref: _depth(record, {r.ref: r for r in chosen + made_from}) for record in chosen + made_from}
    ordered = sorted(chosen + made_from, key=lambda record: -depth[record.ref])
    return Removal(tuple(ordered), sum(_folder_bytes(store.path(record)) for record in ordered))


def remove(store: Store, removal: Removal) -> None:
    """Hide each version by renaming its record to the tombstone, then delete its data files."""
    for record in removal.records:
        folder = store.path(record)
        tombstone = {
            "removed": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "record": record.to_dict(),
        }
        try:
            # The commit point: once the record is renamed the version is gone for every reader.
            os.replace(folder / RECORD_FILE, folder / REMOVED_FILE)
            write_json_atomic(folder / REMOVED_FILE, tombstone)
        except FileNotFoundError:
            continue  # another `featstore rm` took it first
        except OSError as exc:
            raise StoreError(describe_os_error(exc, store.root)) from exc
    sweep(store)


def sweep(store: Store) -> int:
    """Delete the data left in tombstoned version folders (by a removal that was stopped); bytes freed."""
    freed = 0
    for tombstone in store.root.glob(f"artifacts/*/*/v*/{REMOVED_FILE}"):
        folder = tombstone.parent
        if (folder / RECORD_FILE).exists():
            continue
        for entry in folder.iterdir():
            if entry.name == REMOVED_FILE:
                continue
            freed += _folder_bytes(entry) if entry.is_dir() else entry.stat().st_size
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return freed


def _depth(record: ArtifactRecord, among: dict[str, ArtifactRecord]) -> int:
    """Generations between ``record`` and the removed versions it descends from (0 for a chosen root)."""
    parents = [among[ref] for ref in record.parents if ref in among]
    return 1 + max((_depth(parent, among) for parent in parents), default=-1)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
