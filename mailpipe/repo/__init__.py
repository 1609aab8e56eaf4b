"""The backup repository: object stores, chunking, manifests, snapshots, checkpoints (docs/FORMAT.md).

Names are imported on first use, so that ``import mailpipe.repo.cli`` (the ``mailpipe`` command's
start-up) does not load pyarrow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IntegrityError": "repository", "Repository": "repository", "RepositoryError": "repository",
    "SnapshotInfo": "repository", "SnapshotWriter": "repository", "StoredContent": "repository",
    "mailbox_dir": "repository", "open_repository": "repository",
    "KeyNotFound": "store", "LocalStore": "store", "ObjectLocked": "store", "ObjectStore": "store", "S3Store": "store", "StoreError": "store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'mailpipe.repo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mailpipe.repo.{mod}"), name)
