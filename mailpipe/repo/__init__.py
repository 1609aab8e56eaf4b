"""The backup repository: object stores, chunking, manifests, snapshots, checkpoints (docs/FORMAT.md)."""

from mailpipe.repo.repository import (
    IntegrityError,
    Repository,
    RepositoryError,
    SnapshotInfo,
    SnapshotWriter,
    StoredContent,
    mailbox_dir,
    open_repository,
)
from mailpipe.repo.store import KeyNotFound, LocalStore, ObjectStore, S3Store, StoreError

__all__ = [
    "IntegrityError", "KeyNotFound", "LocalStore", "ObjectStore", "Repository", "RepositoryError", "S3Store",
    "SnapshotInfo", "SnapshotWriter", "StoreError", "StoredContent", "mailbox_dir", "open_repository",
]
