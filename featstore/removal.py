"""Removing committed versions: what ``featstore rm`` does to reclaim disk without breaking lineage.

Feature artifacts run to gigabytes per backbone, and ``--force`` leaves superseded versions behind, so a
store needs pruning. A version is removed by one atomic rename of its record to ``removed.json``: from
that instant no reader, cache lookup or ``ls`` sees it, and the folder stays as a tombstone so its version
number is never given to other content and ``NAME:vN`` can say it was removed. Its data files are deleted
after the rename; a removal killed part-way leaves only invisible files, which the next ``rm`` or ``gc`` deletes.
Artifacts made from a version (its dependents) go first, or the removal is refused, so no committed
version is left with a parent that is gone.

``featstore gc`` removes unfinished work instead: a build killed part-way keeps its staging folder so the
same build can resume, but once its inputs change that folder is never used again. A staging folder is
abandoned when its lock can be taken: a running job holds it for as long as it writes there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from featstore.errors import StoreError
from featstore.store import (
    ARTIFACT_TYPES,
    RECORD_FILE,
    REMOVED_FILE,
    TRASH_PREFIX,
    ArtifactRecord,
    Store,
    describe_os_error,
    discard_staging,
    staging_lock,
    write_json_atomic,
)


@dataclasses.dataclass(frozen=True)
class Removal:
    """The versions one removal takes, dependents before the artifacts they were made from."""

    records: tuple[ArtifactRecord, ...]
    bytes: int
    warnings: tuple[str, ...] = ()  # unreadable records, whose parents could not be checked

    @property
    def refs(self) -> list[str]:
        return [record.ref for record in self.records]


def dependents(
    store: Store, records: Sequence[ArtifactRecord], unreadable: list[str] | None = None
) -> list[ArtifactRecord]:
    """Every committed version made, directly or through others, from one of ``records``.

    Versions whose record cannot be read are described in ``unreadable`` (they cannot be checked).
    """
    everything = store.list(damaged=unreadable if unreadable is not None else [])
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
    chosen = _chosen(store, refs)
    unreadable: list[str] = []
    made_from = dependents(store, list(chosen.values()), unreadable)
    if made_from and not cascade:
        shown = ", ".join(record.ref for record in made_from[:6]) + (" ..." if len(made_from) > 6 else "")
        raise StoreError(
            f"{len(made_from)} artifact(s) were made from {', '.join(chosen)}: {shown}. Remove them first, or "
            "pass --cascade to remove them too"
        )
    among = {**chosen, **{record.ref: record for record in made_from}}
    # Deepest first: a removal stopped part-way never leaves a version whose parent is gone.
    ordered = sorted(among.values(), key=lambda record: -_depth(record, among))
    # The record itself stays, as the tombstone: everything else is freed.
    try:
        size = sum(_folder_bytes(store.path(r)) - (store.path(r) / RECORD_FILE).stat().st_size for r in ordered)
    except FileNotFoundError as exc:
        raise StoreError(f"{exc.filename} vanished while planning the removal: another rm is running; try again") from exc
    return Removal(tuple(ordered), size, tuple(unreadable))


def _chosen(store: Store, refs: Sequence[str]) -> dict[str, ArtifactRecord]:
    """The records ``refs`` name, each once; references need an explicit version."""
    chosen: dict[str, ArtifactRecord] = {}
    for ref in refs:
        if ":v" not in ref:
            raise StoreError(
                f"{ref!r}: name the version to remove, as NAME:vN (`featstore ls` lists them); removal never "
                "guesses a version"
            )
        try:
            record = store.resolve(ref)
        except StoreError:
            unreadable_version = _unreadable(store, ref)
            if unreadable_version is None:
                raise
            record = unreadable_version
        chosen[record.ref] = record
    return chosen


def remove(store: Store, refs: Sequence[str], *, cascade: bool) -> tuple[Removal, int]:
    """Remove versions (and with ``cascade`` their dependents); returns the plan and the bytes freed.

    Under the store's exclusive lineage lock each record is renamed to its tombstone, the moment the version
    disappears; no data is written before that, so a full disk does not stop it. The files are deleted
    next, and the tombstone is stamped with the time last.
    """
    _chosen(store, refs)  # refuse bad references before the lock file is created
    with store.lineage_lock(exclusive=True):
        removal = plan_removal(store, refs, cascade=cascade)  # again: a job may have committed meanwhile
        hidden = []
        for record in removal.records:
            folder = store.path(record)
            try:
                os.replace(folder / RECORD_FILE, folder / REMOVED_FILE)
            except FileNotFoundError:
                continue  # another `featstore rm` took it first
            except OSError as exc:
                raise StoreError(describe_os_error(exc, store.root)) from exc
            hidden.append(record)
    freed = sweep(store)
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    for record in hidden:
        # Best effort: without the stamp the tombstone still holds the record, and still reads as removed.
        with contextlib.suppress(OSError):
            write_json_atomic(store.path(record) / REMOVED_FILE, {"removed": when, "record": record.to_dict()})
    return dataclasses.replace(removal, records=tuple(hidden)), freed


def sweep(store: Store) -> int:
    """Delete the files left in tombstoned version folders; the bytes freed."""
    freed = 0
    for tombstone in store.root.glob(f"artifacts/*/*/v*/{REMOVED_FILE}"):
        folder = tombstone.parent
        if (folder / RECORD_FILE).exists():
            continue
        for entry in folder.iterdir():
            if entry.name == REMOVED_FILE:
                continue
            try:
                if entry.is_dir() and not entry.is_symlink():
                    size = _folder_bytes(entry)
                    shutil.rmtree(entry)
                else:
                    size = entry.lstat().st_size
                    entry.unlink()
            except FileNotFoundError:
                continue  # another rm or gc deleted it first
            except OSError as exc:
                raise StoreError(describe_os_error(exc, store.root)) from exc
            freed += size
    return freed


@dataclasses.dataclass(frozen=True)
class Abandoned:
    """A staging folder no running job holds: unfinished work of a job that was stopped."""

    path: Path
    bytes: int


def collect_garbage(store: Store, *, dry_run: bool = False) -> list[Abandoned]:
    """Delete (or with ``dry_run`` only list) abandoned staging folders, and files left by stopped deletions.

    Each folder is taken under its lock, so a job starting on that key waits, then starts afresh; a job
    that finished meanwhile has already deleted it. The lock files stay: deleting one that another process
    has open would let two writers in.
    """
    staging = store.root / "staging"
    found: list[Abandoned] = []
    for folder in sorted(staging.iterdir()) if staging.is_dir() else []:
        if not folder.is_dir():
            continue
        trashed = folder.name.startswith(TRASH_PREFIX)  # renamed aside: its job deletes it under the same lock
        try:
            with open(staging_lock(folder), "a+") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a running job is writing there, or deleting it
                try:
                    if folder.is_dir():  # else its job committed and removed it while we waited
                        found.append(Abandoned(folder, _folder_bytes(folder)))
                        if not dry_run:
                            if trashed:
                                shutil.rmtree(folder, ignore_errors=True)
                            else:
                                discard_staging(folder)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        except OSError as exc:
            raise StoreError(describe_os_error(exc, store.root)) from exc
    if not dry_run:
        sweep(store)
    return found


def _unreadable(store: Store, ref: str) -> ArtifactRecord | None:
    """A stand-in record for ``NAME:vN`` whose own record cannot be read, so rm can still drop it.

    Only the reference is known; dependents are found by it, since they name their parents by reference.
    """
    name, _, version = ref.strip().partition(":v")
    if not version.isdigit():
        return None
    for kind in ARTIFACT_TYPES:
        record_file = store.root / "artifacts" / kind / name / f"v{int(version)}" / RECORD_FILE
        if record_file.is_file() and not _readable(store, record_file):
            return ArtifactRecord(type=kind, name=name, version=int(version), key="", parents=(), created="",
                                  featstore_version="")
    return None


def _readable(store: Store, record_file: Path) -> bool:
    try:
        store.read_record(record_file)
    except StoreError:
        return False
    return True


def _depth(record: ArtifactRecord, among: dict[str, ArtifactRecord]) -> int:
    """Generations between ``record`` and the removed versions it descends from (0 for a chosen root)."""
    parents = [among[ref] for ref in record.parents if ref in among]
    return 1 + max((_depth(parent, among) for parent in parents), default=-1)


def _folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path``; files deleted meanwhile (by another rm or gc) count as nothing."""
    total = 0
    for entry in path.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            if entry.is_file() and not entry.is_symlink():
                total += entry.stat().st_size
    return total
