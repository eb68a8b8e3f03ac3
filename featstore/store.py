"""The artifact store: versioned, content-keyed artifacts that become visible only when committed.

Layout under the store root::

    artifacts/<type>/<name>/v<N>/artifact.json   the committed record (present iff the version is visible)
    artifacts/<type>/<name>/v<N>/...             the artifact's files, listed with their sha256 in the record
    staging/<type>-<key>/                        work in progress: resumable, invisible, one writer (flock)

A version is committed by writing every file, hashing them into a manifest, fsyncing, and renaming the
staging folder to ``v<N>`` in one ``rename(2)``: a killed job leaves nothing visible, and readers never
see a half-written version.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import difflib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featstore import __version__
from featstore.errors import StoreError

ARTIFACT_TYPES = ("dataset", "features", "decoder", "result")
RECORD_FILE = "artifact.json"
REMOVED_FILE = "removed.json"  # a version's tombstone, left by `featstore rm` (featstore.removal)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REF_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*?)(?::(?P<alias>v\d+|latest))?$")


def default_store_root() -> Path:
    """``$FEATSTORE_HOME`` when set, else ``~/.featstore``."""
    home = os.environ.get("FEATSTORE_HOME")
    return Path(home).expanduser() if home else Path.home() / ".featstore"


def sha256_file(path: Path, block: int = 1 << 22, *, fsync: bool = False) -> str:
    """Hex sha256 of a file's bytes, read in large blocks (hashlib releases the GIL on them).

    With ``fsync`` the file is also flushed to disk while it is open, so committing costs one pass.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
        if fsync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def hash_files(root: Path, relpaths: Sequence[str], *, fsync: bool = False) -> dict[str, str]:
    """sha256 of many files in parallel threads, keyed by their path relative to ``root``."""
    workers = min(16, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = pool.map(lambda rel: sha256_file(root / rel, fsync=fsync), relpaths)
        return dict(zip(relpaths, digests, strict=True))


def canonical_hash(payload: Any) -> str:
    """Content key of a JSON-able description: sha256 of its canonical JSON form."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def check_name(name: str) -> str:
    """Artifact names travel into paths and W&B, so they are restricted to a safe alphabet."""
    if not _NAME_RE.match(name):
        raise StoreError(
            f"artifact name {name!r} is not valid: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class ArtifactRecord:
    """Everything needed to trust and trace one artifact version."""

    type: str
    name: str
    version: int
    key: str
    parents: tuple[str, ...]
    created: str
    featstore_version: str
    metadata: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}:v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "key": self.key,
            "parents": list(self.parents),
            "created": self.created,
            "featstore_version": self.featstore_version,
            "metadata": self.metadata,
            "manifest": self.manifest,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArtifactRecord:
        return cls(
            type=data["type"],
            name=data["name"],
            version=int(data["version"]),
            key=data["key"],
            parents=tuple(data.get("parents", ())),
            created=data["created"],
            featstore_version=data.get("featstore_version", ""),
            metadata=dict(data.get("metadata", {})),
            manifest=dict(data.get("manifest", {})),
        )


def _fsync_folders(root: Path) -> None:
    """Flush every folder under ``root`` (their entries), so a rename that follows exposes only flushed data."""
    for dirpath, _dirnames, _filenames in os.walk(root):
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hidden_sibling(path: Path, suffix: str) -> Path:
    """A fresh hidden name beside ``path`` for work in progress, renamed onto ``path`` when complete.

    The caller creates it, so it gets the user's umask: tempfile's names come with modes 0600 and 0700,
    which would leave result folders and plots unreadable to the rest of a team.
    """
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temporary sibling and a rename, so readers see the old or the new file only."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _list_files(root: Path) -> list[str]:
    files = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            rel = os.path.relpath(os.path.join(dirpath, filename), root)
            if rel != RECORD_FILE:
                files.append(rel.replace(os.sep, "/"))
    return sorted(files)


class Staging:
    """A locked, resumable scratch folder for one content key; ``commit`` publishes it as the next version."""

    def __init__(
        self, store: Store, type: str, name: str, key: str, root: Path, *, fresh: bool = False, intact: bool = False
    ) -> None:
        self.store = store
        self.type = type
        self.name = name
        self.key = key
        self.root = root
        self.path = root / "data"
        self.scratch = root / "scratch"
        self.committed: ArtifactRecord | None = None if fresh else store.find(type, name, key)
        if intact and self.committed is not None and store.verify(self.committed):
            self.committed = None  # damaged: stage a new version

    def commit(self, parents: Sequence[str], metadata: dict[str, Any]) -> ArtifactRecord:
        """Hash every file, write the record, flush, and rename into the next free version, atomically."""
        if self.committed is not None:
            return self.committed
        try:
            # A run killed inside write_json_atomic leaves its temporary file behind; it is not data.
            for stale in self.path.rglob(".*.tmp-*"):
                stale.unlink()
            relpaths = _list_files(self.path)
            manifest = hash_files(self.path, relpaths, fsync=True)
            created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            versions_dir = self.store.root / "artifacts" / self.type / self.name
            versions_dir.mkdir(parents=True, exist_ok=True)
            _fsync_folders(self.path)
            with self.store.lineage_lock(exclusive=False):
                record = self._rename_in(parents, metadata, created, manifest, versions_dir)
            _fsync_dir(versions_dir)
        except OSError as exc:
            raise StoreError(describe_os_error(exc, self.store.root)) from exc
        self.committed = record
        return record

    def _rename_in(
        self, parents: Sequence[str], metadata: dict[str, Any], created: str, manifest: dict[str, str], versions_dir: Path
    ) -> ArtifactRecord:
        """Write the record and rename the data into the next free version; the parents must still exist."""
        for parent in parents:
            try:
                self.store.resolve(parent)
            except StoreError as exc:
                raise StoreError(
                    f"cannot commit {self.type} {self.name}: its input {parent} is gone ({exc}); run the job again"
                ) from exc
        while True:
            version = self.store._next_version(self.type, self.name)
            record = ArtifactRecord(
                type=self.type,
                name=self.name,
                version=version,
                key=self.key,
                parents=tuple(parents),
                created=created,
                featstore_version=__version__,
                metadata=metadata,
                manifest=manifest,
            )
            write_json_atomic(self.path / RECORD_FILE, record.to_dict())
            _fsync_dir(self.path)
            try:
                os.rename(self.path, versions_dir / f"v{version}")
            except OSError as exc:  # another writer took this version number first
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue
                raise
            return record


TRASH_PREFIX = ".trash-"


def staging_lock(folder: Path) -> Path:
    """The lock file of a staging folder, or of one renamed aside (``.trash-<name>.<token>``) for deletion.

    A job holds it while it writes in the folder, and while it deletes the folder once renamed aside.
    """
    name = folder.name
    if name.startswith(TRASH_PREFIX):
        name = name[len(TRASH_PREFIX) :].rpartition(".")[0]
    return folder.with_name(f"{name}.lock")


def discard_staging(root: Path) -> None:
    """Delete a staging folder so that no kill leaves part of it: rename it aside at once, then delete.

    ``rmtree`` alone, stopped half-way, could keep a clip's progress marker and lose its data, and the next
    run would resume past a clip it does not have. Folders renamed aside are deleted by ``featstore gc``
    when a kill stops the deletion itself.
    """
    trash = root.with_name(f"{TRASH_PREFIX}{root.name}.{secrets.token_hex(4)}")
    try:
        os.rename(root, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


_RECOMPUTED_BY = {"features": "featstore build", "decoder": "featstore train", "result": "featstore predict"}


def recompute_hint(type: str) -> str:
    """How to replace a damaged artifact: its job again with --force, which commits a fresh version."""
    command = _RECOMPUTED_BY.get(type)
    if command is None:  # datasets: every build checks its dataset's record and records it again if damaged
        return ("Run `featstore build` on that data again: it records the dataset anew (for a -holdout dataset, "
                "run the `featstore compare` that made it again)")
    return (f"Recompute it: run the `{command}` (or `featstore compare`) command that made it again with --force, "
            "which commits a new version that supersedes this one")


def describe_os_error(exc: OSError, root: Path) -> str:
    """One line naming the store and the fix for a failed write: full disk, size limit, permissions, bad path."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device holding the store {root}: free space or pass --store DIR on another disk"
    if exc.errno == errno.EFBIG:
        return (f"a file in the store {root} outgrew the allowed file size ({exc.strerror}): free space or raise "
                "the file-size limit (ulimit -f), or pass --store DIR on another disk")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"the store {root} is not writable ({exc.strerror}: {exc.filename}): fix its permissions or pass --store DIR"
    if exc.errno == errno.ENOTDIR:
        blocker = next((p for p in [root, *root.parents] if p.exists() and not p.is_dir()), exc.filename)
        return f"the store {root} cannot be created: {blocker} is a file, not a folder; pass --store DIR"
    return f"store {root}: {exc.strerror or exc} ({exc.filename})"


class Store:
    """A folder of versioned artifacts; see the module docstring for the layout and commit protocol."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root).expanduser().resolve() if root is not None else default_store_root()

    # --- reading -----------------------------------------------------------------------------------

    def path(self, record: ArtifactRecord) -> Path:
        return self.root / "artifacts" / record.type / record.name / f"v{record.version}"

    def disk_bytes(self, record: ArtifactRecord) -> int:
        """Bytes the version's files take (sizes of the manifest's files, plus the record)."""
        root = self.path(record)
        total = 0
        for rel in [*record.manifest, RECORD_FILE]:
            with contextlib.suppress(OSError):  # a missing file is verify's to report, not ls's
                total += (root / rel).stat().st_size
        return total

    def _records(self, type: str, name: str, damaged: builtins.list[str] | None = None) -> builtins.list[ArtifactRecord]:
        """The committed versions of ``name``; an unreadable record is an error, or noted in ``damaged``."""
        folder = self.root / "artifacts" / type / name
        if not folder.is_dir():
            return []
        records = []
        for entry in folder.iterdir():
            record_file = entry / RECORD_FILE
            if entry.name.startswith("v") and entry.name[1:].isdigit() and record_file.is_file():
                try:
                    records.append(self.read_record(record_file))
                except StoreError as exc:
                    if damaged is None:
                        raise
                    damaged.append(str(exc))
        return sorted(records, key=lambda r: r.version)

    def _removed_note(self, type: str, name: str, version: int | None) -> str | None:
        """``removed with `featstore rm` on <when>`` for a tombstoned version (None: the newest tombstone)."""
        folder = self.root / "artifacts" / type / name
        pattern = f"v{version}/{REMOVED_FILE}" if version is not None else f"v*/{REMOVED_FILE}"
        found = folder.glob(pattern) if folder.is_dir() else []
        notes = []
        for tombstone in sorted(found, key=lambda path: int(path.parent.name[1:]) if path.parent.name[1:].isdigit() else 0):
            try:
                notes.append(f"removed with `featstore rm` on {json.loads(tombstone.read_text())['removed']}")
            except (OSError, ValueError, KeyError, TypeError):
                notes.append("removed with `featstore rm`")
        return notes[-1] if notes else None

    def read_record(self, record_file: Path) -> ArtifactRecord:
        """Parse one ``artifact.json``; unreadable or malformed is a ``StoreError`` that names the fix."""
        try:
            return ArtifactRecord.from_dict(json.loads(record_file.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            version = record_file.parent
            raise StoreError(
                f"artifact record {record_file} is unreadable ({exc}): restore it, or drop that version with "
                f"`featstore rm {version.parent.name}:{version.name}`"
            ) from exc

    def _next_version(self, type: str, name: str) -> int:
        folder = self.root / "artifacts" / type / name
        numbers = [int(p.name[1:]) for p in folder.iterdir() if p.name.startswith("v") and p.name[1:].isdigit()]
        return max(numbers, default=0) + 1

    def list(self, type: str | None = None, damaged: builtins.list[str] | None = None) -> list[ArtifactRecord]:
        """Every committed version, ordered by type, name and version.

        With ``damaged``, a version whose record is unreadable is described there instead of failing the list.
        """
        types = [type] if type else list(ARTIFACT_TYPES)
        records: list[ArtifactRecord] = []
        for kind in types:
            folder = self.root / "artifacts" / kind
            if folder.is_dir():
                for name_dir in sorted(folder.iterdir()):
                    records.extend(self._records(kind, name_dir.name, damaged))
        return records

    def find(self, type: str, name: str, key: str) -> ArtifactRecord | None:
        """The newest committed version of ``name`` with this content key, if any: the cache lookup.

        Newest, because a version recomputed with ``--force`` supersedes the one it replaces.
        """
        for record in reversed(self._records(type, name)):
            if record.key == key:
                return record
        return None

    def resolve(self, ref: str, type: str | None = None) -> ArtifactRecord:
        """Turn ``name:vN``, ``name:latest`` or ``name`` (= latest) into a committed record."""
        match = _REF_RE.match(ref.strip())
        if not match:
            raise StoreError(f"{ref!r} is not an artifact reference: use NAME:vN or NAME:latest (see `featstore ls`)")
        name, alias = match["name"], match["alias"] or "latest"
        kinds = [type] if type else list(ARTIFACT_TYPES)
        unreadable: builtins.list[str] = []
        candidates = [r for kind in kinds for r in self._records(kind, name, unreadable)]
        if unreadable and (alias == "latest" or not candidates):  # the one asked for may be the unreadable one
            raise StoreError(unreadable[0])
        if not candidates:
            what = f"{type} artifact" if type else "artifact"
            notes = [note for kind in kinds if (note := self._removed_note(kind, name, None))]
            if notes:
                raise StoreError(f"every version of {name!r} was {notes[0]}: run the job that made it again")
            raise StoreError(f"no {what} named {name!r} in the store {self.root}: {self._ref_hint(name, type)}")
        if len({r.type for r in candidates}) > 1:
            raise StoreError(f"{name!r} names artifacts of several types; pass the type explicitly")
        if alias == "latest":
            return candidates[-1]
        version = int(alias[1:])
        for record in candidates:
            if record.version == version:
                return record
        if unreadable:  # the version asked for may be the one whose record is unreadable
            raise StoreError(unreadable[0])
        removed = self._removed_note(candidates[0].type, name, version)
        if removed:
            raise StoreError(f"{name}:v{version} was {removed}; known versions: {', '.join(r.ref for r in candidates)}")
        known = ", ".join(r.ref for r in candidates)
        raise StoreError(f"{ref!r} does not exist in the store {self.root}; known versions: {known}")

    def _ref_hint(self, name: str, type: str | None) -> str:
        """What a mistyped name probably meant: the same name as another type, or close names of this type."""
        kinds = [type] if type else list(ARTIFACT_TYPES)
        names = sorted({p.name for kind in kinds if (self.root / "artifacts" / kind).is_dir()
                        for p in (self.root / "artifacts" / kind).iterdir()})
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.8)
        suggestion = f"did you mean {' or '.join(close)}? " if close else ""
        if type is not None:  # without a type every kind was searched already
            other = next((kind for kind in ARTIFACT_TYPES if kind != type and self._records(kind, name, [])), None)
            if other is not None:
                return f"{name!r} is a {other} artifact, not a {type}; {suggestion}`featstore ls` lists the {type}s"
        return f"{suggestion}`featstore ls` lists what is there"

    def verify(self, record: ArtifactRecord, prefix: str = "") -> builtins.list[str]:  # `list` is a method here
        """Re-hash every file of the manifest (under ``prefix``); returns the problems found."""
        root = self.path(record)
        wanted = {rel: digest for rel, digest in record.manifest.items() if rel.startswith(prefix)}
        problems = [f"missing file {rel}" for rel in sorted(wanted) if not (root / rel).is_file()]
        present = [rel for rel in sorted(wanted) if (root / rel).is_file()]
        for rel, digest in hash_files(root, present).items():
            if digest != wanted[rel]:
                problems.append(f"changed file {rel} (sha256 {digest[:12]}..., recorded {wanted[rel][:12]}...)")
        if not prefix:
            extra = sorted(set(_list_files(root)) - set(record.manifest))
            problems.extend(f"unrecorded file {rel}" for rel in extra)
        return problems

    def require_intact(self, record: ArtifactRecord, prefix: str = "") -> None:
        """Refuse to read data whose files are missing or altered (zarr would read a missing chunk as zeros)."""
        problems = self.verify(record, prefix)
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise StoreError(
                f"artifact {record.ref} at {self.path(record)} is damaged: {shown}. {recompute_hint(record.type)}"
            )

    # --- writing -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lineage_lock(self, *, exclusive: bool) -> Iterator[None]:
        """Held shared by every commit (parents checked, then renamed in) and exclusive by ``featstore rm``.

        So a version is never removed between a job's check that its parents exist and its commit: the job
        either commits first (and rm then sees the new dependent) or finds the parent gone.
        """
        try:
            (self.root / "staging").mkdir(parents=True, exist_ok=True)
            handle = open(self.root / "staging" / "lineage.lock", "a+")  # noqa: SIM115 -- closed in finally
        except OSError as exc:
            raise StoreError(describe_os_error(exc, self.root)) from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    @contextlib.contextmanager
    def stage(
        self, type: str, name: str, key: str, *, fresh: bool = False, intact: bool = False
    ) -> Iterator[Staging]:
        """A staging area for one content key, held under an exclusive lock for one writer at a time.

        A second process staging the same key waits for the first; when the first committed, the second
        sees ``staging.committed`` and reuses it. An interrupted staging area is left in place so the
        next run can resume from what it finished. ``fresh`` (``--force``) ignores both: the staging
        area starts empty and commits a new version even when one with this key exists. ``intact`` reuses a
        committed version only if its files verify (checked under the lock, so two waiters commit one).
        """
        if type not in ARTIFACT_TYPES:
            raise StoreError(f"unknown artifact type {type!r}; expected one of {', '.join(ARTIFACT_TYPES)}")
        check_name(name)
        staging_root = self.root / "staging"
        try:
            staging_root.mkdir(parents=True, exist_ok=True)
            root = staging_root / f"{type}-{key[:32]}"
            lock = open(staging_lock(root), "a+")  # noqa: SIM115 -- held across the yield, closed in finally
        except OSError as exc:
            raise StoreError(describe_os_error(exc, self.root)) from exc
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"featstore: waiting for another job writing {type} {name} ({key[:12]})", file=sys.stderr)
                fcntl.flock(lock, fcntl.LOCK_EX)
            staging = Staging(self, type, name, key, root, fresh=fresh, intact=intact)
            if staging.committed is None:
                try:
                    # Progress markers without their data (a kill after the commit's rename moved the data
                    # away) would make the next run skip clips it no longer has.
                    if fresh or (staging.scratch.exists() and not staging.path.exists()):
                        discard_staging(root)
                    staging.path.mkdir(parents=True, exist_ok=True)
                    staging.scratch.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreError(describe_os_error(exc, self.root)) from exc
            yield staging
            if staging.committed is not None:
                discard_staging(root)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
