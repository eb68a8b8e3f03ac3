"""Mirror featstore jobs and their lineage into Weights & Biases.

Each job becomes one W&B run of its job type; its input artifacts are declared with ``use_artifact`` and
its outputs with ``log_artifact``, so the W&B lineage graph has the same edges as the local store. Feature
groups and datasets travel as ``file://`` references with checksums (the bytes stay in the store); decoders
and contest results travel as files. ``wandb`` is imported only when W&B is asked for, so jobs without
``--wandb`` never load or touch it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from featstore.errors import FeatstoreError
from featstore.store import ArtifactRecord, Store

if TYPE_CHECKING:
    from wandb import Artifact
    from wandb.sdk.wandb_run import Run

ENV_FLAG = "FEATSTORE_WANDB"
DEFAULT_PROJECT = "featstore"
FEATURES_GROUP = "features.zarr"
RESULT_METADATA = "metadata.json"
_TRUE = {"1", "true", "yes"}
_MODES_WITHOUT_LOGIN = {"offline", "dryrun", "disabled"}
_FIX = "run `wandb login`, or set WANDB_MODE=offline to record runs locally and `wandb sync` them later"
DATASET_CONTENT = "featstore_content.json"
_GROUP: contextvars.ContextVar[str | None] = contextvars.ContextVar("featstore_wandb_group", default=None)


@contextlib.contextmanager
def wandb_group(name: str) -> Iterator[None]:
    """Runs started inside share this W&B group: the jobs one ``featstore compare`` runs, say."""
    token = _GROUP.set(name)
    try:
        yield
    finally:
        _GROUP.reset(token)


def wandb_requested(flag: bool) -> bool:
    """True when ``--wandb`` was passed or ``FEATSTORE_WANDB`` is 1/true/yes."""
    return flag or os.environ.get(ENV_FLAG, "").strip().lower() in _TRUE


class WandbJob:
    """One job as a W&B run; a context manager whose methods do nothing when W&B was not requested.

    Typical use in a job::

        with WandbJob("train", {"lr": 1e-3}, enabled=wandb_requested(args.wandb), store=store) as job:
            job.use(features_record)
            job.log(decoder_record)  # also declares every local parent of the record as an input
    """

    def __init__(
        self,
        job_type: str,
        config: dict[str, Any],
        *,
        enabled: bool,
        project: str | None = None,
        store: Store | None = None,
    ) -> None:
        self.job_type = job_type
        self.config = dict(config)
        self.enabled = enabled
        self.project = project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        self._store = store
        self._run: Run | None = None
        self._used: set[str] = set()

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store()
        return self._store

    def __enter__(self) -> WandbJob:
        if not self.enabled:
            return self
        wandb = _import_wandb()
        _check_credentials()
        root = Path(os.environ.get("WANDB_DIR") or self.store.root).expanduser().absolute()
        try:
            root.mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(
                project=self.project,
                job_type=self.job_type,
                config=self.config,
                group=_GROUP.get(),
                dir=str(root),
                reinit="create_new",  # jobs that run other jobs get one run each, not a finished parent
            )
        except OSError as exc:
            raise FeatstoreError(
                f"cannot write W&B runs under {root} ({exc}): set WANDB_DIR to a writable folder"
            ) from exc
        except wandb.errors.Error as exc:
            raise FeatstoreError(f"W&B could not start a run: {exc}; {_FIX}") from exc
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._run is not None:
            self._run.finish(exit_code=0 if exc_type is None else 1)
            self._run = None

    def use(self, record: ArtifactRecord) -> None:
        """Declare a local artifact as an input of this run (once per run)."""
        run = self._run
        if run is None or run.disabled or record.ref in self._used:
            return
        artifact = self._to_wandb(record)
        aliases = self._aliases(record)
        if run.offline:
            # Run.use_artifact refuses offline because it waits for the server. What it sends online for a
            # draft artifact is a LogArtifact entry created by no run and used by this one; record exactly
            # that, so `wandb sync` creates (or finds by digest) the version and links it as an input.
            run._log_artifact(artifact, aliases=aliases, is_user_created=True, use_after_commit=True)
        else:
            run.use_artifact(artifact, aliases=aliases)
        self._used.add(record.ref)

    def log(self, record: ArtifactRecord) -> None:
        """Declare a local artifact as an output of this run, after its local parents as inputs."""
        run = self._run
        if run is None or run.disabled:
            return
        for parent in record.parents:
            if parent not in self._used:
                self.use(self.store.resolve(parent))
        run.log_artifact(self._to_wandb(record), aliases=self._aliases(record))
        run.name = f"{self.job_type} {record.ref}"

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        """Log the numbers among ``metrics``; ``None`` (nothing measured, as for a cache hit) is left out."""
        if self._run is not None:
            self._run.log({k: v for k, v in metrics.items() if v is not None})

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        """Log ``rows`` (dicts with the same keys) as one W&B table, shown as a sortable grid."""
        if self._run is not None and rows:
            import wandb

            columns = list(rows[0])
            data = [[row[c] for c in columns] for row in rows]
            self._run.log({key: wandb.Table(columns=list[str | int](columns), data=data)})

    def log_image(self, key: str, path: Path) -> None:
        if self._run is not None:
            import wandb

            self._run.log({key: wandb.Image(str(path))})

    def _aliases(self, record: ArtifactRecord) -> list[str]:
        """``featstore-vN`` names the local version (W&B numbers its own from v0, and reserves ``vN``).

        W&B gives ``latest`` to whatever was logged last, an older version used again included, so
        ``featstore-latest`` marks the local store's latest, and only that.
        """
        latest = self.store.resolve(record.name, type=record.type).ref == record.ref
        return [f"featstore-v{record.version}"] + (["featstore-latest"] if latest else [])

    def _to_wandb(self, record: ArtifactRecord) -> Artifact:
        import wandb

        root = self.store.path(record).absolute()
        artifact = wandb.Artifact(
            record.name,
            type=record.type,
            description=f"featstore {record.type} {record.ref}",
            metadata=_metadata(record, root),
        )
        if record.type == "features":
            group = root / FEATURES_GROUP
            if not group.is_dir():
                raise FeatstoreError(
                    f"feature artifact {record.ref} has no {FEATURES_GROUP} at {group}: run `featstore verify {record.ref}`"
                )
            # Every group file is in the manifest, so this bound never cuts a large group short.
            artifact.add_reference(
                group.as_uri(), name=FEATURES_GROUP, checksum=True, max_objects=max(1, len(record.manifest))
            )
        elif record.type == "dataset":
            for rel in sorted(record.manifest):
                artifact.add_reference((root / rel).as_uri(), name=rel, checksum=True)
            # The frame table lists paths, not pixels: two versions of a dataset whose files changed in place
            # would share one W&B version. Their content key tells them apart, as it does locally.
            with artifact.new_file(DATASET_CONTENT) as handle:
                json.dump({"key": record.key, "digest": record.metadata.get("digest")}, handle, sort_keys=True)
        else:
            # Committed files never change (the manifest guards them), so W&B need not copy them aside.
            for rel in sorted(record.manifest):
                artifact.add_file(str(root / rel), name=rel, policy="immutable")
        return artifact


def _metadata(record: ArtifactRecord, root: Path) -> dict[str, Any]:
    """The record's metadata plus its local identity; results also carry the contest ``metadata.json``."""
    metadata: dict[str, Any] = {}
    if record.type == "result":
        metadata_file = root / RESULT_METADATA
        try:
            metadata.update(json.loads(metadata_file.read_text()))
        except (OSError, ValueError) as exc:
            raise FeatstoreError(
                f"result {record.ref}: cannot read {metadata_file} ({exc}): run `featstore verify {record.ref}`"
            ) from exc
    metadata.update(record.metadata)
    if record.type == "result" and "nparams" not in metadata:
        raise FeatstoreError(
            f"result {record.ref} records no nparams in {root / RESULT_METADATA}; the contest needs it: "
            "predict again with this featstore version"
        )
    metadata.update(
        featstore_ref=record.ref,
        featstore_key=record.key,
        featstore_parents=list(record.parents),
        featstore_created=record.created,
        featstore_version=record.featstore_version,
    )
    return metadata


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as exc:
        raise FeatstoreError(
            f"--wandb (or {ENV_FLAG}=1) needs the wandb package ({exc}): `pip install wandb`, or drop --wandb"
        ) from exc
    return wandb


def _check_credentials() -> None:
    """Fail before any run starts when W&B would log online without an API key (instead of prompting).

    Uses W&B's own resolution of the mode (``WANDB_MODE``, ``wandb offline``) and of credentials
    (``WANDB_API_KEY``, netrc, settings files); it reads local configuration only, never the network.
    """
    from wandb.errors import AuthenticationError
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    settings = wandb_setup.singleton().settings
    if settings.mode in _MODES_WITHOUT_LOGIN:
        return
    host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
    try:
        auth = wbauth.authenticate_session(host=host, source="featstore", prompt=False, update_session=False)
    except AuthenticationError as exc:
        raise FeatstoreError(f"W&B credentials for {host} are invalid ({exc}): {_FIX}") from exc
    if auth is None:
        raise FeatstoreError(
            f"--wandb logs online to {host} but no W&B API key is configured "
            f"(WANDB_MODE={settings.mode}, no WANDB_API_KEY, no netrc entry): {_FIX}"
        )
